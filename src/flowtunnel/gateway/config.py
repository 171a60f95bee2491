"""The gateway's settings: one frozen keyword-only dataclass filled by ``flowtunnel.config.load_settings``.

Section ``[gateway]`` of the TOML file; every key also has an env var ``FLOWTUNNEL_GATEWAY_<KEY>`` and a flag.
Values are checked here, once, so the rest of the gateway can trust them; a bad value raises ``ValueError``,
which ``load_settings`` turns into a one-line ``ConfigError``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from flowtunnel.config import check_bounds, count_setting, duration_setting, masked_repr, size_setting
from flowtunnel.wire.dns import normalise_zone

__all__ = [
    "DEFAULT_AGENT_BURST",
    "DEFAULT_AGENT_RATE",
    "DEFAULT_FORWARD_RATE",
    "DEFAULT_SOURCE_POOL",
    "ForwardTarget",
    "GatewayConfig",
    "ListenAddress",
    "parse_host_port",
    "parse_listen",
]

#: Source addresses for re-emitted datagrams when nothing else is configured: all of loopback but 127.0.0.1,
#: which local exporters sending straight to the collector are likely to use.
DEFAULT_SOURCE_POOL = ("127.0.0.2-127.255.255.254",)

#: Datagrams per second the udp-forward sink sends to each collector. A collector on the same host with a
#: default receive buffer (about 200 KiB: a hundred-odd datagrams) keeps up with bursts of 5 ms at this rate
#: (nfcapd and goflow2 each take tens of thousands per second on one core), and a backlog of a day of a busy
#: site (a million datagrams) still drains in under a minute.
DEFAULT_FORWARD_RATE = 20_000

#: Journal bytes/s one agent may add: above what a busy site exports (a few thousand datagrams/s, under
#: 4 MB/s), so honest agents and their backlog drains pass; a rogue agent expanding tiny bodies into
#: millions of datagrams is held there. The burst lets a spool's backlog start at once (and exceeds the
#: largest batch).
DEFAULT_AGENT_RATE = 4 << 20
DEFAULT_AGENT_BURST = 64 << 20

_AGENT_MAP_RE = re.compile(r"^([^=\s]+)=(\S+)$")


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardTarget:
    """A collector the udp-forward sink re-emits datagrams to."""

    host: str
    port: int

    @property
    def family(self) -> int:
        import socket

        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        return f"udp://[{self.host}]:{self.port}" if ":" in self.host else f"udp://{self.host}:{self.port}"


def parse_host_port(text: str, *, what: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` / ``"[::1]:8080"`` → (host, port); ``ValueError`` naming ``what`` otherwise."""
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)$", text) or re.match(r"^([^:\[\]]+):(\d+)$", text)
    if not m:
        raise ValueError(f"{what} {text!r} is not HOST:PORT (examples: 127.0.0.1:8080, [::1]:8080)")
    port = int(m.group(2))
    if not 0 <= port <= 65535:
        raise ValueError(f"{what} {text!r}: port {port} is outside 0..65535")
    return m.group(1), port


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenAddress:
    """Where the gateway accepts HTTP (``scheme`` "http") or HTTPS ("https") connections."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_listen(text: str, *, tls: bool) -> ListenAddress:
    """``[http://|https://]HOST:PORT`` → ``ListenAddress``. Without a scheme, HTTPS when a certificate is
    configured (``tls``), else HTTP; ``https://`` needs one. ``ValueError`` naming the text otherwise."""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*?)/?$", text)
    if m is None:
        scheme, rest = ("https" if tls else "http"), text
    else:
        scheme, rest = m.group(1).lower(), m.group(2)
        if scheme not in ("http", "https"):
            raise ValueError(f"listen address {text!r}: scheme {m.group(1)!r} is not http or https")
    host, port = parse_host_port(rest, what="listen address")
    if scheme == "https" and not tls:
        raise ValueError(
            f"listen address {text!r} is HTTPS: give tls_cert and tls_key (--tls-cert, --tls-key)"
        )
    return ListenAddress(scheme=scheme, host=host, port=port)


def _parse_forward(text: str) -> ForwardTarget:
    parts = urlsplit(text)
    if parts.scheme != "udp" or not parts.hostname or parts.path or parts.query:
        raise ValueError(f"forward target {text!r} is not udp://HOST:PORT")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"forward target {text!r}: port is outside 0..65535") from None
    if not port:
        raise ValueError(f"forward target {text!r} has no port (example: udp://127.0.0.1:2055)")
    return ForwardTarget(host=parts.hostname, port=port)


