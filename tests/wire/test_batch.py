"""Sealed batches: round trip, tampering, truncation, garbage, limits, decompression bombs, dictionaries."""

from __future__ import annotations

import contextlib
import os
import random
import struct
import tracemalloc

import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowtunnel.datagram import Datagram
from flowtunnel.wire import (
    AUTO_COLUMNAR_BYTES,
    CODEC_OFFSET,
    FLAG_CONTEXT,
    FLAGS_OFFSET,
    HEADER,
    MAGIC,
    NONCE_BYTES,
    NONCE_OFFSET,
    AuthenticationFailed,
    BadMagic,
    Codec,
    LimitExceeded,
    MalformedHeader,
    MalformedRecords,
    Truncated,
    UnknownDictionary,
    UnsupportedVersion,
    WireError,
    WireLimits,
    default_dictionary_id,
    open_batch,
    peek_header,
    seal_batch,
)
from flowtunnel.wire.records import decode_block, encode_block

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NONCE = bytes(12)
T0 = 1_764_000_000_000_000_000


def dg(i: int, payload: bytes | None = None, exporter: str = "192.0.2.1", port: int = 9995) -> Datagram:
    return Datagram(
        received_ns=T0 + i * 1_000_000, exporter=exporter, exporter_port=port, local_port=2055,
        payload=payload if payload is not None else bytes([0, 9]) + i.to_bytes(2, "big") + bytes(60),
    )


def seal(datagrams: list[Datagram], **kw: object) -> bytes:
    args: dict[str, object] = {"agent_id": "site-a", "key": KEY, "first_seq": 101, "nonce": NONCE}
    args.update(kw)
    return seal_batch(datagrams=datagrams, **args)  # type: ignore[arg-type]


def seal_raw(packed: bytes, *, raw_len: int, count: int, codec: int = 1, dict_id: int = 0) -> bytes:
    """A validly sealed batch around arbitrary (compressed) plaintext: what a malicious agent with a real
    key could send."""
    agent = b"site-a"
    header = HEADER.pack(MAGIC, 1, 0, codec, len(agent), dict_id, 1, count, raw_len, len(packed) + 16, NONCE)
    header += agent
    return header + ChaCha20Poly1305(KEY).encrypt(NONCE, packed, header)


addresses = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
datagrams_st = st.lists(
    st.builds(
        Datagram,
        received_ns=st.integers(0, (1 << 63) - 1),
        exporter=addresses,
        exporter_port=st.integers(0, 65535),
        local_port=st.integers(0, 65535),
        payload=st.binary(max_size=2000),
    ),
    max_size=40,
)


@given(datagrams_st, st.sampled_from([None, *Codec]), st.integers(1, (1 << 64) - 41))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip_gives_back_every_datagram(
    datagrams: list[Datagram], codec: Codec | None, first_seq: int
) -> None:
    body = seal(datagrams, codec=codec, first_seq=first_seq, agent_info={"backlog": 7, "dropped:quota": 0})
    batch = open_batch(body, key=KEY)
    assert batch.datagrams == tuple(datagrams)
    assert batch.agent_id == "site-a"
    assert batch.first_seq == first_seq
    assert batch.last_seq == first_seq + len(datagrams) - 1
    assert dict(batch.agent_info) == {"backlog": 7, "dropped:quota": 0}
    hdr = peek_header(body)
    assert (hdr.count, hdr.first_seq, hdr.agent_id) == (len(datagrams), first_seq, "site-a")
    assert hdr.codec == codec or codec is None


def test_an_empty_batch_proves_identity_and_carries_nothing() -> None:
    body = seal([], first_seq=0)
    batch = open_batch(body, key=KEY)
    assert batch.datagrams == ()
    assert batch.header.count == 0
    with pytest.raises(AuthenticationFailed):
        open_batch(body, key=OTHER_KEY)


