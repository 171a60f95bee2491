"""Compression of the record block: codec ids, the bundled zstd dictionaries, bounded decompression.

The dictionary (``netflow-v1.zdict``, made by ``tools/train_dictionary.py`` from softflowd v5/v9/IPFIX output
and the vendor captures) holds the byte patterns every export datagram repeats — headers, template sets,
common field values — so even a one-datagram batch compresses well. Its zstd dictionary id goes in the batch
header; the receiver refuses ids it does not have instead of guessing.

Codec 4 swaps zstd for a raw LZMA2 stream (liblzma, one encoder kept across batches:
``lzstream.BlockEncoder``; the stdlib's ``lzma`` where liblzma cannot be bound, the same bytes): about a
quarter fewer bytes than codec 3 on flow data at four to five times the CPU, which is worth it for the large
backlog batches a slow uplink waits on.
"""

from __future__ import annotations

import collections
import enum
import functools
import importlib.resources
import lzma
import threading
from collections.abc import Collection

import zstandard

from flowtunnel.wire import lzstream
from flowtunnel.wire.errors import MalformedHeader, MalformedRecords, UnknownContext, UnknownDictionary

__all__ = [
    "BUNDLED_DICTIONARY",
    "DEFAULT_LEVEL",
    "LZMA_DICT_SIZE",
    "LZMA_MIN_DICT",
    "Codec",
    "bundled_dictionaries",
    "compress",
    "compress_with_context",
    "decompress",
    "default_dictionary_id",
    "release_compressors",
]

BUNDLED_DICTIONARY = "netflow-v1.zdict"  # codec 2 default, id 0x46540001
BUNDLED_COLUMNAR_DICTIONARY = "netflow-columnar-v1.zdict"  # codec 3 default, id 0x46540003
#: dictionaries compressed with a precomputed (cached) table below this size: loading 64 KiB of dictionary
#: per call would cost more than compressing a small batch, and for larger inputs a precomputed table would
#: pin parameters chosen for small ones
_PRECOMPUTED_BELOW = 64 << 10
DEFAULT_LEVEL = 6
#: zstd frames may not ask for a window larger than this (bounds decoder memory whatever the sender says)
MAX_WINDOW = 1 << 25
#: codec 4 encoder's LZMA2 dictionary: measured on softflowd v9 columnar blocks of 2 MB, 256 KiB compresses as
#: well as preset 6's 8 MiB (columns repeat locally) for a third less CPU and ~3 MB instead of ~90 MB of
#: encoder memory (a Raspberry Pi agent must stay small)
LZMA_DICT_SIZE = 1 << 18
#: the smallest dictionary liblzma accepts; codec 4 decoders use ``max(LZMA_MIN_DICT, raw_len)``
LZMA_MIN_DICT = 1 << 12


class Codec(enum.IntEnum):
    """How the record block is compressed (header byte ``codec``)."""

    NONE = 0  # record block as is
    ZSTD = 1  # zstd, no dictionary
    ZSTD_DICT = 2  # zstd with the dictionary named by the header's dict_id (the default)
    COLUMNAR = 3  # payloads transposed into byte columns (see wire.columnar), then zstd [+ dictionary]
    COLUMNAR_LZMA = 4  # codec 3's record block, then a raw LZMA2 stream instead of zstd (no dictionary)
    DELTA_LZMA = 5  # codec 4 with chosen record fields stored as differences (wire.deltas), then raw LZMA2
    LZMA = 6  # the record block with verbatim payloads (codecs 0-2's layout), then raw LZMA2


_LZMA_CODECS = (Codec.COLUMNAR_LZMA, Codec.DELTA_LZMA, Codec.LZMA)


@functools.cache
def bundled_dictionaries() -> dict[int, zstandard.ZstdCompressionDict]:
    """The dictionaries shipped in the package, by zstd dictionary id (reading package data, once)."""
    out: dict[int, zstandard.ZstdCompressionDict] = {}
    for name in (BUNDLED_DICTIONARY, BUNDLED_COLUMNAR_DICTIONARY):
        try:
            data = importlib.resources.files("flowtunnel.wire").joinpath(name).read_bytes()
        except (FileNotFoundError, OSError):
            continue
        d = zstandard.ZstdCompressionDict(data, dict_type=zstandard.DICT_TYPE_FULLDICT)
        out[d.dict_id()] = d
    return out


def default_dictionary_id(codec: int = 2) -> int:
    """The bundled dictionary the sealer uses for ``codec`` by default (0 when none applies or is bundled)."""
    name = {2: BUNDLED_DICTIONARY, 3: BUNDLED_COLUMNAR_DICTIONARY}.get(int(codec))
    return _ids_by_name().get(name, 0) if name else 0


