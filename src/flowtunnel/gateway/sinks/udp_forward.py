"""The udp-forward sink: re-emit every journaled datagram to existing collectors, exporters kept apart.

Identity: collectors key v9/IPFIX templates by (source address, source id) and ignore the source port, so
each (agent, exporter address) gets its own source address from the pool (``pool.py``); the exporter's port
is not part of the identity unless ``identity_port`` is set (exporters pick a new port on restart, and two
exporters on one box behind one agent rarely share an address *and* a source id). With ``spoof``, datagrams
are sent over a raw socket with a forged IPv4 source instead (needs CAP_NET_RAW), from an explicit per-agent
address or the same pool.

Templates: a ``Decoder`` per agent is fed the datagrams that carry (options) templates; its state is
persisted in ``DATA/forward-templates.json``, and when forwarding (re)starts, every exporter's cached
templates are re-sent from its source before any data, so a collector that restarted too can decode at once.

Delivery: the cursor is committed after a batch was sent, so a gateway crash re-sends at most that batch
(at-least-once). UDP itself may lose datagrams at a busy collector; send errors are counted, logged once per
cause and do not stop the sink.

Pacing: a journal read is hundreds of datagrams, and sent in one tight loop it overruns a collector's socket
receive buffer (the kernel default holds about a hundred datagrams), so the sink sends at most
``forward_rate`` datagrams per second to each target (token bucket, bursts of a few milliseconds' worth),
yielding to the event loop between bursts. 0 sends as fast as the sockets take them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from flowtunnel.gateway.config import DEFAULT_FORWARD_RATE, ForwardTarget
from flowtunnel.gateway.metrics import GatewayMetrics
from flowtunnel.gateway.pool import AddressPool, ForwardMap, Mapping, PoolExhausted
from flowtunnel.gateway.sinks.base import CursorSink
from flowtunnel.netflow.sniff import has_templates
from flowtunnel.runtime import OnceLogger
from flowtunnel.statusfile import write_json_atomic

if TYPE_CHECKING:
    from flowtunnel.journal import JournalReader
    from flowtunnel.log import Entry
    from flowtunnel.netflow import Decoder

__all__ = ["Pacer", "UdpForwardConfig", "UdpForwardSink", "build_ipv4_udp", "has_templates"]

log = logging.getLogger("flowtunnel.gateway.udp_forward")

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_SNDBUF = 4 << 20
#: A burst is this many seconds' worth of datagrams at ``forward_rate`` (at most _MAX_BURST, at least 1).
_BURST_SECONDS = 0.005
_MAX_BURST = 256


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def build_ipv4_udp(src: str, sport: int, dst: str, dport: int, payload: bytes, *, ident: int = 0) -> bytes:
    """An IPv4 + UDP packet (header checksum and UDP checksum computed) for a raw socket."""
    src_b, dst_b = socket.inet_aton(src), socket.inet_aton(dst)
    udp_len = 8 + len(payload)
    pseudo = src_b + dst_b + struct.pack("!BBH", 0, socket.IPPROTO_UDP, udp_len)
    udp = _UDP.pack(sport, dport, udp_len, 0)
    csum = _checksum(pseudo + udp + payload) or 0xFFFF
    udp = _UDP.pack(sport, dport, udp_len, csum)
    total = 20 + udp_len
    hdr = _IPV4.pack(0x45, 0, total, ident & 0xFFFF, 0x4000, 64, socket.IPPROTO_UDP, 0, src_b, dst_b)
    hdr = hdr[:10] + struct.pack("!H", _checksum(hdr)) + hdr[12:]
    return hdr + udp + payload


@dataclass(frozen=True, slots=True, kw_only=True)
class UdpForwardConfig:
    """What the sink needs from ``GatewayConfig``."""

    data_dir: Path
    targets: tuple[ForwardTarget, ...]
    source_pool: tuple[str, ...]
    source_ports: tuple[int, int] = (0, 0)
    identity_port: bool = False
    spoof: bool = False
    spoof_map: dict[str, str] = field(default_factory=dict)
    max_sources: int = 4096
    #: Datagrams per second to each target (0 = unlimited).
    forward_rate: int = DEFAULT_FORWARD_RATE

    def __post_init__(self) -> None:
        if self.forward_rate < 0:
            raise ValueError(f"forward_rate {self.forward_rate} datagrams/s must be >= 0 (0 = unlimited)")


class Pacer:
    """Token bucket: ``rate`` datagrams per second with bursts of up to ``burst``.

    ``take(n, now)`` spends ``n`` tokens and returns how long to wait before sending them (0: now); the
    bucket may go into debt, so a caller that waits as told keeps the average at ``rate``.
    """

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"pacer rate {rate}/s and burst {burst} must be positive")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last: float | None = None

    def take(self, n: int, now: float) -> float:
        if self._last is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class _Source:
    """Where one identity's datagrams leave from: a bound UDP socket, or a forged source (raw socket)."""

    def __init__(self, mapping: Mapping, sock: socket.socket | None, *, fallback: bool = False) -> None:
        self.mapping = mapping
        self.sock = sock
        self.fallback = fallback
        self.sent = 0


