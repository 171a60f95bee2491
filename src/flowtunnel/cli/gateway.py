"""``flowtunnel gateway``, ``enroll``, ``revoke`` and ``agents``: run the gateway and manage its agents."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from flowtunnel.cli._common import add_config_flag, init_logging
from flowtunnel.errors import ConfigError

__all__ = ["register"]

# (flag, field, metavar, help). Every flag is also a key in [gateway] and an env var FLOWTUNNEL_GATEWAY_<KEY>.
_FLAGS: tuple[tuple[str, str, str, str], ...] = (
    ("--data", "data", "DIR", "data directory: registry, journal, store, status.json (required)"),
    ("--source-pool", "source_pool", "LIST", "source addresses for re-emitted datagrams, one per (agent, "
     "exporter): addresses, CIDRs, LOW-HIGH ranges, comma-separated (default 127.0.0.2-127.255.255.254)"),
    ("--source-ports", "source_ports", "PORTS", "source ports for those sockets: 0 (any), PORT or LOW-HIGH"),
    ("--forward-rate", "forward_rate", "N", "datagrams/s re-emitted to each --forward collector, paced so a "
     "collector's receive buffer is not overrun (default 20000; 0 = unlimited)"),
    ("--max-sources", "max_sources", "N", "(agent, exporter) sources with their own socket (default 4096)"),
    ("--spoof-map", "spoof_map", "LIST", "with --spoof: AGENT=IPV4 source addresses, comma-separated"),
    ("--tls-cert", "tls_cert", "FILE", "serve HTTPS with this PEM certificate chain (with --tls-key)"),
    ("--tls-key", "tls_key", "FILE", "PEM private key for --tls-cert"),
    ("--max-body", "max_body", "SIZE", "largest request body accepted (default 8MiB)"),
    ("--max-raw", "max_raw", "SIZE", "largest batch after decompression (default 24MiB)"),
    ("--max-batch-datagrams", "max_batch_datagrams", "N", "most datagrams in one batch (default 20000)"),
    ("--agent-rate", "agent_rate", "SIZE", "journal bytes/s one agent may add, beyond: 429 (default 4MiB; "
     "0 = unlimited)"),
    ("--agent-burst", "agent_burst", "SIZE", "burst allowed above --agent-rate (default 64MiB)"),
    ("--journal-agent-share", "journal_agent_share", "FRACTION", "part of --journal-quota one agent may "
     "hold before its batches get 429 (default 0.5)"),
    ("--max-inflight", "max_inflight", "N", "requests processed at once; more get 503 (default 16)"),
    ("--max-inflight-per-agent", "max_inflight_per_agent", "N", "of those, per agent id (default 2)"),
    ("--max-inflight-small", "max_inflight_small", "N", "slots of small batches' own lane (body <= 16 KiB, "
     "record block <= 64 KiB; default 256; 0: they share --max-inflight)"),
    ("--max-waiting", "max_waiting", "N", "batches waiting for a slot in arrival order (default 4096; "
     "0: 503 at once)"),
    ("--slot-wait", "slot_wait", "DURATION", "longest wait for a slot before 503 busy (default 10s)"),
    ("--body-timeout", "body_timeout", "DURATION", "time allowed to send a body, plus length / min-body-rate "
     "(default 60s)"),
    ("--min-body-rate", "min_body_rate", "SIZE", "slowest body transfer accepted, bytes/s (default 1KiB)"),
    ("--keepalive-timeout", "keepalive_timeout", "DURATION", "close idle keep-alive connections after (75s)"),
    ("--journal-quota", "journal_quota", "SIZE", "disk the journal may use, all its files included "
     "(database, write-ahead log, reserve); when full, batches get 503 (2GiB)"),
    ("--commit-agent-bytes", "commit_agent_bytes", "SIZE", "journal bytes one agent adds to one group "
     "commit of the SQLite journal; a larger batch is journaled over several (default 256KiB)"),
    ("--commit-max-bytes", "commit_max_bytes", "SIZE", "journal bytes of one group commit, all agents "
     "together (default 8MiB)"),
    ("--journal", "journal", "nats://HOST:PORT[,...]", "scale-out: journal on this NATS JetStream cluster "
     "(shared by every gateway; registry in a KV bucket; sinks as 'flowtunnel sink' processes; "
     "docs/scale-out.md). Default: the embedded SQLite journal in --data"),
    ("--journal-replicas", "journal_replicas", "N", "with --journal: stream replicas (default: 3 with three "
     "or more servers, else 1)"),
    ("--journal-max-age", "journal_max_age", "DURATION", "with --journal: age limit of stream messages "
     "(default: kept until consumed)"),
    ("--journal-agent-messages", "journal_agent_messages", "N", "with --journal: accepted batches one agent "
     "may hold in the stream, beyond: 429 (default 0 = unlimited)"),
    ("--journal-timeout", "journal_timeout", "DURATION", "with --journal: wait this long for the stream to "
     "acknowledge an append before retrying it; three tries, then 503 (default 5s)"),
    ("--retain", "retain", "DURATION", "store retention, e.g. 30d (default: keep everything)"),
    ("--jsonl", "jsonl", "FILE", "also write decoded records as JSON lines to FILE ('-' for stdout)"),
    ("--parquet", "parquet", "DIR", "also write decoded flows as Parquet files under DIR, hive-partitioned "
     "by day and hour ('flowtunnel query --parquet DIR')"),
    ("--parquet-flush", "parquet_flush", "DURATION", "with --parquet: write a file at least this often while "
     "flows arrive (default 10s)"),
    ("--status-interval", "status_interval", "DURATION", "how often status.json is rewritten (default 2s)"),
    ("--registry-ttl", "registry_ttl", "DURATION", "how long the agent registry is cached (default 2s)"),
    ("--probe-rate", "probe_rate", "N", "captive-portal probes (GET /v1/probe) answered per second per "
     "source address, bursts of 10 s worth (default 2)"),
    ("--max-ws", "max_ws", "N", "WebSocket connections (/v1/ws) open at once (default 256)"),
    ("--max-ws-per-agent", "max_ws_per_agent", "N", "of those, per agent id (default 4)"),
    ("--ws-heartbeat", "ws_heartbeat", "DURATION", "ping interval on WebSocket connections (default 30s)"),
    ("--ws-idle-timeout", "ws_idle_timeout", "DURATION", "close a WebSocket connection without a batch for "
     "this long (default 5m)"),
    ("--get-max-pieces", "get_max_pieces", "N", "GET-only rung: pieces per batch (default 4096)"),
    ("--get-pending-per-agent", "get_pending_per_agent", "N", "GET-only rung: incomplete batches kept per "
     "agent (default 4)"),
    ("--get-pending-bytes", "get_pending_bytes", "SIZE", "GET-only rung: bytes of incomplete batches kept in "
     "all (default 64MiB)"),
    ("--get-max-age", "get_max_age", "DURATION", "GET-only rung: drop a batch still incomplete after this "
     "long (default 2m)"),
    ("--dns-zone", "dns_zone", "ZONE", "serve the DNS rung: the zone delegated to this gateway, whose names "
     "carry agents' batches (docs/networks.md: how to delegate it); off unless given"),
    ("--dns-listen", "dns_listen", "udp://HOST:PORT", "where the DNS endpoint for --dns-zone listens, UDP "
     "and TCP on the same port (default udp://127.0.0.1:5353; a delegated zone needs port 53)"),
    ("--health-silence", "health_silence", "DURATION", "GET /v1/health answers 503 when an enrolled agent "
     "has been silent longer than this (default 1h)"),
    ("--console", "console", "on|off", "serve the operator's console at /console (default on; it needs an "
     "operator token: --admin-token-file or DATA/admin.token)"),
    ("--admin-token-file", "admin_token_file", "FILE", "operator token (mode 0600) for /console, /metrics "
     "and /v1/status (default DATA/admin.token if it exists; 'flowtunnel admin-token' writes one). "
     "Without any, the console is off and /metrics, /v1/status answer loopback only"),
    ("--console-late", "console_late", "DURATION", "the console shows an agent late after this long without "
     "news (default 5m)"),
    ("--console-silent", "console_silent", "DURATION", "... and silent after this long (default 1h)"),
    ("--console-session", "console_session", "DURATION", "a console login lasts this long (default 12h)"),
    ("--health-ignore", "health_ignore", "LIST", "agents /v1/health and 'flowtunnel status' do not watch, "
     "comma-separated (seasonal sites, spares)"),
)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "gateway",
        help="receive batches from agents and hand them to collectors, the store and other sinks",
        description=(
            "Accept sealed batches from enrolled agents over HTTP(S), journal them durably exactly once, and "
            "feed the sinks: udp-forward (--forward) re-emits every datagram to existing collectors with "
            "one source address per (agent, exporter); store (on unless --no-store) decodes into DuckDB for "
            "'flowtunnel query'; jsonl (--jsonl) writes decoded records; parquet (--parquet DIR) writes "
            "decoded flows as Parquet files. Every flag is also a key in the [gateway] section of --config "
            "and an environment variable FLOWTUNNEL_GATEWAY_<KEY>."
        ),
    )
    parser.add_argument(
        "--forward", action="append", default=None, metavar="udp://HOST:PORT",
        help="collector to re-emit every datagram to, repeatable",
    )
    parser.add_argument(
        "--listen", action="append", default=None, metavar="[http://|https://]HOST:PORT",
        help="listen address, repeatable: the same gateway on plain HTTP and on TLS (https:// needs "
        "--tls-cert/--tls-key; without a scheme: HTTPS when they are given, else HTTP; default "
        "127.0.0.1:8080; port 0 = any free port)",
    )
    for flag, dest, metavar, text in _FLAGS:
        parser.add_argument(flag, dest=dest, default=None, metavar=metavar, help=text)
    parser.add_argument("--spoof", dest="spoof", action="store_const", const=True, default=None,
                        help="forge source addresses over a raw socket, no binding (needs CAP_NET_RAW)")
    parser.add_argument("--identity-port", dest="identity_port", action="store_const", const=True,
                        default=None, help="treat exporters on one address but different ports as distinct")
    parser.add_argument("--no-store", dest="store", action="store_const", const=False, default=None,
                        help="do not decode into the DuckDB store")
    parser.add_argument("--no-metrics", dest="metrics", action="store_const", const=False, default=None,
                        help="do not serve /metrics")
    parser.add_argument("--metrics-public", dest="metrics_public", action="store_const", const=True,
                        default=None,
                        help="serve /metrics and /v1/status to anyone, without the operator token")
    add_config_flag(parser)
    parser.set_defaults(func=_run_gateway)

    enroll = sub.add_parser(
        "enroll",
        help="register an agent at the gateway and print its key",
        description=(
            "Create agent NAME in the gateway's registry (DATA/registry.sqlite) with a new 256-bit key and "
            "print the key with a ready-to-use agent configuration. A running gateway picks it up within "
            "seconds. The key is shown once: store it in the agent's config or key file."
        ),
    )
    enroll.add_argument("name", metavar="NAME", help="agent id: 1-63 letters, digits, '.', '_', '-'")
    _data_flag(enroll)
    enroll.add_argument("--rotate", action="store_true",
                        help="issue a new key to an existing agent (the old key stops working)")
    enroll.add_argument("--gateway-url", action="append", default=None, metavar="URL",
                        help="gateway URL to put in the printed agent config (default http://HOST:PORT); "
                        "repeatable (or comma-separated) for the gateways of one cluster (--journal): the "
                        "agent config lists them all, best first")
    enroll.add_argument("--format", choices=["text", "json"], default="text",
                        help="json: one line {\"agent_id\": ..., \"key\": ...}")
    enroll.add_argument("--key-file", type=Path, default=None, metavar="PATH",
                        help="write the key to PATH (mode 0600, a new file; with --rotate it may exist) "
                        "instead of printing it; copy it to the agent's /etc/flowtunnel/agent.key")
    enroll.set_defaults(func=_run_enroll)

    revoke = sub.add_parser(
        "revoke",
        help="revoke an agent: its batches are refused (403) from now on",
        description="Mark agent NAME revoked in the registry; a running gateway refuses it within seconds.",
    )
    revoke.add_argument("name", metavar="NAME")
    _data_flag(revoke)
    revoke.set_defaults(func=_run_revoke)

    token = sub.add_parser(
        "admin-token",
        help="write the operator token that opens the console, /metrics and /v1/status",
        description=(
            "Write a new operator token (256 random bits) to DATA/admin.token (or --file), mode 0600, and "
            "say where. A gateway started afterwards uses it (--admin-token-file overrides). The token is "
            "not printed unless --print is given: read it from the file when you log in."
        ),
    )
    _data_flag(token, journal=False)
    token.add_argument("--file", type=Path, default=None, metavar="PATH",
                       help="write here instead of DATA/admin.token")
    token.add_argument("--rotate", action="store_true", help="replace an existing token (sessions of the old "
                       "one end when the gateway restarts)")
    token.add_argument("--print", dest="show", action="store_true", help="also print the token")
    token.set_defaults(func=_run_admin_token)

    agents = sub.add_parser("agents", help="list the agents enrolled at a gateway",
                            description="List enrolled agents (never their keys).")
    _data_flag(agents)
    agents.add_argument("--format", choices=["text", "json"], default="text")
    agents.set_defaults(func=_run_agents)


def _data_flag(parser: argparse.ArgumentParser, *, journal: bool = True) -> None:
    parser.add_argument("--data", type=Path, default=None, metavar="DIR",
                        help="the gateway's data directory (env FLOWTUNNEL_GATEWAY_DATA)")
    if not journal:
        return
    parser.add_argument("--journal", default=None, metavar="nats://HOST:PORT[,...]",
                        help="scale-out: the registry in the KV bucket of this JetStream cluster, shared by "
                        "every gateway started with --journal (env FLOWTUNNEL_GATEWAY_JOURNAL)")


class _KvRegistrySync:
    """The KV bucket registry with the file registry's blocking face, for the one-shot commands."""

    def __init__(self, url: str) -> None:
        import asyncio

        from flowtunnel.gateway.kvregistry import REGISTRY_BUCKET, KvRegistry
        from flowtunnel.journal.jetstream import parse_journal_url

        try:
            config = parse_journal_url(url)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.where = f"bucket {REGISTRY_BUCKET} at {config.describe()}"
        self._runner = asyncio.Runner()
        self._reg = KvRegistry(config)
        try:
            self._runner.run(self._reg.open())
        except BaseException:
            self._runner.close()
            raise

    def __enter__(self) -> _KvRegistrySync:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._runner.run(self._reg.close())
        finally:
            self._runner.close()

    def enroll(self, name: str, *, rotate: bool = False) -> Any:
        return self._runner.run(self._reg.enroll(name, rotate=rotate))

    def revoke(self, name: str) -> Any:
        return self._runner.run(self._reg.revoke(name))

    def list(self) -> Any:
        return self._runner.run(self._reg.list())


