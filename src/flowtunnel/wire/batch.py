"""Sealed batches: the header, sealing (compress + AEAD) and opening (verify + bounded decompress + parse).

Pure: no I/O, no clock, no randomness — the caller passes the nonce (12 bytes, unique per key: the agent
uses ``os.urandom(12)``). The whole header is the AEAD's associated data, so nothing in it can be changed
without the tag failing; every size the header declares is checked against ``WireLimits`` before any
decryption or decompression work. Byte layout: docs/protocol.md.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

# ChaCha20-Poly1305 (RFC 8439) from libsodium (PyNaCl) rather than cryptography: the same AEAD and bytes, but
# cryptography's Rust extension costs the agent ~8 MB of RSS at import against ~1 MB (issue 14).
from nacl.bindings import crypto_aead_chacha20poly1305_ietf_decrypt as _aead_open
from nacl.bindings import crypto_aead_chacha20poly1305_ietf_encrypt as _aead_seal
from nacl.exceptions import CryptoError

from flowtunnel.datagram import Datagram
from flowtunnel.wire import columnar, lzstream
from flowtunnel.wire.codec import (
    DEFAULT_LEVEL,
    Codec,
    check_dictionary,
    compress,
    compress_with_context,
    decompress,
)
from flowtunnel.wire.codec import default_dictionary_id as _default_dict_id
from flowtunnel.wire.deltas import PlanCache
from flowtunnel.wire.digest import blake2b_256
from flowtunnel.wire.errors import (
    AuthenticationFailed,
    BadAgentId,
    BadMagic,
    LimitExceeded,
    MalformedHeader,
    Truncated,
    UnknownContext,
    UnsupportedVersion,
)
from flowtunnel.wire.keys import Key, key_bytes, validate_agent_id
from flowtunnel.wire.records import decode_block, encode_block

__all__ = [
    "AGENT_LEN_OFFSET",
    "AUTO_COLUMNAR_BYTES",
    "CODEC_OFFSET",
    "CONTENT_TYPE",
    "CONTENT_TYPES",
    "CONTEXT_BYTES",
    "FLAGS_OFFSET",
    "FLAG_CONTEXT",
    "FLAG_STREAM",
    "FLAG_STREAM_START",
    "HEADER",
    "MAGIC",
    "NONCE_BYTES",
    "NONCE_OFFSET",
    "TAG_BYTES",
    "VERSION",
    "Batch",
    "BatchHeader",
    "FieldWidths",
    "OpenStream",
    "RecordLength",
    "SealStream",
    "WireLimits",
    "context_id",
    "context_of",
    "header_length",
    "open_batch",
    "peek_header",
    "seal_batch",
    "seal_batch_and_context",
    "seal_stream_batch",
    "stream_dict_id",
    "stream_of",
]

MAGIC = b"FTNB"
VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
#: magic, version, flags, codec, agent id length, dict id, first seq, count, raw length, sealed length, nonce
HEADER = struct.Struct(">4sBBBBIQIII12s")
#: offsets in ``HEADER`` of the flags byte, the codec byte and the agent id length byte (after magic 4 and
#: version); the agent id follows the fixed part
FLAGS_OFFSET, CODEC_OFFSET, AGENT_LEN_OFFSET = 5, 6, 7
#: where the nonce sits in a sealed batch: the last field of the fixed part
NONCE_OFFSET = HEADER.size - NONCE_BYTES
#: the HTTP Content-Type of a sealed batch body
CONTENT_TYPE = "application/vnd.flowtunnel.batch"
#: every Content-Type the gateway takes for a sealed batch body, in the order the agent tries them when a
#: proxy refuses one (docs/protocol.md section 7): the body is a sealed batch whatever the label, which only
#: has to pass proxies' ``req_mime_type``-style rules. ``application/octet-stream`` is what generic uploads
#: use (the one such rules refuse most often, to stop executables); ``application/x-www-form-urlencoded`` is
#: what every HTML form posts, so no proxy that lets people use the web refuses it.
CONTENT_TYPES = (CONTENT_TYPE, "application/octet-stream", "application/x-www-form-urlencoded")
#: header flag: codec 1 or 3's frame is compressed against a context (docs/protocol.md section 3.3) that the
#: header's dict id names (``context_id``)
FLAG_CONTEXT = 0x01
#: header flags of stream compression (docs/protocol.md section 3.4): the frame continues the agent's LZMA2
#: stream (``dict_id`` = stream id << 16 | position); with ``FLAG_STREAM_START`` too, it starts a new one
FLAG_STREAM = 0x02
FLAG_STREAM_START = 0x04
_KNOWN_FLAGS = FLAG_CONTEXT | FLAG_STREAM | FLAG_STREAM_START
#: codecs a stream frame may name: the layout of the record block inside (4 columnar, 5 with field deltas,
#: 6 verbatim payloads)
STREAM_CODECS = (Codec.COLUMNAR_LZMA, Codec.DELTA_LZMA, Codec.LZMA)
#: a context is at most the last this many bytes of the previous acknowledged batch's record block
CONTEXT_BYTES = 32 << 10
_U64 = (1 << 64) - 1
#: with ``codec=None``, smaller record blocks are sealed both ways (codec 2 and 3) and the smaller kept;
#: larger ones (backlog batches) go columnar only, which wins there on flow data and halves the CPU
AUTO_COLUMNAR_BYTES = 1 << 20
#: codecs whose record block has section 4's layout
_COLUMNAR_CODECS = (Codec.COLUMNAR, Codec.COLUMNAR_LZMA, Codec.DELTA_LZMA)
_MIN_RECORD_BYTES = 3  # time delta, source index, length: one varint byte each at least

#: ``record_length(datagram, set_id) -> int | None``: the record length of a v9/IPFIX data set, if known
RecordLength = Callable[[bytes, int], int | None]
#: ``field_widths(datagram, set_id)``: a template's field widths (codec 5), ``TemplateLengths.field_widths``
FieldWidths = Callable[[bytes, int], "tuple[int, ...] | None"]


@dataclass(frozen=True, slots=True, kw_only=True)
class WireLimits:
    """Bounds on what ``open_batch`` accepts, all checked before the work they bound.

    ``max_body``: sealed batch bytes; ``max_raw``: record block bytes after decompression; ``max_count``:
    datagrams per batch; ``max_datagram``: bytes per datagram; ``max_exporters``: entries in the batch's
    source table.
    """

    max_body: int = 8 << 20
    max_raw: int = 64 << 20
    max_count: int = 100_000
    max_datagram: int = 65_535
    max_exporters: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_body", "max_raw", "max_count", "max_datagram", "max_exporters"):
            if getattr(self, name) < 1:
                raise ValueError(f"WireLimits.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchHeader:
    """The clear-text (but authenticated) header of a sealed batch."""

    version: int
    flags: int
    codec: Codec
    dict_id: int
    agent_id: str
    first_seq: int
    count: int
    raw_len: int
    sealed_len: int
    nonce: bytes = field(repr=False)
    header_len: int

    @property
    def last_seq(self) -> int:
        """The last sequence number covered (``first_seq - 1`` for an empty batch)."""
        return self.first_seq + self.count - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Batch:
    """An opened batch: datagrams ``first_seq .. first_seq + len(datagrams) - 1`` of ``agent_id``.

    ``agent_info`` holds the agent's authenticated counters (e.g. backlog, drops by cause) if it sent any.
    """

    agent_id: str
    first_seq: int
    datagrams: tuple[Datagram, ...]
    agent_info: Mapping[str, int]
    header: BatchHeader
    #: the context this batch leaves for the agent's next one (``context_of`` its record block)
    context: bytes = field(default=b"", repr=False)
    #: a stream frame: the agent's stream after it (to keep once the batch is committed, else to drop)
    stream: OpenStream | None = field(default=None, repr=False)

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.datagrams) - 1


class SealStream:
    """The agent's half of a stream (docs/protocol.md section 3.4): its id, its encoder, and the nonce of the
    last frame sealed in it (the next frame's associated data ends with it). Not thread-safe."""

    def __init__(self, stream_id: int) -> None:
        if not 1 <= stream_id <= 0xFFFF:
            raise ValueError(f"stream id {stream_id} is outside 1..65535")
        self.stream_id = stream_id
        self.encoder = lzstream.StreamEncoder()
        self.last_nonce = b""

    @property
    def position(self) -> int:
        """Frames sealed in this stream so far: the next frame's position."""
        return self.encoder.position

    @property
    def full(self) -> bool:
        """No position left for another frame: start a new stream."""
        return self.encoder.position > lzstream.MAX_POSITION


class OpenStream:
    """The gateway's half of an agent's stream: its id, its decoder (``position`` frames decoded) and the
    nonce of the last frame decoded. Not thread-safe: one frame at a time."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.decoder = lzstream.StreamDecoder()
        self.last_nonce = b""

    @property
    def position(self) -> int:
        return self.decoder.position


def stream_dict_id(stream_id: int, position: int) -> int:
    """The header's ``dict_id`` of a stream frame: stream id (16 bits) then position (16 bits)."""
    return (stream_id << 16) | position


def stream_of(dict_id: int) -> tuple[int, int]:
    """(stream id, position) a stream frame's ``dict_id`` names: the inverse of ``stream_dict_id``."""
    return dict_id >> 16, dict_id & 0xFFFF


def seal_stream_batch(
    *,
    agent_id: str,
    key: bytes | Key,
    first_seq: int,
    datagrams: Sequence[Datagram],
    nonce: bytes,
    stream: SealStream,
    codec: Codec = Codec.LZMA,
    agent_info: Mapping[str, int] | None = None,
    record_length: RecordLength | None = None,
    field_widths: FieldWidths | None = None,
    plans: PlanCache | None = None,
) -> bytes:
    """Seal ``datagrams`` as the next frame of ``stream`` (docs/protocol.md section 3.4), which it advances.

    ``codec`` names the record block's layout: ``Codec.LZMA`` (6) verbatim payloads, ``COLUMNAR_LZMA`` (4)
    columnar, ``DELTA_LZMA`` (5) columnar with field deltas. The first frame of a stream (position 0) is a
    start frame; every later one is authenticated with the nonce of the one before appended to its header,
    so it opens only against the very history it was compressed against. A frame that is not acknowledged
    leaves the two sides apart: the caller must then seal into a new stream. Caller mistakes (empty batch,
    a full stream, a codec that is not a stream layout, what ``seal_batch`` refuses) raise ``ValueError``.
    """
    validate_agent_id(agent_id)
    secret = key_bytes(key)
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes, got {len(nonce)}")
    count = len(datagrams)
    if not count or first_seq < 1 or first_seq + count - 1 > _U64:
        raise ValueError(f"a stream frame needs datagrams with seqs in 1..2**64-1 (first_seq {first_seq}, "
                         f"{count} datagrams)")
    codec = Codec(codec)
    if codec not in STREAM_CODECS:
        raise ValueError(f"codec {codec.name.lower()} is not a stream layout (4, 5 or 6)")
    if stream.full:
        raise ValueError(f"stream {stream.stream_id} has no position left: start a new one")
    raw = _record_block(datagrams, codec, agent_info, record_length, field_widths, plans)
    _check_block_len(raw)  # before the frame advances the stream
    start = stream.position == 0
    dict_id = stream_dict_id(stream.stream_id, stream.position)
    packed = stream.encoder.frame(raw)
    flags = FLAG_STREAM | (FLAG_STREAM_START if start else 0)
    previous = b"" if start else stream.last_nonce
    stream.last_nonce = nonce
    return _sealed(agent_id, flags, codec, dict_id, first_seq, count, raw, packed, nonce, secret,
                   aad_tail=previous)


def seal_batch(
    *,
    agent_id: str,
    key: bytes | Key,
    first_seq: int,
    datagrams: Sequence[Datagram],
    nonce: bytes,
    agent_info: Mapping[str, int] | None = None,
    codec: Codec | None = None,
    level: int = DEFAULT_LEVEL,
    dict_id: int | None = None,
    record_length: RecordLength | None = None,
    context: bytes | None = None,
    field_widths: FieldWidths | None = None,
    plans: PlanCache | None = None,
) -> bytes:
    """``seal_batch_and_context``'s body alone."""
    return seal_batch_and_context(
        agent_id=agent_id, key=key, first_seq=first_seq, datagrams=datagrams, nonce=nonce,
        agent_info=agent_info, codec=codec, level=level, dict_id=dict_id, record_length=record_length,
        context=context, field_widths=field_widths, plans=plans,
    )[0]


def seal_batch_and_context(
    *,
    agent_id: str,
    key: bytes | Key,
    first_seq: int,
    datagrams: Sequence[Datagram],
    nonce: bytes,
    agent_info: Mapping[str, int] | None = None,
    codec: Codec | None = None,
    level: int = DEFAULT_LEVEL,
    dict_id: int | None = None,
    record_length: RecordLength | None = None,
    context: bytes | None = None,
    field_widths: FieldWidths | None = None,
    plans: PlanCache | None = None,
) -> tuple[bytes, bytes]:
    """Frame, compress and seal ``datagrams`` (sequence numbers ``first_seq ..``) for ``agent_id``.

    ``codec=None`` (the default) seals record blocks under ``AUTO_COLUMNAR_BYTES`` (1 MiB) with codecs 2 and 3
    and keeps the smaller (codec 2 wins on a few datagrams whose templates are unknown, and on some
    template-heavy exports), larger ones with codec 3. ``dict_id``
    defaults to the bundled dictionary of the codec. ``record_length(datagram, set_id) -> int | None`` helps
    codec 3 cut v9/IPFIX data sets into records (e.g. ``wire.columnar.TemplateLengths().record_length``).
    ``codec=Codec.COLUMNAR_LZMA`` (4) takes the same record block as codec 3 through LZMA2, ``level`` being
    the LZMA preset (0-9): for large backlog batches, where bytes matter more than CPU.
    ``codec=Codec.DELTA_LZMA`` (5) is codec 4 with chosen fields stored as differences from the previous
    record (``wire.deltas``): fewer bytes again, for the DNS rung; ``field_widths(datagram, set_id)``
    (``TemplateLengths().field_widths``) names a template's fields, else the templates in the batch do;
    ``plans`` (a ``wire.deltas.PlanCache`` the caller keeps across batches) reuses codec 5's field plans
    instead of choosing them for every batch (most of codec 5's CPU).
    ``context`` (non-empty; ``codec`` None, ``Codec.ZSTD`` or ``Codec.COLUMNAR``, None meaning columnar):
    the record block compressed against that context, named in the header by ``FLAG_CONTEXT`` and
    ``context_id`` (docs/protocol.md section 3.3). Returns the body and the context it leaves once
    acknowledged (``context_of`` its record block).
    Caller mistakes (bad agent id, key or nonce length, unknown dictionary, values the format cannot carry)
    raise ``ValueError`` (``BadKey``/``BadAgentId`` are ValueErrors too).
    """
    validate_agent_id(agent_id)
    secret = key_bytes(key)
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes, got {len(nonce)}")
    count = len(datagrams)
    if (count and not first_seq >= 1) or first_seq < 0 or first_seq + count - 1 > _U64:
        raise ValueError(f"first_seq {first_seq} with {count} datagrams is outside 1..2**64-1")
    flags = 0
    if context is not None:
        if not context or codec not in (None, Codec.ZSTD, Codec.COLUMNAR) or dict_id is not None:
            raise ValueError("a context must be non-empty, with codec 1, 3 or None and no dict_id")
        codec = Codec.COLUMNAR if codec is None else Codec(codec)
        if codec is Codec.COLUMNAR:
            raw = encode_block(datagrams, agent_info, columnar.payload_encoder(record_length))
        else:
            raw = encode_block(datagrams, agent_info)
        best = (codec, context_id(context)), compress_with_context(raw, context, level=level, codec=codec)
        flags = FLAG_CONTEXT
    elif codec is None:
        if dict_id is not None:
            raise ValueError("dict_id needs an explicit codec")
        raw = encode_block(datagrams, agent_info, columnar.payload_encoder(record_length))
        best = _pack(raw, Codec.COLUMNAR, level, _default_dict_id(Codec.COLUMNAR))
        if len(raw) < AUTO_COLUMNAR_BYTES and _default_dict_id(Codec.ZSTD_DICT):
            raw2 = encode_block(datagrams, agent_info)
            other = _pack(raw2, Codec.ZSTD_DICT, level, _default_dict_id(Codec.ZSTD_DICT))
            if len(other[1]) < len(best[1]):
                best, raw = other, raw2
    else:
        codec = Codec(codec)
        if dict_id is None:
            dict_id = _default_dict_id(codec)
        if codec is Codec.ZSTD_DICT and not dict_id:
            raise ValueError("codec zstd-dict needs a dictionary, and none is bundled in this flowtunnel")
        if codec in (Codec.NONE, Codec.ZSTD, Codec.COLUMNAR_LZMA, Codec.DELTA_LZMA, Codec.LZMA) and dict_id:
            raise ValueError(f"codec {codec.name.lower()} takes no dictionary, got dict_id {dict_id}")
        raw = _record_block(datagrams, codec, agent_info, record_length, field_widths, plans)
        best = _pack(raw, codec, level, dict_id)
    (codec, dict_id), packed = best
    _check_block_len(raw)
    body = _sealed(agent_id, flags, codec, dict_id, first_seq, count, raw, packed, nonce, secret)
    return body, context_of(raw, context)


def _record_block(
    datagrams: Sequence[Datagram], codec: Codec, agent_info: Mapping[str, int] | None,
    record_length: RecordLength | None, field_widths: FieldWidths | None, plans: PlanCache | None = None,
) -> bytes:
    """The record block for an explicit ``codec``: columnar (with field deltas for codec 5) for the columnar
    codecs, verbatim payloads for the others."""
    if codec not in _COLUMNAR_CODECS:
        return encode_block(datagrams, agent_info)
    encoder = columnar.payload_encoder(record_length, field_widths=field_widths,
                                       deltas=codec is Codec.DELTA_LZMA, plans=plans)
    return encode_block(datagrams, agent_info, encoder)


def _check_block_len(raw: bytes) -> None:
    if len(raw) > 0xFFFFFFFF:
        raise ValueError(f"record block of {len(raw)} bytes exceeds the format's 4 GiB limit")


def _sealed(
    agent_id: str, flags: int, codec: Codec, dict_id: int, first_seq: int, count: int, raw: bytes,
    packed: bytes, nonce: bytes, secret: bytes, *, aad_tail: bytes = b"",
) -> bytes:
    """Header + agent id + AEAD of ``packed`` (the compressed ``raw``), the header (and ``aad_tail``: a stream
    continuation's previous nonce) as associated data."""
    agent = agent_id.encode("ascii")
    header = HEADER.pack(
        MAGIC, VERSION, flags, int(codec), len(agent), dict_id, first_seq, count, len(raw),
        len(packed) + TAG_BYTES, nonce,
    ) + agent
    return header + _aead_seal(packed, header + aad_tail, nonce, secret)


def _pack(raw: bytes, codec: Codec, level: int, dict_id: int) -> tuple[tuple[Codec, int], bytes]:
    return (codec, dict_id), compress(raw, codec, level=level, dict_id=dict_id)


def context_of(record_block: bytes, context: bytes | None = None) -> bytes:
    """The context an acknowledged batch leaves: the last ``CONTEXT_BYTES`` of the ``context`` it was
    compressed against (none: nothing) followed by its record block as sealed (before compression; the
    opener has exactly these bytes after decompression). So a context holds the newest record blocks of an
    agent's recent batches, however small each is, back to the last batch sealed without one."""
    tail = bytes(record_block[-CONTEXT_BYTES:])
    if not context or len(tail) >= CONTEXT_BYTES:
        return tail
    return bytes(context[len(tail) - CONTEXT_BYTES :]) + tail


def context_id(context: bytes) -> int:
    """The header's name for ``context``: the first 4 bytes of its BLAKE2b-256 digest, big-endian (never 0:
    a digest starting with 4 zero bytes names itself 1)."""
    return int.from_bytes(blake2b_256(context)[:4], "big") or 1


def header_length(head: bytes) -> int | None:
    """The whole header's length (fixed part plus agent id) that the start of a body announces, or ``None``
    while ``head`` is too short to hold the agent id length byte."""
    return HEADER.size + head[AGENT_LEN_OFFSET] if len(head) > AGENT_LEN_OFFSET else None


def peek_header(body: bytes, limits: WireLimits | None = None) -> BatchHeader:
    """Parse and check the header of a sealed batch without the key (to find the agent and its key).

    Checks, in order: body size, magic, version, flags, codec, agent id, declared count and raw length
    against ``limits``, the dictionary id, and that the body is exactly header + sealed length long.
    Raises a ``WireError`` subclass naming the field, its value and the limit.
    """
    lim = limits or WireLimits()
    size = len(body)
    if size > lim.max_body:
        raise LimitExceeded(f"batch of {size} bytes exceeds max_body {lim.max_body}")
    if body[:4] != MAGIC[: min(4, size)]:
        raise BadMagic(f"body does not start with the batch magic {MAGIC!r} (got {bytes(body[:4])!r})")
    if size < 5:
        raise Truncated(f"batch of {size} bytes ends inside the {HEADER.size}-byte header")
    if body[4] != VERSION:
        raise UnsupportedVersion(
            f"batch format version {body[4]} is not supported (this side speaks {VERSION})"
        )
    if size < HEADER.size:
        raise Truncated(f"batch of {size} bytes ends inside the {HEADER.size}-byte header")
    (_, version, flags, codec_id, agent_len, dict_id, first_seq, count, raw_len, sealed_len, nonce) = (
        HEADER.unpack_from(body)
    )
    if flags & ~_KNOWN_FLAGS:
        raise MalformedHeader(f"header flags 0x{flags:02x} has unknown bits set (only 0x01, 0x02 and 0x04 "
                              "are defined)")
    try:
        codec = Codec(codec_id)
    except ValueError:
        raise MalformedHeader(f"codec id {codec_id} is unknown (known: 0-{max(Codec)})") from None
    if codec in _COLUMNAR_CODECS and not columnar.SUPPORTED:
        raise MalformedHeader(f"codec {int(codec)} (columnar) is not supported by this gateway version")
    if not 1 <= agent_len <= 63:
        raise MalformedHeader(f"agent id length {agent_len} is outside 1..63")
    header_len = HEADER.size + agent_len
    if size < header_len:
        raise Truncated(f"batch of {size} bytes ends inside the {header_len}-byte header")
    try:
        agent_id = validate_agent_id(bytes(body[HEADER.size : header_len]).decode("ascii"))
    except (UnicodeDecodeError, BadAgentId) as exc:
        raise MalformedHeader(f"header agent id is invalid: {exc}") from None
    if count > lim.max_count:
        raise LimitExceeded(f"batch of {count} datagrams exceeds max_count {lim.max_count}")
    if raw_len > lim.max_raw:
        raise LimitExceeded(f"batch record block of {raw_len} bytes exceeds max_raw {lim.max_raw}")
    if (count and first_seq < 1) or first_seq + count - 1 > _U64:
        raise MalformedHeader(f"first_seq {first_seq} with count {count} is outside 1..2**64-1")
    if raw_len < 2 + _MIN_RECORD_BYTES * count:
        raise MalformedHeader(f"raw length {raw_len} is too small for {count} records")
    if flags & (FLAG_STREAM | FLAG_STREAM_START):
        _check_stream_header(flags, codec, dict_id, count)
    elif flags & FLAG_CONTEXT:
        if codec not in (Codec.ZSTD, Codec.COLUMNAR) or not dict_id:
            raise MalformedHeader(f"a context batch needs codec 1 or 3 and a context id, header has codec "
                                  f"{int(codec)} and id {dict_id}")
    else:
        check_dictionary(codec, dict_id)
    if sealed_len < TAG_BYTES:
        raise MalformedHeader(f"sealed length {sealed_len} is shorter than the {TAG_BYTES}-byte tag")
    if codec is Codec.NONE and sealed_len != raw_len + TAG_BYTES:
        raise MalformedHeader(f"codec none: sealed length {sealed_len} != raw length {raw_len} + {TAG_BYTES}")
    if size < header_len + sealed_len:
        raise Truncated(f"batch of {size} bytes is shorter than its header and sealed length "
                        f"({header_len} + {sealed_len})")
    if size > header_len + sealed_len:
        raise MalformedHeader(f"batch has {size - header_len - sealed_len} bytes after the sealed block")
    return BatchHeader(
        version=version, flags=flags, codec=codec, dict_id=dict_id, agent_id=agent_id, first_seq=first_seq,
        count=count, raw_len=raw_len, sealed_len=sealed_len, nonce=bytes(nonce), header_len=header_len,
    )


def _check_stream_header(flags: int, codec: Codec, dict_id: int, count: int) -> None:
    if flags not in (FLAG_STREAM, FLAG_STREAM | FLAG_STREAM_START):
        raise MalformedHeader(f"header flags 0x{flags:02x}: a stream frame has flag 0x02, and 0x04 only "
                              "beside it, never 0x01")
    if codec not in STREAM_CODECS:
        raise MalformedHeader(f"a stream frame needs codec 4, 5 or 6, header has codec {int(codec)}")
    if not lzstream.SUPPORTED:
        raise MalformedHeader("stream frames are not supported here (liblzma could not be loaded)")
    if not count:
        raise MalformedHeader("a stream frame carries datagrams, header count is 0")
    stream_id, position = stream_of(dict_id)
    if not stream_id:
        raise MalformedHeader(f"stream frame names stream id 0 (dict_id {dict_id:#010x})")
    if (position == 0) != bool(flags & FLAG_STREAM_START):
        what = "a start frame must be at position 0" if position else "position 0 must be a start frame"
        raise MalformedHeader(f"stream frame at position {position}: {what}")


def open_batch(
    body: bytes, *, key: bytes | Key, limits: WireLimits | None = None,
    contexts: Mapping[int, bytes] | None = None, stream: OpenStream | None = None,
) -> Batch:
    """Verify, decrypt, decompress (bounded) and parse a sealed batch.

    ``contexts``: the compression contexts held for this agent, by ``context_id``; a batch naming one not
    there (or one that does not reproduce it) raises ``UnknownContext`` after authentication.
    ``stream``: the agent's stream held here, for a stream frame (docs/protocol.md section 3.4). A start
    frame opens a new one; a continuation opens only against the held stream of its id at its position
    (``UnknownContext`` before decrypting otherwise) and with the nonce of the frame before
    (``UnknownContext`` when the tag fails with it: another history, or a wrong key; a start frame then
    tells which). The stream after the frame is ``Batch.stream``; ``stream`` is advanced in place once
    decoding began, and its state is unknown after an error (discard it, unless ``stream.decoder.broken`` is
    False and its position unchanged: the frame did not reach the decoder).

    Error handling: every problem with ``body`` raises a ``WireError`` subclass (``AuthenticationFailed``
    for a wrong key or any altered byte; ``LimitExceeded`` before the work for sizes over ``limits``);
    a key that is not 32 bytes raises ``BadKey``.
    """
    lim = limits or WireLimits()
    secret = key_bytes(key)
    hdr = peek_header(body, lim)
    view = memoryview(body)
    aad = bytes(view[: hdr.header_len])
    continued = None
    if hdr.flags & FLAG_STREAM and not hdr.flags & FLAG_STREAM_START:
        continued = _held_stream(hdr, stream)
        aad += continued.last_nonce
    try:
        packed = _aead_open(bytes(view[hdr.header_len :]), aad, hdr.nonce, secret)
    except CryptoError:
        if continued is not None:
            raise UnknownContext(
                f"batch of agent {hdr.agent_id!r} (seq {hdr.first_seq}) does not authenticate as the next "
                f"frame of stream {continued.stream_id} held here (another history of that stream, or a "
                "wrong key); seal it in a new stream"
            ) from None
        raise AuthenticationFailed(
            f"batch of agent {hdr.agent_id!r} (seq {hdr.first_seq}, {hdr.count} datagrams) does not "
            "authenticate: wrong key, or altered in transit"
        ) from None
    if hdr.flags & FLAG_STREAM:
        return _open_frame(hdr, packed, lim, continued)
    context = None
    if hdr.flags & FLAG_CONTEXT:
        context = (contexts or {}).get(hdr.dict_id)
        if context is None:
            raise UnknownContext(
                f"batch of agent {hdr.agent_id!r} (seq {hdr.first_seq}, {hdr.count} datagrams) is compressed "
                f"against context {hdr.dict_id:#010x}, which this side does not hold; seal it afresh"
            )
    raw = decompress(packed, hdr.codec, dict_id=hdr.dict_id, raw_len=hdr.raw_len, context=context)
    datagrams, info = _parse_block(raw, hdr, lim)
    return Batch(
        agent_id=hdr.agent_id, first_seq=hdr.first_seq, datagrams=tuple(datagrams), agent_info=info,
        header=hdr, context=context_of(raw, context),
    )


def _parse_block(raw: bytes, hdr: BatchHeader, lim: WireLimits) -> tuple[list[Datagram], dict[str, int]]:
    """The datagrams and agent info of a decompressed record block, laid out as ``hdr.codec`` says."""
    if hdr.codec not in _COLUMNAR_CODECS:
        return decode_block(raw, hdr.count, max_datagram=lim.max_datagram, max_exporters=lim.max_exporters)
    return decode_block(
        raw, hdr.count, max_datagram=lim.max_datagram, max_exporters=lim.max_exporters,
        payload_decoder=columnar.payload_decoder(lim.max_raw, deltas=hdr.codec is Codec.DELTA_LZMA),
    )


def _held_stream(hdr: BatchHeader, stream: OpenStream | None) -> OpenStream:
    stream_id, position = stream_of(hdr.dict_id)
    if (stream is None or stream.stream_id != stream_id or stream.position != position
            or stream.decoder.broken):
        held = "none" if stream is None else f"stream {stream.stream_id} at position {stream.position}"
        raise UnknownContext(
            f"batch of agent {hdr.agent_id!r} (seq {hdr.first_seq}) continues stream {stream_id} at position "
            f"{position}, this side holds {held}; seal it in a new stream"
        )
    return stream


def _open_frame(hdr: BatchHeader, packed: bytes, lim: WireLimits, continued: OpenStream | None) -> Batch:
    stream = continued if continued is not None else OpenStream(stream_of(hdr.dict_id)[0])
    raw = stream.decoder.frame(packed, hdr.raw_len)
    stream.last_nonce = hdr.nonce
    datagrams, info = _parse_block(raw, hdr, lim)
    return Batch(agent_id=hdr.agent_id, first_seq=hdr.first_seq, datagrams=tuple(datagrams), agent_info=info,
                 header=hdr, stream=stream)
