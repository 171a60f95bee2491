"""What the console shows, as JSON-ready dicts: agents (gateway counters, store loss), series, top, queries.

Every flow figure is aggregated in DuckDB by the store's own query path: the query socket of the store sink
in this process (``QueryClient``), in the read-only sandbox, as ``flowtunnel query`` reaches it, so the page
and the CLI cannot disagree. Every query is bounded: a time range clamped to ``MAX_RANGE``, a row limit
clamped to ``MAX_ROWS``, a timeout, and at most ``MAX_CONCURRENT`` console queries at once (the CLI keeps a
slot of the store's four), on threads of their own (never the event loop's default pool, which ingest uses);
stopping the gateway ends them at once.

Gateway figures (last seen, backlog, bytes on the wire, rung, drops) come from ``Gateway.status()``, the
document ``flowtunnel status`` reads; upload rates from ``RateHistory``, sampled at each status rewrite.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import datetime as dt
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from flowtunnel.config import parse_duration
from flowtunnel.store.errors import QueryError, StoreError
from flowtunnel.store.filter import CompiledFilter, compile_filter
from flowtunnel.store.query import TOP_KEYS, StorePaths, check_read_only, top_sql
from flowtunnel.store.server import QueryClient

__all__ = [
    "MAX_RANGE",
    "MAX_ROWS",
    "AgentThresholds",
    "BadRequest",
    "ConsoleData",
    "RateHistory",
    "agent_state",
    "bucket_for",
    "parse_range",
    "series_sql",
]

#: Longest time range any console query covers; longer ones are clamped (and the answer says so).
MAX_RANGE: Final = 35 * 86400.0
MIN_RANGE: Final = 60.0
#: Most rows a table answer holds (query page, CSV), and the default.
MAX_ROWS: Final = 10_000
DEFAULT_ROWS: Final = 500
MAX_TOP: Final = 100
#: Most points a series has: the bucket grows with the range (60 s for up to 12 h).
MAX_POINTS: Final = 720
_BUCKETS: Final = (60, 300, 900, 1800, 3600, 4 * 3600, 86400)
#: Series split by agent or exporter show the biggest this many and sum the rest as "(other)".
SERIES_GROUPS: Final = 8
MAX_CONCURRENT: Final = 3
QUERY_TIMEOUT: Final = 30.0
#: The agents page's sparklines: flow bytes per bucket over this long.
SPARK_RANGE: Final = 6 * 3600.0
SPARK_BUCKET: Final = 600
_SPARK_TTL: Final = 10.0
SERIES_GROUP_BY: Final = ("none", "agent", "exporter")
FLOW_TABLE_COLUMNS: Final = (
    "received", "agent", "exporter", "flow_start", "flow_end", "src_addr", "src_port", "dst_addr", "dst_port",
    "protocol", "tcp_flags", "packets", "bytes", "src_as", "dst_as", "in_if", "out_if",
)


class BadRequest(ValueError):
    """A console request that cannot be answered as asked (bad range, filter, SQL): shown to the operator."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentThresholds:
    """An agent is alive if heard from within ``late`` seconds, late until ``silent``, silent after."""

    late: float = 300.0
    silent: float = 3600.0

    def __post_init__(self) -> None:
        if not 0 < self.late < self.silent:
            raise ValueError(f"console thresholds: late ({self.late:g} s) must be > 0 and below silent "
                             f"({self.silent:g} s)")


def agent_state(doc: Mapping[str, Any], *, now: float, thresholds: AgentThresholds) -> str:
    """``alive``, ``late``, ``silent``, ``never`` (enrolled, never heard from) or ``revoked``."""
    if doc.get("revoked"):
        return "revoked"
    seen = doc.get("last_seen")
    if not isinstance(seen, int | float):
        return "never"
    age = now - float(seen)
    if age <= thresholds.late:
        return "alive"
    if age <= thresholds.silent:
        return "late"
    return "silent"


