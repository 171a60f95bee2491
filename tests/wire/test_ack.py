"""Authenticated acknowledgements: only the key holder can produce a tag, and only for this request."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from pathlib import Path

import pytest

from flowtunnel.wire import (
    COMPACT_ACK_BYTES,
    AuthenticationFailed,
    Key,
    ack_tag,
    compact_ack,
    parse_compact_ack,
    verify_ack,
)

KEY = bytes(range(32))
NONCE = bytes.fromhex("000102030405060708090a0b")


def test_a_tag_verifies_for_exactly_the_answer_it_was_made_for() -> None:
    tag = ack_tag(KEY, agent_id="site-a", request_nonce=NONCE, acked=103)
    assert len(tag) == 22
    verify_ack(KEY, agent_id="site-a", request_nonce=NONCE, acked=103, tag=tag)
    verify_ack(Key(KEY), agent_id="site-a", request_nonce=NONCE, acked=103, tag=tag)


@pytest.mark.parametrize(
    ("key", "agent", "nonce", "acked"),
    [
        (bytes(32), "site-a", NONCE, 103),  # forged without the key
        (KEY, "site-b", NONCE, 103),  # another agent's answer
        (KEY, "site-a", bytes(12), 103),  # an old answer replayed for a new request
        (KEY, "site-a", NONCE, 10**9),  # acked inflated on the path
    ],
)
def test_any_other_answer_is_refused(key: bytes, agent: str, nonce: bytes, acked: int) -> None:
    tag = ack_tag(KEY, agent_id="site-a", request_nonce=NONCE, acked=103)
    with pytest.raises(AuthenticationFailed, match="does not authenticate") as info:
        verify_ack(key, agent_id=agent, request_nonce=nonce, acked=acked, tag=tag)
    assert KEY.hex()[:8] not in str(info.value)


@pytest.mark.parametrize("tag", [None, "", "x" * 21, "!" * 22, 12345])
def test_a_missing_or_malformed_tag_is_refused(tag: object) -> None:
    with pytest.raises(AuthenticationFailed):
        verify_ack(KEY, agent_id="site-a", request_nonce=NONCE, acked=1, tag=tag)


def test_the_documented_vector_follows_the_documented_formula() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text(encoding="utf-8")
    m = re.search(
        r"ack vector: agent `([^`]+)`, nonce `([0-9a-f]{24})`, acked `(\d+)` → tag `([A-Za-z0-9_-]{22})`", doc
    )
    assert m, "docs/protocol.md lacks the ack vector"
    agent, nonce, acked, tag = m.group(1), bytes.fromhex(m.group(2)), int(m.group(3)), m.group(4)
    assert ack_tag(KEY, agent_id=agent, request_nonce=nonce, acked=acked) == tag
    # the formula written in the document, computed independently
    ack_key = hmac.new(KEY, b"flowtunnel ack key v1", hashlib.sha256).digest()
    msg = b"flowtunnel-ack-v1" + bytes([len(agent)]) + agent.encode() + nonce + acked.to_bytes(8, "big")
    raw = hmac.new(ack_key, msg, hashlib.sha256).digest()[:16]
    assert base64.urlsafe_b64encode(raw).rstrip(b"=").decode() == tag


def test_the_compact_answer_carries_acked_and_the_tag_in_24_bytes() -> None:
    """``POST /v1/b``'s 200 (docs/protocol.md section 7): acked u64 big-endian, then the tag's raw bytes."""
    tag = ack_tag(KEY, agent_id="site-a", request_nonce=NONCE, acked=103)
    body = compact_ack(103, tag)
    assert len(body) == COMPACT_ACK_BYTES == 24
    assert body[:8] == (103).to_bytes(8, "big")
    assert body[8:] == base64.urlsafe_b64decode(tag + "==")
    acked, got = parse_compact_ack(body)
    assert (acked, got) == (103, tag)
    verify_ack(KEY, agent_id="site-a", request_nonce=NONCE, acked=acked, tag=got)


@pytest.mark.parametrize("body", [b"", bytes(23), bytes(25), b'{"acked": 1, "tag": "xy"}'])
def test_a_compact_answer_of_another_length_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError, match="compact answer of"):
        parse_compact_ack(body)


def test_a_compact_answer_forged_on_the_path_does_not_verify() -> None:
    tag = ack_tag(KEY, agent_id="site-a", request_nonce=NONCE, acked=103)
    forged = (10**9).to_bytes(8, "big") + compact_ack(103, tag)[8:]
    acked, got = parse_compact_ack(forged)
    with pytest.raises(AuthenticationFailed):
        verify_ack(KEY, agent_id="site-a", request_nonce=NONCE, acked=acked, tag=got)


def test_the_documented_compact_vector() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text(encoding="utf-8")
    m = re.search(r"nonce `([0-9a-f]{24})`, acked `(\d+)`\): body\s+`([0-9a-f]{48})`", doc)
    assert m, "docs/protocol.md lacks the compact answer vector"
    nonce, acked, body = bytes.fromhex(m.group(1)), int(m.group(2)), bytes.fromhex(m.group(3))
    assert compact_ack(acked, ack_tag(KEY, agent_id="site-a", request_nonce=nonce, acked=acked)) == body
