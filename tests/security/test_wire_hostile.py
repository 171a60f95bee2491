"""Hostile batches against the pure wire format: bombs, tampering, forged headers, hostile agent ids, fuzz.

The gateway calls ``peek_header`` and ``open_batch`` on every request body, so whatever they let through is
what a hostile client (or a rogue agent holding a valid key) can make the gateway do. Memory is measured with
``tracemalloc`` (zstandard allocates its output as a Python bytes object, so an inflated bomb would show).
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowtunnel.datagram import Datagram
from flowtunnel.wire import (
    HEADER,
    AuthenticationFailed,
    BadAgentId,
    Codec,
    Key,
    LimitExceeded,
    MalformedHeader,
    MalformedRecords,
    WireError,
    WireLimits,
    default_dictionary_id,
    format_key,
    open_batch,
    peek_header,
    seal_batch,
    validate_agent_id,
)
from flowtunnel.wire.codec import compress
from flowtunnel.wire.records import encode_block, write_uvarint
from tests.security.crafting import header_with_agent, seal_packed, zstd_rle_frame

KEY = bytes(range(32))
GIB = 1 << 30


@contextmanager
def peak_memory() -> Iterator[Callable[[], int]]:
    """Yields a function returning the peak traced allocation (bytes) since entering."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        yield lambda: tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def datagram(payload: bytes = b"\x00\x09" + b"\x11" * 98, exporter: str = "192.0.2.1") -> Datagram:
    return Datagram(received_ns=1_700_000_000_000_000_000, exporter=exporter, exporter_port=2055,
                    local_port=2055, payload=payload)


def sealed(count: int = 3, agent_id: str = "site-a") -> bytes:
    return seal_batch(agent_id=agent_id, key=KEY, first_seq=10, datagrams=[datagram()] * count,
                      nonce=b"\x01" * 12)


# -- decompression bombs ------------------------------------------------------------------------------------


def test_crafted_bomb_frame_is_a_real_zstd_bomb() -> None:
    """The bomb used below really inflates (so the rejections are not an artefact of a broken frame)."""
    frame = zstd_rle_frame(4 << 20, declare=4 << 20)
    assert len(frame) < 200
    assert zstandard.ZstdDecompressor().decompress(frame) == bytes(4 << 20)


def test_bomb_declaring_its_size_is_refused_from_the_header_before_any_work() -> None:
    frame = zstd_rle_frame(GIB, declare=GIB)
    body = seal_packed(agent_id="rogue", key=KEY, packed=frame, raw_len=GIB, count=1)
    with peak_memory() as peak:
        with pytest.raises(LimitExceeded, match="max_raw"):
            peek_header(body)
        with pytest.raises(LimitExceeded, match="max_raw"):
            open_batch(body, key=KEY)
        assert peak() < 4 << 20


@pytest.mark.parametrize("declare", [4096, None, GIB], ids=["lying-size", "no-size", "true-size"])
def test_bomb_inside_a_validly_sealed_batch_is_refused_before_it_is_inflated(declare: int | None) -> None:
    # The header claims a small record block; the authenticated frame inflates to 1 GiB.
    frame = zstd_rle_frame(GIB, declare=declare)
    body = seal_packed(agent_id="rogue", key=KEY, packed=frame, raw_len=4096, count=1)
    peek_header(body)  # the header alone is unremarkable
    with peak_memory() as peak:
        with pytest.raises(MalformedRecords, match="zstd"):
            open_batch(body, key=KEY)
        assert peak() < 4 << 20


def test_bomb_asking_for_a_huge_window_is_refused() -> None:
    frame = zstd_rle_frame(1 << 20, declare=1 << 20, window_log=31)
    body = seal_packed(agent_id="rogue", key=KEY, packed=frame, raw_len=1 << 20, count=1)
    with peak_memory() as peak:
        with pytest.raises(MalformedRecords, match="window"):
            open_batch(body, key=KEY)
        assert peak() < 4 << 20


def test_honest_block_at_the_raw_limit_costs_at_most_a_few_times_the_limit() -> None:
    limit = 4 << 20
    frame = zstd_rle_frame(limit, declare=limit)
    body = seal_packed(agent_id="rogue", key=KEY, packed=frame, raw_len=limit, count=1)
    with peak_memory() as peak:
        with pytest.raises(WireError):  # zeros are not a valid record block
            open_batch(body, key=KEY, limits=WireLimits(max_raw=limit))
        assert peak() < 3 * limit


def _columnar_layout_bomb(steps: int) -> bytes:
    """One 1-byte datagram whose columnar layout repeats an empty step ``steps`` times (3 bytes each)."""

    def evil(payloads: object) -> bytes:
        out = bytearray()
        write_uvarint(1, out)  # one record group
        write_uvarint(1, out)  # of record length 1
        ops = bytearray(b"\x00\x01\x00" * steps) + b"\x01\x00"  # (0 verbatim, group 0, 0 records) ...
        write_uvarint(len(ops), out)
        out += ops
        write_uvarint(1, out)
        out += b"x"
        return bytes(out)

    raw = encode_block([datagram(b"x")], None, evil)
    dict_id = default_dictionary_id()
    packed = compress(raw, Codec.COLUMNAR, dict_id=dict_id)
    return seal_packed(agent_id="rogue", key=KEY, packed=packed, raw_len=len(raw), count=1,
                       codec=Codec.COLUMNAR, dict_id=dict_id)


