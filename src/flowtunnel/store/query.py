"""Read-only access to the flow store: the query path choice, ``top`` and Parquet export.

DuckDB admits one process that holds a database file open for writing, and while it does, no other process
may open the file even read-only. The gateway's store sink is that process, so queries reach the store in one
of two ways, chosen per call:

1. through the sink's query server (``DATA/store/query.sock``, see ``flowtunnel.store.server``), which runs
   the SQL on a connection of the writer's own (locked-down) database instance, so a query sees every
   committed row, mid-ingest;
2. when nobody holds the file (gateway stopped, or killed and its socket left behind), by opening the
   database directly, read-only, with the same lock-down.

Either way the query runs in the sandbox of ``flowtunnel.store.sandbox``: exactly one SELECT (or EXPLAIN of
one), in a read-only transaction, on an instance without external access, extensions or SET, with memory
and time limits.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import duckdb

from flowtunnel.datadir import PrivateUmask
from flowtunnel.store import sandbox
from flowtunnel.store.errors import QueryError, StoreBusy, StoreError, StoreNotFound
from flowtunnel.store.export import (
    export_sql,
    install_partitions,
    new_staging,
    remove_staging,
    since_clause,
)
from flowtunnel.store.filter import CompiledFilter
from flowtunnel.store.sandbox import QueryLimits, check_read_only
from flowtunnel.store.schema import FLOW_COLUMNS

__all__ = [
    "CLOCKS",
    "TOP_KEYS",
    "QueryResult",
    "StorePaths",
    "check_read_only",
    "connect_direct",
    "count_sql",
    "export_sql",
    "jsonable",
    "open_parquet_query",
    "open_query",
    "parquet_view_sql",
    "run_export",
    "top_sql",
]

TOP_KEYS: Final = (
    "src_addr", "dst_addr", "dst_port", "src_port", "protocol", "exporter", "agent", "src_as", "dst_as",
    "in_if", "out_if", "next_hop", "tos",
)
_TOP_ORDER: Final = ("bytes", "packets", "flows")
FETCH_ROWS: Final = 2048
# Which time a ``--since`` filter goes by: the exporter's flow times, or when flowtunnel received the flow.
CLOCKS: Final = ("flow", "received")


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

    @property
    def export_staging(self) -> Path:
        return self.root / "export-staging"


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryResult:
    """Column names and DuckDB type names, and the rows (values made JSON-friendly by ``jsonable``)."""

    columns: list[str]
    types: list[str]
    rows: Iterator[list[object]]


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


def connect_direct(
    paths: StorePaths, *, limits: QueryLimits | None = None, allowed_directories: Sequence[Path] = ()
) -> duckdb.DuckDBPyConnection:
    """Open the database read-only and locked down here. Raises ``StoreNotFound`` or ``StoreBusy``."""
    if not paths.database.exists():
        raise StoreNotFound(
            f"no flow store at {paths.database} (has a gateway with the store sink run on {paths.data_dir}?)"
        )
    try:
        return sandbox.connect_read_only(
            paths.database, limits or QueryLimits(), allowed_directories=allowed_directories
        )
    except duckdb.Error as exc:
        text = str(exc).lower()
        if "lock" in text or "same database file" in text:
            raise StoreBusy(
                f"{paths.database} is held by another process or connection (a running gateway?) and its "
                f"query socket {paths.socket} does not answer"
            ) from None
        raise StoreError(f"cannot open flow store {paths.database}: {exc}") from None


def iterate(
    cursor: duckdb.DuckDBPyConnection, timeout: float | None = None, limits: QueryLimits | None = None
) -> Iterator[list[object]]:
    """Rows of the cursor's current result, fetched in chunks, as lists of JSON-friendly values."""
    while True:
        try:
            chunk = cursor.fetchmany(FETCH_ROWS)
        except duckdb.InterruptException:
            raise QueryError(_interrupted(timeout)) from None
        except duckdb.Error as exc:
            raise QueryError(sandbox.error_text(exc, limits or QueryLimits())) from None
        if not chunk:
            return
        for row in chunk:
            yield [jsonable(v) for v in row]


def _interrupted(timeout: float | None) -> str:
    if timeout is None:
        return "query interrupted"
    return f"query interrupted after its {timeout:g} s timeout"


def describe(cursor: duckdb.DuckDBPyConnection) -> tuple[list[str], list[str]]:
    desc = cursor.description or []
    return [str(d[0]) for d in desc], [str(d[1]) for d in desc]


