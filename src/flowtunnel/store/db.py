"""The store's DuckDB database as the writer sees it: open, load state, commit a batch atomically, retention.

Synchronous and single-threaded by contract: the store sink calls every method from one worker thread. The
query server gets its own connections from ``reader()``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import duckdb
import numpy.typing as npt

from flowtunnel.store import sandbox
from flowtunnel.store.errors import StoreError
from flowtunnel.store.schema import (
    AGENT_STATS_COLUMNS,
    DDL,
    EXPORTER_STATS_COLUMNS,
    FLOW_COLUMNS,
    SCHEMA_VERSION,
)

__all__ = ["FlowDatabase", "StoredState"]

_FLOW_NAMES = ", ".join(name for name, _ in FLOW_COLUMNS)
_INSERT_FLOWS = f"INSERT INTO flows ({_FLOW_NAMES}) SELECT {_FLOW_NAMES} FROM _flow_batch"
_UPDATE_CURSOR = "UPDATE store_meta SET value = ? WHERE key = 'cursor'"

# DuckDB checkpoints (folds the WAL into the file, compressing row groups) when the WAL passes this size. Its
# default, 16 MiB, is about 70k flow rows: the partly filled row group at the end of the table is then
# recompressed and rewritten at every checkpoint, which cost as much CPU as the inserts themselves. 128 MiB
# (about 550k rows) makes checkpoints rarer and each row group get written about once. Durability is
# unchanged: each commit still writes and syncs the WAL; a restart replays at most this much WAL.
CHECKPOINT_THRESHOLD: Final = "128MiB"

# Bookkeeping tables: name → (key columns, all columns). Rows are updated in place when their key is already
# stored, inserted otherwise: DuckDB's INSERT OR REPLACE (a delete plus an insert in a keyed table) took
# 3-6 ms per row, a plain UPDATE about 1 ms.
_BOOKKEEPING: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "decoder_state": (("agent",), ("agent", "state")),
    "exporter_stats": (("agent", "exporter"), EXPORTER_STATS_COLUMNS),
    "agent_stats": (("agent",), AGENT_STATS_COLUMNS),
}
# Up to this many rows are written one statement each (about 1 ms a row); more go in one statement that
# unnests a list parameter per column (about 6 ms, whatever the count).
_ROW_BY_ROW: Final = 2


def _count(result: duckdb.DuckDBPyConnection) -> int:
    row = result.fetchone()
    return int(row[0]) if row else 0


@dataclass(frozen=True, slots=True)
class _TableWriter:
    """The statements that write rows of one bookkeeping table."""

    table: str
    key: tuple[str, ...]
    columns: tuple[str, ...]
    insert_row: str
    update_row: str
    insert_many: str
    update_many: str

    @classmethod
    def build(
        cls, table: str, key: tuple[str, ...], columns: tuple[str, ...], types: dict[str, str]
    ) -> _TableWriter:
        names = ", ".join(columns)
        values = [c for c in columns if c not in key]
        where_row = " AND ".join(f"{k} = ?" for k in key)
        unnest = ", ".join(f"unnest(?::{types[c]}[]) AS {c}" for c in columns)
        return cls(
            table=table,
            key=key,
            columns=columns,
            insert_row=f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' for _ in columns)})",
            update_row=f"UPDATE {table} SET {', '.join(f'{c} = ?' for c in values)} WHERE {where_row}",
            insert_many=f"INSERT INTO {table} ({names}) SELECT {unnest}",
            update_many=(
                f"UPDATE {table} AS t SET {', '.join(f'{c} = s.{c}' for c in values)} "
                f"FROM (SELECT {unnest}) AS s WHERE {' AND '.join(f't.{k} = s.{k}' for k in key)}"
            ),
        )

    def write(
        self, conn: duckdb.DuckDBPyConnection, rows: list[dict[str, Any]], stored: set[tuple[Any, ...]]
    ) -> list[tuple[Any, ...]]:
        """Update the rows whose key is in ``stored``, insert the others; returns the inserted keys."""
        new: list[dict[str, Any]] = []
        old: list[dict[str, Any]] = []
        for row in rows:
            (old if tuple(row[k] for k in self.key) in stored else new).append(row)
        if old:
            updated = 0
            if len(old) <= _ROW_BY_ROW:
                values = [c for c in self.columns if c not in self.key]
                for row in old:
                    updated += _count(conn.execute(
                        self.update_row, [row[c] for c in values] + [row[k] for k in self.key]
                    ))
            else:
                columns = [[row[c] for row in old] for c in self.columns]
                updated = _count(conn.execute(self.update_many, columns))
            if updated != len(old):
                # The file changed under us: fail the commit (rolled back); the sink reloads and retries.
                missing = len(old) - updated
                raise StoreError(f"{self.table}: {missing} of {len(old)} rows to update are missing")
        if new:
            if len(new) <= _ROW_BY_ROW:
                for row in new:
                    conn.execute(self.insert_row, [row[c] for c in self.columns])
            else:
                conn.execute(self.insert_many, [[row[c] for row in new] for c in self.columns])
        return [tuple(row[k] for k in self.key) for row in new]


@dataclass(slots=True, kw_only=True)
class StoredState:
    """What the last committed transaction left: the journal cursor, template caches and counters."""

    cursor: int = 0
    decoder_states: dict[str, bytes] = field(default_factory=dict)
    exporter_stats: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    agent_stats: dict[str, dict[str, Any]] = field(default_factory=dict)


class FlowDatabase:
    """The writer's connection to ``flows.duckdb``.

    Error handling: DuckDB failures surface as ``StoreError`` naming the file; a failed commit is rolled
    back whole (rows, cursor, state), so the caller may retry the same batch.

    Resource handling: one connection until ``close()``; ``reader()`` connections share the database
    instance and must be closed by their users before ``close()``. Once the tables exist the instance is
    locked down for queries (``flowtunnel.store.sandbox``): no external access but ``export_staging``, no
    extension loading, no SET, ``limits`` fixed.
    """

    def __init__(
        self,
        path: Path,
        *,
        memory_limit: str | None = None,
        threads: int | None = None,
        limits: sandbox.QueryLimits | None = None,
    ) -> None:
        self.path = path
        self.limits = limits or sandbox.QueryLimits(memory_limit=memory_limit, threads=threads)
        # Where the query server's Parquet export writes before moving files into place: the one directory
        # the locked instance may write to.
        self.export_staging = path.parent / "export-staging"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.export_staging.mkdir(mode=0o700, exist_ok=True)
        config = sandbox.instance_config(self.limits, checkpoint_threshold=CHECKPOINT_THRESHOLD)
        try:
            self._conn = duckdb.connect(str(path), config=config)
        except duckdb.Error as exc:
            raise StoreError(f"cannot open flow store {path}: {exc}") from None
        self._reader_lock = threading.Lock()
        self._reader_root = self._conn.cursor()
        self._writers: dict[str, _TableWriter] = {}
        # Keys of the bookkeeping rows as of the last commit: whether a row is updated or inserted.
        self._stored: dict[str, set[tuple[Any, ...]]] = {table: set() for table in _BOOKKEEPING}
        self._cursor_stored = False
        try:
            self._conn.execute("SET TimeZone = 'UTC'")
            for ddl in DDL:
                self._conn.execute(ddl)
            for table, (key, columns) in _BOOKKEEPING.items():
                types = dict(self._conn.execute(
                    "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = ?", [table]
                ).fetchall())
                self._writers[table] = _TableWriter.build(table, key, columns, types)
            row = self._conn.execute("SELECT value FROM store_meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                self._conn.execute("INSERT INTO store_meta VALUES ('schema_version', ?)", [SCHEMA_VERSION])
            elif int(row[0]) == 1:
                self._migrate_1_to_2()
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(
                    f"flow store {path} has schema version {row[0]}, this flowtunnel knows {SCHEMA_VERSION}"
                )
            self._read_stored_keys()
            sandbox.lock(self._conn, allowed_directories=[self.export_staging])
        except duckdb.Error as exc:
            self.close()
            raise StoreError(f"cannot set up flow store {path}: {exc}") from None

    def _migrate_1_to_2(self) -> None:
        """Version 1 kept the agent's receive time in ``received``: it moves to the new ``agent_received``
        too (``received`` keeps it: the gateway's time of those rows is not known). One transaction."""
        conn = self._conn
        conn.begin()
        try:
            columns = {r[0] for r in conn.execute(
                "SELECT column_name FROM duckdb_columns() WHERE table_name = 'flows'"
            ).fetchall()}
            if "agent_received" not in columns:
                conn.execute("ALTER TABLE flows ADD COLUMN agent_received TIMESTAMPTZ")
            conn.execute("UPDATE flows SET agent_received = received WHERE agent_received IS NULL")
            conn.execute("UPDATE store_meta SET value = ? WHERE key = 'schema_version'", [SCHEMA_VERSION])
            conn.commit()
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                conn.rollback()
            raise

    def close(self) -> None:
        with contextlib.suppress(duckdb.Error):
            self._reader_root.close()
            self._conn.close()

    def reader(self) -> duckdb.DuckDBPyConnection:
        """A new connection to the same (locked) database instance, for one query in another thread."""
        with self._reader_lock:
            return self._reader_root.cursor()

    def load(self) -> StoredState:
        conn = self._conn
        state = StoredState()
        row = conn.execute("SELECT value FROM store_meta WHERE key = 'cursor'").fetchone()
        state.cursor = int(row[0]) if row else 0
        for agent, blob in conn.execute("SELECT agent, state FROM decoder_state").fetchall():
            state.decoder_states[str(agent)] = bytes(blob)
        cols = ", ".join(EXPORTER_STATS_COLUMNS)
        for values in conn.execute(f"SELECT {cols} FROM exporter_stats").fetchall():
            rec = dict(zip(EXPORTER_STATS_COLUMNS, values, strict=True))
            state.exporter_stats[(rec["agent"], rec["exporter"])] = rec
        cols = ", ".join(AGENT_STATS_COLUMNS)
        for values in conn.execute(f"SELECT {cols} FROM agent_stats").fetchall():
            rec = dict(zip(AGENT_STATS_COLUMNS, values, strict=True))
            state.agent_stats[rec["agent"]] = rec
        self._read_stored_keys()
        return state

    def _read_stored_keys(self) -> None:
        row = self._conn.execute("SELECT count(*) FROM store_meta WHERE key = 'cursor'").fetchone()
        self._cursor_stored = bool(row and row[0])
        for table, writer in self._writers.items():
            rows = self._conn.execute(f"SELECT {', '.join(writer.key)} FROM {table}").fetchall()
            self._stored[table] = {tuple(r) for r in rows}

    def commit(
        self,
        *,
        arrays: dict[str, npt.NDArray[Any]] | None,
        cursor: int,
        decoder_states: dict[str, bytes],
        exporter_stats: list[dict[str, Any]],
        agent_stats: list[dict[str, Any]],
    ) -> None:
        """In one transaction: append the rows, set the cursor, replace the given states and counters.

        Bookkeeping rows are updated when ``load`` (or an earlier commit here) saw their key, else inserted.
        """
        conn = self._conn
        try:
            conn.begin()
            try:
                if arrays is not None:
                    conn.register("_flow_batch", arrays)
                    try:
                        conn.execute(_INSERT_FLOWS)
                    finally:
                        conn.unregister("_flow_batch")
                if self._cursor_stored:
                    if not _count(conn.execute(_UPDATE_CURSOR, [cursor])):
                        raise StoreError("store_meta: the cursor row is missing")
                else:
                    conn.execute("INSERT INTO store_meta VALUES ('cursor', ?)", [cursor])
                inserted = {
                    table: self._writers[table].write(conn, rows, self._stored[table])
                    for table, rows in (
                        ("decoder_state", [{"agent": a, "state": s} for a, s in decoder_states.items()]),
                        ("exporter_stats", exporter_stats),
                        ("agent_stats", agent_stats),
                    )
                    if rows
                }
                conn.commit()
                self._cursor_stored = True
                for table, keys in inserted.items():
                    self._stored[table].update(keys)
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    conn.rollback()
                raise
        except (duckdb.Error, StoreError) as exc:
            raise StoreError(f"flow store {self.path}: commit of cursor {cursor} failed: {exc}") from None

    def drop_received_before(self, cutoff: dt.datetime) -> tuple[int, dt.datetime | None]:
        """Delete flows received before ``cutoff``; returns (rows deleted, oldest remaining receive time)."""
        try:
            row = self._conn.execute("DELETE FROM flows WHERE received < ?", [cutoff]).fetchone()
            deleted = int(row[0]) if row else 0
            oldest = self._conn.execute("SELECT min(received) FROM flows").fetchone()
        except duckdb.Error as exc:
            raise StoreError(f"flow store {self.path}: retention delete failed: {exc}") from None
        return deleted, (oldest[0] if oldest else None)

    def count(self) -> int:
        row = self._conn.execute("SELECT count(*) FROM flows").fetchone()
        return int(row[0]) if row else 0
