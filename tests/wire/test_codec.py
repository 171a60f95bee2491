"""Codec 4 (columnar record block through raw LZMA2): round trip, and hostile streams refused with a WireError
before they are inflated past the header's raw length."""

from __future__ import annotations

import contextlib
import lzma
import os
import random
import struct
import threading
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowtunnel.datagram import Datagram
from flowtunnel.wire import (
    AuthenticationFailed,
    Codec,
    LimitExceeded,
    MalformedHeader,
    MalformedRecords,
    TemplateLengths,
    WireError,
    lzstream,
    open_batch,
    peek_header,
)
from flowtunnel.wire.codec import LZMA_DICT_SIZE, compress, decompress
from flowtunnel.wire.columnar import payload_encoder
from flowtunnel.wire.records import encode_block
from tests.wire.test_batch import KEY, datagrams_st, dg, seal, seal_raw

LZMA4 = int(Codec.COLUMNAR_LZMA)


def lzma_raw(data: bytes, preset: int = 6) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": preset}])


def columnar_block(datagrams: list[Datagram]) -> bytes:
    return encode_block(datagrams, None, payload_encoder(None))


@given(datagrams_st, st.integers(0, 9))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip_at_every_preset(datagrams: list[Datagram], preset: int) -> None:
    body = seal(datagrams, codec=Codec.COLUMNAR_LZMA, level=preset, agent_info={"acked": 5})
    hdr = peek_header(body)
    assert (hdr.codec, hdr.dict_id) == (Codec.COLUMNAR_LZMA, 0)
    batch = open_batch(body, key=KEY)
    assert batch.datagrams == tuple(datagrams)
    assert dict(batch.agent_info) == {"acked": 5}


def test_v9_records_cut_by_the_template_cache_round_trip_and_beat_codec_3() -> None:
    # a v9 export: one template (id 256: srcaddr, in_bytes, 4 bytes each), then data sets of 50 records each
    def v9(seq: int, flowset: bytes) -> bytes:
        return struct.pack(">HHIIII", 9, 1, 0, 0, seq, 0) + flowset

    template = v9(0, bytes.fromhex("00000010" "01000002" "00080004" "00010004"))
    datagrams = [dg(0, template)]
    for i in range(1, 200):
        records = b"".join(bytes([10, 0, i % 7, r]) + (i * 40 + r).to_bytes(4, "big") for r in range(50))
        datagrams.append(dg(i, v9(i, struct.pack(">HH", 256, 4 + len(records)) + records)))
    lengths = TemplateLengths()
    for d in datagrams:
        lengths.learn(d.payload)
    assert lengths.record_length(datagrams[1].payload, 256) == 8
    body4 = seal(datagrams, codec=Codec.COLUMNAR_LZMA, record_length=lengths.record_length)
    body3 = seal(datagrams, codec=Codec.COLUMNAR, record_length=lengths.record_length)
    assert open_batch(body4, key=KEY).datagrams == tuple(datagrams)
    assert len(body4) < len(body3)


def test_a_bomb_is_refused_without_inflating_it() -> None:
    bomb = lzma_raw(bytes(256 << 20), preset=0)  # 256 MiB of zeros in ~40 KiB
    assert len(bomb) < 100_000
    with pytest.raises(LimitExceeded, match="max_raw"):
        open_batch(seal_raw(bomb, raw_len=256 << 20, count=1, codec=LZMA4), key=KEY)
    lying = seal_raw(bomb, raw_len=1000, count=1, codec=LZMA4)
    tracemalloc.start()
    try:
        with pytest.raises(MalformedRecords, match="more than the header's raw length 1000"):
            open_batch(lying, key=KEY)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def test_a_stream_shorter_than_declared_truncated_or_followed_by_bytes_is_refused() -> None:
    block = columnar_block([dg(1), dg(2)])
    packed = lzma_raw(block)
    with pytest.raises(MalformedRecords, match=f"inflated to {len(block)} bytes"):
        open_batch(seal_raw(packed, raw_len=len(block) + 1, count=2, codec=LZMA4), key=KEY)
    with pytest.raises(MalformedRecords, match="extra bytes"):
        open_batch(seal_raw(packed + b"\x00", raw_len=len(block), count=2, codec=LZMA4), key=KEY)
    for cut in range(len(packed)):
        with pytest.raises(MalformedRecords):
            open_batch(seal_raw(packed[:cut], raw_len=len(block), count=2, codec=LZMA4), key=KEY)
    assert open_batch(seal_raw(packed, raw_len=len(block), count=2, codec=LZMA4), key=KEY).datagrams == (
        dg(1), dg(2),
    )