class UdpForwardSink(CursorSink):
    """Re-emits datagrams to every target; see the module docstring. One instance per gateway."""

    name = "udp-forward"
    TEMPLATES_FILE = "forward-templates.json"

    def __init__(self, config: UdpForwardConfig, *, metrics: GatewayMetrics | None = None) -> None:
        super().__init__()
        if not config.targets:
            raise ValueError("udp-forward needs at least one target")
        self.config = config
        self._metrics = metrics
        self._pool = AddressPool(config.source_pool)
        self._map = ForwardMap(config.data_dir)
        self._sources: dict[tuple[str, str, int], _Source] = {}
        self._fallback: dict[int, _Source] = {}
        self._no_pool_logged: set[int] = set()
        self._decoders: dict[str, Decoder] = {}
        self._templates_dirty: set[str] = set()
        self._raw: socket.socket | None = None
        self._addrs: list[tuple[ForwardTarget, int, tuple[str, int]]] = []
        self._once = OnceLogger(log)
        self.errors: dict[str, int] = {}
        self.sent = 0
        self.templates_resent = 0
        self._ident = 0
        rate = config.forward_rate
        self._burst = max(1, min(_MAX_BURST, int(rate * _BURST_SECONDS))) if rate else 0
        self._pacer = Pacer(rate, self._burst) if rate else None
        self._clock: Callable[[], float] = time.monotonic
        self._sndbuf_logged = False
        self.paced_waits = 0
        # Worker threads (handle) and stop() take turns on the caches and sockets; re-entrant because a batch
        # sends then persists under one hold.
        self._work_lock = threading.RLock()

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def start(self, journal: JournalReader) -> None:
        await asyncio.to_thread(self._start)

    def _start(self) -> None:
        self._addrs = []  # start() runs again when the gateway restarts a failed sink
        for target in self.config.targets:
            info = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_DGRAM)
            family, _, _, _, sockaddr = info[0]
            version = 4 if family == socket.AF_INET else 6
            self._addrs.append((target, version, (str(sockaddr[0]), int(sockaddr[1]))))
        if self.config.spoof:
            self._raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self._raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
        self._load_templates()
        # Re-announce what every known exporter defined, from its own source, before any data.
        for m in self._map.all():
            dec = self._decoders.get(m.agent)
            if dec is None:
                continue
            try:
                datagrams = dec.template_datagrams(m.exporter)
            except (KeyError, ValueError):
                continue
            if not datagrams:
                continue
            src = self._source(m.agent, m.exporter, m.family)
            for payload in datagrams:
                for target, version, sockaddr in self._addrs:
                    if version == m.family:
                        self._send(src, target, sockaddr, payload, sport=0)
            self.templates_resent += len(datagrams)
        if self.templates_resent:
            log.info("re-sent %d template datagrams to %d target(s)", self.templates_resent, len(self._addrs))
        self._map.save()

    async def stop(self) -> None:
        # A cancelled handle() leaves its worker thread running (to_thread cannot stop it): wait for it under
        # the work lock before saving, so the save never iterates the caches while that thread changes them.
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        with self._work_lock:
            self._close()

    def _close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._persist()
        for src in [*self._sources.values(), *self._fallback.values()]:
            if src.sock is not None:
                src.sock.close()  # idempotent: shared sockets appear more than once
        self._sources.clear()
        self._fallback.clear()
        if self._raw is not None:
            self._raw.close()
            self._raw = None

    # -- templates ----------------------------------------------------------------------------------------

    def _decoder(self, agent: str) -> Decoder:
        dec = self._decoders.get(agent)
        if dec is None:
            from flowtunnel.netflow import Decoder, DecoderConfig

            dec = self._decoders[agent] = Decoder(DecoderConfig(scope_port=self.config.identity_port))
        return dec

    def _load_templates(self) -> None:
        path = self.config.data_dir / self.TEMPLATES_FILE
        if not path.exists():
            return
        from flowtunnel.netflow import Decoder, DecoderConfig

        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            for agent, state in doc.get("agents", {}).items():
                self._decoders[agent] = Decoder.from_state(
                    base64.b64decode(state), DecoderConfig(scope_port=self.config.identity_port)
                )
        except (OSError, ValueError, TypeError) as exc:
            # Losing the cache only delays decoding at the collector until the exporter re-sends templates.
            log.warning("template cache %s is unreadable, starting without it: %s", path, exc)

    def _save_templates(self) -> None:
        if not self._templates_dirty:
            return
        path = self.config.data_dir / self.TEMPLATES_FILE
        doc = {
            "version": 1,
            "agents": {
                a: base64.b64encode(d.export_state()).decode() for a, d in sorted(self._decoders.items())
            },
        }
        write_json_atomic(path, doc)
        self._templates_dirty.clear()

    # -- sources ------------------------------------------------------------------------------------------

    def _identity(self, entry: Entry) -> str:
        d = entry.datagram
        if not self.config.identity_port:
            return d.exporter
        return f"[{d.exporter}]:{d.exporter_port}" if ":" in d.exporter else f"{d.exporter}:{d.exporter_port}"

    def _count(self, cause: str, msg: str, *args: object) -> None:
        self.errors[cause] = self.errors.get(cause, 0) + 1
        if self._metrics is not None:
            self._metrics.sink_errors.labels(self.name, cause).inc()
        self._once.warning(cause, msg, *args)

    def _source(self, agent: str, exporter: str, family: int) -> _Source:
        key = (agent, exporter, family)
        src = self._sources.get(key)
        if src is not None:
            return src
        m = self._map.get(agent, exporter, family)
        if len(self._sources) >= self.config.max_sources:
            # A flood of exporter addresses (rogue or broken agent) must not exhaust descriptors or the pool.
            self._count(
                "too_many_sources", "more than %d (agent, exporter) sources; agent %s exporter %s shares the "
                "wildcard source", self.config.max_sources, agent, exporter,
            )
            return self._shared(family)
        if m is None:
            m = self._allocate(agent, exporter, family)
        src = _Source(m, None) if self.config.spoof and family == 4 else self._bind(m)
        self._sources[key] = src
        self._map.put(src.mapping)
        return src

    def _allocate(self, agent: str, exporter: str, family: int) -> Mapping:
        wanted = self.config.spoof_map.get(agent) if self.config.spoof and family == 4 else None
        if wanted is not None:
            return Mapping(agent=agent, exporter=exporter, family=family, address=wanted, port=0)
        if not self._pool.has(family):
            # No pool of this family (typically IPv6 when only 127.0.0.0/8 is configured): each identity
            # still gets its own socket, but collectors see one address with many ports.
            if family not in self._no_pool_logged:
                self._no_pool_logged.add(family)
                log.warning("no IPv%d address in the source pool: IPv%d targets see every exporter from the "
                            "gateway's own address (distinct ports only)", family, family)
            return Mapping(agent=agent, exporter=exporter, family=family, address="::" if family == 6
                           else "0.0.0.0", port=0)
        try:
            address = self._pool.allocate(family, self._map.used(family))
        except PoolExhausted as exc:
            self._count(
                "pool_exhausted", "%s; agent %s exporter %s is sent from the wildcard address (told apart by "
                "port only)", exc, agent, exporter,
            )
            address = "0.0.0.0" if family == 4 else "::"
        return Mapping(agent=agent, exporter=exporter, family=family, address=address, port=0)

    def _bind(self, m: Mapping) -> _Source:
        fam = socket.AF_INET if m.family == 4 else socket.AF_INET6
        lo, hi = self.config.source_ports
        candidates = [m.port] if m.port else []
        candidates += [p for p in range(lo, hi + 1) if p != m.port][:4096] if (lo, hi) != (0, 0) else [0]
        last_exc: OSError | None = None
        for port in candidates:
            try:
                sock = socket.socket(fam, socket.SOCK_DGRAM)
            except OSError as exc:  # EMFILE: out of file descriptors
                last_exc = exc
                break
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
                sock.bind((m.address, port))
            except OSError as exc:
                sock.close()
                last_exc = exc
                continue
            self._log_sndbuf(sock)
            bound = sock.getsockname()[1]
            return _Source(Mapping(agent=m.agent, exporter=m.exporter, family=m.family, address=m.address,
                                   port=bound), sock)
        self._count(
            "bind_failed", "cannot bind a source socket to %s (ports %s) for agent %s exporter %s: %s; "
            "using the shared unbound socket (the collector sees the gateway's own address)",
            m.address, self.config.source_ports, m.agent, m.exporter, last_exc,
        )
        return _Source(m, self._shared(m.family).sock, fallback=True)

    def _log_sndbuf(self, sock: socket.socket) -> None:
        """Say once what send buffer the kernel granted: below the request, bursts rely on pacing."""
        if self._sndbuf_logged:
            return
        self._sndbuf_logged = True
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        # Linux doubles the requested value for bookkeeping and caps the request at net.core.wmem_max.
        if granted < _SNDBUF:
            log.info(
                "source sockets got a %d-byte send buffer (asked %d; raise net.core.wmem_max for more); "
                "forwarding is paced at %s datagrams/s per target", granted, _SNDBUF,
                self.config.forward_rate or "unlimited",
            )

    def _shared(self, family: int) -> _Source:
        """The one wildcard-bound socket per family that identities share when they cannot get their own."""
        src = self._fallback.get(family)
        if src is None:
            fam = socket.AF_INET if family == 4 else socket.AF_INET6
            sock = socket.socket(fam, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
            wildcard = "0.0.0.0" if family == 4 else "::"
            src = self._fallback[family] = _Source(
                Mapping(agent="*", exporter="*", family=family, address=wildcard, port=0), sock, fallback=True
            )
        return src

    # -- sending ------------------------------------------------------------------------------------------

    def _send(
        self, src: _Source, target: ForwardTarget, sockaddr: tuple[str, int], payload: bytes, *, sport: int
    ) -> None:
        try:
            if src.sock is not None:
                src.sock.sendto(payload, sockaddr)
            else:
                assert self._raw is not None
                self._ident = (self._ident + 1) & 0xFFFF
                packet = build_ipv4_udp(
                    src.mapping.address, src.mapping.port or sport or 2055, sockaddr[0], sockaddr[1], payload,
                    ident=self._ident,
                )
                self._raw.sendto(packet, (sockaddr[0], 0))
        except OSError as exc:
            self._count(f"send_{type(exc).__name__}", "sending to %s failed: %s", target, exc)
            return
        src.sent += 1
        self.sent += 1
        if self._metrics is not None:
            self._metrics.forwarded.labels(str(target)).inc()

    def _send_batch(self, entries: Sequence[Entry]) -> None:
        with self._work_lock:
            self._send_entries(entries)
            self._persist()

    def _persist(self) -> None:
        with self._work_lock:
            self._save_templates()
            self._map.save()

    def _send_entries(self, entries: Sequence[Entry]) -> None:
        from flowtunnel.netflow import ProtocolError

        with self._work_lock:
            for entry in entries:
                d = entry.datagram
                exporter = self._identity(entry)
                payload = d.payload
                if has_templates(payload):
                    try:
                        self._decoder(entry.stream).decode(payload, exporter=exporter)
                    except ProtocolError as exc:
                        self._count("undecodable_template", "template datagram from %s/%s: %s", entry.stream,
                                    exporter, exc)
                    self._templates_dirty.add(entry.stream)
                for target, version, sockaddr in self._addrs:
                    src = self._source(entry.stream, exporter, version)
                    self._send(src, target, sockaddr, payload, sport=d.exporter_port)

    async def handle(self, entries: Sequence[Entry]) -> None:
        pacer = self._pacer
        if pacer is None:
            await asyncio.to_thread(self._send_batch, entries)
            return
        # Bursts of a few milliseconds' worth, each sent in a worker thread (sockets may block on a full
        # send buffer), waiting between them as the token bucket says: the event loop runs meanwhile.
        for start in range(0, len(entries), self._burst):
            part = entries[start : start + self._burst]
            wait = pacer.take(len(part), self._clock())
            if wait > 0:
                self.paced_waits += 1
                await asyncio.sleep(wait)
            await asyncio.to_thread(self._send_entries, part)
        await asyncio.to_thread(self._persist)

    # -- status -------------------------------------------------------------------------------------------

    def mappings(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for m in self._map.all():
            src = self._sources.get((m.agent, m.exporter, m.family))
            out.append({
                "agent": m.agent, "exporter": m.exporter, "source": _fmt(m.address, m.port),
                "spoofed": src is not None and src.sock is None,
                "fallback": src is not None and src.fallback,
                "sent": 0 if src is None else src.sent,
            })
        return out

    def status(self) -> dict[str, object]:
        st = super().status()
        st.update({
            "targets": [str(t) for t in self.config.targets],
            "sent": self.sent,
            "templates_resent": self.templates_resent,
            "forward_rate": self.config.forward_rate,
            "errors": dict(self.errors),
            "mappings": self.mappings(),
        })
        return st


def _fmt(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ipaddress.ip_address(address).version == 6 else f"{address}:{port}"
