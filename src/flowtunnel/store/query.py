"""Read-only access to the flow store: SQL checks, the query path choice, ``top`` and Parquet export.

DuckDB admits one process that holds a database file open for writing, and while it does, no other process
may open the file even read-only. The gateway's store sink is that process, so queries reach the store in one
of two ways, chosen per call:

1. through the sink's query server (``DATA/store/query.sock``, see ``flowtunnel.store.server``), which runs
   the SQL on a cursor of the writer's own database, so a query sees every committed row, mid-ingest;
2. when nobody holds the file (gateway stopped, or killed and its socket left behind), by opening the
   database directly with ``read_only=True``.

Either way the SQL must be exactly one SELECT (or EXPLAIN) statement, and it runs inside a transaction that is
rolled back, so nothing a query does can persist.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import duckdb

from flowtunnel.store.errors import QueryError, QueryRejected, StoreBusy, StoreError, StoreNotFound

__all__ = [
    "TOP_KEYS",
    "QueryResult",
    "StorePaths",
    "check_read_only",
    "connect_direct",
    "export_sql",
    "jsonable",
    "open_query",
    "run_export",
    "top_sql",
]

_ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
TOP_KEYS: Final = ("src_addr", "dst_addr", "dst_port", "src_port", "protocol", "exporter", "agent")
_TOP_ORDER: Final = ("bytes", "packets", "flows")
FETCH_ROWS: Final = 2048


@dataclass(frozen=True, slots=True, kw_only=True)
class StorePaths:
    """Where the store of a gateway data directory lives."""

    data_dir: Path

    @property
    def root(self) -> Path:
        return self.data_dir / "store"

    @property
    def database(self) -> Path:
        return self.root / "flows.duckdb"

    @property
    def socket(self) -> Path:
        return self.root / "query.sock"


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryResult:
    """Column names and DuckDB type names, and the rows (values made JSON-friendly by ``jsonable``)."""

    columns: list[str]
    types: list[str]
    rows: Iterator[list[object]]


def check_read_only(sql: str) -> str:
    """Return ``sql`` if it is exactly one SELECT/EXPLAIN statement; raise ``QueryRejected`` otherwise."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"SQL does not parse: {exc}") from None
    if len(statements) != 1:
        raise QueryRejected(
            f"a query must be exactly one statement, got {len(statements)}: run them one at a time"
        )
    kind = statements[0].type
    if kind not in _ALLOWED:
        name = kind.name if hasattr(kind, "name") else str(kind)
        raise QueryRejected(
            f"the store is read-only for queries: {name} statements are refused (use SELECT or EXPLAIN)"
        )
    return sql


def jsonable(value: object) -> object:
    """A DuckDB result value as JSON-native data (timestamps as ISO-8601 UTC text, blobs as hex)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC)
            return value.replace(tzinfo=None).isoformat() + "Z"
        return value.isoformat()
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return str(value)


def _json_param(value: object) -> object:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return value


def connect_direct(paths: StorePaths) -> duckdb.DuckDBPyConnection:
    """Open the database read-only in this process. Raises ``StoreNotFound`` or ``StoreBusy``."""
    if not paths.database.exists():
        raise StoreNotFound(
            f"no flow store at {paths.database} (has a gateway with the store sink run on {paths.data_dir}?)"
        )
    try:
        conn = duckdb.connect(
            str(paths.database), read_only=True, config={"autoinstall_known_extensions": False}
        )
    except duckdb.Error as exc:
        text = str(exc).lower()
        if "lock" in text or "same database file" in text:
            raise StoreBusy(
                f"{paths.database} is held by another process or connection (a running gateway?) and its "
                f"query socket {paths.socket} does not answer"
            ) from None
        raise StoreError(f"cannot open flow store {paths.database}: {exc}") from None
    conn.execute("SET TimeZone = 'UTC'")
    return conn


def iterate(cursor: duckdb.DuckDBPyConnection) -> Iterator[list[object]]:
    """Rows of the cursor's current result, fetched in chunks, as lists of JSON-friendly values."""
    while True:
        chunk = cursor.fetchmany(FETCH_ROWS)
        if not chunk:
            return
        for row in chunk:
            yield [jsonable(v) for v in row]


def describe(cursor: duckdb.DuckDBPyConnection) -> tuple[list[str], list[str]]:
    desc = cursor.description or []
    return [str(d[0]) for d in desc], [str(d[1]) for d in desc]