def parse_range(text: str | None, *, default: float = 3600.0) -> tuple[float, bool]:
    """A console time range (``1h``, ``7d``, seconds) → (seconds, clamped). ``BadRequest`` if unreadable."""
    if text is None or text == "":
        return default, False
    try:
        seconds = parse_duration(text[:40])
    except ValueError as exc:
        raise BadRequest(f"time range {text[:40]!r}: {exc}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise BadRequest(f"time range {text[:40]!r} must be positive")
    clamped = min(max(seconds, MIN_RANGE), MAX_RANGE)
    return clamped, clamped != seconds


def parse_limit(text: str | None, *, default: int, maximum: int) -> int:
    if text is None or text == "":
        return default
    try:
        n = int(text[:12])
    except ValueError:
        raise BadRequest(f"limit {text[:20]!r} is not a whole number") from None
    if n < 1:
        raise BadRequest(f"limit {n} must be at least 1")
    return min(n, maximum)


def bucket_for(range_seconds: float) -> int:
    """Bucket width in seconds: a minute up to ``MAX_POINTS`` minutes, then the next round width."""
    for b in _BUCKETS:
        if range_seconds / b <= MAX_POINTS:
            return b
    return _BUCKETS[-1]


def _since(now: float, seconds: float) -> str:
    return dt.datetime.fromtimestamp(now - seconds, tz=dt.UTC).isoformat()


def series_sql(
    *, range_seconds: float, bucket: int, now: float, group: str = "none", agent: str | None = None,
    exporter: str | None = None, flow_filter: CompiledFilter | None = None,
) -> tuple[str, list[object]]:
    """Bytes, packets and flows per ``bucket`` seconds of reception time over the last ``range_seconds``,
    in total or per agent/exporter (the ``SERIES_GROUPS`` biggest by bytes, the others as "(other)")."""
    if group not in SERIES_GROUP_BY:
        raise BadRequest(f"cannot split series by {group!r}: choose one of {', '.join(SERIES_GROUP_BY)}")
    params: list[object] = [_since(now, range_seconds)]
    where = ["received >= CAST(? AS TIMESTAMPTZ)"]
    if agent is not None:
        where.append("agent = ?")
        params.append(agent)
    if exporter is not None:
        where.append("exporter = ?")
        params.append(exporter)
    if flow_filter is not None:
        where.append(f"({flow_filter.where})")
        params.extend(flow_filter.params)
    cond = " AND ".join(where)
    # Integer microseconds: about 1.4x faster than floor() of epoch()'s double on 10 million rows.
    bucketed = "(epoch_us(received) // ?) * ?"
    width = [bucket * 1_000_000, bucket]
    sums = ("CAST(coalesce(sum(bytes), 0) AS UBIGINT) AS bytes, CAST(coalesce(sum(packets), 0) AS UBIGINT) "
            "AS packets, count(*) AS flows")
    if group == "none":
        return (f"SELECT 0 AS part, '' AS k, {bucketed} AS t, {sums} FROM flows WHERE {cond} GROUP BY t "
                "ORDER BY t", [*width, *params])
    # The biggest groups first (a cheap aggregate); then the total per bucket, and per bucket and group only
    # the rows of those groups: "(other)" is the total less theirs (ConsoleData.series). Grouping every row
    # by a CASE of the group's text took 1.6x as long (1,500 exporters over 7 days); bucketing every group
    # and ranking afterwards, twice as long.
    sql = (
        f"WITH top AS (SELECT {group} AS k FROM flows WHERE {cond} GROUP BY k "
        f"ORDER BY sum(bytes) DESC, k LIMIT {SERIES_GROUPS}) "
        f"SELECT 0 AS part, '' AS k, {bucketed} AS t, {sums} FROM flows WHERE {cond} GROUP BY ALL "
        f"UNION ALL SELECT 1 AS part, {group} AS k, {bucketed} AS t, {sums} FROM flows "
        f"WHERE {cond} AND {group} IN (SELECT k FROM top) GROUP BY ALL ORDER BY t, part, k"
    )
    return sql, [*params, *width, *params, *width, *params]


class RateHistory:
    """Per agent: (time, wire bytes, raw datagram bytes) samples of the last ``keep`` seconds, for rates and
    the "bytes on the wire vs raw" column. Fed by the gateway at each status rewrite."""

    def __init__(self, *, keep: float = 3600.0, every: float = 10.0, max_agents: int = 100_000) -> None:
        self.keep = keep
        self.every = every
        self.max_agents = max_agents
        self._samples: dict[str, deque[tuple[float, int, int]]] = {}

    def sample(self, agents: Mapping[str, Mapping[str, Any]], now: float) -> None:
        for agent_id, doc in agents.items():
            q = self._samples.get(agent_id)
            if q is None:
                if len(self._samples) >= self.max_agents:
                    continue
                q = self._samples[agent_id] = deque()
            if q and now - q[-1][0] < self.every:
                continue
            q.append((now, int(doc.get("http_bytes") or 0), int(doc.get("datagram_bytes") or 0)))
            while q and now - q[0][0] > self.keep:
                q.popleft()

    def rate(self, agent_id: str, *, window: float = 300.0) -> float | None:
        """Wire bytes per second over about the last ``window`` seconds (None before two samples)."""
        q = self._samples.get(agent_id)
        if not q or len(q) < 2:
            return None
        last = q[-1]
        first = next((s for s in q if last[0] - s[0] <= window), q[0])
        if first is last:
            first = q[-2]
        dt_ = last[0] - first[0]
        return max(0.0, (last[1] - first[1]) / dt_) if dt_ > 0 else None


def _param(value: object) -> object:
    return base64.b64encode(value).decode() if isinstance(value, bytes) else value


def _age(doc: Mapping[str, Any], now: float) -> float | None:
    """Age of the agent's oldest unacknowledged datagram now (None when unknown or nothing waits)."""
    oldest = doc.get("backlog_oldest")
    if not isinstance(oldest, int | float) or not doc.get("backlog"):
        return None
    return max(0.0, now - float(oldest))


def _row_dicts(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> list[dict[str, object]]:
    return [dict(zip(columns, r, strict=True)) for r in rows]


@dataclass(frozen=True, slots=True, kw_only=True)
class Table:
    columns: list[str]
    types: list[str]
    rows: list[list[object]]
    truncated: bool


class ConsoleData:
    """Builds the console's answers. ``status`` is ``Gateway.status``; ``data_dir`` holds the store."""

    def __init__(
        self, *, data_dir: Path, status: Callable[[], dict[str, Any]], thresholds: AgentThresholds,
        history: RateHistory, clock: Callable[[], float] = time.time, timeout: float = QUERY_TIMEOUT,
    ) -> None:
        self.data_dir = data_dir
        self.status = status
        self.thresholds = thresholds
        self.history = history
        self.clock = clock
        self.timeout = timeout
        self._limit = asyncio.Semaphore(MAX_CONCURRENT)
        #: Queries running now (one token each).
        self.running: set[object] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(MAX_CONCURRENT, thread_name_prefix="console-query")
        self._socket = StorePaths(data_dir=data_dir).socket
        self._lock = threading.Lock()
        self._clients: set[QueryClient] = set()
        self._closed = False
        self._spark: tuple[float, dict[str, list[list[int]]]] | None = None
        self._store_totals: tuple[float, dict[str, dict[str, int]]] | None = None

    def close(self) -> None:
        """End running queries' connections (their requests answer at once) and stop the query threads.
        Called before the HTTP server stops, which waits for requests in flight."""
        with self._lock:
            self._closed = True
            clients = list(self._clients)
        for client in clients:
            client.abort()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def forget(self) -> None:
        """Drop the few seconds' cache of the agents page's store figures (the benchmark times cold pages)."""
        self._spark = None
        self._store_totals = None

    # -- the store ----------------------------------------------------------------------------------------

    def _run_sync(self, sql: str, params: Sequence[object], limit: int) -> Table:
        check_read_only(sql)  # refused here already: the answer names the statement
        client = QueryClient.connect(self._socket)
        if client is None:
            raise StoreError(
                "the flow store is not answering queries: it is off (--no-store), still starting, or failed "
                "(see the gateway's log)"
            )
        with self._lock:
            if self._closed:
                client.close()
                raise StoreError("the gateway is stopping")
            self._clients.add(client)
        try:
            with client:
                result = client.query(sql, [_param(p) for p in params], timeout=self.timeout)
                rows: list[list[object]] = []
                truncated = False
                for row in result.rows:
                    if len(rows) >= limit:
                        truncated = True
                        break
                    rows.append(row)
                return Table(columns=result.columns, types=result.types, rows=rows, truncated=truncated)
        except OSError as exc:
            raise StoreError(f"the store's query server went away: {exc.strerror or exc}") from None
        finally:
            with self._lock:
                self._clients.discard(client)

    async def run(self, sql: str, params: Sequence[object] = (), *, limit: int = MAX_ROWS) -> Table:
        """Run read-only ``sql`` through the store's query path ; raises ``QueryError``, ``StoreError``."""
        async with self._limit:
            token = object()
            self.running.add(token)
            try:
                # Threads of its own: a query blocks its thread up to its timeout, and the event loop's
                # default pool is where ingest opens batches and writes the journal.
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self._pool, self._run_sync, sql, list(params), limit)
            finally:
                self.running.discard(token)

    @staticmethod
    def compile(text: str | None) -> CompiledFilter | None:
        if text is None or not text.strip():
            return None
        return compile_filter(text)  # FilterError (a QueryError) with the column of the bad token

    async def _store_agent_totals(self) -> dict[str, dict[str, int]]:
        """Per agent, from exporter_stats and agent_stats: records, exporters, NetFlow sequence loss, transit
        loss (cached for a few seconds: every console poll asks)."""
        now = self.clock()
        if self._store_totals is not None and now - self._store_totals[0] < _SPARK_TTL:
            return self._store_totals[1]
        sql = (
            "SELECT coalesce(e.agent, a.agent) AS agent, coalesce(e.exporters, 0), coalesce(e.records, 0), "
            "coalesce(e.seq_lost, 0), coalesce(e.undecodable, 0), coalesce(a.transit_lost, 0), "
            "coalesce(a.datagrams, 0) FROM (SELECT agent, count(*) AS exporters, "
            "CAST(sum(records) AS UBIGINT) AS records, CAST(sum(seq_lost) AS UBIGINT) AS seq_lost, "
            "CAST(sum(undecodable) AS UBIGINT) AS undecodable FROM exporter_stats GROUP BY agent) AS e "
            "FULL OUTER JOIN agent_stats AS a ON a.agent = e.agent"
        )
        table = await self.run(sql, limit=1_000_000)
        out = {
            str(r[0]): {"exporters": int(str(r[1])), "records": int(str(r[2])), "seq_lost": int(str(r[3])),
                        "undecodable": int(str(r[4])), "transit_lost": int(str(r[5])),
                        "stored_datagrams": int(str(r[6]))}
            for r in table.rows
        }
        self._store_totals = (now, out)
        return out

    async def _sparklines(self) -> dict[str, list[list[int]]]:
        now = self.clock()
        if self._spark is not None and now - self._spark[0] < _SPARK_TTL:
            return self._spark[1]
        sql = (
            "SELECT agent, (epoch_us(received) // ?) * ? AS t, "
            "CAST(coalesce(sum(bytes), 0) AS UBIGINT) FROM flows WHERE received >= CAST(? AS TIMESTAMPTZ) "
            "GROUP BY ALL ORDER BY agent, t"
        )
        table = await self.run(sql, [SPARK_BUCKET * 1_000_000, SPARK_BUCKET, _since(now, SPARK_RANGE)],
                               limit=2_000_000)
        out: dict[str, list[list[int]]] = {}
        for agent, t, b in table.rows:
            out.setdefault(str(agent), []).append([int(str(t)), int(str(b))])
        self._spark = (now, out)
        return out

    # -- pages --------------------------------------------------------------------------------------------

    def _agent_row(self, agent_id: str, doc: Mapping[str, Any], store: Mapping[str, int] | None,
                   now: float) -> dict[str, Any]:
        dropped = doc.get("dropped") if isinstance(doc.get("dropped"), Mapping) else {}
        return {
            "id": agent_id,
            "state": agent_state(doc, now=now, thresholds=self.thresholds),
            "last_seen": doc.get("last_seen"),
            "enrolled": doc.get("enrolled", False),
            "backlog": doc.get("backlog"),
            "backlog_age": _age(doc, now),
            "upload_bps": self.history.rate(agent_id),
            "wire_bytes": doc.get("http_bytes", 0),
            "raw_bytes": doc.get("datagram_bytes", 0),
            "ratio": doc.get("compression_ratio"),
            "datagrams": doc.get("datagrams", 0),
            "acked": doc.get("acked", 0),
            "rung": doc.get("rung"),
            "drops": {
                # The agent's own counters (spool full, kernel receive buffer, ...), as it reports them.
                **{f"agent:{k}": v for k, v in sorted(dict(dropped or {}).items())},
                "sequence_gap": doc.get("gap", 0),
                "lost_at_gateway": doc.get("lost_at_gateway", 0),
                "netflow_seq_lost": store.get("seq_lost") if store else None,
                "transit": store.get("transit_lost") if store else None,
            },
            "rejected": doc.get("rejected") or {},
            "records": store.get("records") if store else None,
            "exporters": store.get("exporters") if store else None,
        }

    async def agents(self) -> dict[str, Any]:
        now = self.clock()
        status = self.status()
        agents = status.get("agents") or {}
        store_error = None
        try:
            totals = await self._store_agent_totals()
            spark = await self._sparklines()
        except (QueryError, StoreError) as exc:
            totals, spark, store_error = {}, {}, str(exc)
        rows = []
        for agent_id in sorted(agents):
            row = self._agent_row(agent_id, agents[agent_id], totals.get(agent_id), now)
            row["spark"] = spark.get(agent_id, [])
            rows.append(row)
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["state"]] = counts.get(row["state"], 0) + 1
        return {
            "now": now, "late_s": self.thresholds.late, "silent_s": self.thresholds.silent,
            "spark_bucket_s": SPARK_BUCKET, "spark_range_s": SPARK_RANGE, "states": counts, "agents": rows,
            "rungs": status.get("rungs") or {}, "rejected": status.get("rejected") or {},
            "sinks": {name: {k: v for k, v in s.items() if k in ("running", "lag", "cursor", "rows")}
                      for name, s in (status.get("sinks") or {}).items() if isinstance(s, Mapping)},
            "store_error": store_error,
        }

    async def agent(self, agent_id: str, range_text: str | None) -> dict[str, Any]:
        now = self.clock()
        status = self.status()
        doc = (status.get("agents") or {}).get(agent_id)
        if doc is None:
            raise LookupError(f"no agent {agent_id[:80]!r} is enrolled or known to this gateway")
        seconds, clamped = parse_range(range_text, default=6 * 3600.0)
        store_error = None
        exporters: list[dict[str, object]] = []
        totals: dict[str, dict[str, int]] = {}
        series: dict[str, Any] = {}
        try:
            totals = await self._store_agent_totals()
            table = await self.run(
                "SELECT exporter, datagrams, records, options_records, undecodable, set_errors, "
                "no_template_sets, seq_expected, seq_received, seq_lost, seq_resets, last_version, "
                "first_seen, last_seen FROM exporter_stats WHERE agent = ? ORDER BY exporter",
                [agent_id], limit=10_000,
            )
            exporters = _row_dicts(table.columns, table.rows)
            series = await self.series(group="exporter", agent=agent_id, range_seconds=seconds)
        except (QueryError, StoreError) as exc:
            store_error = str(exc)
        sources = await self.sources(agent_id)
        return {
            "now": now, "agent": self._agent_row(agent_id, doc, totals.get(agent_id), now),
            "exporters": exporters, "series": series, "range_s": seconds, "clamped": clamped,
            "store_error": store_error, "sources": sources["sources"],
        }

    async def sources(self, agent_id: str | None = None) -> dict[str, Any]:
        """The udp-forward mapping, as ``flowtunnel sources`` lists it: the source address (and port) a
        collector sees as an exporter -> (agent, original exporter); one agent's rows, or every row."""
        from flowtunnel.cli.sources import read_sources
        from flowtunnel.errors import FlowtunnelError

        try:
            rows = await asyncio.to_thread(read_sources, self.data_dir)
        except FlowtunnelError as exc:
            return {"sources": [], "error": str(exc)}
        return {"sources": [r for r in rows if agent_id is None or r["agent"] == agent_id], "error": None}

    async def series(
        self, *, group: str = "none", agent: str | None = None, exporter: str | None = None,
        range_seconds: float = 3600.0, flow_filter: CompiledFilter | None = None,
    ) -> dict[str, Any]:
        now = self.clock()
        bucket = bucket_for(range_seconds)
        sql, params = series_sql(range_seconds=range_seconds, bucket=bucket, now=now, group=group,
                                 agent=agent, exporter=exporter, flow_filter=flow_filter)
        table = await self.run(sql, params, limit=MAX_POINTS * (SERIES_GROUPS + 2))
        start = (int(now - range_seconds) // bucket) * bucket
        times = list(range(start, int(now) + 1, bucket))
        index = {t: i for i, t in enumerate(times)}
        metrics = ("bytes", "packets", "flows")
        total = {m: [0] * len(times) for m in metrics}
        groups: dict[str, dict[str, list[int]]] = {}
        for part, k, t, *values in table.rows:
            i = index.get(int(str(t)))
            if i is None:
                continue
            g = total if part == 0 else groups.setdefault(str(k), {m: [0] * len(times) for m in metrics})
            for m, v in zip(metrics, values, strict=True):
                g[m][i] += int(str(v))
        if group == "none":
            groups = {"": total} if any(total["flows"]) else {}
        else:
            other = {m: [n - sum(g[m][i] for g in groups.values()) for i, n in enumerate(total[m])]
                     for m in metrics}
            if any(other["flows"]):
                groups["(other)"] = other
        return {"bucket_s": bucket, "times": times, "groups": groups, "group_by": group}

    async def top(self, *, by: str, order: str, range_seconds: float, limit: int,
                  flow_filter: CompiledFilter | None, agent: str | None) -> Table:
        if by not in TOP_KEYS:
            raise BadRequest(f"cannot rank by {by[:40]!r}: choose one of {', '.join(TOP_KEYS)}")
        try:
            sql, params = top_sql(
                by=by, since_seconds=range_seconds, agent=agent, limit=limit, order=order,
                now=dt.datetime.fromtimestamp(self.clock(), tz=dt.UTC), clock="received",
                flow_filter=flow_filter,
            )
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return await self.run(sql, params, limit=limit)

    async def flows(self, *, flow_filter: CompiledFilter | None, range_seconds: float, limit: int) -> Table:
        """The newest flows the filter selects within the range."""
        params: list[object] = [_since(self.clock(), range_seconds)]
        where = "received >= CAST(? AS TIMESTAMPTZ)"
        if flow_filter is not None:
            where += f" AND ({flow_filter.where})"
            params.extend(flow_filter.params)
        sql = (f"SELECT {', '.join(FLOW_TABLE_COLUMNS)} FROM flows WHERE {where} "
               f"ORDER BY received DESC LIMIT {int(limit) + 1}")
        return await self.run(sql, params, limit=limit)

    async def sql(self, text: str, *, limit: int) -> Table:
        """Read-only SQL as typed (the sandbox refuses anything but one SELECT); at most ``limit`` rows."""
        return await self.run(text, (), limit=limit)