@functools.cache
def _ids_by_name() -> dict[str, int]:
    out: dict[str, int] = {}
    for name in (BUNDLED_DICTIONARY, BUNDLED_COLUMNAR_DICTIONARY):
        try:
            data = importlib.resources.files("flowtunnel.wire").joinpath(name).read_bytes()
        except (FileNotFoundError, OSError):
            continue
        out[name] = zstandard.ZstdCompressionDict(data, dict_type=zstandard.DICT_TYPE_FULLDICT).dict_id()
    return out


#: compressors kept for reuse, the most recently used last: setting one up with a 64 KiB dictionary costs
#: more than compressing a datagram or two. One set for the process, not one per thread (the agent seals in
#: whichever worker thread is free: per-thread sets held a copy each, ~1 MB a compressor at 50 KB batches),
#: and a few only, so the level-15 ones of a quiet start do not stay once the agent seals at level 6
#: (issue 14). A compressor in use is out of the set: two threads never share one (they are not
#: thread-safe), concurrent sealers make their own.
_IDLE_COMPRESSORS = 3
_idle: collections.OrderedDict[tuple[int, int, bool], zstandard.ZstdCompressor] = collections.OrderedDict()
_idle_lock = threading.Lock()


_tables: collections.OrderedDict[tuple[int, int], zstandard.ZstdCompressionDict] = collections.OrderedDict()


def _precomputed(dict_id: int, level: int) -> zstandard.ZstdCompressionDict:
    """The bundled dictionary ``dict_id`` with its tables for ``level`` computed (~0.7 MB at level 6), kept
    for the last ``_IDLE_COMPRESSORS`` (dictionary, level) pairs used."""
    key = (dict_id, level)
    with _idle_lock:
        d = _tables.pop(key, None)
        if d is not None:
            _tables[key] = d
            return d
    # a private copy per level: precompute_compress() fixes the parameters inside the dictionary object
    d = zstandard.ZstdCompressionDict(bundled_dictionaries()[dict_id].as_bytes(),
                                      dict_type=zstandard.DICT_TYPE_FULLDICT)
    d.precompute_compress(level=level)
    with _idle_lock:
        _tables[key] = d
        while len(_tables) > _IDLE_COMPRESSORS:
            _tables.popitem(last=False)
    return d


def release_compressors(*, keep: Collection[int] = ()) -> None:
    """Drop the idle compressors and precomputed tables of every dictionary but those of ``keep`` (ids; 0
    for no dictionary): ~0.7 MB each at level 6; and the kept LZMA2 encoder, whatever ``keep`` says. The
    agent calls it between the ways of a trial (issue 14: the peak RSS counts every compressor alive at
    once)."""
    with _idle_lock:
        for key in [k for k in _idle if k[0] not in keep]:
            del _idle[key]
        for table in [k for k in _tables if k[0] not in keep]:
            del _tables[table]
        lzma_encoders = _idle_lzma[:]
        _idle_lzma.clear()
    for encoder in lzma_encoders:
        encoder.close()


def compress(raw: bytes, codec: Codec, *, level: int = DEFAULT_LEVEL, dict_id: int = 0) -> bytes:
    """Compress ``raw`` for ``codec`` (caller's ``ValueError`` if the dictionary is not bundled).

    ``level`` is the zstd level, or for codec 4 the LZMA preset (0-9)."""
    if codec is Codec.NONE:
        return raw
    if codec in _LZMA_CODECS:
        if dict_id:
            raise ValueError(f"codec {codec.name.lower()} takes no dictionary, got dict_id {dict_id}")
        if not 0 <= level <= 9:
            raise ValueError(f"LZMA preset {level} is outside 0..9")
        # A dictionary no larger than the block needs (a power of two, LZMA_MIN_DICT at least): the encoder's
        # tables follow its size (~1.3 MB at 256 KiB against ~0.9 MB at 64 KiB, for each batch: issue 14's
        # peak RSS), and a match cannot reach further back than the block's start anyway.
        size = min(LZMA_DICT_SIZE, max(LZMA_MIN_DICT, 1 << max(0, len(raw) - 1).bit_length()))
        # Differences leave fewer byte values for the literal coder to tell apart: 1 bit of context (lc)
        # instead of 3 saves ~1 % on flow exports (softflowd v5/v9/IPFIX, the Cisco captures), and on
        # verbatim datagrams too (codec 6); the stream carries its own lc: the encoder's choice alone.
        lc = 1 if codec in (Codec.DELTA_LZMA, Codec.LZMA) else None
        encoder = _take_lzma()
        if encoder is None:  # liblzma cannot be bound here: the stdlib's encoder, the same bytes
            lzma2: dict[str, int] = {"id": lzma.FILTER_LZMA2, "preset": level, "dict_size": size}
            if lc is not None:
                lzma2["lc"] = lc
            return lzma.compress(raw, format=lzma.FORMAT_RAW, filters=[lzma2])
        try:
            return encoder.compress(raw, preset=level, dict_size=size, lc=lc)
        finally:
            _give_back_lzma(encoder)
    if dict_id and dict_id not in bundled_dictionaries():
        raise ValueError(f"compression dictionary {dict_id} is not bundled in this flowtunnel")
    small = len(raw) < _PRECOMPUTED_BELOW
    key = (dict_id, level, small)
    cctx = _take_compressor(key)
    if cctx is None:
        dict_data = None
        if dict_id:
            dict_data = _precomputed(dict_id, level) if small else bundled_dictionaries()[dict_id]
        # checksum and dict id are left out of the frame: the AEAD tag and our header already carry them
        cctx = zstandard.ZstdCompressor(
            level=level, dict_data=dict_data, write_checksum=False, write_dict_id=False,
            write_content_size=True,
        )
    out: bytes = cctx.compress(raw)
    _give_back(key, cctx)
    return out




