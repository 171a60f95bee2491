"""``flowtunnel status``: what an agent or a gateway is doing, from its status file or a running gateway."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowtunnel.config import parse_duration
from flowtunnel.errors import ConfigError, FlowtunnelError
from flowtunnel.health import UNKNOWN, CheckResult, Thresholds, check_agent, check_gateway
from flowtunnel.statusfile import process_running

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "status",
        help="show an agent's or a gateway's state: backlog, last upload, rates, lags, drops",
        description=(
            "Render the status an agent writes to SPOOL/status.json or a gateway to DATA/status.json "
            "(every few seconds), or ask a running gateway (GET /v1/status)."
        ),
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--spool", type=Path, metavar="DIR", help="an agent's spool directory")
    group.add_argument("--data", type=Path, metavar="DIR", help="a gateway's data directory")
    group.add_argument("--gateway", metavar="URL", help="a running gateway's base URL")
    parser.add_argument("--format", choices=["text", "json"], default="text")
    checks = parser.add_argument_group(
        "checks",
        "The exit status follows the Nagios plugin convention: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN "
        "(status unreadable). CRITICAL: the agent or gateway is not running; an agent silent or a backlog "
        "older than the critical threshold. WARNING: the same beyond the warning threshold, or drop counters "
        "that grew within the drops window. Gateway agents in --health-ignore are not watched.",
    )
    checks.add_argument("--check", action="store_true",
                        help="print only one line 'FLOWTUNNEL <STATE> - <problems>' (Nagios, Icinga, cron)")
    for flag, dest, default, text in (
        ("--stale-warning", "stale_warning", "15m", "gateway: agent not heard from for this long"),
        ("--stale-critical", "stale_critical", "1h", "gateway: ... critical"),
        ("--backlog-warning", "backlog_warning", "15m", "agent: oldest spooled datagram this old"),
        ("--backlog-critical", "backlog_critical", "2h", "agent: ... critical"),
        ("--drops-window", "drops_window", "1h", "drop counters that grew this recently warn (0: off)"),
    ):
        checks.add_argument(flag, dest=dest, type=_duration, default=parse_duration(default),
                            metavar="DURATION", help=f"{text} (default {default})")
    parser.set_defaults(func=_run)


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _thresholds(args: argparse.Namespace) -> Thresholds:
    try:
        return Thresholds(stale_warning=args.stale_warning, stale_critical=args.stale_critical,
                          backlog_warning=args.backlog_warning, backlog_critical=args.backlog_critical,
                          drops_window=args.drops_window)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _fetch(url: str) -> dict[str, Any]:
    target = url.rstrip("/") + "/v1/status"
    if not target.startswith(("http://", "https://")):
        raise ConfigError(f"gateway URL {url!r} must start with http:// or https://")
    try:
        with urllib.request.urlopen(target, timeout=10) as resp:  # scheme checked above
            doc = json.loads(resp.read(16 << 20))
    except urllib.error.HTTPError as exc:
        raise FlowtunnelError(f"{target} answered {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise FlowtunnelError(f"cannot reach {target}: {getattr(exc, 'reason', exc)}") from None
    except ValueError as exc:
        raise FlowtunnelError(f"{target} did not answer JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise FlowtunnelError(f"{target} did not answer a status document")
    return doc


def _run(args: argparse.Namespace) -> int:
    thresholds = _thresholds(args)
    try:
        if args.spool is not None:
            return _agent(args, thresholds)
        from flowtunnel.gateway.status import read_status, render

        doc = _fetch(args.gateway) if args.gateway else read_status(args.data)
    except FlowtunnelError as exc:
        if isinstance(exc, ConfigError):
            raise
        if args.check:
            print(f"FLOWTUNNEL UNKNOWN - {exc}")
            return UNKNOWN
        print(f"flowtunnel status: error: {exc}", file=sys.stderr)
        return 1
    result = check_gateway(doc, thresholds=thresholds)
    # A file on this host: whether the gateway that wrote it still runs (a running gateway's own answer over
    # HTTP is live by definition).
    alive = None if args.gateway else process_running(doc.get("pid"))
    return _report(args, doc, result, functools.partial(render, pid_running=alive), "gateway")


def _report(args: argparse.Namespace, doc: dict[str, Any], result: CheckResult,
            render: Callable[[dict[str, Any]], str], what: str) -> int:
    if args.check:
        print(result.line(what))
    elif args.format == "json":
        print(json.dumps({**doc, "check": result.as_json()}, indent=1, sort_keys=True))
    else:
        print(render(doc))
        print()
        print(result.line(what))
    return result.state


def _agent(args: argparse.Namespace, thresholds: Thresholds) -> int:
    from flowtunnel.agent import status as agent_status

    doc = agent_status.read_status(args.spool)
    render = functools.partial(agent_status.render, pid_running=process_running(doc.get("pid")))
    return _report(args, doc, check_agent(doc, thresholds=thresholds), render, "agent")
