"""The query sandbox: the SQL check, DuckDB settings and limits under which every flow-store query runs.

Queries come from people (``flowtunnel query``, the console) and must not write, change settings, read or
write files, load extensions, or take the gateway's memory. DuckDB lets one process hold the database file,
and while the gateway's store sink holds it no other process may open it, even read-only; so live queries
cannot run in a process of their own. They run on the writer's own database instance, which is locked down
as soon as the sink has created its tables (``lock``), and the same settings apply to the instance a stopped
gateway's store is opened with (``connect_read_only``). Layers, each enough on its own for writes:

1. ``check_read_only``: exactly one statement, a SELECT (``EXPLAIN`` only of a SELECT, never ``EXPLAIN
   ANALYZE``, which executes the statement inside it);
2. ``begin``: every query runs in a ``READ ONLY`` transaction that is rolled back;
3. the instance: ``enable_external_access = false`` (no file, URL or database other than the store, no COPY,
   no INSTALL/LOAD; ``allowed_directories`` names the one staging directory the export writes to),
   ``autoinstall/autoload_known_extensions = false``, ``lock_configuration = true`` (no SET, so neither
   ``memory_limit``, ``threads`` nor access can be changed), a fixed ``memory_limit`` and ``threads``;
4. per query: ``operator_memory_limit`` (sorts, hash tables), a timeout that interrupts it, and a cap on the
   bytes of its answer.

DuckDB's ``memory_limit`` is per instance: a query and the writer share it. A query that reaches it fails
with an out-of-memory error (the gateway's RSS stays bounded); a commit that fails meanwhile is retried by the
sink, which first interrupts the running queries (``QueryServer.interrupt_all``), so ingest wins.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import duckdb

from flowtunnel.store.errors import QueryError, QueryRejected

__all__ = [
    "QueryLimits",
    "begin",
    "check_read_only",
    "connect_read_only",
    "error_text",
    "instance_config",
    "lock",
    "rollback",
]

_MIB: Final = 1 << 20
# The store's DuckDB instance (writer and queries together) takes a quarter of the machine's memory, at least
# 256 MiB and at most 1 GiB unless configured: DuckDB's own default, 80 % of RAM, let one query take a gateway
# from 1 GB to 12.8 GB RSS.
_MEMORY_MIN: Final = 256 * _MIB
_MEMORY_MAX: Final = 1024 * _MIB
MAX_RESULT_BYTES: Final = 256 * _MIB


def _default_memory() -> int:
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return _MEMORY_MAX
    return max(_MEMORY_MIN, min(_MEMORY_MAX, physical // 4))


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryLimits:
    """Resource limits of the store's DuckDB instance and of each query on it.

    ``memory_limit``: the instance (DuckDB syntax, e.g. ``"1GiB"``; None: a quarter of RAM, 256 MiB..1 GiB);
    ``query_memory``: each query's sorts and hash tables (None: half the instance's); ``threads``: the
    instance's worker threads (None: DuckDB's default, one per core); ``max_result_bytes``: the JSON a query
    may send back through the query socket.
    """

    memory_limit: str | None = None
    query_memory: str | None = None
    threads: int | None = None
    max_result_bytes: int = MAX_RESULT_BYTES

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"store threads {self.threads} must be at least 1")
        if self.max_result_bytes < 1:
            raise ValueError(f"max_result_bytes {self.max_result_bytes} must be at least 1")

    @property
    def instance_memory(self) -> str:
        return self.memory_limit or f"{_default_memory() // _MIB}MiB"

    @property
    def per_query_memory(self) -> str:
        if self.query_memory:
            return self.query_memory
        if self.memory_limit:
            return self.memory_limit  # DuckDB caps it at the instance's anyway; explicit is clearer than /2
        return f"{_default_memory() // 2 // _MIB}MiB"


def error_text(exc: duckdb.Error, limits: QueryLimits) -> str:
    """DuckDB's message for a failed query, without advice that does not apply in the sandbox (SET ...)."""
    text = str(exc)
    if isinstance(exc, duckdb.OutOfMemoryException):
        first = text.splitlines()[0] if text else "out of memory"
        return (
            f"{first}: the query needs more memory than the store's limit of {limits.instance_memory} "
            "(filter or aggregate more, or add a LIMIT)"
        )
    return text


def check_read_only(sql: str) -> str:
    """Return ``sql`` if it is exactly one SELECT (or EXPLAIN of one); raise ``QueryRejected`` otherwise.

    ``EXPLAIN ANALYZE`` is refused: it executes the statement it explains (``EXPLAIN ANALYZE COPY ... TO``
    writes the file). ``QueryError`` when the SQL does not parse.
    """
    statements = _statements(sql)
    if len(statements) != 1:
        raise QueryRejected(
            f"a query must be exactly one statement, got {len(statements)}: run them one at a time"
        )
    kind = statements[0].type
    if kind == duckdb.StatementType.EXPLAIN:
        _check_explain(sql)
    elif kind != duckdb.StatementType.SELECT:
        raise QueryRejected(
            f"the store is read-only for queries: {_name(kind)} statements are refused "
            "(use SELECT or EXPLAIN)"
        )
    _check_functions(sql)
    return sql


