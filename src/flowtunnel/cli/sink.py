"""``flowtunnel sink KIND --journal nats://...``: one sink as its own process on the shared JetStream
journal."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from flowtunnel.cli._common import add_log_format_flag, init_logging
from flowtunnel.errors import ConfigError

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    from flowtunnel.sinkrunner import SINK_KINDS

    kinds = ", ".join(f"{k.name} ({k.description}; {k.delivery})" for k in SINK_KINDS.values())
    parser = sub.add_parser(
        "sink",
        help="run one sink as its own process on a shared JetStream journal (scale-out)",
        description=(
            "Consume the journal of gateways started with --journal nats://... on a durable pull consumer "
            f"named after the sink, and act on every entry. Kinds: {kinds}. docs/scale-out.md."
        ),
    )
    parser.add_argument("kind", choices=sorted(SINK_KINDS), help="what the sink does")
    parser.add_argument("--journal", required=False, default=None, metavar="nats://HOST:PORT[,...]",
                        help="the JetStream cluster of the gateways (env FLOWTUNNEL_SINK_JOURNAL)")
    parser.add_argument("--data", type=Path, default=None, metavar="DIR",
                        help="the sink's own directory: the store's database (query --data DIR), forward "
                        "mappings, status (env FLOWTUNNEL_SINK_DATA)")
    parser.add_argument("--name", default=None, metavar="NAME",
                        help="consumer name, the sink's position in the stream (default: the kind); two "
                        "processes with one name share the work of one sink")
    parser.add_argument("--retain", default=None, metavar="DURATION", help="store: retention, e.g. 30d")
    parser.add_argument("--output", default=None, metavar="FILE", help="jsonl: the file ('-' for stdout)")
    parser.add_argument("--forward", action="append", default=None, metavar="udp://HOST:PORT",
                        help="forward: a collector, repeatable")
    add_log_format_flag(parser)
    parser.set_defaults(func=_run_sink)


def _run_sink(args: argparse.Namespace) -> int:
    from flowtunnel.config import parse_duration
    from flowtunnel.runtime import run_daemon
    from flowtunnel.sinkrunner import SinkOptions, run_sink

    journal = args.journal or os.environ.get("FLOWTUNNEL_SINK_JOURNAL")
    if not journal:
        raise ConfigError("sink needs --journal nats://HOST:PORT[,...] (or FLOWTUNNEL_SINK_JOURNAL)")
    data = args.data or (Path(os.environ["FLOWTUNNEL_SINK_DATA"]) if os.environ.get("FLOWTUNNEL_SINK_DATA")
                         else None)
    if data is None:
        raise ConfigError("sink needs --data DIR (or FLOWTUNNEL_SINK_DATA)")
    try:
        retain = parse_duration(args.retain) if args.retain else None
    except ValueError as exc:
        raise ConfigError(f"--retain: {exc}") from None
    opts = SinkOptions(
        journal=journal, data=Path(data), name=args.name or args.kind, retain=retain, jsonl=args.output,
        forward=tuple(args.forward or ()),
    )
    init_logging(args)
    try:
        return run_daemon(lambda stop: run_sink(args.kind, opts, stop))
    except OSError as exc:
        from flowtunnel.errors import describe_os_error

        print(f"flowtunnel sink: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
