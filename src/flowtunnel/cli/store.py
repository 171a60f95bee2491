"""``flowtunnel query``, ``top`` and ``export``: read-only questions to a gateway's flow store.

Argument parsing only; the work is in ``flowtunnel.store``. The data directory comes from ``--data``, else
``FLOWTUNNEL_GATEWAY_DATA``, else ``data`` in the ``[gateway]`` section of ``--config`` (the gateway's keys).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from rich.markup import escape

from flowtunnel.config import format_duration, parse_duration
from flowtunnel.errors import ConfigError
from flowtunnel.store import (
    TOP_KEYS,
    CompiledFilter,
    StoreError,
    compile_filter,
    open_query,
    parse_stat,
    restrict_sql,
    run_export,
    top_sql,
)
from flowtunnel.store.filter import STAT_KEYS
from flowtunnel.store.output import FORMATS, write_result
from flowtunnel.store.query import CLOCKS, QueryResult, count_sql, open_parquet_query

__all__ = ["register"]

EXIT_FAILED = 1


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, default=None, metavar="DIR",
        help="the gateway's data directory (env FLOWTUNNEL_GATEWAY_DATA, or [gateway] data in --config)",
    )
    parser.add_argument("--config", type=Path, default=None, metavar="FILE", help="the gateway's TOML config")
    parser.add_argument(
        "--timeout", type=_timeout, default=300.0, metavar="DURATION",
        help="give up on a query running longer than this, 100ms .. 1d (default 300s)",
    )


def _add_parquet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--parquet", type=Path, default=None, metavar="DIR",
        help="ask the Parquet store in DIR instead (the --out of 'flowtunnel sink parquet', or a gateway's "
        "--parquet): the same columns and SQL, over every writer's files",
    )


#: Allowed ranges (issue 15 item 7): a window beyond a century overflowed the date arithmetic (a traceback),
#: a timeout of NaN or a negative one meant no limit or none at all.
SINCE_RANGE: Final = (1.0, 36500 * 86400.0)
TIMEOUT_RANGE: Final = (0.1, 86400.0)


def _in_range(text: str, bounds: tuple[float, float]) -> float:
    """``text`` as a duration in ``bounds``; ``ValueError`` "99999999d is outside the allowed range 1s ..
    36500d" (or parse_duration's own message)."""
    seconds = parse_duration(text)
    lo, hi = bounds
    if not lo <= seconds <= hi:
        raise ValueError(f"{text} is outside the allowed range {format_duration(lo)} .. "
                         f"{format_duration(hi)}")
    return seconds


