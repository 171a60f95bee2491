"""Helpers for tests that drive real peers on loopback: softflowd, tshark, nfcapd/nfdump and tinyproxy.

Tests check flowtunnel against the tools people already run, never against mocks of them. Everything here
binds to 127.0.0.1 (or ::1) on free ports, writes into a directory the test owns (``tmp_path``) and stops
what it started, so tests can run in parallel and leave nothing behind.

Public API (stable; extend, do not change)::

    free_udp_port() -> int ; free_tcp_port() -> int ; have_tool(name) -> bool ; require(*tools)
    make_trace(path, *, flows=2000, seed=0, ipv6_share=0.2) -> TraceSummary
    run_softflowd(pcap, *, version, dest, extra_args=(), timeout=60) -> SoftflowdStats
    UdpCapture(host="127.0.0.1", port=0)            # context manager; .port .datagrams .payloads
    capture_softflowd(pcap, version, extra_args=()) -> SoftflowdExport
    tshark_records(pcap, ports=(2055,), *, include_options=False) -> list[dict[str, Any]]
    write_pcap(datagrams, path, *, dst_port, ...) -> int
    Nfcapd(workdir)                                 # context manager; .port .records() .exporters()
    Tinyproxy(workdir, auth=("user", "pass"))       # context manager; .url .proxy_url .log_text()
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import dpkt

__all__ = [
    "Datagram",
    "Nfcapd",
    "SoftflowdExport",
    "SoftflowdStats",
    "Tinyproxy",
    "TraceSummary",
    "UdpCapture",
    "capture_softflowd",
    "free_tcp_port",
    "free_udp_port",
    "have_tool",
    "make_trace",
    "require",
    "run_softflowd",
    "tshark_records",
    "write_pcap",
]

Datagram = tuple[bytes, tuple[str, int]]
"""A received UDP payload and the sender's (host, port)."""


def have_tool(name: str) -> bool:
    """True if the executable ``name`` is on PATH (tests skip cleanly when a Debian peer is missing)."""
    return shutil.which(name) is not None


def require(*tools: str) -> None:
    """Skip the calling test when a Debian peer (softflowd, tshark, nfcapd, ...) is not installed."""
    missing = [t for t in tools if not have_tool(t)]
    if missing:
        import pytest

        pytest.skip(f"not installed: {', '.join(missing)}")


# ---------------------------------------------------------------------------------------------- ports


