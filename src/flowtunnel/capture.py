"""Reading packet captures: pcap/pcapng files (dpkt) → UDP datagrams → the NetFlow/IPFIX ones among them.

``flowtunnel decode`` and ``flowtunnel replay`` (and the demo) start from a capture somebody took with
tcpdump, Wireshark or a router, so the reader accepts the link types those write (Ethernet with VLAN tags,
Linux cooked SLL/SLL2, raw IP, BSD null/loopback), IPv4 and IPv6 (extension headers walked), and skips
what cannot carry a whole export datagram: IP fragments and frames cut short by the snap length, counted in
``CaptureStats`` so a caller can say how many it left out. NetFlow is recognised by content
(``flowtunnel.netflow.sniff``), on any port unless the caller narrows it.

Regular pcap files are memory-mapped and walked with ``struct`` in one loop that reads Ethernet + IPv4 + UDP
frames (what nearly every export capture holds) straight from the mapping; any other frame, pcapng, and
standard input go through the general per-frame path, which gives the same datagrams and counts (tested on
the vendor corpus and softflowd captures). dpkt (pcapng only) is imported when a pcapng file is opened, to
keep it out of the start-up time of ``flowtunnel decode``.

Error handling: a missing, unreadable or non-capture file, and an unsupported link type, raise
``CaptureError`` when the reader is created; a file cut short mid-record ends the iteration and sets
``CaptureStats.truncated_file`` (tcpdump killed mid-write is common and the packets before are good).
"""

from __future__ import annotations

import io
import mmap
import socket
import struct
import sys
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from flowtunnel.errors import FlowtunnelError
from flowtunnel.netflow import sniff

__all__ = [
    "STDIN",
    "CaptureError",
    "CaptureReader",
    "CaptureStats",
    "NetflowDatagram",
    "UdpDatagram",
    "find_netflow",
    "read_udp",
]

# Link-layer header types (https://www.tcpdump.org/linktypes.html) this reader understands.
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW_BSD = 12  # DLT_RAW on most BSDs
LINKTYPE_RAW_OPENBSD = 14
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

_LINKTYPE_NAMES = {
    LINKTYPE_NULL: "null (BSD loopback)",
    LINKTYPE_ETHERNET: "Ethernet",
    LINKTYPE_RAW_BSD: "raw IP",
    LINKTYPE_RAW_OPENBSD: "raw IP",
    LINKTYPE_RAW: "raw IP",
    LINKTYPE_LOOP: "OpenBSD loopback",
    LINKTYPE_LINUX_SLL: "Linux cooked (SLL)",
    LINKTYPE_IPV4: "raw IPv4",
    LINKTYPE_IPV6: "raw IPv6",
    LINKTYPE_LINUX_SLL2: "Linux cooked v2 (SLL2)",
}

_ETH_IP4 = 0x0800
_ETH_IP6 = 0x86DD
_ETH_VLAN = frozenset((0x8100, 0x88A8, 0x9100))
# BSD address families for IPv6 differ per OS (Linux 10, BSDs 24, FreeBSD 28, macOS 30).
_AF_INET6 = frozenset((10, 24, 28, 30))
# IPv6 extension headers that may precede UDP; fragments (44) are handled apart.
_IP6_EXT = frozenset((0, 43, 60, 135, 139, 140))
_IP6_FRAGMENT = 44
_PROTO_UDP = 17

