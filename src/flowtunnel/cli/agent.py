"""``flowtunnel agent``: receive NetFlow/IPFIX over UDP, spool it, upload it to a gateway over HTTP(S)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from flowtunnel.cli._common import add_config_flag, init_logging

__all__ = ["register"]

# (flag, field, metavar, help). Every flag is also a key in [agent] and an env var FLOWTUNNEL_AGENT_<KEY>.
_FLAGS: tuple[tuple[str, str, str, str], ...] = (
    ("--spool", "spool", "DIR", "spool directory: durable queue, status.json (required)"),
    ("--agent-id", "agent_id", "ID", "this agent's id, as enrolled at the gateway (required)"),
    ("--key", "key", "KEY", "the agent's key (ftk1_...) from 'flowtunnel enroll'; prefer --key-file or "
     "the env var FLOWTUNNEL_AGENT_KEY, command lines are visible to other users"),
    ("--key-file", "key_file", "FILE", "file holding the agent's key"),
    ("--proxy", "proxy", "URL|auto|none", "HTTP proxy, http://[user:pass@]host:port (Basic, NTLM or "
     "Negotiate, as the proxy asks; CONNECT for https gateways); auto: HTTP(S)_PROXY/NO_PROXY, then --pac, "
     "then WPAD, then direct; none: direct; unset: HTTP(S)_PROXY/NO_PROXY only"),
    ("--pac", "pac", "FILE|URL", "PAC file naming the proxy (with --proxy auto)"),
    ("--proxy-user", "proxy_user", "USER", "proxy login when the proxy URL has none (DOMAIN\\user for NTLM)"),
    ("--proxy-password-file", "proxy_password_file", "FILE", "file holding the password for --proxy-user"),
    ("--ca-file", "ca_file", "FILE", "PEM file of CA certificates to verify an https gateway with"),
    ("--pin-sha256", "pin_sha256", "HEX", "SHA-256 of the gateway's DER certificate; alone it replaces CA "
     "verification (self-signed gateway), with --ca-file both must pass"),
    ("--rungs", "rungs", "LIST", "transports to try, best first, comma-separated: post (a POST per batch), "
     "ws (batches as WebSocket messages), get (GET-only pieces in URLs, for proxies that refuse POST or "
     "bodies), dns (query names through the resolver, needs --dns-zone) (default post,ws,get, and dns "
     "last with --dns-zone); once post carried a batch, batches go by ws when listed after it (fewer "
     "bytes): post,get keeps them on POST"),
    ("--dns-zone", "dns_zone", "ZONE", "the gateway's DNS zone (gateway --dns-zone): adds the dns rung, for "
     "networks where only the resolver answers"),
    ("--dns-resolver", "dns_resolver", "HOST:PORT", "resolver for the dns rung (default: the first "
     "nameserver of /etc/resolv.conf)"),
    ("--dns-qps", "dns_qps", "N", "DNS queries per second at most on the dns rung (default 20)"),
    ("--on-intercept", "on_intercept", "allow|refuse", "a pinned gateway's certificate replaced by one a "
     "CA this box trusts (TLS interception): allow (default: reported, batches stay sealed end to end) or "
     "refuse"),
    ("--stream-compression", "stream_compression", "on|off", "at a quiet site, compress batches as frames of "
     "one LZMA2 stream continued across batches, ~19 %% smaller bodies at 2 datagrams/s (default on; off: "
     "each batch compressed on its own)"),
    ("--connect-timeout", "connect_timeout", "DURATION", "limit on connecting (TCP, proxy, TLS), 15s"),
    ("--read-timeout", "read_timeout", "DURATION", "limit on each read of the response (default 60s)"),
    ("--total-timeout", "total_timeout", "DURATION", "limit on a whole request (default 180s)"),
    ("--latency", "latency", "DURATION", "when caught up, send at most this often (default 1s)"),
    ("--max-batch-datagrams", "max_batch_datagrams", "N", "datagrams per batch at most (default 20000)"),
    ("--max-body", "max_body", "SIZE", "request body bytes at most, for buffering proxies (default 1MiB, "
     "at least 4k); lowered at run time when a proxy answers 413"),
    ("--bandwidth", "bandwidth", "SIZE", "cap on upload bytes per second, e.g. 20k (default 0 = unlimited)"),
    ("--daily-bytes", "daily_bytes", "SIZE", "cap on upload bytes per UTC day, e.g. 50MB (0 = unlimited)"),
    ("--spool-quota", "spool_quota", "SIZE", "disk the spool may use, all its files included: database, "
     "write-ahead log, reserve (default 512MiB, at least 512KiB)"),
    ("--full-policy", "full_policy", "POLICY", "when the spool is full: drop-oldest (default) or refuse-new; "
     "either way every dropped datagram is counted"),
    ("--rcvbuf", "rcvbuf", "SIZE", "UDP receive buffer asked of the kernel (default 16MiB; capped by "
     "net.core.rmem_max unless the agent has CAP_NET_ADMIN, as root); what a full buffer drops is counted "
     "as kernel_rcvbuf"),
    ("--buffer-datagrams", "buffer_datagrams", "N", "datagrams held in memory before the spool (20000)"),
    ("--commit-interval", "commit_interval", "DURATION", "group-commit interval of the spool (default 50ms)"),
    ("--commit-bytes", "commit_bytes", "SIZE", "a spool commit also waits until this much has arrived, at "
     "most --latency (5s at most): a kill -9 loses what waits (default 64KiB; 0: every --commit-interval)"),
    ("--backoff-base", "backoff_base", "DURATION", "first retry delay after a failure (default 0.5s)"),
    ("--backoff-cap", "backoff_cap", "DURATION", "longest retry delay (default 60s)"),
    ("--reject-backoff", "reject_backoff", "DURATION", "retry delay after a refusal retrying cannot fix "
     "(401, 403, 400) (default 5m)"),
    ("--status-interval", "status_interval", "DURATION", "how often status.json is rewritten if anything in "
     "it changed (unchanged: every 10 s) (default 2s)"),
    ("--metrics-listen", "metrics_listen", "HOST:PORT", "serve Prometheus metrics on "
     "http://HOST:PORT/metrics (backlog, drops by cause, upload rate, bytes on the wire; default off)"),
    ("--shutdown-timeout", "shutdown_timeout", "DURATION", "on SIGTERM, time allowed for a last upload "
     "(default 5s)"),
)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "agent",
        help="receive exports over UDP and carry them to a gateway",
        description=(
            "Receive NetFlow v5/v9/IPFIX datagrams over UDP, keep them in a durable spool, and upload them "
            "to a flowtunnel gateway over HTTP(S), through proxies and outages, exactly once and in order. "
            "Sizes take units (500k, 4MiB), durations too (250ms, 30s, 5m). Every flag is also a key in the "
            "[agent] section of --config and an environment variable FLOWTUNNEL_AGENT_<KEY>."
        ),
    )
    parser.add_argument(
        "--listen", action="append", default=None, metavar="udp://HOST:PORT",
        help="address to receive exports on, repeatable; IPv6 as udp://[::1]:2055 (default udp://127.0.0.1:2055)",
    )
    parser.add_argument(
        "--gateway", action="append", default=None, metavar="URL",
        help="gateway base URL, e.g. https://gw.example.net:8443 (required); repeatable (or comma-separated) "
        "for the gateways of one cluster: the agent uses the first, moves to the next when one cannot be "
        "reached, times out or answers 5xx (never on a 4xx refusal), logs each move and goes back to the "
        "first after 10 minutes; exactly once holds across them (they share the journal)",
    )
    for flag, dest, metavar, text in _FLAGS:
        parser.add_argument(flag, dest=dest, default=None, metavar=metavar, help=text)
    add_config_flag(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from flowtunnel.agent.config import AgentConfig, check_files, load_key
    from flowtunnel.agent.service import run_agent
    from flowtunnel.config import load_settings
    from flowtunnel.runtime import run_daemon

    flags: dict[str, Any] = {dest: getattr(args, dest) for _, dest, _, _ in _FLAGS}
    flags["listen"] = tuple(args.listen) if args.listen else None
    flags["gateway"] = tuple(args.gateway) if args.gateway else None  # joined with commas by load_settings
    config = load_settings(AgentConfig, section="agent", config_file=args.config, env=os.environ, flags=flags)
    load_key(config)  # a bad key is a usage error: report it before anything starts
    check_files(config)
    init_logging(args)
    return run_daemon(lambda stop: run_agent(config, stop))