@contextmanager
def open_query(
    data_dir: Path,
    sql: str,
    params: Sequence[object] = (),
    *,
    timeout: float = 300.0,
    limits: QueryLimits | None = None,
) -> Iterator[QueryResult]:
    """Run the read-only ``sql`` on the store of ``data_dir``; yields a ``QueryResult`` to iterate.

    Error handling: ``QueryRejected`` for anything but one SELECT (before anything runs), ``QueryError``
    for SQL DuckDB refuses, a file or setting the sandbox refuses, the memory cap or the timeout;
    ``StoreNotFound``/``StoreBusy`` when the store cannot be reached. ``limits`` apply when the store is
    opened directly; through the socket the gateway's apply.
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
    limits = limits or QueryLimits()
    conn = connect_direct(paths, limits=limits)
    try:
        with _sandboxed(conn, sql, params, timeout=timeout, limits=limits) as result:
            yield result
    finally:
        conn.close()


@contextmanager
def _sandboxed(
    conn: duckdb.DuckDBPyConnection, sql: str, params: Sequence[object], *, timeout: float,
    limits: QueryLimits,
) -> Iterator[QueryResult]:
    """Run ``sql`` on a cursor of the locked ``conn`` inside the sandbox's read-only transaction, interrupted
    after ``timeout`` s; DuckDB's refusals become ``QueryError``. The DuckDB store and the Parquet store
    share it, so their queries are bounded the same way."""
    cursor = conn.cursor()
    timer = threading.Timer(timeout, cursor.interrupt)  # the query's own connection, not its parent
    timer.daemon = True
    try:
        sandbox.begin(cursor, limits)
        timer.start()
        try:
            cursor.execute(sql, list(params))
        except duckdb.InterruptException:
            raise QueryError(_interrupted(timeout)) from None
        except duckdb.Error as exc:
            raise QueryError(sandbox.error_text(exc, limits)) from None
        columns, types = describe(cursor)
        yield QueryResult(columns=columns, types=types, rows=iterate(cursor, timeout, limits))
    finally:
        timer.cancel()
        # Closed here, before the caller closes the connection: a cursor left to the garbage collector
        # outlives its connection and aborts the interpreter at exit ("exception not rethrown").
        cursor.close()


#: The files of a Parquet store (``flowtunnel sink parquet``, ``gateway --parquet``) under its directory.
PARQUET_GLOB: Final = "day=*/hour=*/flows-*.parquet"


def parquet_view_sql(directory: Path) -> str:
    """``CREATE VIEW flows`` over the Parquet store in ``directory``: the DuckDB store's columns, in its order
    (the hive partition columns day and hour are not in it: filter on ``received``, whose per-file
    statistics let DuckDB skip files). An empty store is an empty view of the same columns."""
    names = ", ".join(name for name, _ in FLOW_COLUMNS)
    if not any(directory.glob(PARQUET_GLOB)):
        nulls = ", ".join(f"CAST(NULL AS {t.replace(' NOT NULL', '')}) AS {n}" for n, t in FLOW_COLUMNS)
        return f"CREATE VIEW flows AS SELECT {nulls} WHERE false"
    pattern = str(directory / PARQUET_GLOB).replace("'", "''")
    return (f"CREATE VIEW flows AS SELECT {names} FROM read_parquet('{pattern}', hive_partitioning = true, "
            "union_by_name = true)")


@contextmanager
def open_parquet_query(
    directory: Path,
    sql: str,
    params: Sequence[object] = (),
    *,
    timeout: float = 300.0,
    limits: QueryLimits | None = None,
) -> Iterator[QueryResult]:
    """Run the read-only ``sql`` on the Parquet store in ``directory`` (view ``flows``): the same sandbox as
    ``open_query`` (one SELECT, read-only transaction, no external access but ``directory``, no SET, memory
    and time limits), on an in-memory DuckDB instance of this process. Files written meanwhile by the
    sinks appear in the next query (each one is complete: written under another name, then renamed).

    Error handling: as ``open_query``; ``StoreNotFound`` when ``directory`` is not a directory.
    """
    check_read_only(sql)
    directory = directory.resolve()
    if not directory.is_dir():
        raise StoreNotFound(f"no Parquet store at {directory} (the --out of 'flowtunnel sink parquet')")
    limits = limits or QueryLimits()
    try:
        conn = duckdb.connect(":memory:", config=sandbox.instance_config(limits))
    except duckdb.Error as exc:
        raise StoreError(f"cannot start a query engine for {directory}: {exc}") from None
    try:
        try:
            conn.execute(parquet_view_sql(directory))
            sandbox.lock(conn, allowed_directories=[directory])
        except duckdb.Error as exc:
            raise StoreError(f"cannot read the Parquet store at {directory}: {exc}") from None
        with _sandboxed(conn, sql, params, timeout=timeout, limits=limits) as result:
            yield result
    finally:
        conn.close()


def top_sql(
    *,
    by: str,
    since_seconds: float | None = None,
    agent: str | None = None,
    limit: int = 10,
    order: str = "bytes",
    now: dt.datetime,
    clock: str = "flow",
    flow_filter: CompiledFilter | None = None,
) -> tuple[str, list[object]]:
    """The SQL (and parameters) ranking ``by`` values by bytes, packets and flow count.

    ``clock`` says which time ``since_seconds`` goes by: ``flow`` (the exporter's flow end, else start, else
    the receive time) or ``received`` (when the flow reached the gateway, by its clock). ``flow_filter`` (an
    nfdump-style filter, see ``flowtunnel.store.filter``) keeps only the flows it selects.
    """
    if by not in TOP_KEYS:
        raise ValueError(f"cannot rank by {by!r}: choose one of {', '.join(TOP_KEYS)}")
    if order not in _TOP_ORDER:
        raise ValueError(f"cannot order by {order!r}: choose one of {', '.join(_TOP_ORDER)}")
    if limit < 1:
        raise ValueError(f"limit {limit} must be at least 1")
    params: list[object] = []
    where = [c for c in (since_clause(since_seconds, params, now, clock),) if c]
    if agent is not None:
        where.append("agent = ?")
        params.append(agent)
    if flow_filter is not None:
        where.append(flow_filter.where)
        params.extend(flow_filter.params)
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


def count_sql(
    *, since_seconds: float, agent: str | None, now: dt.datetime, clock: str,
    flow_filter: CompiledFilter | None = None,
) -> tuple[str, list[object]]:
    """How many flows a ``top`` with these filters would rank (for the empty-result hint)."""
    params: list[object] = []
    where = [since_clause(since_seconds, params, now, clock)]
    if agent is not None:
        where.append("agent = ?")
        params.append(agent)
    if flow_filter is not None:
        where.append(flow_filter.where)
        params.extend(flow_filter.params)
    return f"SELECT count(*) FROM flows WHERE {' AND '.join(where)}", params


def run_export(
    data_dir: Path,
    target: Path,
    *,
    since_seconds: float | None,
    now: dt.datetime,
    timeout: float = 3600.0,
    limits: QueryLimits | None = None,
    flow_filter: str | None = None,
    clock: str = "flow",
) -> int:
    """Write Parquet partitioned by day to ``target`` (only the flows the nfdump-style ``flow_filter``
    selects, when given, of the last ``since_seconds`` by ``clock``); returns the number of rows written.

    Files are written to a staging directory first and moved into ``target`` only when complete
    (``flowtunnel.store.export``): a killed export leaves the previous export's files whole.
    """
    paths = StorePaths(data_dir=data_dir)
    target = target.resolve()
    from flowtunnel.store.server import QueryClient

    client = QueryClient.connect(paths.socket)
    if client is not None:
        with client:
            return client.export(
                target, since_seconds=since_seconds, now=now, timeout=timeout, flow_filter=flow_filter,
                clock=clock,
            )
    if not paths.database.exists():
        connect_direct(paths)  # raises StoreNotFound
    # Flows in clear, as private as the gateway writes them through its socket (its umask is 077), whatever
    # the caller's umask.
    with PrivateUmask():
        return _export_direct(paths, target, since_seconds=since_seconds, now=now, timeout=timeout,
                              limits=limits, flow_filter=flow_filter, clock=clock)


def _export_direct(
    paths: StorePaths,
    target: Path,
    *,
    since_seconds: float | None,
    now: dt.datetime,
    timeout: float,
    limits: QueryLimits | None,
    flow_filter: str | None,
    clock: str,
) -> int:
    # A sibling of the target: the same filesystem (files are renamed into place), outside its tree
    # (readers of target/** never see half an export).
    staging = new_staging(target.parent)
    try:
        conn = connect_direct(paths, limits=limits, allowed_directories=[staging])
        timer = threading.Timer(timeout, conn.interrupt)
        timer.daemon = True
        timer.start()
        try:
            sql, params = export_sql(
                staging / "parts", since_seconds=since_seconds, now=now, flow_filter=flow_filter, clock=clock
            )
            try:
                row = conn.execute(sql, params).fetchone()
            except duckdb.InterruptException:
                raise QueryError(f"export to {target} interrupted after its {timeout:g} s timeout") from None
            except duckdb.Error as exc:
                raise QueryError(f"export to {target} failed: {exc}") from None
        finally:
            timer.cancel()
            conn.close()
        try:
            install_partitions(staging / "parts", target)
        except OSError as exc:
            raise StoreError(f"export to {target} failed while moving files into place: {exc}") from None
        return int(row[0]) if row else 0
    finally:
        remove_staging(staging)