_PCAP_MAGICS = frozenset((b"\xa1\xb2\xc3\xd4", b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\x3c\x4d", b"\x4d\x3c\xb2\xa1"))
_PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"

_U16 = struct.Struct("!H")
_U32_LE = struct.Struct("<I")
_U32_BE = struct.Struct("!I")
_UDP_HDR = struct.Struct("!HHH")  # sport, dport, length (checksum not needed)
# Ethernet (no VLAN tag) + IPv4 without options + UDP, in one unpack: ethertype, version/IHL, total length,
# flags/fragment offset, protocol, source, destination, sport, dport, UDP length.
_ETH_IP4_UDP = struct.Struct("!12xHBxH2xHxB2x4s4sHHH")
_UDP4_AT = 14 + 20  # where that UDP header starts in the frame
_UDP4_PAYLOAD_AT = _UDP4_AT + 8  # and its payload
_READ_ERRORS = (ValueError, struct.error, EOFError)  # a record cut short (pcapng errors are mapped to these)

STDIN = "-"
"""The path that means "read the capture from standard input" (``tcpdump -w - | flowtunnel decode -``)."""

_OffsetFn = Callable[[bytes], int]  # frame -> offset of the IP header, -1 not IP, -2 truncated


class CaptureError(FlowtunnelError):
    """The capture file is missing, unreadable, not a pcap/pcapng file, or of an unsupported link type."""


@dataclass(frozen=True, slots=True, kw_only=True)
class UdpDatagram:
    """One UDP datagram found in a capture: when, from where to where, and its payload."""

    time: float  # capture timestamp, Unix seconds
    src: str  # source IP address as text (no brackets)
    sport: int
    dst: str
    dport: int
    payload: bytes

    @property
    def exporter(self) -> str:
        """The sender as ``"ip:port"`` (``"[v6]:port"``), the form ``Decoder.decode`` takes."""
        return f"[{self.src}]:{self.sport}" if ":" in self.src else f"{self.src}:{self.sport}"


@dataclass(frozen=True, slots=True, kw_only=True)
class NetflowDatagram:
    """A UDP datagram that ``sniff`` recognised as NetFlow v5/v9 or IPFIX (``version`` 5, 9 or 10)."""

    version: int
    datagram: UdpDatagram


@dataclass(slots=True)
class CaptureStats:
    """What a ``CaptureReader`` saw; every frame is in exactly one of the counters after ``packets``."""

    packets: int = 0  # frames read from the file
    udp: int = 0  # whole UDP datagrams yielded
    fragments: int = 0  # IPv4/IPv6 fragments (skipped: a fragment does not hold a whole datagram)
    truncated: int = 0  # frames cut short by the snap length or malformed headers
    not_udp: int = 0  # IP packets of another protocol
    not_ip: int = 0  # ARP, LLDP and other non-IP frames
    truncated_file: bool = False  # the file ended in the middle of a record
    link_types: set[int] = field(default_factory=set)


class CaptureReader:
    """Iterates over the whole UDP datagrams of a pcap or pcapng file, in file order.

    ``with CaptureReader(path) as reader: for dgram in reader: ...``; ``reader.stats`` counts what was
    skipped and why. Iterate once. ``path`` ``"-"`` reads standard input (a pipe from tcpdump).

    Error handling: ``CaptureError`` from the constructor for a missing, unreadable or non-capture file or
    an unsupported link type; never during iteration (a cut-short file sets ``stats.truncated_file``).
    Resource handling: the file is closed by ``close()``/the context manager, or at the end of iteration.
    """

    def __init__(self, path: Path | str, *, fast_path: bool = True) -> None:
        """``fast_path=False`` sends every frame through the general path (to compare the two)."""
        self.path = Path(path)
        self.stats = CaptureStats()
        self._owned = str(path) != STDIN
        self._fast_path = fast_path
        try:
            self._file: BinaryIO = self.path.open("rb") if self._owned else sys.stdin.buffer
        except FileNotFoundError:
            raise CaptureError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise CaptureError(f"{self.path}: is a directory, not a capture file") from None
        except OSError as exc:
            raise CaptureError(f"{self.path}: cannot read: {exc.strerror}") from None
        magic = b""
        try:
            if self._owned:
                magic = self._file.read(4)
                self._file.seek(0)
            elif isinstance(self._file, io.BufferedReader):  # a pipe cannot seek back: peek instead
                magic = self._file.peek(4)[:4]
            else:
                raise CaptureError("standard input is not a byte stream that a capture can be read from")
            if magic in _PCAP_MAGICS:
                self.format = "pcap"
                self._reader: Any = _PcapReader(self._file)
            elif magic == _PCAPNG_MAGIC:
                self.format = "pcapng"
                self._reader = _PcapngReader(self._file)
            else:
                shown = magic.hex() if magic else "an empty file"
                raise CaptureError(
                    f"{self.path}: not a pcap or pcapng capture (starts with {shown}; "
                    "expected pcap magic a1b2c3d4/a1b23c4d or pcapng 0a0d0d0a)"
                )
            self.linktype: int = int(self._reader.datalink())
        except CaptureError:
            self.close()
            raise
        except (ValueError, struct.error, OSError, EOFError) as exc:
            self.close()
            raise CaptureError(f"{self.path}: unreadable {magic.hex()} capture header: {exc}") from None
        if self.linktype not in _LINKTYPE_NAMES:
            self.close()
            supported = ", ".join(f"{n} ({k})" for k, n in sorted(_LINKTYPE_NAMES.items()))
            raise CaptureError(
                f"{self.path}: link type {self.linktype} is not supported (supported: {supported})"
            )
        self.stats.link_types.add(self.linktype)
        self._addr_cache: dict[bytes, str] = {}

    def __enter__(self) -> CaptureReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._owned:
            self._file.close()

    def __iter__(self) -> Iterator[UdpDatagram]:
        try:
            mapped = self._map() if self._fast_path else None
            if mapped is None:
                yield from self._iter_frames()
            else:
                with mapped:
                    yield from self._iter_mapped(mapped)
        finally:
            self.close()

    def _map(self) -> mmap.mmap | None:
        """The whole pcap file mapped read-only, or None where the general path must read it (pcapng,
        standard input, a file mmap refuses)."""
        if self.format != "pcap" or not self._owned:
            return None
        try:
            return mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            return None

    def _iter_frames(self) -> Iterator[UdpDatagram]:
        stats = self.stats
        network = self._network_offset_fn()
        frames = iter(self._reader)
        while True:
            try:
                ts, frame = next(frames)
            except StopIteration:
                return
            except _READ_ERRORS:
                stats.truncated_file = True
                return
            stats.packets += 1
            dgram = self._frame(frame, float(ts), network)
            if dgram is not None:
                yield dgram

    def _iter_mapped(self, buf: mmap.mmap) -> Iterator[UdpDatagram]:
        """The pcap records of ``buf``; Ethernet + IPv4 + UDP frames decoded in place, the rest by ``_frame``.

        The inline branch takes a frame only when it is sure of the outcome and applies the general path's
        checks in the same order (fragment, protocol, lengths), so both count every frame alike."""
        stats = self.stats
        reader: _PcapReader = self._reader
        record = reader.record.unpack_from
        divisor = reader.divisor
        network = self._network_offset_fn()
        ethernet = self.linktype == LINKTYPE_ETHERNET
        headers = _ETH_IP4_UDP.unpack_from
        addr = self._addr
        size = len(buf)
        pos = 24  # after the file header, which _PcapReader has read
        while pos < size:
            if size - pos < 16:
                stats.truncated_file = True
                return
            sec, frac, caplen, _ = record(buf, pos)
            start = pos + 16
            pos = start + caplen
            if pos > size:
                stats.truncated_file = True
                return
            stats.packets += 1
            if ethernet and caplen >= _UDP4_PAYLOAD_AT:
                ethertype, vihl, total, frag, proto, src, dst, sport, dport, ulen = headers(buf, start)
                if ethertype == _ETH_IP4 and vihl == 0x45 and not frag & 0x3FFF:
                    if proto != _PROTO_UDP:
                        stats.not_udp += 1
                        continue
                    # total 0: TSO-offloaded capture, trust the frame (as _udp does)
                    limit = min(14 + total, caplen) if total else caplen
                    if ulen >= 8 and _UDP4_AT + ulen <= limit:
                        stats.udp += 1
                        yield UdpDatagram(
                            time=sec + frac / divisor, src=addr(src), sport=sport, dst=addr(dst), dport=dport,
                            payload=buf[start + _UDP4_PAYLOAD_AT : start + _UDP4_AT + ulen],
                        )
                        continue
            dgram = self._frame(buf[start:pos], sec + frac / divisor, network)
            if dgram is not None:
                yield dgram

    def _frame(self, frame: bytes, ts: float, network: _OffsetFn) -> UdpDatagram | None:
        """The whole UDP datagram in ``frame``, or None with the reason counted."""
        stats = self.stats
        start = network(frame)
        if start < 0:
            if start == -1:
                stats.not_ip += 1
            else:
                stats.truncated += 1
            return None
        dgram = self._udp(frame, start, ts)
        if dgram is not None:
            stats.udp += 1
        return dgram

    # --- link layer: offset of the IP header in the frame, -1 not IP, -2 truncated ----------------------

    def _network_offset_fn(self) -> _OffsetFn:
        lt = self.linktype
        if lt == LINKTYPE_ETHERNET:
            return _ethernet_offset
        if lt == LINKTYPE_LINUX_SLL:
            return _sll_offset
        if lt == LINKTYPE_LINUX_SLL2:
            return _sll2_offset
        if lt in (LINKTYPE_NULL, LINKTYPE_LOOP):
            return _null_offset
        return _raw_offset

    # --- network and transport layers ------------------------------------------------------------------

    def _addr(self, raw: bytes) -> str:
        text = self._addr_cache.get(raw)
        if text is None:
            text = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
            if len(self._addr_cache) < 65536:
                self._addr_cache[raw] = text
        return text

    def _udp(self, frame: bytes, ip: int, ts: float) -> UdpDatagram | None:
        stats = self.stats
        if len(frame) < ip + 1:
            stats.truncated += 1
            return None
        version = frame[ip] >> 4
        if version == 4:
            if len(frame) < ip + 20:
                stats.truncated += 1
                return None
            ihl = (frame[ip] & 0x0F) * 4
            total = _U16.unpack_from(frame, ip + 2)[0]
            frag = _U16.unpack_from(frame, ip + 6)[0]
            if frag & 0x3FFF:  # more-fragments flag or a fragment offset
                stats.fragments += 1
                return None
            if frame[ip + 9] != _PROTO_UDP:
                stats.not_udp += 1
                return None
            if ihl < 20:
                stats.truncated += 1
                return None
            src, dst = frame[ip + 12 : ip + 16], frame[ip + 16 : ip + 20]
            udp = ip + ihl
            end = ip + total if total else len(frame)  # 0: TSO-offloaded capture, trust the frame
        elif version == 6:
            if len(frame) < ip + 40:
                stats.truncated += 1
                return None
            plen = _U16.unpack_from(frame, ip + 4)[0]
            nxt = frame[ip + 6]
            src, dst = frame[ip + 8 : ip + 24], frame[ip + 24 : ip + 40]
            udp = ip + 40
            end = udp + plen if plen else len(frame)  # 0: jumbogram or offload, trust the frame
            while nxt in _IP6_EXT:
                if len(frame) < udp + 8:
                    stats.truncated += 1
                    return None
                nxt, hlen = frame[udp], (frame[udp + 1] + 1) * 8
                udp += hlen
            if nxt == _IP6_FRAGMENT:
                stats.fragments += 1
                return None
            if nxt != _PROTO_UDP:
                stats.not_udp += 1
                return None
        else:
            stats.not_ip += 1
            return None
        if len(frame) < udp + 8:
            stats.truncated += 1
            return None
        sport, dport, ulen = _UDP_HDR.unpack_from(frame, udp)
        if ulen < 8 or udp + ulen > min(end, len(frame)):
            stats.truncated += 1
            return None
        return UdpDatagram(
            time=ts, src=self._addr(src), sport=sport, dst=self._addr(dst), dport=dport,
            payload=frame[udp + 8 : udp + ulen],
        )


class _PcapReader:
    """Classic pcap (microsecond or nanosecond, either byte order), read record by record.

    Own code rather than ``dpkt.pcap.Reader`` because a record cut short at the end of the file must be told
    apart from a frame cut by the snap length (dpkt returns both as a short frame).
    """

    def __init__(self, f: BinaryIO) -> None:
        header = f.read(24)
        if len(header) < 24:
            raise EOFError(f"pcap file header is {len(header)} of 24 bytes")
        magic = header[:4]
        order = ">" if magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d") else "<"
        self.divisor = 1e9 if magic in (b"\xa1\xb2\x3c\x4d", b"\x4d\x3c\xb2\xa1") else 1e6
        self.record = struct.Struct(order + "IIII")  # sec, usec/nsec, captured length, original length
        self._linktype = struct.unpack_from(order + "I", header, 20)[0] & 0x0FFFFFFF
        self._file = f

    def datalink(self) -> int:
        return int(self._linktype)

    def __iter__(self) -> Iterator[tuple[float, bytes]]:
        read = self._file.read
        record = self.record
        size = record.size
        divisor = self.divisor
        while True:
            head = read(size)
            if not head:
                return
            if len(head) < size:
                raise EOFError(f"pcap record header is {len(head)} of {size} bytes")
            sec, frac, caplen, _ = record.unpack(head)
            frame = read(caplen)
            if len(frame) < caplen:
                raise EOFError(f"pcap record of {caplen} bytes has only {len(frame)}")
            yield sec + frac / divisor, frame


class _PcapngReader:
    """``dpkt.pcapng.Reader`` with dpkt imported on first use and its errors mapped to ``ValueError``."""

    def __init__(self, f: BinaryIO) -> None:
        import dpkt  # here, not at the top: only pcapng needs it, and it costs start-up time

        self._error: type[Exception] = dpkt.Error
        try:
            self._reader = dpkt.pcapng.Reader(f)
        except dpkt.Error as exc:
            raise ValueError(str(exc) or type(exc).__name__) from None

    def datalink(self) -> int:
        return int(self._reader.datalink())

    def __iter__(self) -> Iterator[tuple[float, bytes]]:
        frames = iter(self._reader)
        while True:
            try:
                ts, frame = next(frames)
            except StopIteration:
                return
            except self._error as exc:
                raise ValueError(str(exc) or type(exc).__name__) from None
            yield float(ts), bytes(frame)


def _ethernet_offset(frame: bytes) -> int:
    off = 12
    while True:
        if len(frame) < off + 2:
            return -2
        ethertype = _U16.unpack_from(frame, off)[0]
        if ethertype in _ETH_VLAN:
            off += 4
            continue
        if ethertype in (_ETH_IP4, _ETH_IP6):
            return off + 2
        return -1


def _sll_offset(frame: bytes) -> int:
    if len(frame) < 16:
        return -2
    proto = _U16.unpack_from(frame, 14)[0]
    return 16 if proto in (_ETH_IP4, _ETH_IP6) else -1


def _sll2_offset(frame: bytes) -> int:
    if len(frame) < 20:
        return -2
    proto = _U16.unpack_from(frame, 0)[0]
    return 20 if proto in (_ETH_IP4, _ETH_IP6) else -1


def _null_offset(frame: bytes) -> int:
    if len(frame) < 4:
        return -2
    # The family is in the byte order of the capturing host: accept either.
    family = _U32_LE.unpack_from(frame, 0)[0]
    if family > 0xFFFF:
        family = _U32_BE.unpack_from(frame, 0)[0]
    return 4 if family == 2 or family in _AF_INET6 else -1


def _raw_offset(frame: bytes) -> int:
    return 0


def read_udp(path: Path | str) -> CaptureReader:
    """A ``CaptureReader`` over ``path``: ``for dgram in read_udp(path): ...``. Raises ``CaptureError``."""
    return CaptureReader(path)


def find_netflow(
    datagrams: Iterable[UdpDatagram], *, ports: Collection[int] | None = None
) -> Iterator[NetflowDatagram]:
    """The datagrams that look like NetFlow v5/v9/IPFIX exports (by ``sniff``), in order.

    ``ports`` narrows the search to datagrams sent to one of those UDP destination ports (the collector's
    port); by default any port is searched, since exporters are configured with every port imaginable.
    """
    wanted = frozenset(ports) if ports else None
    for dgram in datagrams:
        if wanted is not None and dgram.dport not in wanted:
            continue
        version = sniff(dgram.payload)
        if version is not None:
            yield NetflowDatagram(version=version, datagram=dgram)