def _timeout(text: str) -> float:
    """``--timeout`` (an argparse type): a duration in ``TIMEOUT_RANGE``; bare numbers are seconds."""
    try:
        return _in_range(text, TIMEOUT_RANGE)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _since(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return _in_range(text, SINCE_RANGE)
    except ValueError as exc:
        raise ConfigError(f"--since {exc}") from None


def _add_filter(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--filter", "-f", dest="flow_filter", default=None, metavar="FILTER",
        help=f"{what} only the flows this nfdump-style filter selects, e.g. 'proto tcp and dst port 443' "
        "(see docs/filters.md)",
    )


def _compile(text: str | None) -> CompiledFilter | None:
    return None if text is None else compile_filter(text)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    query = sub.add_parser(
        "query",
        help="run read-only SQL over the flow store (table 'flows')",
        description=(
            "Run one read-only SQL statement (SELECT or EXPLAIN) over table 'flows' of a gateway's store and "
            "print the result: CSV by default, JSON lines (one object per row) or a table. With --filter, "
            "'flows' holds only the flows an nfdump-style filter selects, and SQL may be left out (then "
            "every column of those flows is printed). Works while the "
            "gateway runs (through its query socket) and when it is stopped (opening the store read-only). "
            "Columns: agent, exporter, version, domain_id, flow_start, flow_end, src_addr, dst_addr, "
            "src_port, dst_port, protocol, tcp_flags, packets, bytes, in_if, out_if, src_as, dst_as, "
            "next_hop, tos, sampling_interval, extra (JSON: every other field), received (the gateway's "
            "receive time, by its clock), agent_received (the agent's, by the agent's clock). With "
            "--parquet DIR, 'flows' is the Parquet store in DIR (same columns, same SQL)."
        ),
    )
    query.add_argument(
        "sql", metavar="SQL", nargs="?", default=None,
        help="one SELECT statement, e.g. \"SELECT count(*) FROM flows\" (optional with --filter)",
    )
    query.add_argument("--format", choices=FORMATS, default="csv", help="output format (default csv)")
    _add_filter(query, "'flows' holds")
    _add_parquet(query)
    _add_common(query)
    query.set_defaults(func=_run_query)

    top = sub.add_parser(
        "top",
        help="top talkers: rank addresses, ports, protocols, exporters or agents by bytes, packets, flows",
        description=(
            "Rank the values of one column by total bytes (or packets, or flows) in the flow store. nfdump's "
            "-s spellings work too: -s srcip/bytes, -s dstport/flows, -s proto/packets, -s srcas, ..."
        ),
    )
    top.add_argument(
        "--by", default=None, metavar="COLUMN",
        help=f"column to rank (default src_addr): {', '.join(TOP_KEYS)}, or nfdump's names "
        f"({', '.join(STAT_KEYS)})",
    )
    top.add_argument(
        "-s", "--stat", default=None, metavar="KEY[/ORDER]",
        help="nfdump's statistic spelling, e.g. srcip/bytes or dstport/flows (sets --by and --order)",
    )
    top.add_argument("--since", default=None, metavar="DURATION",
                     help="only flows of the last DURATION (e.g. 15m, 1h, 7d), by the clock --time names")
    top.add_argument(
        "--time", choices=CLOCKS, default="flow", dest="clock",
        help="which time --since goes by: 'flow' (default) = when the flow ended by the exporter's clock "
             "(its start, else its receive time, when the exporter sent none); 'received' = when flowtunnel "
             "received it (column received). Use 'received' when exporter clocks are off",
    )
    top.add_argument("--agent", default=None, metavar="NAME", help="only flows from this agent")
    top.add_argument("--limit", type=int, default=10, metavar="N", help="rows to show (default 10)")
    top.add_argument("--order", choices=("bytes", "packets", "flows"), default=None,
                     help="rank by (default bytes)")
    _add_filter(top, "rank")
    top.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")
    _add_parquet(top)
    _add_common(top)
    top.set_defaults(func=_run_top)

    export = sub.add_parser(
        "export",
        help="write the flow store as Parquet, one directory per day",
        description=(
            "Write table 'flows' as Parquet files under DIR/day=YYYY-MM-DD/ (hive partitioning, day of "
            "flow start in UTC) for other engines. A day already exported to DIR is replaced."
        ),
    )
    export.add_argument("--parquet", type=Path, required=True, metavar="DIR", help="target directory")
    export.add_argument(
        "--since", default=None, metavar="DURATION",
        help="only flows of the last DURATION (e.g. 7d), by the clock --time names",
    )
    export.add_argument(
        "--time", choices=CLOCKS, default="flow", dest="clock",
        help="which time --since goes by: 'flow' (default) = when the flow ended by the exporter's clock; "
             "'received' = when flowtunnel received it. Use 'received' when exporter clocks are off",
    )
    _add_filter(export, "write")
    _add_common(export)
    export.set_defaults(func=_run_export)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Source:
    """Where a query goes: a gateway's (or store sink's) data directory, or a Parquet store."""

    data: Path | None = None
    parquet: Path | None = None


def _source(args: argparse.Namespace) -> _Source:
    parquet = getattr(args, "parquet", None)
    if parquet is not None:
        if args.data is not None:
            raise ConfigError("give --data DIR (the DuckDB store) or --parquet DIR, not both")
        return _Source(parquet=Path(parquet))
    return _Source(data=_data_dir(args))


@contextmanager
def _open(source: _Source, sql: str, params: list[object], timeout: float) -> Iterator[QueryResult]:
    if source.parquet is not None:
        with open_parquet_query(source.parquet, sql, params, timeout=timeout) as result:
            yield result
        return
    assert source.data is not None
    with open_query(source.data, sql, params, timeout=timeout) as result:
        yield result


def _data_dir(args: argparse.Namespace) -> Path:
    if args.data is not None:
        return Path(args.data)
    env = os.environ.get("FLOWTUNNEL_GATEWAY_DATA")
    if env:
        return Path(env)
    if args.config is not None:
        try:
            doc = tomllib.loads(Path(args.config).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {args.config}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {args.config} is not valid TOML: {exc}") from None
        data = doc.get("gateway", {}).get("data")
        if isinstance(data, str) and data:
            return Path(data).expanduser()
    raise ConfigError("no data directory: pass --data DIR (or set FLOWTUNNEL_GATEWAY_DATA)")


def _fail(command: str, exc: Exception) -> int:
    print(f"flowtunnel {command}: error: {exc}", file=sys.stderr)
    return EXIT_FAILED


def _print(
    source: _Source, sql: str, params: list[object], fmt: str, timeout: float, title: str | None
) -> int:
    with _open(source, sql, params, timeout) as result:
        rows = write_result(result, fmt, sys.stdout, title=title)
    sys.stdout.flush()
    return rows


def _run_query(args: argparse.Namespace) -> int:
    source = _source(args)
    if args.sql is None and args.flow_filter is None:
        raise ConfigError("give SQL, or --filter FILTER, or both")
    try:
        flt = _compile(args.flow_filter)
        sql: str
        params: list[object] = []
        if flt is None:
            sql = args.sql
        elif args.sql is None:
            sql, params = flt.select_sql()
        else:
            sql, params = restrict_sql(args.sql, flt)
        _print(source, sql, params, args.format, args.timeout, None)
    except StoreError as exc:
        return _fail("query", exc)
    except BrokenPipeError:
        _quiet_pipe()
    return 0


def _ranking(args: argparse.Namespace) -> tuple[str, str]:
    """``--by``/``--order``, or nfdump's ``-s key/order``: the column and the order."""
    try:
        by, order = parse_stat(args.stat, TOP_KEYS) if args.stat else ("src_addr", None)
        if args.by is not None:
            if args.stat:
                raise ValueError("give --by or -s/--stat, not both")
            by, _ = parse_stat(args.by, TOP_KEYS)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.order is not None:
        if order is not None and order != args.order:
            raise ConfigError(f"-s {args.stat} orders by {order}, --order says {args.order}: give one")
        order = args.order
    return by, order or "bytes"


def _run_top(args: argparse.Namespace) -> int:
    source = _source(args)
    since = _since(args.since)
    now = dt.datetime.now(dt.UTC)
    by, order = _ranking(args)
    try:
        flt = _compile(args.flow_filter)
    except StoreError as exc:
        return _fail("top", exc)
    try:
        sql, params = top_sql(by=by, since_seconds=since, agent=args.agent, limit=args.limit,
                              order=order, now=now, clock=args.clock, flow_filter=flt)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    title = f"top {by} by {order}"
    if args.since:
        title += f", last {args.since} by {_CLOCK_WORDS[args.clock]}"
    if args.agent:
        title += f", agent {args.agent}"
    if flt is not None:
        title += f", filter {escape(args.flow_filter)}"
    try:
        rows = _print(source, sql, params, args.format, args.timeout, title)
        if rows == 0 and since is not None:
            _hint_other_clock(source, args, since, now, flt)
    except StoreError as exc:
        return _fail("top", exc)
    except BrokenPipeError:
        _quiet_pipe()
    return 0


_CLOCK_WORDS = {"flow": "flow end time (exporter's clock)", "received": "receive time"}


def _hint_other_clock(
    source: _Source, args: argparse.Namespace, since: float, now: dt.datetime, flt: CompiledFilter | None,
    *, command: str = "top",
) -> None:
    """An empty ``top --since`` (or ``export --since``): say so on stderr when the other clock has flows in
    that window."""
    other = "received" if args.clock == "flow" else "flow"
    sql, params = count_sql(since_seconds=since, agent=getattr(args, "agent", None), now=now, clock=other,
                            flow_filter=flt)
    with _open(source, sql, params, args.timeout) as result:
        [[count]] = list(result.rows)
    if not isinstance(count, int) or count == 0:
        return
    if args.clock == "flow":
        print(
            f"flowtunnel {command}: no flows ended in the last {args.since} by the exporters' clocks "
            f"(--time flow), but {count} flows were received in that window: exporter clocks may be off; "
            "try --time received",
            file=sys.stderr,
        )
    else:
        print(
            f"flowtunnel {command}: no flows were received in the last {args.since} (--time received), but "
            f"{count} flows ended in that window by the exporters' clocks; try --time flow",
            file=sys.stderr,
        )


def _run_export(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    since = _since(args.since)
    now = dt.datetime.now(dt.UTC)
    try:
        flt = _compile(args.flow_filter)  # a bad filter fails here, before the store is asked
        rows = run_export(data_dir, args.parquet, since_seconds=since, now=now, timeout=args.timeout,
                          flow_filter=args.flow_filter, clock=args.clock)
        print(f"exported {rows} flows to {args.parquet} (Parquet, one day=YYYY-MM-DD directory per day)")
        if rows == 0 and since is not None:
            _hint_other_clock(_Source(data=data_dir), args, since, now, flt, command="export")
    except StoreError as exc:
        return _fail("export", exc)
    return 0


def _quiet_pipe() -> None:
    # The reader (e.g. `| head`) went away: stop quietly, without Python's second error at exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