#: the LZMA2 encoder kept for the next batch of codecs 4-6 (``lzstream.BlockEncoder``: liblzma re-initialised
#: on the same stream keeps its tables, ~1 MB at LEAN's preset 1 and a 64 KiB dictionary, instead of
#: allocating them per batch). One only, sized by the last block; a second sealer at the same time makes its
#: own, dropped after use. ``release_compressors`` drops it too.
_idle_lzma: list[lzstream.BlockEncoder] = []


def _take_lzma() -> lzstream.BlockEncoder | None:
    """The kept LZMA2 encoder, else a new one; None when liblzma cannot be bound (the stdlib's then)."""
    if not lzstream.SUPPORTED:
        return None
    with _idle_lock:
        if _idle_lzma:
            return _idle_lzma.pop()
    return lzstream.BlockEncoder()


def _give_back_lzma(encoder: lzstream.BlockEncoder) -> None:
    with _idle_lock:
        if not _idle_lzma:
            _idle_lzma.append(encoder)
            return
    encoder.close()


def _take_compressor(key: tuple[int, int, bool]) -> zstandard.ZstdCompressor | None:
    with _idle_lock:
        return _idle.pop(key, None)


def _give_back(key: tuple[int, int, bool], cctx: zstandard.ZstdCompressor) -> None:
    with _idle_lock:
        _idle[key] = cctx
        while len(_idle) > _IDLE_COMPRESSORS:
            _idle.popitem(last=False)


#: the bundled dictionary a context extends, by the codec of a context batch (docs/protocol.md section 3.3)
CONTEXT_BASE = {1: BUNDLED_DICTIONARY, 3: BUNDLED_COLUMNAR_DICTIONARY}


