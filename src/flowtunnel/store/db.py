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
from typing import Any

import duckdb
import numpy.typing as npt

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
    instance and must be closed by their users before ``close()``.
    """

    def __init__(self, path: Path, *, memory_limit: str | None = None, threads: int | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {"autoinstall_known_extensions": False}
        if memory_limit:
            config["memory_limit"] = memory_limit
        if threads:
            config["threads"] = threads
        try:
            self._conn = duckdb.connect(str(path), config=config)
        except duckdb.Error as exc:
            raise StoreError(f"cannot open flow store {path}: {exc}") from None
        self._reader_lock = threading.Lock()
        self._reader_root = self._conn.cursor()
        try:
            self._conn.execute("SET TimeZone = 'UTC'")
            for ddl in DDL:
                self._conn.execute(ddl)
            row = self._conn.execute("SELECT value FROM store_meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                self._conn.execute("INSERT INTO store_meta VALUES ('schema_version', ?)", [SCHEMA_VERSION])
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(
                    f"flow store {path} has schema version {row[0]}, this flowtunnel knows {SCHEMA_VERSION}"
                )
        except duckdb.Error as exc:
            self.close()
            raise StoreError(f"cannot set up flow store {path}: {exc}") from None

    def close(self) -> None:
        with contextlib.suppress(duckdb.Error):
            self._reader_root.close()
            self._conn.close()

    def reader(self) -> duckdb.DuckDBPyConnection:
        """A new connection to the same database instance, for one query in another thread."""
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
        return state

    def commit(
        self,
        *,
        arrays: dict[str, npt.NDArray[Any]] | None,
        cursor: int,
        decoder_states: dict[str, bytes],
        exporter_stats: list[dict[str, Any]],
        agent_stats: list[dict[str, Any]],
    ) -> None:
        """In one transaction: append the rows, set the cursor, replace the given states and counters."""
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
                conn.execute("INSERT OR REPLACE INTO store_meta VALUES ('cursor', ?)", [cursor])
                if decoder_states:
                    conn.executemany(
                        "INSERT OR REPLACE INTO decoder_state VALUES (?, ?)", list(decoder_states.items())
                    )
                if exporter_stats:
                    marks = ", ".join("?" for _ in EXPORTER_STATS_COLUMNS)
                    conn.executemany(
                        f"INSERT OR REPLACE INTO exporter_stats ({', '.join(EXPORTER_STATS_COLUMNS)}) "
                        f"VALUES ({marks})",
                        [[s[c] for c in EXPORTER_STATS_COLUMNS] for s in exporter_stats],
                    )
                if agent_stats:
                    marks = ", ".join("?" for _ in AGENT_STATS_COLUMNS)
                    conn.executemany(
                        f"INSERT OR REPLACE INTO agent_stats ({', '.join(AGENT_STATS_COLUMNS)}) "
                        f"VALUES ({marks})",
                        [[s[c] for c in AGENT_STATS_COLUMNS] for s in agent_stats],
                    )
                conn.commit()
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    conn.rollback()
                raise
        except duckdb.Error as exc:
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