def _registry(args: argparse.Namespace) -> tuple[Any, str]:
    """The registry the command works on (file in --data, or the KV bucket of --journal) and its name."""
    url = getattr(args, "journal", None) or os.environ.get("FLOWTUNNEL_GATEWAY_JOURNAL")
    if url:
        reg = _KvRegistrySync(url)
        return reg, reg.where
    from flowtunnel.gateway.registry import Registry

    data = _data_dir(args)
    return Registry(data), str(data)


def _data_dir(args: argparse.Namespace) -> Path:
    data = args.data or (Path(os.environ["FLOWTUNNEL_GATEWAY_DATA"]) if os.environ.get(
        "FLOWTUNNEL_GATEWAY_DATA") else None)
    if data is None:
        raise ConfigError("the data directory is required (--data DIR or FLOWTUNNEL_GATEWAY_DATA)")
    from flowtunnel.datadir import prepare_private_dir

    # Created 0700 (the registry holds every agent's key); someone else's or a group-writable one is refused.
    prepare_private_dir(Path(data), what="data directory")
    return Path(data)


def _run_gateway(args: argparse.Namespace) -> int:
    from flowtunnel.config import load_settings
    from flowtunnel.gateway.config import GatewayConfig
    from flowtunnel.gateway.service import run_gateway
    from flowtunnel.runtime import run_daemon

    flags: dict[str, Any] = {dest: getattr(args, dest) for _, dest, _, _ in _FLAGS}
    for name in ("spoof", "identity_port", "store", "metrics", "metrics_public"):
        flags[name] = getattr(args, name)
    flags["forward"] = tuple(args.forward) if args.forward else None
    flags["listen"] = tuple(args.listen) if args.listen else None
    config = load_settings(GatewayConfig, section="gateway", config_file=args.config, env=os.environ,
                           flags=flags)
    init_logging(args)
    try:
        return run_daemon(lambda stop: run_gateway(config, stop))
    except OSError as exc:
        # A directory that cannot be written, a file that cannot be read: a one-line reason, not a traceback.
        from flowtunnel.errors import describe_os_error

        print(f"flowtunnel gateway: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1


def _default_gateway_url() -> str:
    listen = os.environ.get("FLOWTUNNEL_GATEWAY_LISTEN", "127.0.0.1:8080").split(",")[0].strip()
    return listen if "://" in listen else f"http://{listen}"


# Where the printed agent config puts things: the agent box's paths of docs/operations.md and the sample
# contrib/config/agent.toml, apart from the gateway's /var/lib/flowtunnel (both may share a test box).
AGENT_SPOOL = "/var/lib/flowtunnel-agent"
AGENT_KEY_FILE = "/etc/flowtunnel/agent.key"


def _open_key_file(path: Path, *, rotate: bool) -> int:
    """A descriptor on ``path`` for the key, mode 0600; a new file unless ``rotate`` (then truncated)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if rotate else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise ConfigError(f"key file {path} exists (use --rotate to replace the key and the file)") from None
    except OSError as exc:
        raise ConfigError(f"cannot write key file {path}: {exc.strerror}") from None
    os.fchmod(fd, 0o600)  # an existing file (rotate) keeps no wider mode
    return fd


def _run_enroll(args: argparse.Namespace) -> int:
    from flowtunnel.gateway.registry import RegistryError
    from flowtunnel.wire.keys import format_key

    registry, data = _registry(args)
    key_file: Path | None = args.key_file
    fd = _open_key_file(key_file, rotate=args.rotate) if key_file is not None else None
    try:
        with registry as reg:
            entry = reg.enroll(args.name, rotate=args.rotate)
        key = format_key(entry.key)
        if fd is not None:
            os.write(fd, f"{key}\n".encode())
            os.fsync(fd)
    except BaseException as exc:
        if fd is not None:
            os.close(fd)
            fd = None
            if not args.rotate and key_file is not None:
                with contextlib.suppress(OSError):
                    key_file.unlink()
        if isinstance(exc, ValueError):  # BadAgentId
            raise ConfigError(str(exc)) from None
        if isinstance(exc, RegistryError):
            print(f"flowtunnel enroll: error: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, OSError):
            raise ConfigError(f"cannot write key file {key_file}: {exc.strerror}") from None
        raise
    finally:
        if fd is not None:
            os.close(fd)
    if args.format == "json":
        doc = {"agent_id": entry.agent_id, "key_file": str(key_file)} if key_file else {
            "agent_id": entry.agent_id, "key": key}
        print(json.dumps(doc))
        return 0
    urls = [u.strip() for text in args.gateway_url or () for u in text.split(",") if u.strip()]
    urls = list(dict.fromkeys(urls)) or [_default_gateway_url()]
    verb = "re-keyed" if args.rotate else "enrolled"
    cmd = ["flowtunnel", "agent", *(a for u in urls for a in ("--gateway", u)), "--listen",
           "udp://127.0.0.1:2055", "--spool", AGENT_SPOOL, "--agent-id", entry.agent_id]
    # One gateway as a string; several (a cluster's, one journal) as the TOML array the agent reads.
    gateway = json.dumps(urls[0]) if len(urls) == 1 else f"[{', '.join(json.dumps(u) for u in urls)}]"
    if key_file is not None:
        head = (f"agent {entry.agent_id} {verb} in {data}\n"
                f"key written to {key_file} (mode 0600): copy it to the agent box as {AGENT_KEY_FILE}\n")
        key_line = f"key_file = {json.dumps(AGENT_KEY_FILE)}\n"
        private = ""
        command = shlex.join([*cmd, "--key-file", AGENT_KEY_FILE])
    else:
        head = f"agent {entry.agent_id} {verb} in {data}\nkey: {key}\n"
        key_line = f"key = {json.dumps(key)}\n"
        private = "; keep this file private (chmod 600)"
        command = ("# or on the command line (the key from the environment, not the argument list)\n"
                   f"FLOWTUNNEL_AGENT_KEY={shlex.quote(key)} {shlex.join(cmd)}")
    print(
        head
        + "\n"
        + f"# agent config (TOML), e.g. /etc/flowtunnel/agent.toml{private}\n"
        "[agent]\n"
        f"gateway = {gateway}\n"
        "listen = [\"udp://127.0.0.1:2055\"]\n"
        f"spool = {json.dumps(AGENT_SPOOL)}\n"
        f"agent_id = {json.dumps(entry.agent_id)}\n"
        + key_line
        + "\n"
        + (command if key_file is None else f"# or on the command line\n{command}")
    )
    return 0


def _run_admin_token(args: argparse.Namespace) -> int:
    from flowtunnel.gateway.console.auth import generate_token, write_token_file
    from flowtunnel.gateway.service import ADMIN_TOKEN_FILE

    path: Path = args.file if args.file is not None else _data_dir(args) / ADMIN_TOKEN_FILE
    if args.file is None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = generate_token()
    write_token_file(path, token, replace=args.rotate)
    print(f"operator token written to {path} (mode 0600); restart the gateway to use a new one")
    if args.show:
        print(token)
    return 0


def _run_revoke(args: argparse.Namespace) -> int:
    from flowtunnel.gateway.registry import RegistryError

    registry, data = _registry(args)
    try:
        with registry as reg:
            entry = reg.revoke(args.name)
    except RegistryError as exc:
        print(f"flowtunnel revoke: error: {exc}", file=sys.stderr)
        return 1
    print(f"agent {entry.agent_id} revoked in {data}")
    return 0


def _run_agents(args: argparse.Namespace) -> int:
    from flowtunnel.gateway.registry import RegistryError

    registry, data = _registry(args)
    try:
        with registry as reg:
            entries = reg.list()
    except RegistryError as exc:
        print(f"flowtunnel agents: error: {exc}", file=sys.stderr)
        return 1

    def when(ts: float | None) -> str | None:
        return None if ts is None else dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat(timespec="seconds")

    rows = [{"agent_id": e.agent_id, "created": when(e.created_at), "key_changed": when(e.updated_at),
             "revoked": when(e.revoked_at)} for e in entries]
    if args.format == "json":
        for row in rows:
            print(json.dumps(row))
        return 0
    if not rows:
        print(f"no agents enrolled in {data} (use 'flowtunnel enroll NAME --data {data}')")
        return 0
    width = max(len(r["agent_id"] or "") for r in rows)
    for r in rows:
        state = f"revoked {r['revoked']}" if r["revoked"] else "active"
        print(f"{r['agent_id']:<{width}}  enrolled {r['created']}  {state}")
    return 0
