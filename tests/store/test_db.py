"""FlowDatabase bookkeeping: rows updated in place or inserted, none lost on rollback."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import duckdb
import pytest

from flowtunnel.store.db import FlowDatabase
from flowtunnel.store.errors import StoreError

_T0 = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)


def _exporter(agent: str, exporter: str, n: int) -> dict[str, Any]:
    return {
        "agent": agent, "exporter": exporter, "datagrams": n, "records": 10 * n, "options_records": n % 3,
        "undecodable": n % 2, "set_errors": 0, "no_template_sets": 1, "seq_expected": n, "seq_received": n,
        "seq_lost": 0, "seq_resets": 0, "last_version": 9 if n % 2 else None,
        "first_seen": _T0, "last_seen": _T0 + dt.timedelta(seconds=n) if n % 3 else None,
    }


def _agent(agent: str, n: int) -> dict[str, Any]:
    return {"agent": agent, "last_stream_seq": n if n % 2 else None, "datagrams": n, "transit_lost": n // 2}


def _commit(db: FlowDatabase, cursor: int, agents: list[str], exporters: int, n: int) -> None:
    db.commit(
        arrays=None,
        cursor=cursor,
        decoder_states={a: f"state-{a}-{n}".encode() for a in agents},
        exporter_stats=[_exporter(a, f"192.0.2.{i}", n) for a in agents for i in range(exporters)],
        agent_stats=[_agent(a, n) for a in agents],
    )


def _expect(db: FlowDatabase, cursor: int, versions: dict[tuple[str, int], int]) -> None:
    """``load()`` gives, per (agent, exporter count), the rows of commit number ``n``."""
    state = db.load()
    assert state.cursor == cursor
    exporters: dict[tuple[str, str], dict[str, Any]] = {}
    agents: dict[str, dict[str, Any]] = {}
    blobs: dict[str, bytes] = {}
    for (agent, count), n in versions.items():
        blobs[agent] = f"state-{agent}-{n}".encode()
        agents[agent] = _agent(agent, n)
        for i in range(count):
            exporters[(agent, f"192.0.2.{i}")] = _exporter(agent, f"192.0.2.{i}", n)
    assert state.decoder_states == blobs
    assert state.agent_stats == agents
    assert state.exporter_stats == exporters


@pytest.mark.parametrize("agents", [1, 5], ids=["one-row-each", "many-rows-each"])
def test_bookkeeping_rows_are_inserted_then_updated_and_survive_reopening(
    tmp_path: Path, agents: int
) -> None:
    names = [f"site-{i}" for i in range(agents)]
    db = FlowDatabase(tmp_path / "flows.duckdb")
    try:
        _commit(db, 10, names, 1, 1)  # every row new
        _commit(db, 20, names, 4, 2)  # one row per agent known, three new
        _commit(db, 30, names, 4, 3)  # every row known
        _expect(db, 30, {(a, 4): 3 for a in names})
    finally:
        db.close()
    db = FlowDatabase(tmp_path / "flows.duckdb")  # keys of stored rows are read back at open
    try:
        _commit(db, 40, names[:1], 4, 5)
        _expect(db, 40, {(a, 4): 5 if a == names[0] else 3 for a in names})
    finally:
        db.close()


def test_a_failed_commit_leaves_nothing_and_the_next_one_inserts_its_rows(tmp_path: Path) -> None:
    db = FlowDatabase(tmp_path / "flows.duckdb")
    try:
        _commit(db, 10, ["site-a"], 1, 1)
        # Fails on its last statement, after site-b's decoder state and exporter row were written.
        with pytest.raises(StoreError, match="commit of cursor 20 failed"):
            db.commit(
                arrays=None, cursor=20, decoder_states={"site-b": b"x"},
                exporter_stats=[_exporter("site-b", "192.0.2.0", 7)],
                agent_stats=[{**_agent("site-b", 7), "transit_lost": -1}],  # no UBIGINT
            )
        # site-b's rows were rolled back: this commit (no reload between) must insert them again.
        _commit(db, 30, ["site-a", "site-b"], 1, 8)
        _expect(db, 30, {("site-a", 1): 8, ("site-b", 1): 8})
    finally:
        db.close()


def test_rows_deleted_behind_the_writers_back_fail_the_commit_until_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "flows.duckdb"
    db = FlowDatabase(path)
    try:
        _commit(db, 10, ["site-a"], 1, 1)
        with db.reader() as other:
            other.execute("DELETE FROM agent_stats")
        with pytest.raises(StoreError, match="agent_stats: 1 of 1 rows to update are missing"):
            _commit(db, 20, ["site-a"], 1, 2)
        db.load()  # what the sink does after a failed commit
        _commit(db, 20, ["site-a"], 1, 2)
        _expect(db, 20, {("site-a", 1): 2})
    finally:
        db.close()
    conn = duckdb.connect(str(path), read_only=True)
    try:
        assert conn.execute("SELECT count(*) FROM agent_stats").fetchone() == (1,)
    finally:
        conn.close()


def test_a_version_1_store_is_migrated_keeping_the_agents_time_in_agent_received(tmp_path: Path) -> None:
    path = tmp_path / "flows.duckdb"
    FlowDatabase(path).close()
    # What a version 1 store looks like: ``received`` held the agent's time, there was no agent_received.
    conn = duckdb.connect(str(path))
    conn.execute("ALTER TABLE flows DROP COLUMN agent_received")
    conn.execute("INSERT INTO flows (agent, exporter, version, received) VALUES ('a', '192.0.2.1', 9, ?)",
                 [_T0])
    conn.execute("UPDATE store_meta SET value = 1 WHERE key = 'schema_version'")
    conn.close()
    db = FlowDatabase(path)
    db.close()
    conn = duckdb.connect(str(path), read_only=True)
    assert conn.execute("SELECT received, agent_received FROM flows").fetchall() == [(_T0, _T0)]
    assert conn.execute("SELECT value FROM store_meta WHERE key = 'schema_version'").fetchone() == (2,)
    conn.close()