def _context_dict(context: bytes, codec: int) -> zstandard.ZstdCompressionDict:
    """The zstd dictionary of a context batch of ``codec``: the bundled dictionary of that record block
    layout (its entropy tables, and its content) with ``context`` appended to its content, so the newest
    bytes are the nearest; ``context`` alone, as raw content, when that dictionary is not bundled."""
    name = CONTEXT_BASE.get(int(codec))
    dict_id = _ids_by_name().get(name, 0) if name else 0
    if dict_id:
        return zstandard.ZstdCompressionDict(bundled_dictionaries()[dict_id].as_bytes() + context,
                                             dict_type=zstandard.DICT_TYPE_FULLDICT)
    return zstandard.ZstdCompressionDict(context, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def compress_with_context(
    raw: bytes, context: bytes, *, level: int = DEFAULT_LEVEL, codec: int = Codec.ZSTD
) -> bytes:
    """Codec 1 or 3 with a context (docs/protocol.md section 3.3): a zstd frame whose dictionary is the
    bundled one of ``codec``'s layout extended by ``context``, with content size and the frame checksum (so
    a different context on the other side is detected, not decoded into other bytes)."""
    cctx = zstandard.ZstdCompressor(level=level, dict_data=_context_dict(context, codec), write_checksum=True,
                                    write_dict_id=False, write_content_size=True)
    out: bytes = cctx.compress(raw)
    return out


def check_dictionary(codec: int, dict_id: int) -> None:
    """Header check before any work: the dictionary named must be known (and absent for codecs 0 and 1)."""
    if codec in (Codec.NONE, Codec.ZSTD, *_LZMA_CODECS):
        if dict_id:
            name = Codec(codec).name.lower()
            raise MalformedHeader(f"codec {name} takes no dictionary, header names {dict_id}")
        return
    if dict_id and dict_id not in bundled_dictionaries():
        known = ", ".join(str(i) for i in bundled_dictionaries()) or "none"
        raise UnknownDictionary(f"compression dictionary id {dict_id} is unknown here (known: {known})")
    if codec == Codec.ZSTD_DICT and not dict_id:
        raise MalformedHeader("codec zstd-dict needs a dictionary id, header has 0")


def decompress(
    data: bytes, codec: Codec, *, dict_id: int, raw_len: int, context: bytes | None = None
) -> bytes:
    """Decompress exactly ``raw_len`` bytes. The frame must declare that content size (checked before any
    output is allocated, so a decompression bomb is refused by its frame header) and nothing may follow it.
    ``context``: codec 1 against that raw-content dictionary (then the frame must carry its checksum, and a
    mismatch raises ``UnknownContext``: the context is not the one the sender used)."""
    if codec is Codec.NONE:
        if len(data) != raw_len:
            raise MalformedRecords(f"uncompressed block is {len(data)} bytes, header says {raw_len}")
        return data
    if codec in _LZMA_CODECS:
        return _decompress_lzma(data, raw_len)
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise MalformedRecords(f"compressed block is not a zstd frame: {exc}") from None
    if declared != raw_len:
        what = "no content size" if declared < 0 else f"content size {declared}"
        raise MalformedRecords(f"zstd frame declares {what}, header says raw length {raw_len}")
    try:
        params = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError as exc:
        raise MalformedRecords(f"zstd frame header is invalid: {exc}") from None
    if params.window_size > MAX_WINDOW:
        raise MalformedRecords(
            f"zstd frame asks for a {params.window_size}-byte window, the limit is {MAX_WINDOW}"
        )
    if context is not None:
        if not params.has_checksum:
            raise MalformedRecords("zstd frame compressed against a context carries no checksum")
        dctx = zstandard.ZstdDecompressor(dict_data=_context_dict(context, codec), max_window_size=MAX_WINDOW)
    else:
        dctx = _decompressor(dict_id)
    try:
        out = dctx.decompress(data, max_output_size=raw_len, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        if context is not None:
            raise UnknownContext(
                f"zstd frame does not decode against the context {dict_id:#010x} held here ({exc}): it is "
                "not the context the agent compressed against (corrupted or replaced)"
            ) from None
        raise MalformedRecords(f"zstd decompression failed: {exc}") from None
    if len(out) != raw_len:
        raise MalformedRecords(f"zstd frame inflated to {len(out)} bytes, header says raw length {raw_len}")
    return bytes(out)


#: decompressors kept per thread, by bundled dictionary id (0: none): setting one up for a 64 KiB
#: dictionary costs more than decompressing a small batch (a gateway opens thousands a second, issue 16:
#: ~3 % of its CPU went to creating them). One set per thread, as a decompressor is not thread-safe; each
#: ``decompress`` call starts a new frame, so nothing carries over from one batch to the next.
_decompressors = threading.local()


def _decompressor(dict_id: int) -> zstandard.ZstdDecompressor:
    cache: dict[int, zstandard.ZstdDecompressor] | None = getattr(_decompressors, "by_dict", None)
    if cache is None:
        cache = _decompressors.by_dict = {}
    dctx = cache.get(dict_id)
    if dctx is None:
        dict_data = bundled_dictionaries()[dict_id] if dict_id else None
        dctx = cache[dict_id] = zstandard.ZstdDecompressor(dict_data=dict_data, max_window_size=MAX_WINDOW)
    return dctx


def _decompress_lzma(data: bytes, raw_len: int) -> bytes:
    """Codec 4: a raw LZMA2 stream that inflates to exactly ``raw_len`` bytes, then its end marker.

    The output is capped at ``raw_len`` (``max_length``), so a bomb stops there; the decoder's dictionary is
    ``raw_len`` bytes (no valid match reaches further back than the output), so its memory is bounded by the
    same, already checked, number.
    """
    filters = [{"id": lzma.FILTER_LZMA2, "dict_size": max(LZMA_MIN_DICT, raw_len)}]
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=filters)
    try:
        out = dec.decompress(data, max_length=raw_len)
        # when the output is complete, what remains must be the end marker alone, not more output
        if not dec.eof and len(out) == raw_len and dec.decompress(b"", max_length=1):
            raise MalformedRecords(f"LZMA2 stream inflates to more than the header's raw length {raw_len}")
    except lzma.LZMAError as exc:
        raise MalformedRecords(f"LZMA2 decompression failed: {exc}") from None
    if not dec.eof:
        raise MalformedRecords(
            f"LZMA2 stream ends after {len(out)} of {raw_len} bytes without its end marker"
        )
    if dec.unused_data:
        raise MalformedRecords(f"LZMA2 stream is followed by {len(dec.unused_data)} extra bytes")
    if len(out) != raw_len:
        raise MalformedRecords(f"LZMA2 stream inflated to {len(out)} bytes, header says raw length {raw_len}")
    return out