def _check_pool_entry(text: str) -> None:
    try:
        if "-" in text:
            lo, hi = (ipaddress.ip_address(p.strip()) for p in text.split("-", 1))
            if lo.version != hi.version or int(lo) > int(hi):
                raise ValueError
        elif "/" in text:
            ipaddress.ip_network(text, strict=False)
        else:
            ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(
            f"source pool entry {text!r} is not an address, a CIDR or a range "
            "(examples: 127.0.0.0/8, 192.0.2.10-192.0.2.20, 198.51.100.7)"
        ) from None


def _parse_port_range(text: str) -> tuple[int, int]:
    m = re.match(r"^\s*(\d+)\s*(?:-\s*(\d+))?\s*$", text)
    if not m:
        raise ValueError(f"source ports {text!r} is not PORT or LOW-HIGH (0 = any free port)")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) else lo
    if not 0 <= lo <= hi <= 65535:
        raise ValueError(f"source ports {text!r} must satisfy 0 <= LOW <= HIGH <= 65535")
    return lo, hi


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    """Everything ``flowtunnel gateway`` can be told; see ``docs/architecture.md`` for what each part does."""

    #: Listen addresses, ``[http://|https://]HOST:PORT`` (repeatable: the same gateway on plain HTTP and on
    #: TLS). Without a scheme: HTTPS when tls_cert is given, else HTTP. Port 0 picks a free one (logged).
    #: One address may be given as a string; ``listens`` is always the tuple.
    listen: tuple[str, ...] | str = "127.0.0.1:8080"
    #: Data directory: registry, journal, store, forward mappings, status.json. Required.
    data: Path | None = None
    #: Collectors to re-emit every datagram to, ``udp://HOST:PORT`` (repeatable).
    forward: tuple[str, ...] = ()
    #: Source addresses for the per-(agent, exporter) sockets: addresses, CIDRs or LOW-HIGH ranges.
    source_pool: tuple[str, ...] = DEFAULT_SOURCE_POOL
    #: Source ports for those sockets: 0 (any free port), PORT or LOW-HIGH.
    source_ports: str = "0"
    #: Whether the exporter's UDP port is part of its identity (default: no; collectors ignore it and
    #: exporters change it on restart).
    identity_port: bool = False
    #: At most this many (agent, exporter) sources get their own socket; more share one (and are counted).
    max_sources: int = count_setting(4096, 1, 1_000_000)
    #: Send with forged source addresses over a raw socket (needs CAP_NET_RAW) instead of bound sockets.
    spoof: bool = False
    #: Explicit source addresses for spoofing, ``AGENT=ADDRESS`` (repeatable); others come from the pool.
    spoof_map: tuple[str, ...] = ()
    #: Datagrams per second re-emitted to each collector (0 = unlimited): a tight loop overruns a
    #: collector's receive buffer and the kernel drops what does not fit.
    forward_rate: int = count_setting(DEFAULT_FORWARD_RATE, 0, 10_000_000, zero="unlimited")
    #: Serve HTTPS with this certificate chain and key (PEM).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Largest request body accepted (a sealed batch); bigger ones get 413 before they are read.
    max_body: int = size_setting(8 << 20, 1024, 1 << 30)
    #: Largest record block after decompression (a batch claiming more is refused before inflating it).
    #: The agent aims its batches at 0.85 x its max_body (1 MiB) x a compression ratio it caps at 20: under
    #: 18 MiB; an agent sending more gets 413 and halves its batches.
    max_raw: int = size_setting(24 << 20, 1024, 1 << 30)
    #: Most datagrams in one batch (the agent's max_batch_datagrams default; 413 beyond, before decryption).
    max_batch_datagrams: int = count_setting(20_000, 1, 1_000_000)
    #: Journal bytes per second one agent may add (0 = unlimited), with a burst of agent_burst: beyond, 429
    #: with Retry-After. Journal bytes are payload + about 60 bytes per datagram (what the quota counts).
    agent_rate: int = size_setting(DEFAULT_AGENT_RATE, 0, 1 << 40, zero="unlimited")
    agent_burst: int = size_setting(DEFAULT_AGENT_BURST, 1 << 20, 1 << 40)
    #: Fraction of journal_quota one agent may hold (not yet consumed by every sink); beyond, 429.
    journal_agent_share: float = 0.5
    #: Requests processed at once; more get 503 with Retry-After. Memory stays below about
    #: (max_body + 2 * max_raw) * max_inflight whatever clients send.
    max_inflight: int = count_setting(16, 1, 10_000)
    #: Of those, at most this many for one agent id (a sender impersonating one id cannot take them all).
    max_inflight_per_agent: int = 2
    #: Small batches (body <= 16 KiB, record block <= 64 KiB: a quiet agent's) have a lane of this many slots
    #: of their own, so they are not held to max_inflight while the journal commits; ~200 KiB each at most.
    #: 0: they share max_inflight.
    max_inflight_small: int = count_setting(256, 0, 100_000, zero="small batches share max_inflight")
    #: When every slot is taken, up to this many batches wait for one in arrival order (their body not yet
    #: read), each at most slot_wait; beyond, or after, 503 busy. 0: refuse at once (the old behaviour).
    max_waiting: int = count_setting(4096, 0, 1_000_000, zero="refuse at once")
    slot_wait: float = duration_setting(10.0, 0.0, 3600.0, zero="refuse at once")
    #: Time allowed to receive one request body, plus its length / min_body_rate (then 408).
    body_timeout: float = duration_setting(60.0, 0.1, 86400.0)
    #: Slowest body transfer still accepted, in bytes/s (beyond body_timeout); GPRS manages ~2500.
    min_body_rate: int = size_setting(1024, 1, 1000**3)
    #: Idle keep-alive connections are closed after this long.
    keepalive_timeout: float = duration_setting(75.0, 0.1, 86400.0)
    #: Journal disk quota, all its files included (database, WAL, WAL index, reserve); when reached, new
    #: batches get 503 (nothing acknowledged is ever dropped).
    journal_quota: int = size_setting(2 << 30, 1 << 20, 16 << 40)
    #: SQLite journal group commit: journal bytes one agent adds to one commit (a larger batch is journaled
    #: over several, sharing each with the others waiting), and journal bytes of one commit in all.
    commit_agent_bytes: int = size_setting(256 << 10, 1024, 1 << 30)
    commit_max_bytes: int = size_setting(8 << 20, 1024, 1 << 32)
    #: Scale-out: the journal is a NATS JetStream stream shared by every gateway, ``nats://[USER:PASSWORD@]
    #: HOST:PORT[,HOST:PORT...]`` (docs/scale-out.md); the data directory then keeps only this gateway's
    #: status and lock, the registry is a KV bucket and sinks run as ``flowtunnel sink`` processes.
    #: journal_quota is then the stream's byte limit.
    journal: str | None = None
    #: Stream replicas (0: 3 when three or more servers are listed, else 1).
    journal_replicas: int = count_setting(0, 0, 5, zero="automatic")
    #: Age limit of the stream's messages (unset: kept until every sink consumed them).
    journal_max_age: float | None = duration_setting(None, 1.0, 36500 * 86400.0)
    #: Messages (accepted batches) one agent may hold in the stream (0 = no per-agent quota); beyond, 429.
    journal_agent_messages: int = count_setting(0, 0, 100_000_000, zero="unlimited")
    #: How long one append waits for the stream's acknowledgement (replicated) before it is retried with the
    #: same message id; after three tries the batch gets 503.
    journal_timeout: float = duration_setting(5.0, 0.1, 600.0)
    #: Decode into the embedded DuckDB store (``flowtunnel query``).
    store: bool = True
    #: Store retention (e.g. 30d); unset keeps everything.
    retain: float | None = duration_setting(None, 60.0, 36500 * 86400.0)
    #: Write decoded records as JSON lines to this file ("-" for stdout).
    jsonl: str | None = None
    #: Write decoded flows as Parquet files under this directory (``flowtunnel query --parquet DIR``), one
    #: file per committed sequence range, hive-partitioned by day and hour (docs/scale-out.md).
    parquet: Path | None = None
    #: A Parquet file is written at least this often while flows arrive (and every 100,000 rows): shorter
    #: makes flows queryable sooner, longer makes fewer, larger files.
    parquet_flush: float = duration_setting(10.0, 0.0, 3600.0)
    #: Serve Prometheus metrics on /metrics.
    metrics: bool = True
    #: Serve the operator's console at /console (needs an operator token: admin_token_file, or
    #: DATA/admin.token written by ``flowtunnel admin-token``; without one it stays off, with a log line).
    console: bool = True
    #: The operator token (one word, mode 0600) that opens /console, /metrics and /v1/status. Unset: the
    #: gateway uses DATA/admin.token if that exists; with no token at all /metrics and /v1/status answer
    #: loopback peers only. See docs/security.md, "Operator console".
    admin_token_file: Path | None = None
    #: Serve /metrics and /v1/status to anyone without a token (the behaviour before the console).
    metrics_public: bool = False
    #: The console shows an agent late when not heard from for this long, and silent after console_silent.
    console_late: float = duration_setting(300.0, 1.0, 30 * 86400.0)
    console_silent: float = duration_setting(3600.0, 2.0, 365 * 86400.0)
    #: A console login lasts this long.
    console_session: float = duration_setting(12 * 3600.0, 60.0, 30 * 86400.0)
    #: How often status.json is rewritten.
    status_interval: float = duration_setting(2.0, 0.01, 86400.0)
    #: How long the running gateway trusts its cached copy of the agent registry.
    registry_ttl: float = duration_setting(2.0, 0.01, 86400.0)
    #: ``GET /v1/health`` fails (503) when an enrolled agent has been silent longer than this.
    health_silence: float = duration_setting(3600.0, 60.0, 30 * 86400.0)
    #: Agents ``/v1/health`` and ``flowtunnel status`` do not watch (seasonal sites, spares), comma-separated.
    health_ignore: tuple[str, ...] = ()
    #: Retry-After (seconds) of 503 answers, spread over [r, 2r] (refused agents do not return at once).
    retry_after: int = count_setting(5, 1, 3600)
    #: Probes (GET /v1/probe) answered per second per source address, with bursts of ten seconds' worth
    #: (at least 20); more get 429.
    probe_rate: float = 2.0
    #: WebSocket connections (GET /v1/ws) open at once, and per agent id; see docs/protocol.md 7.4.
    max_ws: int = count_setting(256, 1, 100_000)
    max_ws_per_agent: int = 4
    #: Ping interval on WebSocket connections (a connection that does not pong within half of it is dropped).
    ws_heartbeat: float = duration_setting(30.0, 1.0, 86400.0)
    #: A WebSocket connection without a batch for this long is closed (the agent reconnects when it has data).
    ws_idle_timeout: float = duration_setting(300.0, 1.0, 86400.0)
    #: GET-only rung (docs/protocol.md 7.5): pieces per batch, batches pending per agent, bytes pending in
    #: all, and how long an incomplete batch is kept (then dropped and counted).
    get_max_pieces: int = count_setting(4096, 1, 1_000_000)
    get_pending_per_agent: int = count_setting(4, 1, 1024)
    get_pending_bytes: int = size_setting(64 << 20, 1024, 1 << 34)
    get_max_age: float = duration_setting(120.0, 1.0, 86400.0)
    #: The DNS rung: the zone delegated to this gateway (names under it carry batches; docs/networks.md).
    dns_zone: str | None = None
    #: Where the authoritative DNS endpoint listens for dns_zone, udp://HOST:PORT (TCP on the same port).
    dns_listen: str = "udp://127.0.0.1:5353"

    def __repr__(self) -> str:
        return masked_repr(self)  # --journal may carry a NATS password

    def __post_init__(self) -> None:
        if self.data is None or str(self.data) == "":
            raise ValueError("the data directory is required (--data DIR, key data, FLOWTUNNEL_GATEWAY_DATA)")
        if not self.listens:
            raise ValueError("at least one listen address is required (--listen [http://|https://]HOST:PORT)")
        for text in self.forward:
            _parse_forward(text)
        for text in self.source_pool:
            _check_pool_entry(text)
        _parse_port_range(self.source_ports)
        for text in self.spoof_map:
            m = _AGENT_MAP_RE.match(text)
            if not m:
                raise ValueError(f"spoof map entry {text!r} is not AGENT=ADDRESS")
            try:
                ipaddress.IPv4Address(m.group(2))
            except ValueError:
                raise ValueError(f"spoof map entry {text!r}: {m.group(2)!r} is not an IPv4 address") from None
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together (give both or neither)")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {str(path)!r} is not a readable file")
        addresses = self.listen_addresses
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"listen addresses {', '.join(self.listens)} name one address twice")
        check_bounds(self, error=ValueError)
        if not self.max_body <= self.max_raw <= 1 << 30:
            raise ValueError(f"max_raw {self.max_raw} is outside max_body ({self.max_body}) .. 1 GiB")
        if not 0 < self.journal_agent_share <= 1:
            raise ValueError(
                f"journal_agent_share {self.journal_agent_share} is outside (0, 1] "
                "(a fraction of journal_quota)"
            )
        if not 1 <= self.max_inflight_per_agent <= self.max_inflight:
            raise ValueError(
                f"max_inflight_per_agent {self.max_inflight_per_agent} is outside 1 .. max_inflight "
                f"({self.max_inflight})"
            )
        if self.commit_agent_bytes > self.commit_max_bytes:
            raise ValueError(
                f"commit_agent_bytes {self.commit_agent_bytes} is above commit_max_bytes "
                f"{self.commit_max_bytes}"
            )
        if not 1 <= self.max_ws_per_agent <= self.max_ws:
            raise ValueError(
                f"max_ws_per_agent {self.max_ws_per_agent} is outside 1 .. max_ws ({self.max_ws})"
            )
        if not self.max_body <= self.get_pending_bytes <= 1 << 34:
            raise ValueError(
                f"get_pending_bytes {self.get_pending_bytes} is outside max_body ({self.max_body}) .. 16 GiB"
            )
        if not 0 < self.probe_rate <= 100_000:
            raise ValueError(f"probe_rate {self.probe_rate}/s is outside (0, 100000]")
        if not self.console_late < self.console_silent:
            raise ValueError(f"console_late ({self.console_late:g} s) must be below console_silent "
                             f"({self.console_silent:g} s)")
        if self.dns_zone is not None:
            object.__setattr__(self, "dns_zone", normalise_zone(self.dns_zone))
            _ = self.dns_host_port

    @property
    def data_dir(self) -> Path:
        assert self.data is not None  # checked in __post_init__
        return self.data

    @property
    def listens(self) -> tuple[str, ...]:
        """The listen addresses as given, always a tuple."""
        return (self.listen,) if isinstance(self.listen, str) else tuple(self.listen)

    @property
    def listen_addresses(self) -> tuple[ListenAddress, ...]:
        tls = self.tls_cert is not None
        return tuple(parse_listen(text, tls=tls) for text in self.listens)

    @property
    def dns_host_port(self) -> tuple[str, int]:
        text = self.dns_listen
        if text.startswith("udp://"):
            text = text[len("udp://"):]
        elif "://" in text:
            raise ValueError(f"dns_listen {self.dns_listen!r} must be udp://HOST:PORT (TCP is served on the "
                             "same port)")
        return parse_host_port(text, what="DNS listen address")

    @property
    def listen_host_port(self) -> tuple[str, int]:
        """Host and port of the first listen address."""
        first = self.listen_addresses[0]
        return first.host, first.port

    @property
    def targets(self) -> tuple[ForwardTarget, ...]:
        return tuple(_parse_forward(t) for t in self.forward)

    @property
    def source_port_range(self) -> tuple[int, int]:
        return _parse_port_range(self.source_ports)

    @property
    def spoof_addresses(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for text in self.spoof_map:
            m = _AGENT_MAP_RE.match(text)
            assert m is not None
            out[m.group(1)] = m.group(2)
        return out
