"""One raw LZMA2 stream per agent, continued across batches (docs/protocol.md section 3.4), through liblzma.

A quiet site's batch of two datagrams compressed from scratch pays for a cold compressor every time. Kept open
across batches, an LZMA2 stream keeps both its match history and its adapted probabilities, and each batch
ends at a flush point (``LZMA_SYNC_FLUSH``: the current LZMA2 chunk is closed, the stream is not) so the
gateway decodes it on arrival. Python's ``lzma`` module cannot flush without ending the stream, but the
liblzma it wraps can: this module binds that same library (``liblzma.so.5``, already loaded by the stdlib's
``_lzma``) through ctypes, for the four calls needed. ``SUPPORTED`` is False where it cannot be loaded; then
neither side uses streams.

Protocol parameters, fixed so that the decoder's memory is bounded and known: a 64 KiB dictionary
(``DICT_SIZE``), encoder preset 6 with ``lc=1``. A frame is checked before liblzma sees it (``check_frame``:
it must be whole LZMA2 chunks, no end marker, whose declared sizes add up to the header's ``raw_len``), then
decoded into at most ``raw_len`` bytes; any error leaves the decoder in an unknown state, so it is marked
broken and must be discarded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import lzma  # noqa: F401  (loads the stdlib's _lzma first, so the CDLL below is the liblzma it links)
import weakref

from flowtunnel.wire.errors import MalformedRecords

__all__ = [
    "DICT_SIZE",
    "LC",
    "MAX_POSITION",
    "PRESET",
    "SUPPORTED",
    "BlockEncoder",
    "StreamDecoder",
    "StreamEncoder",
    "check_frame",
    "decoder_memory",
]

#: the stream's LZMA2 dictionary, both sides: measured on softflowd v9 (batches of 10) 64 KiB gives 0.213 of
#: raw UDP where 1 MiB gives 0.209, for a decoder of ~100 KB per agent at the gateway
DICT_SIZE = 64 << 10
#: encoder preset and literal context bits (the encoder's choice: the stream carries lc/lp/pb itself)
PRESET = 6
LC = 1
#: frames per stream: the header's 16-bit position; the agent starts a new stream before it wraps
MAX_POSITION = 0xFFFF

_FILTER_LZMA2 = 0x21
_VLI_UNKNOWN = (1 << 64) - 1
_RUN, _SYNC_FLUSH, _FINISH = 0, 1, 3
_OK, _STREAM_END = 0, 1
_OUT_CHUNK = 1 << 16


class _Stream(ctypes.Structure):
    # lzma_stream (lzma/base.h); LZMA_STREAM_INIT is all zeros
    _fields_ = [
        # next_in as c_char_p: a bytes object is handed over without a copy (see _Coder)
        ("next_in", ctypes.c_char_p), ("avail_in", ctypes.c_size_t), ("total_in", ctypes.c_uint64),
        ("next_out", ctypes.c_void_p), ("avail_out", ctypes.c_size_t), ("total_out", ctypes.c_uint64),
        ("allocator", ctypes.c_void_p), ("internal", ctypes.c_void_p),
        ("reserved_ptr", ctypes.c_void_p * 4), ("seek_pos", ctypes.c_uint64),
        ("reserved_int2", ctypes.c_uint64),
        ("reserved_int3", ctypes.c_size_t), ("reserved_int4", ctypes.c_size_t),
        ("reserved_enum", ctypes.c_int * 2),
    ]


class _Options(ctypes.Structure):
    # lzma_options_lzma (lzma/lzma12.h)
    _fields_ = [
        ("dict_size", ctypes.c_uint32), ("preset_dict", ctypes.c_void_p),
        ("preset_dict_size", ctypes.c_uint32),
        ("lc", ctypes.c_uint32), ("lp", ctypes.c_uint32), ("pb", ctypes.c_uint32), ("mode", ctypes.c_int),
        ("nice_len", ctypes.c_uint32), ("mf", ctypes.c_int), ("depth", ctypes.c_uint32),
        ("reserved_int", ctypes.c_uint32 * 8), ("reserved_enum", ctypes.c_int * 4),
        ("reserved_ptr", ctypes.c_void_p * 2),
    ]


class _Filter(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("options", ctypes.c_void_p)]


def _load() -> ctypes.CDLL | None:
    for name in ("liblzma.so.5", ctypes.util.find_library("lzma")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            lib.lzma_lzma_preset.argtypes = [ctypes.POINTER(_Options), ctypes.c_uint32]
            lib.lzma_lzma_preset.restype = ctypes.c_ubyte
            for fn in (lib.lzma_raw_encoder, lib.lzma_raw_decoder):
                fn.argtypes = [ctypes.POINTER(_Stream), ctypes.POINTER(_Filter)]
                fn.restype = ctypes.c_int
            lib.lzma_raw_decoder_memusage.argtypes = [ctypes.POINTER(_Filter)]
            lib.lzma_raw_decoder_memusage.restype = ctypes.c_uint64
            lib.lzma_code.argtypes = [ctypes.POINTER(_Stream), ctypes.c_int]
            lib.lzma_code.restype = ctypes.c_int
            lib.lzma_end.argtypes = [ctypes.POINTER(_Stream)]
            lib.lzma_end.restype = None
        except AttributeError:
            continue
        return lib
    return None


_lib = _load()
#: whether this process can encode and decode streams (liblzma found)
SUPPORTED = _lib is not None


def _filters(encoder: bool) -> tuple[_Options, ctypes.Array[_Filter]]:
    assert _lib is not None
    opts = _Options()
    if _lib.lzma_lzma_preset(ctypes.byref(opts), PRESET):
        raise RuntimeError(f"liblzma does not know preset {PRESET}")
    opts.dict_size = DICT_SIZE
    if encoder:
        opts.lc = LC
    filters = (_Filter * 2)()
    filters[0].id = _FILTER_LZMA2
    filters[0].options = ctypes.cast(ctypes.pointer(opts), ctypes.c_void_p)
    filters[1].id = _VLI_UNKNOWN
    return opts, filters


def decoder_memory() -> int:
    """Bytes liblzma allocates for one stream decoder (what the gateway holds per agent)."""
    if _lib is None:
        return 0
    _, filters = _filters(False)
    return int(_lib.lzma_raw_decoder_memusage(filters))


# What liblzma reads goes into lzma_stream as the bytes object itself (``next_in`` is a c_char_p: no copy,
# reset to None after the call so no block stays referenced), what it writes into a bytearray by address
# (``_output``), not through ``ctypes.create_string_buffer`` and ``ctypes.cast``: the first makes a new ctypes
# array type for every buffer size, and a cast result shares its source's ``_objects`` and holds the source in
# it; both are reference cycles that only the garbage collector frees, so each call's buffers (a batch's size)
# stayed allocated until a collection happened to run (measured: +10 MB over 200 blocks, issue 14).


def _output(size: int) -> tuple[bytearray, ctypes.c_char, int]:
    """A zeroed buffer of ``size`` bytes for liblzma to write into, the ctypes view that pins it (the caller
    keeps it until liblzma is done with the address) and its address."""
    buf = bytearray(size)
    anchor = ctypes.c_char.from_buffer(buf)
    return buf, anchor, ctypes.addressof(anchor)


class _Coder:
    """A liblzma raw LZMA2 coder; freed by ``close`` or when garbage collected."""

    def __init__(self, *, encoder: bool) -> None:
        if _lib is None:
            raise RuntimeError("liblzma is not available: stream compression is not supported here")
        self._opts, filters = _filters(encoder)
        self._strm = _Stream()
        init = _lib.lzma_raw_encoder if encoder else _lib.lzma_raw_decoder
        ret = init(ctypes.byref(self._strm), filters)
        if ret != _OK:
            what = "encoder" if encoder else "decoder"
            raise MemoryError(f"liblzma could not set up an LZMA2 {what} (error {ret})")
        self._finalizer = weakref.finalize(self, _lib.lzma_end, ctypes.byref(self._strm))

    def close(self) -> None:
        self._finalizer()


class StreamEncoder(_Coder):
    """The agent's half: each ``frame(block)`` is the block's compressed bytes up to a flush point.

    Not thread-safe; one batch at a time. A frame that was not delivered leaves the two sides apart: the
    caller then starts a new encoder (and the gateway a new decoder, from the start frame)."""

    def __init__(self) -> None:
        super().__init__(encoder=True)
        self.position = 0  # frames produced so far

    def frame(self, block: bytes) -> bytes:
        """Compress ``block`` (non-empty) and flush: the returned bytes decode to exactly ``block``."""
        assert _lib is not None
        if not block:
            raise ValueError("a stream frame needs a non-empty block")
        if self.position > MAX_POSITION:
            raise ValueError(f"stream is at position {self.position} (max {MAX_POSITION}): start a new one")
        data = _encode(self._strm, block, max(_OUT_CHUNK, len(block) + len(block) // 8 + 1024), _SYNC_FLUSH)
        self.position += 1
        return data


def _encode(s: _Stream, block: bytes, room: int, action: int) -> bytes:
    """Feed ``block`` to the encoder on ``s`` and run ``action`` (a sync flush: the frame so far; finish: the
    ended stream) to its end, through an output buffer of ``room`` bytes."""
    assert _lib is not None
    out, _pin, address = _output(room)
    s.next_in = bytes(block)
    s.avail_in = len(block)
    chunks: list[bytes] = []
    try:
        while True:
            s.next_out = address
            s.avail_out = len(out)
            ret = _lib.lzma_code(ctypes.byref(s), action)
            chunks.append(ctypes.string_at(address, len(out) - s.avail_out))
            if ret == _STREAM_END:  # the flush or the end is complete
                break
            if ret != _OK:
                raise RuntimeError(f"liblzma encoder failed (error {ret})")
    finally:
        s.next_in = None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _block_bound(size: int) -> int:
    """Output room for a block of ``size`` bytes in one call, incompressible data included (LZMA2 stores it
    in chunks of at most 64 KiB with 3 bytes of header each, then the end marker)."""
    return size + size // 64 + 64


class BlockEncoder:
    """Whole blocks compressed to raw LZMA2 with its end marker (codecs 4-6), on one ``lzma_stream`` kept
    across blocks: byte for byte what ``lzma.compress(block, format=FORMAT_RAW, filters=[{"id": FILTER_LZMA2,
    "preset": preset, "dict_size": dict_size, "lc": lc}])`` gives (the stdlib sets the preset's options, then
    those named), without a new encoder per block. liblzma re-initialising an encoder on the same stream keeps
    its match finder's tables and history buffer when their sizes do not change (the same preset and
    dictionary: one batch after another at a steady rate), where a new encoder allocates them afresh (~1 MB
    at preset 1 with a 64 KiB dictionary) and the kernel faults their pages in again after each batch's
    ``malloc_trim``: measured ~0.6 ms of 3 ms per 47 KB block (issue 14). It holds what the last block needed
    until ``close``. Not thread-safe: one block at a time."""

    def __init__(self) -> None:
        if _lib is None:
            raise RuntimeError("liblzma is not available: use the stdlib's lzma")
        self._strm = _Stream()
        self._opts = _Options()
        self._filters = (_Filter * 2)()
        self._filters[0].id = _FILTER_LZMA2
        self._filters[0].options = ctypes.addressof(self._opts)  # kept alive by self
        self._filters[1].id = _VLI_UNKNOWN
        self._finalizer = weakref.finalize(self, _lib.lzma_end, ctypes.byref(self._strm))

    def compress(self, block: bytes, *, preset: int, dict_size: int, lc: int | None = None) -> bytes:
        """``block`` as one raw LZMA2 stream, ended (``lc``: the literal context bits, else the preset's)."""
        assert _lib is not None
        opts = self._opts
        if _lib.lzma_lzma_preset(ctypes.byref(opts), preset):
            raise ValueError(f"liblzma does not know preset {preset}")
        opts.dict_size = dict_size
        if lc is not None:
            opts.lc = lc
        s = self._strm
        ret = _lib.lzma_raw_encoder(ctypes.byref(s), self._filters)
        if ret != _OK:
            raise MemoryError(f"liblzma could not set up an LZMA2 encoder (error {ret})")
        return _encode(s, block, _block_bound(len(block)), _FINISH)

    def close(self) -> None:
        """Free liblzma's allocations now (else when garbage collected)."""
        self._finalizer()


class StreamDecoder(_Coder):
    """The gateway's half: ``frame(data, raw_len)`` decodes the next frame of the agent's stream.

    After any error ``broken`` is set: liblzma's state is then unknown, so the decoder must be discarded."""

    def __init__(self) -> None:
        super().__init__(encoder=False)
        self.position = 0  # frames decoded so far
        self.broken = False

    def frame(self, data: bytes, raw_len: int) -> bytes:
        """The ``raw_len`` bytes frame ``data`` decodes to; ``MalformedRecords`` when it is not whole
        chunks declaring exactly ``raw_len`` bytes (checked first: a bomb is refused unread), or does not
        decode to them (this decoder is then broken)."""
        assert _lib is not None
        if self.broken:
            raise MalformedRecords("this stream's decoder failed earlier: its state is unknown")
        self.broken = True  # until this frame decoded cleanly
        check_frame(data, raw_len, start=self.position == 0)
        _out, _pin, address = _output(raw_len + 1)  # one spare byte: more output than declared shows
        s = self._strm
        s.next_in = bytes(data)
        s.avail_in = len(data)
        s.next_out = address
        s.avail_out = raw_len + 1
        try:
            for _ in range(4):  # one call consumes a whole frame; a few more only if liblzma paused
                ret = _lib.lzma_code(ctypes.byref(s), _RUN)
                if ret != _OK:
                    raise MalformedRecords(f"LZMA2 stream frame does not decode (liblzma error {ret})")
                if s.avail_in == 0:
                    break
        finally:
            s.next_in = None
        produced = raw_len + 1 - s.avail_out
        if s.avail_in or produced != raw_len:
            raise MalformedRecords(
                f"LZMA2 stream frame decoded to {produced} bytes with {s.avail_in} input bytes left, header "
                f"says raw length {raw_len}"
            )
        self.position += 1
        self.broken = False
        return ctypes.string_at(address, raw_len)


def check_frame(data: bytes, raw_len: int, *, start: bool) -> None:
    """Check that ``data`` is whole LZMA2 chunks declaring ``raw_len`` bytes in all, before decoding.

    A start frame's first chunk resets the dictionary (as the stream's first chunk must); no other chunk may,
    and the end marker (``00``) may not appear: a frame ends at a flush point, the stream goes on."""
    view = memoryview(data)
    size = len(view)
    pos = total = 0
    while pos < size:
        control = view[pos]
        if control in (1, 2):  # uncompressed chunk (1: with a dictionary reset)
            if pos + 3 > size:
                raise MalformedRecords(f"LZMA2 stream frame ends inside a chunk header at byte {pos}")
            unpacked = ((view[pos + 1] << 8) | view[pos + 2]) + 1
            reset, length = control == 1, 3 + unpacked
        elif control >= 0x80:  # LZMA chunk; bits 5-6: 3 = dictionary reset, >= 2 = new properties byte
            if pos + 5 > size:
                raise MalformedRecords(f"LZMA2 stream frame ends inside a chunk header at byte {pos}")
            unpacked = (((control & 0x1F) << 16) | (view[pos + 1] << 8) | view[pos + 2]) + 1
            packed = ((view[pos + 3] << 8) | view[pos + 4]) + 1
            reset = control >= 0xE0
            length = (6 if control >= 0xC0 else 5) + packed
        elif control == 0:
            raise MalformedRecords(f"LZMA2 stream frame holds the end marker at byte {pos}: a frame ends at "
                                   "a flush point, not at the end of the stream")
        else:
            raise MalformedRecords(f"LZMA2 stream frame has an invalid chunk control byte {control:#04x}")
        if reset != (start and pos == 0):
            want = "must start with" if start and pos == 0 else "may not hold"
            raise MalformedRecords(f"LZMA2 stream frame {want} a dictionary reset (chunk at byte {pos})")
        total += unpacked
        if total > raw_len:
            raise MalformedRecords(f"LZMA2 stream frame declares more than the header's raw length {raw_len}")
        pos += length
    if pos != size:
        raise MalformedRecords(f"LZMA2 stream frame of {size} bytes ends inside a chunk (needs {pos})")
    if total != raw_len:
        raise MalformedRecords(f"LZMA2 stream frame declares {total} bytes, header says raw length {raw_len}")
