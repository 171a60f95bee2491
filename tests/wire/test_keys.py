"""Keys and agent ids: text form round trip, precise errors that never echo the key, masked reprs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowtunnel.wire import BadAgentId, BadKey, Key, WireError, format_key, generate_key, parse_key
from flowtunnel.wire.keys import key_fingerprint, validate_agent_id


@given(st.binary(min_size=32, max_size=32))
def test_format_then_parse_gives_the_same_key(raw: bytes) -> None:
    text = format_key(raw)
    assert text.startswith("ftk1_")
    assert len(text) == 48
    assert parse_key(text) == raw
    assert parse_key(text[5:]) == raw  # prefix optional
    assert parse_key(f"  {text}\n") == raw


def test_generate_key_uses_given_bytes_or_fresh_randomness() -> None:
    assert generate_key(bytes(range(32))) == bytes(range(32))
    a, b = generate_key(), generate_key()
    assert len(a) == 32
    assert a != b
    with pytest.raises(BadKey, match="32 bytes, got 16"):
        generate_key(bytes(16))


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("ftk1_" + "A" * 42, "got 42 characters"),
        ("ftk1_" + "A" * 44, "got 44 characters"),
        ("ftk1_" + "A" * 42 + "!", "outside the base64url alphabet"),
        ("ftk1_" + "A" * 42 + "=", "outside the base64url alphabet"),
        ("ftk1_" + "A" * 42 + "B", "not canonical"),
        ("", "got 0 characters"),
    ],
)
def test_bad_key_texts_are_refused_without_echoing_them(text: str, why: str) -> None:
    with pytest.raises(BadKey, match=why) as info:
        parse_key(text)
    assert "A" * 20 not in str(info.value)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, WireError)


def test_key_object_masks_the_secret() -> None:
    raw = bytes(range(32))
    k = Key(raw)
    text = format_key(raw)
    for shown in (repr(k), str(k), f"{k}", repr([k])):
        assert text[5:15] not in shown
        assert raw.hex()[:16] not in shown
        assert key_fingerprint(raw) in shown
    assert k.secret == raw
    assert bytes(k) == raw
    assert Key.parse(text) == k
    assert k.text() == text
    assert Key.generate() != k


@pytest.mark.parametrize("agent_id", ["a", "site-a", "Site_A.01", "x" * 63, "0abc"])
def test_valid_agent_ids_pass(agent_id: str) -> None:
    assert validate_agent_id(agent_id) == agent_id


@pytest.mark.parametrize(
    ("agent_id", "why"),
    [
        ("", "is empty"),
        ("x" * 64, "64 characters long, the limit is 63"),
        ("../etc", "must start with a letter or digit"),
        (".hidden", "must start with a letter or digit"),
        ("a/b", "may only contain"),
        ("a b", "may only contain"),
        ("a\x00b", "may only contain"),
        ("a\n", "may only contain"),
        ("é", "must start with a letter or digit"),
    ],
)
def test_invalid_agent_ids_are_refused_with_the_reason(agent_id: str, why: str) -> None:
    with pytest.raises(BadAgentId, match=why):
        validate_agent_id(agent_id)