def test_tampering_fails_authentication_and_a_bad_stream_is_only_ever_a_wire_error() -> None:
    body = seal([dg(1), dg(2)], codec=Codec.COLUMNAR_LZMA)
    for i in range(len(body)):
        changed = bytearray(body)
        changed[i] ^= 0x01
        with pytest.raises(WireError):
            open_batch(bytes(changed), key=KEY)
    changed = bytearray(body)
    changed[-20] ^= 0x40  # in the ciphertext
    with pytest.raises(AuthenticationFailed):
        open_batch(bytes(changed), key=KEY)
    # an authentic (resealed) stream with a flipped byte: a wire error, never another exception
    block = columnar_block([dg(1), dg(2)])
    packed = lzma_raw(block)
    for i in range(len(packed)):
        flipped = bytearray(packed)
        flipped[i] ^= 0x20
        try:
            batch = open_batch(seal_raw(bytes(flipped), raw_len=len(block), count=2, codec=LZMA4), key=KEY)
        except WireError:
            continue
        assert len(batch.datagrams) == 2


@given(st.binary(max_size=400), st.integers(2, 5000), st.integers(0, 3))
@settings(max_examples=300, deadline=None)
def test_random_plaintext_raises_only_wire_errors(packed: bytes, raw_len: int, count: int) -> None:
    if raw_len < 2 + 3 * count:
        return
    with contextlib.suppress(WireError):
        open_batch(seal_raw(packed, raw_len=raw_len, count=count, codec=LZMA4), key=KEY)


def test_decompress_gives_exactly_the_declared_bytes() -> None:
    data = bytes(range(256)) * 300
    packed = compress(data, Codec.COLUMNAR_LZMA, level=6)
    assert decompress(packed, Codec.COLUMNAR_LZMA, dict_id=0, raw_len=len(data)) == data
    # whatever dictionary the encoder used, the receiver's raw_len-sized one suffices
    big_dict = lzma.compress(data, format=lzma.FORMAT_RAW,
                             filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 64 << 20}])
    assert decompress(big_dict, Codec.COLUMNAR_LZMA, dict_id=0, raw_len=len(data)) == data
    assert LZMA_DICT_SIZE >= 4096


def test_codec_4_takes_no_dictionary_and_only_presets_0_to_9() -> None:
    body = bytearray(seal([dg(1)], codec=Codec.COLUMNAR_LZMA))
    body[8:12] = (0x46540003).to_bytes(4, "big")
    with pytest.raises(MalformedHeader, match="takes no dictionary"):
        peek_header(bytes(body))
    with pytest.raises(ValueError, match="takes no dictionary"):
        seal([dg(1)], codec=Codec.COLUMNAR_LZMA, dict_id=0x46540003)
    with pytest.raises(ValueError, match="preset 10"):
        seal([dg(1)], codec=Codec.COLUMNAR_LZMA, level=10)


def test_compressors_are_kept_once_for_the_process_and_a_few_only() -> None:
    """issue 14: the agent seals in whichever worker thread is free; compressors kept per thread held a copy
    each (~1 MB a compressor at 50 KB batches), and the level-15 ones of a quiet start stayed for good."""
    import threading

    from flowtunnel.wire import codec

    raw = bytes(range(256)) * 40
    dict_id = codec.default_dictionary_id(Codec.ZSTD_DICT)
    codec._idle.clear()
    for _ in range(3):  # three worker threads in turn, one compressor
        t = threading.Thread(target=compress, args=(raw, Codec.ZSTD_DICT), kwargs={"dict_id": dict_id})
        t.start()
        t.join()
    assert list(codec._idle) == [(dict_id, codec.DEFAULT_LEVEL, True)]
    for level in (3, 9, 15, 19):
        compress(raw, Codec.ZSTD_DICT, dict_id=dict_id, level=level)
    assert list(codec._idle) == [(dict_id, level, True) for level in (9, 15, 19)]


