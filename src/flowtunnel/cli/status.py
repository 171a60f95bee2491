"""``flowtunnel status``: what an agent or a gateway is doing, from its status file or a running gateway."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from flowtunnel.errors import ConfigError, FlowtunnelError

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
    parser.set_defaults(func=_run)


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
    try:
        if args.spool is not None:
            return _agent(args)
        from flowtunnel.gateway.status import read_status, render

        doc = _fetch(args.gateway) if args.gateway else read_status(args.data)
    except FlowtunnelError as exc:
        if isinstance(exc, ConfigError):
            raise
        print(f"flowtunnel status: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=1, sort_keys=True) if args.format == "json" else render(doc))
    return 0


def _agent(args: argparse.Namespace) -> int:
    path = Path(args.spool) / "status.json"
    try:
        from flowtunnel.agent import status as agent_status
    except ImportError:
        agent_status = None  # type: ignore[assignment]
    if agent_status is not None and hasattr(agent_status, "read_status"):
        doc = agent_status.read_status(args.spool)
    else:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise FlowtunnelError(f"cannot read {path}: {exc}") from None
    if args.format == "json" or agent_status is None or not hasattr(agent_status, "render"):
        print(json.dumps(doc, indent=1, sort_keys=True))
    else:
        print(agent_status.render(doc))
    return 0
