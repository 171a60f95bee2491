"""The agent's settings: a frozen dataclass filled by ``flowtunnel.config.load_settings`` (section "agent").

Validation happens here, once, with messages that name the setting, the value and the rule, so the CLI and
the service can trust every field. The key is kept out of reprs and logs.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from flowtunnel.config import check_bounds, count_setting, duration_setting, size_setting
from flowtunnel.errors import ConfigError
from flowtunnel.log import MIN_DISK_QUOTA, FullPolicy
from flowtunnel.wire.dns import normalise_zone
from flowtunnel.wire.keys import parse_key, validate_agent_id

__all__ = [
    "AgentConfig", "ListenAddress", "check_files", "load_key", "mask_url", "parse_host_port", "parse_listen",
]

_PIN_RE = re.compile(r"^[0-9a-fA-F:]+$")

# The smallest body limit, configured or learned from a proxy (413, bodies cut mid-way): a few KB still
# carry a typical NetFlow datagram (~1.5 KB) per batch. A datagram that seals larger than the limit in force
# still goes alone (a gateway or proxy may take it); if the path refuses it, it is counted as oversize and
# kept.
MIN_BODY = 4_000  # "--max-body 4k"


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """A parsed ``udp://HOST:PORT`` listen address (host is an IP literal, IPv6 without brackets)."""

    host: str
    port: int

    @property
    def family_v6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"udp://[{self.host}]:{self.port}" if self.family_v6 else f"udp://{self.host}:{self.port}"


def parse_listen(text: str) -> ListenAddress:
    """``udp://127.0.0.1:2055`` or ``udp://[::1]:2055`` → ListenAddress; raises ``ConfigError``."""
    parts = urlsplit(text.strip())
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "udp" or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ConfigError(f"listen address {text!r} is not udp://HOST:PORT (IPv6: udp://[::1]:2055)")
    try:
        host = str(ipaddress.ip_address(parts.hostname))
    except ValueError:
        raise ConfigError(f"listen address {text!r}: host {parts.hostname!r} is not an IP address") from None
    return ListenAddress(host, port)


def parse_host_port(text: str, *, what: str) -> tuple[str, int]:
    """``127.0.0.1:9102`` / ``[::1]:9102`` → (host, port); ``ConfigError`` naming ``what`` otherwise."""
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)$", text) or re.match(r"^([^:\[\]]+):(\d+)$", text)
    if not m or not 0 <= int(m.group(2)) <= 65535:
        raise ConfigError(f"{what} {text!r} is not HOST:PORT, port 0..65535 (example: 127.0.0.1:9102)")
    return m.group(1), int(m.group(2))


