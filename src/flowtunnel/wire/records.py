"""The record block: a batch's datagrams with their metadata, as one byte string before compression.

Layout (docs/protocol.md, "Record block"): agent info pairs, a table of sources (exporter address, exporter
port, local port), then per-record columns — receive-time deltas, source indexes, lengths — and finally the
payload section. Putting like with like in columns lets zstd see long runs of similar bytes. The payload
section is produced by a pluggable transform (verbatim concatenation, or the columnar codec) so the framing
stays one piece of code.

Decoding is vectorised (numpy) for the per-record columns, with the straightforward per-value parser kept as
the reference: a block the fast path does not accept outright is parsed again by the reference, which raises
the precise error, so both paths accept exactly the same blocks and name problems the same way.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from itertools import accumulate
from typing import TYPE_CHECKING

from flowtunnel.datagram import Datagram, make_datagram
from flowtunnel.wire.errors import LimitExceeded, MalformedRecords

if TYPE_CHECKING:  # numpy only for decoding (the gateway): sealing needs none (issue 14)
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "FAST_MIN_RECORDS",
    "INFO_KEY_RE",
    "MAX_INFO_ITEMS",
    "decode_block",
    "encode_block",
    "read_uvarint",
    "split_payloads",
    "uvarint_values",
    "write_uvarint",
]

INFO_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_.:-]{0,31}$")
MAX_INFO_ITEMS = 64
_U64 = (1 << 64) - 1
_PORTS = struct.Struct(">HH")
#: the vectorised paths take varints of at most 9 bytes (63 bits: every honest time delta, index and length);
#: a longer one sends the block to the reference parser
_FAST_VARINT_BYTES = 9
#: bound on the sum of |time delta| for the vectorised cumulative sum (int64, so no overflow below it)
_FAST_TIME_SUM = float(1 << 62)
#: blocks of fewer records are parsed value by value: numpy's fixed cost per call outweighs its speed there
FAST_MIN_RECORDS = 48

#: payload section encoder: payloads -> bytes; decoder: (block, offset, lengths) -> (payloads, new offset)
PayloadEncoder = Callable[[Sequence[bytes]], bytes]
PayloadDecoder = Callable[[memoryview, int, Sequence[int]], tuple[list[bytes], int]]


def write_uvarint(value: int, out: bytearray) -> None:
    """Append ``value`` (0 <= value < 2**64) as an unsigned LEB128 varint."""
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def read_uvarint(buf: memoryview | bytes, pos: int, what: str) -> tuple[int, int]:
    """Decode an unsigned LEB128 varint of at most 10 bytes at ``pos``; returns (value, next position)."""
    result = shift = 0
    end = len(buf)
    start = pos
    while True:
        if pos >= end:
            raise MalformedRecords(f"record block ends inside the varint {what} at offset {start}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift >= 70:
            raise MalformedRecords(f"varint {what} at offset {start} is longer than 10 bytes")
    if result > _U64:
        raise MalformedRecords(f"varint {what} at offset {start} exceeds 64 bits")
    return result, pos


def uvarint_values(
    arr: npt.NDArray[np.uint8], ends: npt.NDArray[np.intp]
) -> npt.NDArray[np.uint64] | None:
    """The LEB128 varints of ``arr`` whose last bytes are at ``ends`` (ascending; the first starts at 0), or
    None if one is longer than 9 bytes. Vectorised: a pass per byte position, not per value."""
    import numpy as np

    values = np.zeros(len(ends), dtype=np.uint64)
    if not len(ends):
        return values
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    sizes = ends - starts + 1
    longest = int(sizes.max())
    if longest > _FAST_VARINT_BYTES:
        return None
    low = arr & np.uint8(0x7F)
    values[:] = low[starts]
    for j in range(1, longest):
        sel = np.flatnonzero(sizes > j)
        values[sel] |= low[starts[sel] + j].astype(np.uint64) << np.uint64(7 * j)
    return values


def _zigzag(v: int) -> int:
    return (v << 1) if v >= 0 else ((-v) << 1) - 1


def _unzigzag(z: int) -> int:
    return (z >> 1) if not z & 1 else -((z + 1) >> 1)


def verbatim_payloads(payloads: Sequence[bytes]) -> bytes:
    return b"".join(payloads)


def verbatim_decode(block: memoryview, pos: int, lengths: Sequence[int]) -> tuple[list[bytes], int]:
    total = sum(lengths)
    data = bytes(block[pos : pos + total])
    if len(data) < total:  # the caller checks; a short section must not yield short payloads silently
        raise MalformedRecords(f"record lengths add up to {total} bytes, only {len(data)} remain")
    return split_payloads(data, lengths), pos + total


def split_payloads(data: bytes, lengths: Sequence[int] | npt.NDArray[np.int64]) -> list[bytes]:
    """``data`` cut into consecutive pieces of ``lengths``."""
    tolist = getattr(lengths, "tolist", None)  # a numpy array (the vectorised decoder's)
    ends = list(accumulate(tolist() if tolist is not None else lengths))
    return [data[a:b] for a, b in zip([0, *ends], ends, strict=False)]


def encode_block(
    datagrams: Sequence[Datagram],
    agent_info: Mapping[str, int] | None = None,
    payload_encoder: PayloadEncoder = verbatim_payloads,
) -> bytes:
    """The record block for ``datagrams``. Raises ``ValueError`` on values the format cannot carry (caller's
    bug: the agent only holds datagrams it received)."""
    out = bytearray()
    info = dict(agent_info or {})
    if len(info) > MAX_INFO_ITEMS:
        raise ValueError(f"agent_info has {len(info)} items, the limit is {MAX_INFO_ITEMS}")
    write_uvarint(len(info), out)
    for k, v in info.items():
        if not INFO_KEY_RE.match(k):
            raise ValueError(f"agent_info key {k!r} must match {INFO_KEY_RE.pattern}")
        if not 0 <= int(v) <= _U64:
            raise ValueError(f"agent_info[{k!r}] = {v} is outside 0..2**64-1")
        out.append(len(k))
        out += k.encode("ascii")
        write_uvarint(int(v), out)
    sources: dict[tuple[str, int, int], int] = {}
    index: list[int] = []
    for d in datagrams:
        key = (d.exporter, d.exporter_port, d.local_port)
        i = sources.get(key)
        if i is None:
            i = sources[key] = len(sources)
        index.append(i)
    write_uvarint(len(sources), out)
    for exporter, eport, lport in sources:
        try:
            addr = ipaddress.ip_address(exporter.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"datagram exporter {exporter!r} is not an IP address") from None
        if not (0 <= eport <= 0xFFFF and 0 <= lport <= 0xFFFF):
            raise ValueError(f"datagram ports {eport}/{lport} outside 0..65535")
        out.append(addr.version)
        out += addr.packed
        out += _PORTS.pack(eport, lport)
    prev = 0
    for d in datagrams:
        if not 0 <= d.received_ns < (1 << 63):
            raise ValueError(f"datagram received_ns {d.received_ns} outside 0..2**63-1")
        write_uvarint(_zigzag(d.received_ns - prev), out)
        prev = d.received_ns
    for i in index:
        write_uvarint(i, out)
    payloads = [d.payload for d in datagrams]
    for p in payloads:
        write_uvarint(len(p), out)
    out += payload_encoder(payloads)
    return bytes(out)


def decode_block(
    block: bytes,
    count: int,
    *,
    max_datagram: int,
    max_exporters: int,
    payload_decoder: PayloadDecoder = verbatim_decode,
) -> tuple[list[Datagram], dict[str, int]]:
    """Parse a record block holding ``count`` records. Raises ``MalformedRecords`` on any inconsistency
    (including trailing bytes) and ``LimitExceeded`` for a datagram or source table over the limits."""
    buf = memoryview(block)
    info, src, pos = _head(buf, count, max_exporters)
    columns = None
    if count >= FAST_MIN_RECORDS:
        columns = _fast_columns(buf, pos, count, len(src), max_datagram, payload_decoder is verbatim_decode)
    if columns is None:
        # Something is off (or merely unusual, like a 10-byte varint): the reference parser decides.
        times, idx, lengths, pos = _columns_reference(buf, pos, count, len(src), max_datagram,
                                                      payload_decoder is verbatim_decode)
    else:
        times, idx, lengths, pos = columns
    payloads, pos = payload_decoder(buf, pos, lengths)
    if pos != len(buf):
        raise MalformedRecords(f"record block has {len(buf) - pos} trailing bytes after {count} records")
    return _datagrams(times, src, idx, payloads), info


def _datagrams(
    times: list[int], src: list[tuple[str, int, int]], idx: list[int], payloads: list[bytes]
) -> list[Datagram]:
    """The decoded datagrams (``Datagram`` objects equal to ones built by its constructor)."""
    out: list[Datagram] = []
    add = out.append
    exporter, eport, lport = src[0] if src else ("", 0, 0)
    one_source = len(src) == 1
    for i, (t, p) in enumerate(zip(times, payloads, strict=True)):
        if not one_source:
            exporter, eport, lport = src[idx[i]]
        add(make_datagram(t, exporter, eport, lport, p))
    return out


def _head(
    buf: memoryview, count: int, max_exporters: int
) -> tuple[dict[str, int], list[tuple[str, int, int]], int]:
    """The agent info and the source table: (info, sources, position after them)."""
    pos = 0
    n_info, pos = read_uvarint(buf, pos, "agent info count")
    if n_info > MAX_INFO_ITEMS:
        raise MalformedRecords(f"agent info has {n_info} items, the limit is {MAX_INFO_ITEMS}")
    info: dict[str, int] = {}
    for _ in range(n_info):
        if pos >= len(buf):
            raise MalformedRecords(f"record block ends in the agent info at offset {pos}")
        klen = buf[pos]
        key_bytes = bytes(buf[pos + 1 : pos + 1 + klen])
        if len(key_bytes) != klen:
            raise MalformedRecords(f"record block ends in an agent info key at offset {pos}")
        try:
            key = key_bytes.decode("ascii")
        except UnicodeDecodeError:
            key = ""
        if not INFO_KEY_RE.match(key):
            raise MalformedRecords(f"agent info key at offset {pos} is not of the form {INFO_KEY_RE.pattern}")
        pos += 1 + klen
        info[key], pos = read_uvarint(buf, pos, f"agent info {key}")
    n_src, pos = read_uvarint(buf, pos, "source count")
    if n_src > max_exporters:
        raise LimitExceeded(f"batch has {n_src} sources (exporter, port, local port), max_exporters is "
                            f"{max_exporters}")
    if n_src == 0 and count:
        raise MalformedRecords(f"batch declares {count} records but an empty source table")
    src: list[tuple[str, int, int]] = []
    for i in range(n_src):
        if pos >= len(buf):
            raise MalformedRecords(f"record block ends in source {i} at offset {pos}")
        family = buf[pos]
        alen = 4 if family == 4 else 16 if family == 6 else 0
        if not alen:
            raise MalformedRecords(f"source {i} at offset {pos} has address family {family}, expected 4 or 6")
        end = pos + 1 + alen + 4
        if end > len(buf):
            raise MalformedRecords(f"record block ends in source {i} at offset {pos}")
        raw = bytes(buf[pos + 1 : pos + 1 + alen])
        addr = str(ipaddress.IPv4Address(raw) if alen == 4 else ipaddress.IPv6Address(raw))
        eport, lport = _PORTS.unpack_from(buf, pos + 1 + alen)
        src.append((addr, eport, lport))
        pos = end
    return info, src, pos


_Columns = tuple[list[int], list[int], list[int], int]


def _fast_columns(
    buf: memoryview, pos: int, count: int, n_src: int, max_datagram: int, verbatim: bool
) -> _Columns | None:
    """The receive times, source indexes and lengths of ``count`` records at ``pos`` (and the position after
    them), vectorised; None when anything would be an error (or a varint is over 9 bytes): the caller then
    runs the reference parser, which names the problem. Work is bounded by 27 bytes per declared record."""
    import numpy as np

    if not count:
        return [], [], [], pos
    arr = np.frombuffer(buf, dtype=np.uint8, count=min(len(buf) - pos, 3 * _FAST_VARINT_BYTES * count),
                        offset=pos)
    ends = np.flatnonzero(arr < 0x80)
    if len(ends) < 3 * count:
        return None
    ends = ends[: 3 * count]
    values = uvarint_values(arr, ends)
    if values is None:
        return None
    z = values[:count].astype(np.int64)  # below 2**63: 9 varint bytes carry 63 bits
    deltas = (z >> 1) ^ -(z & 1)
    if float(np.abs(deltas).sum(dtype=np.float64)) >= _FAST_TIME_SUM:
        return None  # a cumulative sum could overflow int64: let the reference check every prefix
    times = np.cumsum(deltas)
    if int(times.min()) < 0:
        return None
    idx = values[count : 2 * count]
    lengths = values[2 * count :]
    if int(idx.max()) >= n_src or int(lengths.max()) > max_datagram:
        return None
    pos += int(ends[-1]) + 1
    if verbatim and int(lengths.sum()) > len(buf) - pos:
        return None
    return times.tolist(), idx.tolist(), lengths.tolist(), pos


def _columns_reference(
    buf: memoryview, pos: int, count: int, n_src: int, max_datagram: int, verbatim: bool
) -> _Columns:
    """The per-value parser of the record columns: raises the precise error for a bad block."""
    times: list[int] = []
    t = 0
    for i in range(count):
        z, pos = read_uvarint(buf, pos, f"time delta of record {i}")
        t += _unzigzag(z)
        if not 0 <= t < (1 << 63):
            raise MalformedRecords(f"record {i} receive time {t} is outside 0..2**63-1")
        times.append(t)
    idx: list[int] = []
    for i in range(count):
        s, pos = read_uvarint(buf, pos, f"source index of record {i}")
        if s >= n_src:
            raise MalformedRecords(f"record {i} refers to source {s}, the table has {n_src}")
        idx.append(s)
    lengths: list[int] = []
    total = 0
    for i in range(count):
        n, pos = read_uvarint(buf, pos, f"length of record {i}")
        if n > max_datagram:
            raise LimitExceeded(f"record {i} is a datagram of {n} bytes, max_datagram is {max_datagram}")
        lengths.append(n)
        total += n
    if total > len(buf) - pos and verbatim:
        raise MalformedRecords(f"record lengths add up to {total} bytes, only {len(buf) - pos} remain")
    return times, idx, lengths, pos