@contextmanager
def open_query(
    data_dir: Path, sql: str, params: Sequence[object] = (), *, timeout: float = 300.0
) -> Iterator[QueryResult]:
    """Run the read-only ``sql`` on the store of ``data_dir``; yields a ``QueryResult`` to iterate.

    Error handling: ``QueryRejected`` for writes or several statements (before anything runs), ``QueryError``
    for SQL DuckDB refuses or a timeout, ``StoreNotFound``/``StoreBusy`` when the store cannot be reached.
    """
    check_read_only(sql)
    paths = StorePaths(data_dir=data_dir)
    # Imported here: the server module imports this one.
    from flowtunnel.store.server import QueryClient

    client = QueryClient.connect(paths.socket)
    if client is not None:
        with client:
            yield client.query(sql, [_json_param(p) for p in params], timeout=timeout)
        return
    conn = connect_direct(paths)
    try:
        try:
            conn.execute(sql, list(params))
        except duckdb.Error as exc:
            raise QueryError(str(exc)) from None
        columns, types = describe(conn)
        yield QueryResult(columns=columns, types=types, rows=iterate(conn))
    finally:
        conn.close()


def _since_clause(since_seconds: float | None, params: list[object], now: dt.datetime) -> str:
    if since_seconds is None:
        return ""
    params.append((now - dt.timedelta(seconds=since_seconds)).isoformat())
    # Flows without an exporter timestamp count by when the agent received them.
    return "coalesce(flow_end, flow_start, received) >= CAST(? AS TIMESTAMPTZ)"


def top_sql(
    *,
    by: str,
    since_seconds: float | None = None,
    agent: str | None = None,
    limit: int = 10,
    order: str = "bytes",
    now: dt.datetime,
) -> tuple[str, list[object]]:
    """The SQL (and parameters) ranking ``by`` values by bytes, packets and flow count."""
    if by not in TOP_KEYS:
        raise ValueError(f"cannot rank by {by!r}: choose one of {', '.join(TOP_KEYS)}")
    if order not in _TOP_ORDER:
        raise ValueError(f"cannot order by {order!r}: choose one of {', '.join(_TOP_ORDER)}")
    if limit < 1:
        raise ValueError(f"limit {limit} must be at least 1")
    params: list[object] = []
    where = [c for c in (_since_clause(since_seconds, params, now),) if c]
    if agent is not None:
        where.append("agent = ?")
        params.append(agent)
    where_sql = f"WHERE {' AND '.join(where)}" if where else ""
    others = [o for o in _TOP_ORDER if o != order]
    sql = (
        f"SELECT {by}, CAST(coalesce(sum(bytes), 0) AS UBIGINT) AS bytes, "
        "CAST(coalesce(sum(packets), 0) AS UBIGINT) AS packets, count(*) AS flows, "
        "round(100.0 * coalesce(sum(bytes), 0) / nullif(sum(sum(bytes)) OVER (), 0), 2) AS pct_bytes "
        f"FROM flows {where_sql} GROUP BY {by} "
        f"ORDER BY {order} DESC, {others[0]} DESC, {others[1]} DESC, {by} NULLS LAST LIMIT {int(limit)}"
    )
    return sql, params


def export_sql(target: Path, *, since_seconds: float | None, now: dt.datetime) -> tuple[str, list[object]]:
    """COPY statement writing ``flows`` as Parquet under ``target``, one ``day=YYYY-MM-DD`` directory per day.

    A flow's day is that of its start (or, without exporter timestamps, its reception), in UTC. Files of
    days already present in ``target`` are replaced, so re-exporting a day is idempotent.
    """
    params: list[object] = []
    since = _since_clause(since_seconds, params, now)
    where_sql = f"WHERE {since}" if since else ""
    literal = str(target).replace("'", "''")
    sql = (
        "COPY (SELECT *, CAST(coalesce(flow_start, received) AS DATE) AS day FROM flows "
        f"{where_sql}) TO '{literal}' (FORMAT parquet, PARTITION_BY (day), OVERWRITE_OR_IGNORE true)"
    )
    return sql, params


def run_export(
    data_dir: Path, target: Path, *, since_seconds: float | None, now: dt.datetime, timeout: float = 3600.0
) -> int:
    """Write Parquet partitioned by day to ``target``; returns the number of rows written."""
    paths = StorePaths(data_dir=data_dir)
    target = target.resolve()
    from flowtunnel.store.server import QueryClient

    client = QueryClient.connect(paths.socket)
    if client is not None:
        with client:
            return client.export(target, since_seconds=since_seconds, now=now, timeout=timeout)
    conn = connect_direct(paths)
    try:
        sql, params = export_sql(target, since_seconds=since_seconds, now=now)
        try:
            row = conn.execute(sql, params).fetchone()
        except duckdb.Error as exc:
            raise QueryError(f"export to {target} failed: {exc}") from None
        return int(row[0]) if row else 0
    finally:
        conn.close()