def mask_url(url: str | None) -> str | None:
    """The URL with its password replaced by ``***`` (for logs and reprs)."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


DEFAULT_RUNGS = ("post", "ws", "get")
MAX_GATEWAYS = 32  # gateway URLs one agent may list (a cluster's gateways, not a fleet's)


@dataclass(frozen=True, kw_only=True, repr=False)
class AgentConfig:
    """Everything ``flowtunnel agent`` needs; each field is a TOML key in ``[agent]``, an env var
    ``FLOWTUNNEL_AGENT_<KEY>`` and a flag ``--<key>``."""

    gateway: str = field(default="", metadata={"join": ","})
    """Gateway base URL, e.g. https://gw.example.net:8443 (the agent POSTs to <gateway>/v1/batches); several
    gateways of one cluster (a shared journal) separated by commas, or as a TOML array, best first: the agent
    uses one at a time and moves to the next when it fails (``gateways``; ``for_gateway`` gives the settings
    for one of them, which is what every transport sees)."""
    listen: tuple[str, ...] = ("udp://127.0.0.1:2055",)
    spool: Path | None = None
    agent_id: str = ""
    key: str = field(default="", repr=False)
    key_file: Path | None = None
    proxy: str | None = None
    """A proxy URL (http://user:pass@host:port), ``auto`` (HTTP(S)_PROXY/NO_PROXY, then ``pac``, then WPAD,
    then direct) or ``none`` (direct); unset: HTTP(S)_PROXY/NO_PROXY only."""
    pac: str | None = None
    """PAC file (path or http URL) naming the proxy for the gateway, with ``proxy = auto``."""
    proxy_user: str | None = None
    """Proxy login (``DOMAIN\\user`` for NTLM) when the proxy URL carries none (found by auto, PAC, WPAD)."""
    proxy_password_file: Path | None = None
    """File holding the proxy password for ``proxy_user`` (kept out of command lines and logs)."""
    ca_file: Path | None = None
    pin_sha256: str | None = None
    """SHA-256 of the gateway's DER certificate, hex; alone it replaces CA checks (self-signed gateways)."""
    rungs: tuple[str, ...] = DEFAULT_RUNGS
    """The transports to try, best first: ``post`` (a POST per batch), ``ws`` (batches as WebSocket messages
    on one connection), ``get`` (GET-only pieces in URLs), ``dns`` (query names through the network's
    resolver; with ``dns_zone`` it ends the default ladder). Best for reach: once ``post`` carried a batch,
    batches go by ``ws`` when it is listed after ``post`` (fewer bytes, ``transport.ladder.LEAN``);
    ``post,get`` keeps them on POST."""
    dns_zone: str | None = None
    """The zone delegated to the gateway's DNS endpoint (``gateway --dns-zone``): enables the ``dns`` rung."""
    dns_resolver: str | None = None
    """HOST:PORT of the resolver the dns rung asks (default: the first nameserver of /etc/resolv.conf)."""
    dns_qps: float = 20.0
    """DNS queries per second at most on the dns rung (the gateway's answers may slow it further)."""
    stream_compression: bool = True
    """At a quiet site, batches go as frames of one LZMA2 stream continued across batches (docs/protocol.md
    section 3.4): ~19 % smaller bodies at 2 datagrams/s (softflowd v9, docs/benchmarks.md); off: each batch
    compressed on its own."""
    on_intercept: str = "allow"
    """A pinned gateway whose certificate does not match, behind a chain this box trusts (TLS interception):
    ``allow`` (report it, keep uploading: batches are sealed end to end) or ``refuse``."""
    # Allowed ranges (refused with the range in the message): wide enough for any link from a LAN to a
    # satellite hop that is down for days, narrow enough that a typo ("99999999d", "1TB" of receive buffer)
    # cannot leave the agent holding datagrams forever or asking the kernel for the impossible.
    connect_timeout: float = duration_setting(15.0, 0.1, 3600.0)
    read_timeout: float = duration_setting(60.0, 0.1, 3600.0)
    total_timeout: float = duration_setting(180.0, 1.0, 86400.0)
    latency: float = duration_setting(1.0, 0.01, 3600.0)
    max_batch_datagrams: int = count_setting(20000, 1, 1_000_000)
    max_body: int = size_setting(1024 * 1024, MIN_BODY, 1 << 30)
    bandwidth: int = size_setting(0, 0, 10 * 1000**3, zero="unlimited")
    """Cap on request body bytes per second; 0 = unlimited."""
    daily_bytes: int = size_setting(0, 0, 1000**5, zero="unlimited")
    """Cap on request body bytes per UTC day; 0 = unlimited."""
    #: Disk the spool's log may take, all its files included (database, WAL, WAL index, reserve): at least
    #: MIN_DISK_QUOTA (512 KiB), which the pages of an empty log, its reserve and WAL need.
    spool_quota: int = size_setting(512 * 1024 * 1024, MIN_DISK_QUOTA, 16 << 40)
    full_policy: FullPolicy = FullPolicy.DROP_OLDEST
    rcvbuf: int = size_setting(16 * 1024 * 1024, 4096, 1 << 30)
    buffer_datagrams: int = count_setting(20000, 1, 10_000_000)
    """Datagrams held in memory between the socket and the spool; beyond it they drop as receiver_overflow."""
    commit_interval: float = duration_setting(0.05, 0.001, 10.0)
    commit_bytes: int = size_setting(64 * 1024, 0, 64 << 20, zero="every commit interval")
    """A spool commit waits until this much datagram payload has arrived, at most ``latency`` (5 s at most;
    a commit costs the same for one datagram as for a hundred); 0: every ``commit_interval``."""
    backoff_base: float = duration_setting(0.5, 0.01, 3600.0)
    backoff_cap: float = duration_setting(60.0, 0.01, 86400.0)
    reject_backoff: float = duration_setting(300.0, 1.0, 86400.0)
    """Wait after a response retrying cannot fix (401, 403, 400): the data stays spooled meanwhile."""
    status_interval: float = duration_setting(2.0, 0.01, 86400.0)
    metrics_listen: str | None = None
    """Serve Prometheus metrics on http://HOST:PORT/metrics (off unless given)."""
    shutdown_timeout: float = duration_setting(5.0, 0.0, 600.0, zero="no last upload")

    def __post_init__(self) -> None:
        if not self.gateways:
            raise ConfigError(
                "gateway URL is required (--gateway URL, [agent] gateway, FLOWTUNNEL_AGENT_GATEWAY)"
            )
        urls = self.gateways
        if len(urls) > MAX_GATEWAYS:
            raise ConfigError(f"{len(urls)} gateway URLs given, at most {MAX_GATEWAYS}")
        for url in urls:
            try:
                gw = urlsplit(url)
                gw.port  # noqa: B018  (raises ValueError for a port out of range)
            except ValueError:
                gw = urlsplit("")
            if gw.scheme not in ("http", "https") or not gw.hostname:
                raise ConfigError(f"gateway {url!r} is not an http:// or https:// URL")
            if gw.password is not None or gw.username is not None:
                raise ConfigError("gateway URL must not carry credentials (the agent authenticates with its "
                                  "key)")
        if len({url.rstrip("/") for url in urls}) != len(urls):
            raise ConfigError(f"gateway {self.gateway!r} names the same URL twice")
        if self.spool is None:
            raise ConfigError(
                "spool directory is required (--spool DIR, [agent] spool, FLOWTUNNEL_AGENT_SPOOL)"
            )
        if not self.agent_id:
            raise ConfigError(
                "agent id is required (--agent-id ID, [agent] agent-id, FLOWTUNNEL_AGENT_AGENT_ID)"
            )
        try:
            validate_agent_id(self.agent_id)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not self.key and self.key_file is None:
            raise ConfigError(
                "a key is required (--key KEY or --key-file FILE; 'flowtunnel enroll' prints one)"
            )
        if self.key and self.key_file is not None:
            raise ConfigError("give either key or key-file, not both")
        if not self.listen:
            raise ConfigError("at least one listen address is required (udp://HOST:PORT)")
        seen: set[ListenAddress] = set()
        for text in self.listen:
            addr = parse_listen(text)
            if addr in seen:
                raise ConfigError(f"listen address {text!r} is given twice")
            seen.add(addr)
        if self.proxy is not None and self.proxy not in ("auto", "none"):
            px = urlsplit(self.proxy)
            if px.scheme not in ("http", "https") or not px.hostname:
                raise ConfigError(
                    f"proxy {mask_url(self.proxy)!r} is not an http://[user:pass@]host:port URL"
                )
        if self.proxy_password_file is not None and self.proxy_user is None:
            # The password alone cannot be used: it would be silently ignored and the proxy answer 407.
            raise ConfigError("proxy-password-file needs proxy-user, the login the password belongs to "
                              "(--proxy-user USER or DOMAIN\\USER)")
        if self.pac is not None and self.proxy is not None and self.proxy != "auto":
            raise ConfigError(f"pac is read only with proxy = auto (or proxy unset); proxy "
                              f"{mask_url(self.proxy)!r} would ignore it")
        if self.pin_sha256 is not None:
            pin = self.pin_sha256.replace(":", "")
            if not _PIN_RE.match(self.pin_sha256) or len(pin) != 64:
                raise ConfigError(
                    f"pin-sha256 {self.pin_sha256!r} is not 64 hex digits (sha256 of the DER certificate)"
                )
        check_bounds(self)
        if self.metrics_listen is not None:
            parse_host_port(self.metrics_listen, what="metrics-listen")
        known = (*DEFAULT_RUNGS, "dns")
        if self.dns_zone is not None:
            try:
                object.__setattr__(self, "dns_zone", normalise_zone(self.dns_zone))
            except ValueError as exc:
                raise ConfigError(f"dns-zone: {exc}") from None
            if self.rungs == DEFAULT_RUNGS:
                object.__setattr__(self, "rungs", (*DEFAULT_RUNGS, "dns"))
        elif "dns" in self.rungs:
            raise ConfigError("the dns rung needs the gateway's zone: --dns-zone ZONE")
        if self.dns_resolver is not None:
            parse_host_port(self.dns_resolver, what="dns-resolver")
        if not 0.1 <= self.dns_qps <= 10_000:
            raise ConfigError(f"dns-qps {self.dns_qps} is outside the allowed range 0.1 .. 10000 queries/s")
        rungs = self.rungs
        if not rungs or any(r not in known for r in rungs) or len(set(rungs)) != len(rungs):
            raise ConfigError(f"rungs {','.join(self.rungs)!r} must name each of {', '.join(known)} at most "
                              "once, best first (e.g. post,ws,get)")
        if self.on_intercept not in ("allow", "refuse"):
            raise ConfigError(f"on-intercept {self.on_intercept!r} is not one of allow, refuse")

    @property
    def gateways(self) -> tuple[str, ...]:
        """The gateway URLs, best first (``gateway`` split at commas)."""
        return tuple(url.strip() for url in self.gateway.split(",") if url.strip())

    def for_gateway(self, url: str) -> AgentConfig:
        """These settings for one gateway ``url`` (one of ``gateways``): what a transport is built from."""
        if url not in self.gateways:
            raise ValueError(f"gateway {url!r} is not one of {', '.join(self.gateways)}")
        return dataclasses.replace(self, gateway=url)

    @property
    def listen_addresses(self) -> tuple[ListenAddress, ...]:
        return tuple(parse_listen(text) for text in self.listen)

    @property
    def spool_dir(self) -> Path:
        assert self.spool is not None  # checked in __post_init__
        return self.spool

    def __repr__(self) -> str:
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "key":
                value = "***" if value else ""
            elif f.name in ("proxy", "pac"):  # a PAC URL may carry a login too
                value = mask_url(value)
            shown.append(f"{f.name}={value!r}")
        return f"AgentConfig({', '.join(shown)})"


def check_files(config: AgentConfig) -> None:
    """Refuse, before anything starts, a ``pac`` given as a local file that cannot be read (a mistyped path
    would otherwise cost a warning and a direct connection that the network may refuse). A PAC fetched by URL
    is not checked here: an unreachable one is the network's state, warned about when routes are found."""
    pac = config.pac
    if pac is None or pac.startswith(("http://", "https://")):
        return
    path = Path(pac.removeprefix("file://"))
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(f"cannot read PAC file {path}: {exc.strerror or exc}") from None


def load_key(config: AgentConfig) -> bytes:
    """The 32-byte key from ``key`` or ``key_file``; raises ``ConfigError`` (never showing the key)."""
    if config.key_file is not None:
        try:
            text = config.key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read key file {config.key_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"key file {config.key_file} is not text (expected ftk1_...)") from None
        source = f"key file {config.key_file}"
    else:
        text, source = config.key.strip(), "key"
    try:
        return parse_key(text)
    except ValueError as exc:
        # The parser's message may quote the value; do not echo it.
        raise ConfigError(f"{source} is not a valid flowtunnel key ({type(exc).__name__})") from None