def _free_port(kind: int, host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port that was free on ``host`` a moment ago (the kernel's ephemeral pick)."""
    return _free_port(socket.SOCK_DGRAM, host)


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the kernel's ephemeral pick)."""
    return _free_port(socket.SOCK_STREAM, host)


def _wait_tcp_listening(
    host: str, port: int, proc: subprocess.Popen[bytes], what: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not listening on {host}:{port} after {timeout} s") from None
            time.sleep(0.02)


def _udp_bound(host: str, port: int) -> bool:
    """True if some socket is bound to UDP ``host:port`` (read from /proc, so no probe traffic is sent)."""
    ip = ipaddress.ip_address(host)
    table = "/proc/net/udp6" if ip.version == 6 else "/proc/net/udp"
    raw = ip.packed
    if ip.version == 4:
        want = raw[::-1].hex().upper()
    else:  # /proc prints IPv6 as four host-order 32-bit words
        want = "".join(raw[i : i + 4][::-1].hex().upper() for i in range(0, 16, 4))
    any_addr = "0" * len(want)
    try:
        lines = Path(table).read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        local = line.split()[1]
        addr, _, hexport = local.partition(":")
        if int(hexport, 16) == port and addr in (want, any_addr):
            return True
    return False


def _udp_rx_queue(host: str, port: int) -> int | None:
    """Bytes waiting in the receive queue of the socket bound to UDP ``host:port`` (None: no such socket)."""
    ip = ipaddress.ip_address(host)
    table = "/proc/net/udp6" if ip.version == 6 else "/proc/net/udp"
    try:
        lines = Path(table).read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        cols = line.split()
        if int(cols[1].partition(":")[2], 16) == port:
            return int(cols[4].partition(":")[2], 16)
    return None


def _wait_udp_drained(host: str, port: int, *, settle: float = 0.2, timeout: float = 30.0) -> None:
    """Wait until the peer bound to ``host:port`` has read every queued datagram, then ``settle`` more."""
    deadline = time.monotonic() + timeout
    while (_udp_rx_queue(host, port) or 0) > 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(settle)


def _wait_udp_bound(host: str, port: int, proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _udp_bound(host, port):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before binding UDP {host}:{port}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not bind UDP {host}:{port} within {timeout} s")
        time.sleep(0.02)


def _stop_process(proc: subprocess.Popen[bytes], *, timeout: float = 10.0) -> int:
    """SIGTERM (so the peer flushes), then SIGKILL if it does not exit within ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    code: int = proc.returncode
    return code


# ---------------------------------------------------------------------------------------------- traces


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceSummary:
    """What ``make_trace`` wrote: ``flows`` conversations made of ``packets`` packets.

    ``biflows`` is how many bidirectional flows a flow meter keyed on the 5-tuple sees: one per TCP or UDP
    conversation, two per ICMP echo conversation (request and reply differ in type, which softflowd and
    NetFlow carry in the destination port). Unidirectional records are twice that.
    """

    path: Path
    flows: int
    packets: int
    ipv4_flows: int
    ipv6_flows: int
    by_protocol: dict[str, int]
    biflows: int
    ipv4_biflows: int


_ETH_HDR_V4 = b"\x04\x04\x04\x04\x04\x04" + b"\x02\x02\x02\x02\x02\x02" + b"\x08\x00"
_ETH_HDR_V6 = b"\x04\x04\x04\x04\x04\x04" + b"\x02\x02\x02\x02\x02\x02" + b"\x86\xdd"
_IP4 = struct.Struct(">BBHHHBBH4s4s")
_IP6 = struct.Struct(">IHBB16s16s")
_TCP = struct.Struct(">HHIIBBHHH")
_UDP = struct.Struct(">HHHH")
_ICMP = struct.Struct(">BBHHH")


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _frame(src: bytes, dst: bytes, proto: int, l4: bytes) -> bytes:
    """Ethernet + IPv4/IPv6 header around a transport segment (IPv4 header checksum filled in)."""
    if len(src) == 4:
        hdr = _IP4.pack(0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0, src, dst)
        hdr = hdr[:10] + struct.pack(">H", _checksum(hdr)) + hdr[12:]
        return _ETH_HDR_V4 + hdr + l4
    return _ETH_HDR_V6 + _IP6.pack(6 << 28, len(l4), proto, 64, src, dst) + l4


def make_trace(
    path: Path | str, *, flows: int = 2000, seed: int = 0, ipv6_share: float = 0.2
) -> TraceSummary:
    """Write a pcap (Ethernet) of ``flows`` synthetic conversations that exercise every kind of flow record.

    Each conversation is TCP (SYN, SYN+ACK, ACK/PSH data, FIN+ACK; some end in RST), UDP (request and replies)
    or ICMP/ICMPv6 echo, over IPv4 or IPv6 (``ipv6_share`` of them), with 2 to 8 packets of varied sizes,
    starting at random times over three minutes. Addresses and ports are unique per conversation, so a
    flow meter sees exactly ``flows`` distinct 5-tuples per direction. Deterministic for a ``seed``.
    Transport checksums are left zero: flow meters do not check them.
    """
    rnd = random.Random(seed)
    base = 1_700_000_000.0
    packets: list[tuple[float, int, bytes]] = []
    by_proto = {"tcp": 0, "udp": 0, "icmp": 0}
    v6_flows = 0
    v4_icmp = 0
    for i in range(flows):
        v6 = rnd.random() < ipv6_share
        kind = rnd.choices(("tcp", "udp", "icmp"), weights=(5, 3, 2))[0]
        by_proto[kind] += 1
        v4_icmp += kind == "icmp" and not v6
        if v6:
            v6_flows += 1
            a = b"\x20\x01\x0d\xb8\x00\x00" + i.to_bytes(4, "big") + bytes(5) + b"\x01"
            b = b"\x20\x01\x0d\xb8\x00\x99" + bytes(8) + (i % 65000 + 1).to_bytes(2, "big")
        else:
            a = bytes((10, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF))
            b = bytes((198, 51, 100 + (i % 3), i % 250 + 1))
        sport = 1024 + (i * 7919) % 60000
        dport = rnd.choice((80, 443, 53, 123, 8080, 25, 22))
        start = base + rnd.uniform(0.0, 180.0)
        count = rnd.randint(2, 8)
        for k in range(count):
            forward = k % 2 == 0
            src, dst = (a, b) if forward else (b, a)
            ps, pd = (sport, dport) if forward else (dport, sport)
            sizes = (8, 56, 1000) if kind == "icmp" else (0, 0, 40, 100, 512, 1000, 1400)
            size = rnd.choice(sizes)
            if kind == "tcp":
                if k == 0:
                    flags = 0x02  # SYN
                elif k == 1:
                    flags = 0x12  # SYN+ACK
                elif k == count - 1:
                    flags = 0x04 if rnd.random() < 0.1 else 0x11  # RST or FIN+ACK
                else:
                    flags = 0x18 if size else 0x10  # PSH+ACK or ACK
                l4 = _TCP.pack(ps, pd, 1000 + k, 2000 + k, 5 << 4, flags, 65535, 0, 0) + bytes(size)
                proto = 6
            elif kind == "udp":
                l4 = _UDP.pack(ps, pd, 8 + size, 0) + bytes(size)
                proto = 17
            else:
                if v6:
                    l4 = _ICMP.pack(128 if forward else 129, 0, 0, i & 0xFFFF, k) + bytes(size)
                    proto = 58
                else:
                    l4 = _ICMP.pack(8 if forward else 0, 0, 0, i & 0xFFFF, k) + bytes(size)
                    proto = 1
            packets.append((start + k * rnd.uniform(0.001, 0.2), len(packets), _frame(src, dst, proto, l4)))
    packets.sort()
    out = Path(path)
    with out.open("wb") as f:
        writer = dpkt.pcap.Writer(f, snaplen=65535, linktype=dpkt.pcap.DLT_EN10MB)
        for ts, _, frame in packets:
            writer.writepkt(frame, ts)
    return TraceSummary(
        path=out, flows=flows, packets=len(packets), ipv4_flows=flows - v6_flows, ipv6_flows=v6_flows,
        by_protocol=by_proto, biflows=flows + by_proto["icmp"], ipv4_biflows=flows - v6_flows + v4_icmp,
    )


# ---------------------------------------------------------------------------------------------- softflowd


@dataclass(frozen=True, slots=True, kw_only=True)
class SoftflowdStats:
    """softflowd's own end-of-file summary: ``Flows exported: F (R records) in D packets (X failures)``.

    ``records`` is the number of flow records it put on the wire (with ``-b``, one per bidirectional flow;
    without, one per direction), ``datagrams`` the number of export datagrams it sent.
    """

    flows: int
    records: int
    datagrams: int
    failures: int
    packets_processed: int
    output: str


_SFD_EXPORTED = re.compile(r"Flows exported: (\d+) \((\d+) records\) in (\d+) packets \((\d+) failures\)")
_SFD_PROCESSED = re.compile(r"Packets processed: (\d+)")


def run_softflowd(
    pcap: Path | str,
    *,
    version: int,
    dest: tuple[str, int],
    extra_args: Sequence[str] = (),
    timeout: float = 60.0,
) -> SoftflowdStats:
    """Run ``softflowd -r pcap`` to completion, exporting NetFlow ``version`` (1, 5, 9 or 10) to ``dest``.

    softflowd reading a file tracks every flow (``-T full``: addresses, ports and protocol) and expires
    them all at the end of the file, so every flow of the trace is exported. ``-d`` keeps it in the
    foreground; ``-c none`` disables the control socket (with one, softflowd 1.1 can block in
    ``accept()`` after the end of the file) and the pid file goes to a private temporary directory, so
    several instances run in parallel without root paths. IPv6 flows are exported with ``-v 9``/``-v 10``
    only. Pass ``extra_args=("-b",)`` with version 10 for bidirectional IPFIX (RFC 5103).

    Error handling: a non-zero exit or a missing summary raises ``RuntimeError`` with softflowd's output.
    """
    host, port = dest
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with tempfile.TemporaryDirectory(prefix="softflowd-") as tmp:
        cmd = [
            "softflowd", "-r", str(pcap), "-n", target, "-v", str(version), "-d", "-T", "full",
            "-m", "65536", "-c", "none", "-p", os.path.join(tmp, "pid"), *extra_args,
        ]
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    output = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    m = _SFD_EXPORTED.search(output)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{output}")
    processed = _SFD_PROCESSED.search(output)
    return SoftflowdStats(
        flows=int(m.group(1)), records=int(m.group(2)), datagrams=int(m.group(3)), failures=int(m.group(4)),
        packets_processed=int(processed.group(1)) if processed else 0, output=output,
    )


# ---------------------------------------------------------------------------------------------- capture


class UdpCapture:
    """Listens on UDP ``host:port`` (port 0: a free one) and collects every datagram in a thread.

    Use as a context manager; ``datagrams`` holds ``(payload, (sender_host, sender_port))`` in arrival
    order. The receive buffer is made as large as the kernel allows (``SO_RCVBUFFORCE`` as root), so
    bursts from softflowd or ``flowtunnel replay`` are not dropped; ``drops()`` reads the kernel's drop
    counter for the socket so a test can prove none were.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, rcvbuf: int = 64 << 20) -> None:
        self.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE: beyond rmem_max as root
        except OSError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self._sock.bind((host, port))
        self.port: int = self._sock.getsockname()[1]
        self.datagrams: list[Datagram] = []
        # Arrival time (time.monotonic()) of each datagram, index for index: latency measurements use it.
        self.stamps: list[float] = []
        self._cond = threading.Condition()
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"udp-capture-{self.port}", daemon=True)

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def url(self) -> str:
        """``udp://host:port`` as flowtunnel's ``--to``/``--forward`` flags take it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"udp://{host}:{self.port}"

    @property
    def payloads(self) -> list[bytes]:
        with self._cond:
            return [p for p, _ in self.datagrams]

    def __enter__(self) -> UdpCapture:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._sock.close()

    def _run(self) -> None:
        sock = self._sock
        while not self._stop.is_set():
            ready, _, _ = select.select([sock], [], [], 0.05)
            if not ready:
                continue
            # Drain everything queued before looking at the stop flag again.
            while True:
                try:
                    payload, addr = sock.recvfrom(65535, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    return
                with self._cond:
                    now = time.monotonic()
                    self.datagrams.append((payload, (addr[0], addr[1])))
                    self.stamps.append(now)
                    self._last = now
                    self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Datagram]:
        """Wait until at least ``count`` datagrams arrived; ``TimeoutError`` names how many did."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.datagrams) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    got = len(self.datagrams)
                    raise TimeoutError(f"{got} of {count} datagrams on {self.url} after {timeout} s")
                self._cond.wait(left)
            return list(self.datagrams)

    def wait_quiet(self, seconds: float = 0.5, timeout: float = 60.0) -> list[Datagram]:
        """Wait until no datagram arrived for ``seconds`` (at most ``timeout``); returns what arrived."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                quiet_for = now - self._last
                if quiet_for >= seconds or now >= deadline:
                    return list(self.datagrams)
                self._cond.wait(min(seconds - quiet_for, deadline - now))

    def drops(self) -> int:
        """Datagrams the kernel dropped on this socket (the ``drops`` column of /proc/net/udp[6])."""
        table = "/proc/net/udp6" if self._sock.family == socket.AF_INET6 else "/proc/net/udp"
        inode = os.fstat(self._sock.fileno()).st_ino
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if int(cols[9]) == inode:
                return int(cols[-1])
        return 0


@dataclass(frozen=True, slots=True, kw_only=True)
class SoftflowdExport:
    """What softflowd sent for a trace: the datagrams as captured, in order, and its own summary."""

    datagrams: list[Datagram]
    stats: SoftflowdStats
    version: int

    @property
    def payloads(self) -> list[bytes]:
        return [p for p, _ in self.datagrams]

    @property
    def sender(self) -> tuple[str, int]:
        return self.datagrams[0][1] if self.datagrams else ("127.0.0.1", 0)


def capture_softflowd(
    pcap: Path | str, version: int, extra_args: Sequence[str] = (), *, timeout: float = 60.0
) -> SoftflowdExport:
    """Run softflowd on ``pcap`` towards a fresh ``UdpCapture`` and return every datagram it sent.

    Asserts that the number of datagrams captured equals the number softflowd reports having sent and
    that the kernel dropped none, so a test comparing record counts never blames the decoder for a drop.
    """
    with UdpCapture() as cap:
        stats = run_softflowd(pcap, version=version, dest=cap.addr, extra_args=extra_args, timeout=timeout)
        cap.wait_for(stats.datagrams, timeout=timeout)
        got = cap.wait_quiet(0.2, timeout=5.0)
        dropped = cap.drops()
    if stats.failures or dropped or len(got) != stats.datagrams:
        raise AssertionError(
            f"softflowd -v {version} {' '.join(extra_args)} sent {stats.datagrams} datagrams "
            f"({stats.failures} send failures), captured {len(got)}, kernel dropped {dropped}"
        )
    return SoftflowdExport(datagrams=got, stats=stats, version=version)


# ---------------------------------------------------------------------------------------------- pcap writing


def write_pcap(
    datagrams: Iterable[bytes | Datagram],
    path: Path | str,
    *,
    dst_port: int,
    dst: str | None = None,
    src: tuple[str, int] = ("192.0.2.1", 50000),
    start: float = 1_700_000_000.0,
    interval: float = 0.001,
) -> int:
    """Write UDP payloads as an Ethernet pcap that tshark and ``flowtunnel decode`` read; returns the count.

    A bare ``bytes`` item is sent from ``src``; a ``(payload, (host, port))`` item (as ``UdpCapture``
    collects them) keeps its own sender. IPv4 and IPv6 senders are supported; the destination is ``dst``
    or the loopback address of the sender's family. Timestamps start at ``start``, ``interval`` apart.
    """
    count = 0
    with Path(path).open("wb") as f:
        writer = dpkt.pcap.Writer(f, snaplen=65535, linktype=dpkt.pcap.DLT_EN10MB)
        for item in datagrams:
            payload, (shost, sport) = (item, src) if isinstance(item, bytes) else item
            sip = ipaddress.ip_address(shost)
            loopback = "::1" if sip.version == 6 else "127.0.0.1"
            dip = ipaddress.ip_address(dst if dst is not None else loopback)
            if sip.version != dip.version:
                raise ValueError(f"sender {shost} and destination {dip} are of different IP versions")
            udp = _UDP.pack(sport, dst_port, 8 + len(payload), 0) + payload
            writer.writepkt(_frame(sip.packed, dip.packed, 17, udp), start + count * interval)
            count += 1
    return count


# ---------------------------------------------------------------------------------------------- tshark


class _DupList(list[Any]):
    """Values of a key that tshark's JSON repeats inside one object (duplicate keys)."""


def _keep_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            prev = obj[key]
            if isinstance(prev, _DupList):
                prev.append(value)
            else:
                obj[key] = _DupList([prev, value])
        else:
            obj[key] = value
    return obj


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, _DupList) else value


def _second(value: Any) -> Any:
    return value[1] if isinstance(value, _DupList) and len(value) > 1 else None


def _int_or_none(value: Any) -> int | None:
    if value is None:
        return None
    text = str(value)
    return int(text, 16) if text.startswith("0x") else int(text)


def _addr_or_none(value: Any) -> str | None:
    return None if value is None else ipaddress.ip_address(str(value)).compressed


_SET_ID = re.compile(r"\[id=(\d+)\]")
_OPTIONS_TEMPLATE = re.compile(r"^Options Template \(Id = (\d+)\)")
_RECORD_KEY = re.compile(r"^(?:Flow|pdu) \d+")


def tshark_records(
    pcap: Path | str, ports: Sequence[int] = (2055,), *, include_options: bool = False, timeout: float = 120.0
) -> list[dict[str, Any]]:
    """Decode ``pcap`` with tshark's cflow dissector (``-T json``) and return its records in file order.

    Each record is a dict: ``version``, ``exporter`` (sender IP), ``domain`` (v9 source id / IPFIX
    observation domain, None for v5), ``set_id`` (template id, None for v5), ``options`` (True for records
    of an options template, returned only with ``include_options``), ``src``, ``dst`` (IPv4 address if the
    record has one, else IPv6, as compressed text), ``src4``, ``dst4``, ``src6``, ``dst6``, ``sport``,
    ``dport``, ``proto``, ``octets``, ``packets`` (ints or None when the record lacks the field),
    ``reverse_octets``/``reverse_packets`` (RFC 5103 biflows: tshark repeats the key for the reverse
    direction), and ``fields``: the raw ``cflow.*`` strings (first value of a repeated key).

    tshark decodes UDP to each of ``ports`` as cflow and keeps v9/IPFIX templates across packets in file
    order, like a collector.
    """
    cmd = ["tshark", "-n", "-r", str(pcap), "-T", "json", "-J", "ip ipv6 cflow"]
    for port in ports:
        cmd += ["-d", f"udp.port=={port},cflow"]
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace")
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {err}")
    packets = json.loads(proc.stdout or b"[]", object_pairs_hook=_keep_duplicates)
    options_ids: set[tuple[str | None, str | None, int]] = set()
    out: list[dict[str, Any]] = []
    for packet in packets:
        layers = packet["_source"]["layers"]
        ip = layers.get("ip") or layers.get("ipv6") or {}
        exporter = _first(ip.get("ip.src") or ip.get("ipv6.src"))
        cflows = layers.get("cflow")
        if cflows is None:
            continue
        for cflow in cflows if isinstance(cflows, _DupList) else [cflows]:
            version = int(_first(cflow["cflow.version"]))
            domain = _first(cflow.get("cflow.source_id", cflow.get("cflow.od_id")))
            for key, value in cflow.items():
                if _RECORD_KEY.match(key):  # v5: "pdu i/n" straight under the header
                    out.append(_tshark_record(value, version, exporter, None, None, False))
                    continue
                if not isinstance(value, dict):
                    continue
                for sub_key in value:
                    m = _OPTIONS_TEMPLATE.match(sub_key)
                    if m:
                        options_ids.add((exporter, domain, int(m.group(1))))
                set_id_m = _SET_ID.search(key)
                if set_id_m is None:
                    continue
                set_id = int(set_id_m.group(1))
                is_options = (exporter, domain, set_id) in options_ids
                if is_options and not include_options:
                    continue
                for sub_key, sub in value.items():
                    if _RECORD_KEY.match(sub_key) and isinstance(sub, dict):
                        out.append(_tshark_record(sub, version, exporter, domain, set_id, is_options))
    return out


def _tshark_record(
    rec: dict[str, Any],
    version: int,
    exporter: str | None,
    domain: str | None,
    set_id: int | None,
    options: bool,
) -> dict[str, Any]:
    src4 = _addr_or_none(_first(rec.get("cflow.srcaddr")))
    dst4 = _addr_or_none(_first(rec.get("cflow.dstaddr")))
    src6 = _addr_or_none(_first(rec.get("cflow.srcaddrv6")))
    dst6 = _addr_or_none(_first(rec.get("cflow.dstaddrv6")))
    octets = rec.get("cflow.octets", rec.get("cflow.octets64"))
    packets = rec.get("cflow.packets", rec.get("cflow.packets64"))
    return {
        "version": version,
        "exporter": exporter,
        "domain": _int_or_none(domain),
        "set_id": set_id,
        "options": options,
        "src": src4 if src4 is not None else src6,
        "dst": dst4 if dst4 is not None else dst6,
        "src4": src4,
        "dst4": dst4,
        "src6": src6,
        "dst6": dst6,
        "sport": _int_or_none(_first(rec.get("cflow.srcport"))),
        "dport": _int_or_none(_first(rec.get("cflow.dstport"))),
        "proto": _int_or_none(_first(rec.get("cflow.protocol"))),
        "octets": _int_or_none(_first(octets)),
        "packets": _int_or_none(_first(packets)),
        "reverse_octets": _int_or_none(_second(octets)),
        "reverse_packets": _int_or_none(_second(packets)),
        "fields": {k: _first(v) for k, v in rec.items() if not isinstance(_first(v), dict)},
    }


# ---------------------------------------------------------------------------------------------- nfcapd


def _json_objects(text: str) -> list[dict[str, Any]]:
    """nfdump prints a JSON array, or bare concatenated objects with ``-q``: accept both."""
    decoder = json.JSONDecoder()
    out: list[dict[str, Any]] = []
    pos, end = 0, len(text)
    while pos < end:
        while pos < end and text[pos] in " \t\r\n,[]":
            pos += 1
        if pos >= end:
            break
        obj, pos = decoder.raw_decode(text, pos)
        out.append(obj)
    return out


class Nfcapd:
    """nfcapd (nfdump's collector) listening on UDP ``host:port``, writing flow files into ``workdir``.

    ``with Nfcapd(tmp_path) as nf: ...send to nf.port...; rows = nf.records()``. ``records()`` and
    ``exporters()`` stop nfcapd first (SIGTERM: it then writes out its current file) and read the files
    back with nfdump; stopping twice is harmless.
    """

    def __init__(
        self, workdir: Path | str, *, host: str = "127.0.0.1", port: int = 0, extra_args: Sequence[str] = ()
    ) -> None:
        self.host = host
        self.port = port or free_udp_port(host)
        self.flowdir = Path(workdir) / f"nfcapd-{self.port}"
        self.flowdir.mkdir(parents=True, exist_ok=True)
        self._log_path = self.flowdir.parent / f"nfcapd-{self.port}.log"
        self._extra = tuple(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"udp://{host}:{self.port}"

    def __enter__(self) -> Nfcapd:
        cmd = [
            "nfcapd", "-b", self.host, "-p", str(self.port), "-w", str(self.flowdir), "-t", "3600",
            "-B", str(8 << 20), "-C", "none", *self._extra,
        ]
        with self._log_path.open("wb") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _wait_udp_bound(self.host, self.port, self._proc, "nfcapd", timeout=10.0)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Let nfcapd read what is queued on its socket, then SIGTERM it (it writes out its flow file)."""
        if self._proc is not None and self._proc.poll() is None:
            _wait_udp_drained(self.host, self.port)
            _stop_process(self._proc)

    def log_text(self) -> str:
        return self._log_path.read_text(errors="replace") if self._log_path.exists() else ""

    def _files(self) -> list[Path]:
        return sorted(p for p in self.flowdir.rglob("nfcapd.*") if ".current." not in p.name)

    def records(self) -> list[dict[str, Any]]:
        """Every flow nfcapd stored, as dicts: ``exporter``, ``src``, ``dst``, ``sport``, ``dport``,
        ``proto``, ``bytes``, ``packets``, ``out_bytes``, ``out_packets`` (biflows), ``first``, ``last``
        and ``raw`` (nfdump's JSON object)."""
        self.stop()
        rows: list[dict[str, Any]] = []
        for path in self._files():
            proc = subprocess.run(
                ["nfdump", "-r", str(path), "-o", "json"], capture_output=True, timeout=120, check=False
            )
            if proc.returncode != 0:
                raise RuntimeError(f"nfdump -r {path} failed: {proc.stderr.decode(errors='replace')}")
            for raw in _json_objects(proc.stdout.decode(errors="replace")):
                if raw.get("type") != "FLOW":
                    continue
                rows.append({
                    "exporter": raw.get("ip4_router") or raw.get("ip6_router"),
                    "src": raw.get("src4_addr") or raw.get("src6_addr"),
                    "dst": raw.get("dst4_addr") or raw.get("dst6_addr"),
                    "sport": raw.get("src_port"),
                    "dport": raw.get("dst_port"),
                    "proto": raw.get("proto"),
                    "bytes": raw.get("in_bytes"),
                    "packets": raw.get("in_packets"),
                    "out_bytes": raw.get("out_bytes"),
                    "out_packets": raw.get("out_packets"),
                    "first": raw.get("first"),
                    "last": raw.get("last"),
                    "raw": raw,
                })
        return rows

    def exporters(self) -> list[dict[str, Any]]:
        """The exporters nfcapd saw (``nfdump -E``): ``ip``, ``version``, ``domain``, ``packets``, ``flows``,
        ``sequence_failures``, one dict per exporter per flow file."""
        self.stop()
        found: list[dict[str, Any]] = []
        line_re = re.compile(
            r"SysID: *(\d+), IP: *(\S+), version: *(\d+), ID: *(\d+), Sequence failures: *(\d+), "
            r"packets: *(\d+), flows: *(\d+)"
        )
        for path in self._files():
            proc = subprocess.run(["nfdump", "-E", str(path)], capture_output=True, timeout=60, check=False)
            for m in line_re.finditer(proc.stdout.decode(errors="replace")):
                found.append({
                    "sysid": int(m.group(1)), "ip": m.group(2), "version": int(m.group(3)),
                    "domain": int(m.group(4)), "sequence_failures": int(m.group(5)),
                    "packets": int(m.group(6)), "flows": int(m.group(7)),
                })
        return found


# ---------------------------------------------------------------------------------------------- tinyproxy


class Tinyproxy:
    """tinyproxy on ``127.0.0.1:port`` (free port by default), optionally demanding Basic auth.

    ``with Tinyproxy(tmp_path, auth=("user", "pass")) as proxy: ... proxy.proxy_url ...``. CONNECT is
    allowed to every port unless ``connect_ports`` restricts it. ``log_text()`` returns its log (each
    request appears there, so a test can prove traffic went through the proxy).
    """

    def __init__(
        self,
        workdir: Path | str,
        *,
        port: int = 0,
        auth: tuple[str, str] | None = None,
        connect_ports: Sequence[int] | None = None,
    ) -> None:
        self.port = port or free_tcp_port()
        self.auth = auth
        self._dir = Path(workdir) / f"tinyproxy-{self.port}"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._log_path = self._dir / "tinyproxy.log"
        self._conf = self._dir / "tinyproxy.conf"
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 600",
            "Allow 127.0.0.1",
            "MaxClients 100",
            "LogLevel Info",
            f"LogFile \"{self._log_path}\"",
            "DisableViaHeader Yes",
        ]
        if auth is not None:
            lines.append(f"BasicAuth {auth[0]} {auth[1]}")
        for p in connect_ports or ():
            lines.append(f"ConnectPort {p}")
        self._conf.write_text("\n".join(lines) + "\n")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The proxy URL without credentials: ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def proxy_url(self) -> str:
        """The proxy URL with the credentials, if any: ``http://user:pass@127.0.0.1:PORT``."""
        if self.auth is None:
            return self.url
        return f"http://{self.auth[0]}:{self.auth[1]}@127.0.0.1:{self.port}"

    def __enter__(self) -> Tinyproxy:
        self._proc = subprocess.Popen(
            ["tinyproxy", "-d", "-c", str(self._conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )
        _wait_tcp_listening("127.0.0.1", self.port, self._proc, "tinyproxy", timeout=10.0)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        if self._proc is not None:
            _stop_process(self._proc)

    def log_text(self) -> str:
        return self._log_path.read_text(errors="replace") if self._log_path.exists() else ""