def test_columnar_layout_of_empty_steps_is_refused() -> None:
    """Regression (found by this suite): empty layout steps cost a tuple each, without limit."""
    body = _columnar_layout_bomb(10_000)
    assert len(body) < 1000
    with pytest.raises(MalformedRecords):
        open_batch(body, key=KEY)


# -- tampering ----------------------------------------------------------------------------------------------


def test_every_single_bit_flip_anywhere_is_refused() -> None:
    body = sealed()
    assert len(open_batch(body, key=KEY).datagrams) == 3
    for pos in range(len(body)):
        for mask in (0x01, 0x80):
            bad = bytearray(body)
            bad[pos] ^= mask
            with pytest.raises(WireError):
                open_batch(bytes(bad), key=KEY)


def test_every_truncation_and_any_extension_is_refused() -> None:
    body = sealed()
    for cut in range(len(body)):
        with pytest.raises(WireError):
            open_batch(body[:cut], key=KEY)
    for extra in (b"\x00", b"\x00" * 16, body):
        with pytest.raises(MalformedHeader):
            open_batch(body + extra, key=KEY)


def test_batch_of_one_agent_does_not_open_as_another_even_with_the_same_key() -> None:
    body = bytearray(sealed(agent_id="site-a"))
    at = HEADER.size
    body[at : at + 6] = b"site-b"
    with pytest.raises(AuthenticationFailed):
        open_batch(bytes(body), key=KEY)


def test_wrong_key_is_refused_and_the_message_names_no_key() -> None:
    other = bytes(32 - i for i in range(32))
    with pytest.raises(AuthenticationFailed) as info:
        open_batch(sealed(), key=other)
    text = str(info.value)
    for secret in (KEY, other):
        assert secret.hex() not in text
        assert format_key(secret) not in text


# -- hostile agent ids --------------------------------------------------------------------------------------

HOSTILE_IDS = [
    "",
    ".",
    "..",
    "../../etc/passwd",
    "a/../../b",
    "a\\..\\b",
    "/abs",
    "a" * 64,
    "a" * 100_000,
    "a\x00b",
    "a\nb",
    "site\n",
    "a\r\nX-Injected: 1",
    "a b",
    "a\tb",
    "-leading-dash",
    ".hidden",
    "caf\u00e9",
    "\u202eevil",
    "a;rm -rf",
    "a%2f..",
    "a\x1b[31m",
]


@pytest.mark.parametrize("agent_id", HOSTILE_IDS, ids=lambda s: repr(s[:20]))
def test_hostile_agent_id_is_refused_with_a_short_printable_message(agent_id: str) -> None:
    with pytest.raises(BadAgentId) as info:
        validate_agent_id(agent_id)
    message = str(info.value)
    assert len(message) < 300
    assert message.isprintable()


@pytest.mark.parametrize("agent_id", HOSTILE_IDS[1:], ids=lambda s: repr(s[:20]))
def test_hostile_agent_id_cannot_be_sealed(agent_id: str) -> None:
    with pytest.raises(BadAgentId):
        seal_batch(agent_id=agent_id, key=KEY, first_seq=1, datagrams=[datagram()], nonce=b"\x00" * 12)


@pytest.mark.parametrize(
    "raw",
    [s.encode("utf-8", "surrogatepass")[:255] for s in HOSTILE_IDS[1:]] + [b"\xff\xfe", b"a\x80b"],
    ids=lambda b: repr(b[:20]),
)
def test_hostile_agent_id_in_a_batch_header_is_refused_before_any_key_lookup(raw: bytes) -> None:
    with pytest.raises(WireError) as info:
        peek_header(header_with_agent(raw))
    assert str(info.value).isprintable()


# -- fuzz ---------------------------------------------------------------------------------------------------

_VALID = sealed(count=5)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bodies_only_ever_raise_wire_errors(body: bytes) -> None:
    with pytest.raises(WireError):
        open_batch(body, key=KEY)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(1, 255)), min_size=1, max_size=8))
def test_mutated_valid_batches_are_refused(edits: list[tuple[int, int]]) -> None:
    bad = bytearray(_VALID)
    for pos, mask in edits:
        bad[pos] ^= mask
    if bytes(bad) == _VALID:
        return
    with pytest.raises(WireError):
        open_batch(bytes(bad), key=KEY)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=2048), st.integers(0, 5))
def test_authenticated_garbage_records_raise_wire_errors_only(block: bytes, count: int) -> None:
    """A rogue agent with a valid key can put anything inside: the parser must still fail cleanly."""
    body = seal_packed(agent_id="rogue", key=KEY, packed=block, raw_len=len(block), count=count,
                       codec=Codec.NONE)
    try:
        batch = open_batch(body, key=KEY)
    except WireError:
        return
    assert len(batch.datagrams) == count


# -- secrets in reprs ---------------------------------------------------------------------------------------


def test_key_objects_and_batches_never_show_the_secret() -> None:
    key = Key(KEY)
    text = format_key(KEY)
    batch = open_batch(sealed(), key=KEY)
    for shown in (repr(key), str(key), f"{key}", repr(peek_header(sealed())), repr(batch)):
        assert text not in shown
        assert KEY.hex() not in shown
        assert repr(KEY) not in shown
    assert key.fingerprint in repr(key)