# Table functions a SELECT may call that act rather than read: checkpoints, log and profiling switches,
# parser extensions, raw pointer scans, and the ones that run SQL from a string (which this check cannot see).
_ACTING_FUNCTIONS: Final = frozenset({
    "checkpoint", "force_checkpoint", "truncate_duckdb_logs", "enable_logging", "disable_logging",
    "enable_profiling", "disable_profiling", "add_grammar_extension", "remove_grammar_extension",
    "create_external_resource", "register_external_resource", "register_external_resource_type",
    "deregister_external_resource", "destroy_external_resource", "arrow_scan", "arrow_scan_dumb",
    "python_arrow_scan", "pandas_scan", "python_map_function", "query", "query_table",
    "json_execute_serialized_sql",
})


def _check_functions(sql: str) -> None:
    tokens = duckdb.tokenize(sql)
    for i, (pos, kind) in enumerate(tokens[:-1]):
        if kind not in (duckdb.token_type.identifier, duckdb.token_type.keyword):
            continue
        name = sql[pos:tokens[i + 1][0]].strip().strip('"').lower()
        if name in _ACTING_FUNCTIONS and sql[tokens[i + 1][0]:].startswith("("):
            raise QueryRejected(
                f"the store is read-only for queries: function {name}() is refused (it acts, not reads)"
            )


def _statements(sql: str) -> list[duckdb.Statement]:
    try:
        return duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"SQL does not parse: {exc}") from None


def _name(kind: object) -> str:
    return kind.name if hasattr(kind, "name") else str(kind)


def _check_explain(sql: str) -> None:
    """What follows the EXPLAIN keyword must be a plain SELECT: not ANALYZE, not options, not a write."""
    tokens = [(pos, kind) for pos, kind in duckdb.tokenize(sql) if kind != duckdb.token_type.comment]
    if len(tokens) < 2 or sql[tokens[0][0]:tokens[0][0] + 7].upper() != "EXPLAIN":
        raise QueryRejected("EXPLAIN is allowed only as 'EXPLAIN SELECT ...'")
    rest = sql[tokens[1][0]:]
    if rest[:7].upper() == "ANALYZE" or rest.startswith("("):
        raise QueryRejected(
            "EXPLAIN ANALYZE is refused: it runs the statement it explains "
            "(use EXPLAIN SELECT ... for the plan)"
        )
    try:
        inner = duckdb.extract_statements(rest)
    except duckdb.Error:
        raise QueryRejected("EXPLAIN is allowed only as 'EXPLAIN SELECT ...'") from None
    if len(inner) != 1 or inner[0].type != duckdb.StatementType.SELECT:
        what = _name(inner[0].type) if len(inner) == 1 else f"{len(inner)} statements"
        raise QueryRejected(f"EXPLAIN of {what} is refused: only SELECT statements can be explained")


def instance_config(limits: QueryLimits, **extra: Any) -> dict[str, Any]:
    """``duckdb.connect`` configuration of an instance that answers queries (writer's or read-only).

    External access stays on until ``lock``: DuckDB refuses to set ``allowed_directories`` before the
    database has started, and the writer needs neither files nor extensions in between (it creates tables).
    """
    config: dict[str, Any] = {
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "allow_community_extensions": False,
        "memory_limit": limits.instance_memory,
        # The one setting the query server changes per query connection once the configuration is locked.
        "allowed_configs": ["operator_memory_limit"],
        **extra,
    }
    if limits.threads:
        config["threads"] = limits.threads
    return config


def lock(conn: duckdb.DuckDBPyConnection, *, allowed_directories: Sequence[Path] = ()) -> None:
    """Lock the instance down for queries: UTC, no external access but ``allowed_directories``, no SET."""
    conn.execute("SET GLOBAL TimeZone = 'UTC'")
    if allowed_directories:
        dirs = [str(d).rstrip("/") + "/" for d in allowed_directories]
        conn.execute("SET GLOBAL allowed_directories = ?", [dirs])
    conn.execute("SET GLOBAL enable_external_access = false")
    conn.execute("SET GLOBAL lock_configuration = true")


def connect_read_only(
    path: Path, limits: QueryLimits, *, allowed_directories: Sequence[Path] = ()
) -> duckdb.DuckDBPyConnection:
    """Open ``path`` read-only in this process, locked down like the writer's instance.

    Raises ``duckdb.Error`` as DuckDB does (the caller names the store).
    """
    conn = duckdb.connect(str(path), read_only=True, config=instance_config(limits))
    try:
        lock(conn, allowed_directories=allowed_directories)
    except BaseException:
        conn.close()
        raise
    return conn


def begin(cursor: duckdb.DuckDBPyConnection, limits: QueryLimits) -> duckdb.DuckDBPyConnection:
    """Prepare a new connection of a locked instance for one query: memory cap, read-only transaction."""
    cursor.execute(f"SET operator_memory_limit = '{_quoted(limits.per_query_memory)}'")
    cursor.execute("BEGIN TRANSACTION READ ONLY")
    return cursor


def rollback(cursor: duckdb.DuckDBPyConnection) -> None:
    """End a query's transaction (nothing it did persists) and close its connection."""
    with contextlib.suppress(duckdb.Error):
        cursor.execute("ROLLBACK")
    with contextlib.suppress(duckdb.Error):
        cursor.close()


def _quoted(text: str) -> str:
    if not all(c.isalnum() or c in ". " for c in text):
        raise ValueError(f"memory size {text!r} is not like '512MiB'")
    return text
