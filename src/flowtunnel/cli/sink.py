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


#: The flags of the kinds' options (``SinkKind.options``), to refuse one given to another kind.
_OPTION_FLAGS = {"retain": "--retain", "jsonl": "--output", "forward": "--forward", "parquet": "--out",
                 "shard": "--shard", "parquet_flush": "--flush"}


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
                        "mappings, status (env FLOWTUNNEL_SINK_DATA; parquet: default --out)")
    parser.add_argument("--name", default=None, metavar="NAME",
                        help="consumer name, the sink's position in the stream (default: the kind, or "
                        "parquet-I-of-N with --shard I/N); parquet: also the writer's tag in its file names")
    parser.add_argument("--retain", default=None, metavar="DURATION", help="store: retention, e.g. 30d")
    parser.add_argument("--output", default=None, metavar="FILE", help="jsonl: the file ('-' for stdout)")
    parser.add_argument("--forward", action="append", default=None, metavar="udp://HOST:PORT",
                        help="forward: a collector, repeatable")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="parquet: the directory of the Parquet files (day=YYYY-MM-DD/hour=HH/ "
                        "partitions; query --parquet DIR), shared by any number of writers")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="parquet: take the agents of share I of N (several writers, each with its own "
                        "--shard and name, write disjoint files); default 1/1, every agent")
    parser.add_argument("--flush", default=None, metavar="DURATION",
                        help="parquet: write a file at least this often while flows arrive (default 10s; "
                        "also every 100,000 rows and where the hour changes)")
    add_log_format_flag(parser)
    parser.set_defaults(func=_run_sink)


def _run_sink(args: argparse.Namespace) -> int:
    from flowtunnel.config import parse_duration
    from flowtunnel.runtime import run_daemon
    from flowtunnel.sinkrunner import SINK_KINDS, SinkOptions, run_sink

    journal = args.journal or os.environ.get("FLOWTUNNEL_SINK_JOURNAL")
    if not journal:
        raise ConfigError("sink needs --journal nats://HOST:PORT[,...] (or FLOWTUNNEL_SINK_JOURNAL)")
    kind = SINK_KINDS[args.kind]
    given = {"retain": args.retain, "jsonl": args.output, "forward": args.forward, "parquet": args.out,
             "shard": args.shard, "parquet_flush": args.flush}
    for option, value in given.items():
        if value is not None and option not in kind.options:
            raise ConfigError(f"sink {args.kind} does not take {_OPTION_FLAGS[option]} (it takes: "
                              f"{', '.join(_OPTION_FLAGS[o] for o in kind.options) or 'none'})")
    data = args.data or (Path(os.environ["FLOWTUNNEL_SINK_DATA"]) if os.environ.get("FLOWTUNNEL_SINK_DATA")
                         else None) or args.out
    if "parquet" in kind.options and args.out is None:
        raise ConfigError(f"sink {args.kind} needs --out DIR (the directory of its Parquet files)")
    if data is None:
        raise ConfigError("sink needs --data DIR (or FLOWTUNNEL_SINK_DATA)")
    try:
        retain = parse_duration(args.retain) if args.retain else None
    except ValueError as exc:
        raise ConfigError(f"--retain: {exc}") from None
    shard = _shard(args.shard) if args.shard else (1, 1)
    try:
        flush = parse_duration(args.flush) if args.flush else 10.0
    except ValueError as exc:
        raise ConfigError(f"--flush: {exc}") from None
    name = args.name or (args.kind if shard == (1, 1) else f"{args.kind}-{shard[0]}-of-{shard[1]}")
    opts = SinkOptions(
        journal=journal, data=Path(data), name=name, retain=retain, jsonl=args.output,
        forward=tuple(args.forward or ()), out=args.out, shard=shard, flush=flush,
    )
    init_logging(args)
    try:
        return run_daemon(lambda stop: run_sink(args.kind, opts, stop))
    except OSError as exc:
        from flowtunnel.errors import describe_os_error

        print(f"flowtunnel sink: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1


def _shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count) <= 1024):
        raise ConfigError(f"--shard {text!r} is not I/N with 1 <= I <= N <= 1024 (e.g. 2/3)")
    return int(index), int(count)