def test_released_compressors_and_tables_are_those_of_other_dictionaries() -> None:
    """issue 14: the agent seals by one way between trials; the other way's compressor and its precomputed
    tables (~1.4 MB at level 6) need not stay in memory, nor anything once the context wins."""
    from flowtunnel.wire import codec

    raw = bytes(range(256)) * 40
    plain = codec.default_dictionary_id(Codec.ZSTD_DICT)
    columnar = codec.default_dictionary_id(Codec.COLUMNAR)
    codec.release_compressors()
    assert not codec._idle
    assert not codec._tables
    compress(raw, Codec.ZSTD_DICT, dict_id=plain)
    compress(raw, Codec.COLUMNAR, dict_id=columnar)
    assert {k[0] for k in codec._idle} == {k[0] for k in codec._tables} == {plain, columnar}
    codec.release_compressors(keep=(columnar,))
    assert list(codec._idle) == [(columnar, codec.DEFAULT_LEVEL, True)]
    assert list(codec._tables) == [(columnar, codec.DEFAULT_LEVEL)]
    assert decompress(compress(raw, Codec.COLUMNAR, dict_id=columnar), Codec.COLUMNAR, dict_id=columnar,
                      raw_len=len(raw)) == raw


def test_zstd_decompressors_are_set_up_once_per_thread_and_dictionary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gateway opens thousands of small batches a second: a decompressor set up for the 64 KiB dictionary
    each time cost more than the decompression (issue 16). One is kept per thread and dictionary, and a
    failed frame does not spoil it for the next."""
    import threading

    import zstandard

    from flowtunnel.wire import codec

    made: list[object] = []
    real = zstandard.ZstdDecompressor

    def counting(*args: object, **kwargs: object) -> zstandard.ZstdDecompressor:
        made.append(kwargs.get("dict_data"))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(zstandard, "ZstdDecompressor", counting)
    monkeypatch.setattr(codec, "_decompressors", threading.local(), raising=False)
    dict_id = codec.default_dictionary_id(2)
    raw = b"netflow " * 100
    frame = compress(raw, Codec.ZSTD_DICT, dict_id=dict_id)
    plain = compress(raw, Codec.ZSTD)
    for _ in range(5):
        assert decompress(frame, Codec.ZSTD_DICT, dict_id=dict_id, raw_len=len(raw)) == raw
        assert decompress(plain, Codec.ZSTD, dict_id=0, raw_len=len(raw)) == raw
    with pytest.raises(MalformedRecords):
        decompress(frame[:-3] + b"\0\0\0", Codec.ZSTD_DICT, dict_id=dict_id, raw_len=len(raw))
    assert decompress(frame, Codec.ZSTD_DICT, dict_id=dict_id, raw_len=len(raw)) == raw
    assert len(made) == 2
    other: list[bytes] = []
    worker = threading.Thread(
        target=lambda: other.append(decompress(frame, Codec.ZSTD_DICT, dict_id=dict_id, raw_len=len(raw)))
    )
    worker.start()
    worker.join()
    assert other == [raw]
    assert len(made) == 3  # its own in another thread


def test_an_lzma2_block_is_compressed_with_a_dictionary_no_larger_than_it_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """issue 14: LEAN's LZMA2 encoder, made for each batch, sized its tables for 256 KiB of dictionary
    (~1.3 MB) whatever the batch; a 48 KB batch needs 64 KiB (~0.9 MB). Large blocks keep LZMA_DICT_SIZE."""
    from flowtunnel.wire import codec

    sizes: list[int] = []
    real = lzma.compress

    def spy(data: bytes, **kw: object) -> bytes:
        sizes.append(kw["filters"][0]["dict_size"])  # type: ignore[index]
        return real(data, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(lzma, "compress", spy)  # the module codec uses where liblzma cannot be bound
    if lzstream.SUPPORTED:
        real_block = lzstream.BlockEncoder.compress

        def block_spy(self: lzstream.BlockEncoder, data: bytes, **kw: Any) -> bytes:
            sizes.append(kw["dict_size"])
            return real_block(self, data, **kw)

        monkeypatch.setattr(lzstream.BlockEncoder, "compress", block_spy)
    for n in (10, 48_000, 300_000):
        raw = bytes(range(256)) * (n // 256) + bytes(n % 256)
        packed = compress(raw, Codec.DELTA_LZMA, level=1)
        assert decompress(packed, Codec.DELTA_LZMA, dict_id=0, raw_len=len(raw)) == raw
    assert sizes == [codec.LZMA_MIN_DICT, 1 << 16, codec.LZMA_DICT_SIZE]


needs_liblzma = pytest.mark.skipif(not lzstream.SUPPORTED, reason="liblzma not loadable")


def _flow_block(n: int, seed: int) -> bytes:
    """Record-like bytes: fixed-size records whose fields repeat or count up (what codecs 4-6 compress)."""
    rng = random.Random(seed)
    out = bytearray()
    t = rng.randrange(1 << 30)
    while len(out) < n:
        t += rng.randrange(50)
        out += struct.pack(">IIHHIB", 0x0A000000 + rng.randrange(64), 0xC0A80000 + rng.randrange(8),
                           rng.choice((53, 80, 443, 123)), rng.randrange(1024, 65535), t, rng.choice((6, 17)))
    return bytes(out[:n])


@needs_liblzma
def test_the_kept_lzma2_encoder_gives_the_stdlibs_bytes_whatever_came_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """issue 14: codecs 4-6 compress through one liblzma encoder re-initialised per block (its tables kept)
    instead of a new stdlib encoder per batch: the bytes must be the stdlib's, block after block, whatever
    preset, dictionary, lc and size the block before had (the wire format does not change)."""
    encoder = lzstream.BlockEncoder()
    cases = [
        (b"", 1, 1 << 12, None),
        (_flow_block(47_000, 1), 1, 1 << 16, 1),
        (_flow_block(47_000, 2), 1, 1 << 16, 1),  # the same sizes again: the tables are reused
        (_flow_block(300_000, 3), 6, 1 << 18, 1),  # larger tables (preset 6: another match finder)
        (_flow_block(5_000, 4), 1, 1 << 13, None),  # smaller ones, the preset's lc
        (os.urandom(200_000), 1, 1 << 18, 1),  # incompressible: stored chunks
        (bytes(70_000), 9, 1 << 17, 1),
        (_flow_block(47_000, 5), 0, 1 << 16, 1),
        (_flow_block(47_000, 6), 1, 1 << 16, 1),
    ]
    for data, preset, dict_size, lc in cases:
        spec: dict[str, int] = {"id": lzma.FILTER_LZMA2, "preset": preset, "dict_size": dict_size}
        if lc is not None:
            spec["lc"] = lc
        want = lzma.compress(data, format=lzma.FORMAT_RAW, filters=[spec])
        assert encoder.compress(data, preset=preset, dict_size=dict_size, lc=lc) == want
    # an output buffer too small for one call: the rest comes in further calls, the same bytes
    monkeypatch.setattr(lzstream, "_block_bound", lambda size: 1000)
    data = _flow_block(100_000, 7)
    spec = {"id": lzma.FILTER_LZMA2, "preset": 1, "dict_size": 1 << 17, "lc": 1}
    assert encoder.compress(data, preset=1, dict_size=1 << 17, lc=1) == lzma.compress(
        data, format=lzma.FORMAT_RAW, filters=[spec])
    encoder.close()


@needs_liblzma
def test_lzma_codecs_keep_one_encoder_for_the_next_batch_and_release_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """issue 14: LEAN (codec 5) made an LZMA2 encoder for every batch (its ~1 MB of tables allocated and
    faulted in again after each batch's malloc_trim: ~0.6 ms of a batch's 3 ms of compression). One encoder
    now serves batch after batch; at most one is kept (a second sealer at the same time makes its own, not
    kept), and ``release_compressors`` lets it go (a trial's ways are made one at a time)."""
    from flowtunnel.wire import codec

    made: list[lzstream.BlockEncoder] = []
    real_init = lzstream.BlockEncoder.__init__

    def counting(self: lzstream.BlockEncoder) -> None:
        made.append(self)
        real_init(self)

    monkeypatch.setattr(lzstream.BlockEncoder, "__init__", counting)
    codec.release_compressors()
    blocks = [_flow_block(47_000, seed) for seed in range(4)]
    for raw in blocks:
        for kind in (Codec.DELTA_LZMA, Codec.COLUMNAR_LZMA, Codec.LZMA):
            packed = compress(raw, kind, level=1)
            assert decompress(packed, kind, dict_id=0, raw_len=len(raw)) == raw
    assert len(made) == 1
    assert codec._idle_lzma == made

    # two sealers at once: the second makes its own, and one encoder stays kept
    entered, go = threading.Event(), threading.Event()
    real_compress = lzstream.BlockEncoder.compress

    def slow(self: lzstream.BlockEncoder, data: bytes, **kw: Any) -> bytes:
        if threading.current_thread().name == "first":
            entered.set()
            go.wait(10)
        return real_compress(self, data, **kw)

    monkeypatch.setattr(lzstream.BlockEncoder, "compress", slow)
    first = threading.Thread(target=compress, args=(blocks[0], Codec.DELTA_LZMA), kwargs={"level": 1},
                             name="first")
    first.start()
    assert entered.wait(10)
    compress(blocks[1], Codec.DELTA_LZMA, level=1)  # meanwhile, in this thread
    go.set()
    first.join()
    assert len(made) == 2
    assert len(codec._idle_lzma) == 1
    codec.release_compressors()
    assert codec._idle_lzma == []