def test_the_default_codec_picks_the_smaller_of_codecs_2_and_3_for_small_batches() -> None:
    tiny = peek_header(seal([dg(1)]))
    assert (tiny.codec, tiny.dict_id) in {(Codec.ZSTD_DICT, 0x46540001), (Codec.COLUMNAR, 0x46540003)}
    for payload in (bytes(300), bytes(range(256)) * 3):
        auto = len(seal([dg(1, payload), dg(2, payload)]))
        two = len(seal([dg(1, payload), dg(2, payload)], codec=Codec.ZSTD_DICT))
        three = len(seal([dg(1, payload), dg(2, payload)], codec=Codec.COLUMNAR))
        assert auto == min(two, three)
    v5 = struct.pack(">HH", 5, 30) + bytes(20) + bytes(range(48)) * 30
    big = peek_header(seal([dg(i, v5) for i in range(AUTO_COLUMNAR_BYTES // len(v5) + 1)]))
    assert big.raw_len >= AUTO_COLUMNAR_BYTES
    assert (big.codec, big.dict_id) == (Codec.COLUMNAR, default_dictionary_id(Codec.COLUMNAR))
    with pytest.raises(ValueError, match="explicit codec"):
        seal([dg(1)], dict_id=default_dictionary_id())


def test_wrong_key_fails_authentication_and_the_message_holds_no_key_bytes() -> None:
    with pytest.raises(AuthenticationFailed, match="site-a") as info:
        open_batch(seal([dg(1), dg(2)]), key=OTHER_KEY)
    assert info.value.code == "authentication-failed"
    assert OTHER_KEY.hex()[:8] not in str(info.value)
    assert KEY.hex()[:8] not in str(info.value)


def test_changing_any_byte_is_detected() -> None:
    body = seal([dg(i) for i in range(5)], agent_info={"backlog": 3})
    for i in range(len(body)):
        tampered = bytearray(body)
        tampered[i] ^= 0x01
        with pytest.raises(WireError) as info:
            open_batch(bytes(tampered), key=KEY)
        # a changed header field may be refused by its check before the tag is even computed
        if i >= peek_header(body).header_len:
            assert isinstance(info.value, AuthenticationFailed)


def test_every_truncation_raises_a_wire_error() -> None:
    body = seal([dg(i) for i in range(3)])
    for n in range(len(body)):
        with pytest.raises(WireError) as info:
            open_batch(body[:n], key=KEY)
        assert info.value.code in ("truncated", "malformed-header")  # the body's fault, not the key's
    with pytest.raises(Truncated, match="shorter than its header and sealed length"):
        open_batch(body[:-1], key=KEY)


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(MalformedHeader, match="1 bytes after the sealed block"):
        open_batch(seal([dg(1)]) + b"x", key=KEY)


def test_random_bytes_raise_only_wire_errors() -> None:
    rnd = random.Random(42)
    body = seal([dg(1)])
    for _ in range(2000):
        n = rnd.randrange(0, 300)
        prefix = body[: rnd.randrange(len(body))]
        candidates = [rnd.randbytes(n), MAGIC + rnd.randbytes(n), prefix + rnd.randbytes(n)]
        for junk in candidates:
            with pytest.raises(WireError):
                open_batch(junk, key=KEY)


@pytest.mark.parametrize("context", [None, b"the previous block"])
def test_header_offsets_are_where_peek_header_reads_them(context: bytes | None) -> None:
    """The agent reads a sealed body's flags, codec and nonce at these offsets (one home: issue 14)."""
    body = seal([dg(i) for i in range(3)], nonce=bytes(range(12)), codec=Codec.ZSTD, context=context)
    head = peek_header(body)
    assert body[FLAGS_OFFSET] == head.flags
    assert bool(body[FLAGS_OFFSET] & FLAG_CONTEXT) == (context is not None)
    assert body[CODEC_OFFSET] == head.codec
    assert body[NONCE_OFFSET:NONCE_OFFSET + NONCE_BYTES] == head.nonce == bytes(range(12))


def test_header_errors_name_the_field() -> None:
    body = bytearray(seal([dg(1)]))
    with pytest.raises(BadMagic, match="magic"):
        open_batch(b"GET / HTTP/1.1\r\n" + bytes(50), key=KEY)
    v2 = bytearray(body)
    v2[4] = 2
    with pytest.raises(UnsupportedVersion, match="version 2"):
        peek_header(bytes(v2))
    flags = bytearray(body)
    flags[5] = 0x80
    with pytest.raises(MalformedHeader, match="flags 0x80"):
        peek_header(bytes(flags))
    codec = bytearray(body)
    codec[6] = 9
    with pytest.raises(MalformedHeader, match="codec id 9"):
        peek_header(bytes(codec))
    agent = bytearray(body)
    agent[HEADER.size] = ord("/")
    with pytest.raises(MalformedHeader, match="agent id"):
        peek_header(bytes(agent))


def test_unknown_dictionary_is_refused_before_decryption() -> None:
    body = bytearray(seal([dg(1)]))
    struct.pack_into(">I", body, 8, 12345)
    with pytest.raises(UnknownDictionary, match="12345"):
        open_batch(bytes(body), key=KEY)


def test_declared_sizes_over_the_limits_are_refused_before_any_work() -> None:
    datagrams = [dg(i) for i in range(20)]
    body = seal(datagrams)
    with pytest.raises(LimitExceeded, match="max_body 100") as info:
        open_batch(body, key=KEY, limits=WireLimits(max_body=100))
    assert info.value.code == "limit-exceeded"
    with pytest.raises(LimitExceeded, match="20 datagrams exceeds max_count 10"):
        open_batch(body, key=KEY, limits=WireLimits(max_count=10))
    with pytest.raises(LimitExceeded, match="max_raw 100"):
        open_batch(body, key=KEY, limits=WireLimits(max_raw=100))
    with pytest.raises(LimitExceeded, match="64 bytes, max_datagram is 63"):
        open_batch(body, key=KEY, limits=WireLimits(max_datagram=63))
    many = [dg(i, exporter=f"10.0.0.{i}") for i in range(5)]
    with pytest.raises(LimitExceeded, match="5 sources"):
        open_batch(seal(many), key=KEY, limits=WireLimits(max_exporters=4))


def test_a_decompression_bomb_is_refused_without_inflating_it() -> None:
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(256 << 20))  # 256 MiB of zeros, ~8 KiB
    assert len(bomb) < 100_000
    # declares 256 MiB in its header: over max_raw
    with pytest.raises(LimitExceeded, match="max_raw"):
        open_batch(seal_raw(bomb, raw_len=256 << 20, count=1), key=KEY)
    # lies in our header (1000 bytes), the frame says 256 MiB: refused from the frame header alone
    lying = seal_raw(bomb, raw_len=1000, count=1)
    tracemalloc.start()
    try:
        with pytest.raises(MalformedRecords, match="content size 268435456, header says raw length 1000"):
            open_batch(lying, key=KEY)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20
    # a frame without a content size (streamed) is refused too: it could inflate to anything
    cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    streamed = cobj.compress(bytes(1 << 20)) + cobj.flush()
    with pytest.raises(MalformedRecords, match="no content size"):
        open_batch(seal_raw(streamed, raw_len=1000, count=1), key=KEY)


def test_an_authenticated_but_inconsistent_record_block_is_malformed() -> None:
    block = encode_block([dg(1), dg(2)])
    # declares 3 records, carries 2
    with pytest.raises(MalformedRecords):
        open_batch(seal_raw(block, raw_len=len(block), count=3, codec=0), key=KEY)
    # declares 1 record: the second one's bytes are trailing garbage
    with pytest.raises(MalformedRecords):
        open_batch(seal_raw(block, raw_len=len(block), count=1, codec=0), key=KEY)
    packed = zstandard.ZstdCompressor().compress(block) + b"zz"
    with pytest.raises(MalformedRecords, match="zstd"):
        open_batch(seal_raw(packed, raw_len=len(block), count=2), key=KEY)


def test_sealing_refuses_caller_mistakes() -> None:
    with pytest.raises(ValueError, match="nonce must be 12 bytes"):
        seal([dg(1)], nonce=b"short")
    with pytest.raises(ValueError, match="agent id"):
        seal([dg(1)], agent_id="../x")
    with pytest.raises(ValueError, match="key must be 32 bytes"):
        seal([dg(1)], key=b"k" * 16)
    with pytest.raises(ValueError, match="not an IP address"):
        seal([dg(1, exporter="example.org")])
    with pytest.raises(ValueError, match="first_seq 0"):
        seal([dg(1)], first_seq=0)
    with pytest.raises(ValueError, match="agent_info key"):
        seal([dg(1)], agent_info={"Bad Key": 1})
    with pytest.raises(ValueError, match="takes no dictionary"):
        seal([dg(1)], codec=Codec.ZSTD, dict_id=default_dictionary_id())


@given(st.binary(max_size=300), st.integers(0, 20))
@settings(max_examples=500, deadline=None)
def test_the_record_block_parser_raises_only_wire_errors(block: bytes, count: int) -> None:
    with contextlib.suppress(WireError):
        decode_block(block, count, max_datagram=65535, max_exporters=16)


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_a_mutated_record_block_never_escapes_as_another_error(data: st.DataObject) -> None:
    block = bytearray(encode_block([dg(1), dg(2, exporter="2001:db8::1")], {"backlog": 300}))
    for _ in range(data.draw(st.integers(1, 4))):
        block[data.draw(st.integers(0, len(block) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(WireError):
        decode_block(bytes(block), 2, max_datagram=65535, max_exporters=16)


# -- the vectorised record columns against the per-value reference ----------------------------------------


def _outcome(block: bytes, count: int, *, reference: bool) -> object:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("flowtunnel.wire.records.FAST_MIN_RECORDS", 0)  # vectorised at any size
        if reference:
            mp.setattr("flowtunnel.wire.records._fast_columns", lambda *_a: None)
        try:
            datagrams, info = decode_block(block, count, max_datagram=1000, max_exporters=16)
        except WireError as exc:
            return type(exc), str(exc)
    return datagrams, info


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_the_vectorised_columns_agree_with_the_reference_parser(data: st.DataObject) -> None:
    times = data.draw(st.lists(st.integers(0, (1 << 63) - 1), min_size=1, max_size=6))
    datagrams = [
        Datagram(received_ns=t, exporter=data.draw(st.sampled_from(["192.0.2.1", "2001:db8::1"])),
                 exporter_port=9995, local_port=2055, payload=data.draw(st.binary(max_size=20)))
        for t in times
    ]
    block = bytearray(encode_block(datagrams, {"acked": 5}))
    for _ in range(data.draw(st.integers(0, 3))):
        block[data.draw(st.integers(0, len(block) - 1))] = data.draw(st.integers(0, 255))
    count = len(datagrams) + data.draw(st.sampled_from([0, 0, 0, -1, 1]))
    fast = _outcome(bytes(block), count, reference=False)
    assert fast == _outcome(bytes(block), count, reference=True)  # same datagrams, or the same error
    if block == encode_block(datagrams, {"acked": 5}) and count == len(datagrams):
        assert fast == (datagrams, {"acked": 5})


def test_a_receive_time_needing_a_ten_byte_varint_still_decodes() -> None:
    # the vectorised path takes varints of up to 9 bytes; the reference parser takes over for the rest
    datagrams = [dg(1), Datagram(received_ns=(1 << 63) - 1, exporter="192.0.2.1", exporter_port=1,
                                 local_port=2, payload=b"x"), dg(2)]
    assert open_batch(seal(datagrams), key=KEY).datagrams == tuple(datagrams)


def test_a_context_batch_names_its_context_and_opens_only_against_it() -> None:
    """docs/protocol.md section 3.3: flag 0x01, the context id in dict_id, the frame's checksum guarding
    against a different context under the same id; a refusal before anything is decoded."""
    from flowtunnel.wire import FLAG_CONTEXT, UnknownContext, context_id, seal_batch_and_context

    key = bytes(range(32))
    first = [Datagram(received_ns=10**18, exporter="192.0.2.1", exporter_port=2055, local_port=2055,
                      payload=b"\x00\x09" + bytes(range(200)))]
    second = [Datagram(received_ns=10**18 + 1, exporter="192.0.2.1", exporter_port=2055, local_port=2055,
                       payload=b"\x00\x09" + bytes(range(1, 201)))]
    body1, context = seal_batch_and_context(agent_id="a", key=key, first_seq=1, datagrams=first,
                                            nonce=bytes(12))
    assert open_batch(body1, key=key).context == context
    for codec in (None, Codec.ZSTD, Codec.COLUMNAR):
        body = seal_batch(agent_id="a", key=key, first_seq=2, datagrams=second, nonce=bytes(12),
                          codec=codec, context=context)
        hdr = peek_header(body)
        assert (hdr.flags, hdr.dict_id) == (FLAG_CONTEXT, context_id(context))
        assert hdr.codec == (codec or Codec.COLUMNAR)
        assert open_batch(body, key=key, contexts={hdr.dict_id: context}).datagrams == tuple(second)
        with pytest.raises(UnknownContext, match="does not hold"):
            open_batch(body, key=key, contexts={hdr.dict_id + 1: context})
        with pytest.raises(UnknownContext, match="not the context"):
            open_batch(body, key=key, contexts={hdr.dict_id: bytes(b ^ 1 for b in context)})
    with pytest.raises(ValueError, match="context"):
        seal_batch(agent_id="a", key=key, first_seq=2, datagrams=second, nonce=bytes(12),
                   codec=Codec.ZSTD_DICT, context=context)
    with pytest.raises(ValueError, match="context"):
        seal_batch(agent_id="a", key=key, first_seq=2, datagrams=second, nonce=bytes(12), context=b"")


def test_the_context_flag_is_refused_with_other_codecs_and_unknown_flags_are_refused() -> None:
    key = bytes(range(32))
    body = bytearray(seal_batch(agent_id="a", key=key, first_seq=1, datagrams=[], nonce=bytes(12)))
    body[5] = 0x08  # 0x02 and 0x04 are the stream flags (tests/wire/test_lzstream.py)
    with pytest.raises(MalformedHeader, match="0x08 has unknown bits"):
        peek_header(bytes(body))
    body[5] = 0x01  # codec 0 with the context flag
    with pytest.raises(MalformedHeader, match="context batch needs codec 1 or 3"):
        peek_header(bytes(body))


def test_contexts_chain_the_recent_batches_and_both_sides_derive_the_same() -> None:
    """docs/protocol.md section 3.3 (since 2026-12-06): the context a batch leaves is the tail of the context
    it used followed by its own record block, so a batch of one datagram still compresses against the ones
    before it; sealer and opener derive the same next context from the header's context and the block."""
    from flowtunnel.wire import CONTEXT_BYTES, context_id, seal_batch_and_context

    key = bytes(range(32))

    def dgram(i: int) -> Datagram:
        return Datagram(received_ns=10**18 + i, exporter="192.0.2.1", exporter_port=2055, local_port=2055,
                        payload=b"\x00\x09" + bytes((i * 7 + j) % 251 for j in range(300)))

    context: bytes | None = None
    opener: dict[int, bytes] = {}
    leaves: list[bytes] = []
    for i in range(4):
        body, left = seal_batch_and_context(agent_id="a", key=key, first_seq=i + 1, datagrams=[dgram(i)],
                                            nonce=bytes(12), context=context, codec=Codec.ZSTD)
        batch = open_batch(body, key=key, contexts=opener)
        assert batch.context == left
        opener[context_id(left)] = left  # what the gateway remembers
        leaves.append(left)
        context = left
    assert leaves[0] in leaves[1]  # the first block is still in the second's context ...
    assert leaves[2].startswith(leaves[0])  # ... and the third's
    assert len(leaves[3]) < CONTEXT_BYTES
    # a block larger than the context keeps only its own tail
    big = [Datagram(received_ns=10**18, exporter="192.0.2.1", exporter_port=2055, local_port=2055,
                    payload=os.urandom(40_000))]
    _, left = seal_batch_and_context(agent_id="a", key=key, first_seq=9, datagrams=big, nonce=bytes(12),
                                     context=context, codec=Codec.ZSTD)
    assert len(left) == CONTEXT_BYTES
    assert left == left[-CONTEXT_BYTES:]
    assert context is not None
    assert context not in left
