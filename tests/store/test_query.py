"""Queries, top and export: read-only, right answers mid-ingest and with the gateway stopped."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import time
from pathlib import Path
from typing import Any

import duckdb
import pytest

from flowtunnel.datagram import Datagram
from flowtunnel.gateway.notify import JournalNotify
from flowtunnel.netflow import FieldSpec, Template, encode_v9
from flowtunnel.runtime import TaskSet
from flowtunnel.store import (
    QueryError,
    QueryRejected,
    StoreNotFound,
    StorePaths,
    StoreSink,
    check_read_only,
    open_query,
    run_export,
    top_sql,
)
from tests.store._support import fill_journal, run_sink_until, wait_caught_up

TEMPLATE = Template(
    256,
    (FieldSpec(8, 4), FieldSpec(12, 4), FieldSpec(7, 2), FieldSpec(11, 2), FieldSpec(4, 1), FieldSpec(1, 8),
     FieldSpec(2, 8), FieldSpec(152, 8), FieldSpec(153, 8)),
)
PER_DATAGRAM = 10
# Heavy hitters first: talker k sends in proportion to 1/(k+1), so the ranking is unambiguous.
TALKERS = [f"10.1.0.{k + 1}" for k in range(8)]
SLOTS = [k for k in range(len(TALKERS)) for _ in range(len(TALKERS) - k)]
START_MS = 1_790_000_000_000


def _records(i: int) -> list[dict[str, Any]]:
    rows = []
    for r in range(PER_DATAGRAM):
        n = i * PER_DATAGRAM + r
        k = SLOTS[n % len(SLOTS)]
        rows.append({
            "sourceIPv4Address": TALKERS[k], "destinationIPv4Address": f"192.0.2.{n % 5 + 1}",
            "sourceTransportPort": 40000 + n % 1000, "destinationTransportPort": (443, 53, 80)[n % 3],
            "protocolIdentifier": (6, 17, 6)[n % 3], "octetDeltaCount": 1000 * (8 - k) + n % 7,
            "packetDeltaCount": 9 - k, "flowStartMilliseconds": START_MS + n,
            "flowEndMilliseconds": START_MS + n + 500,
        })
    return rows


def _datagrams(count: int, *, received_ns: int | None = None) -> list[Datagram]:
    now = received_ns or time.time_ns()
    return [
        Datagram(
            received_ns=now + i, exporter="192.0.2.1", exporter_port=40000, local_port=2055,
            payload=encode_v9(templates=[TEMPLATE] if i % 50 == 0 else [], data=[(TEMPLATE, _records(i))],
                              sys_uptime_ms=1000 + i, unix_secs=START_MS // 1000, sequence=i, source_id=1),
        )
        for i in range(count)
    ]


def _expected_top(datagrams: int, by: str) -> list[tuple[object, int, int, int]]:
    agg: dict[object, list[int]] = {}
    for i in range(datagrams):
        for rec in _records(i):
            key = {"src_addr": rec["sourceIPv4Address"], "dst_port": rec["destinationTransportPort"]}[by]
            a = agg.setdefault(key, [0, 0, 0])
            a[0] += rec["octetDeltaCount"]
            a[1] += rec["packetDeltaCount"]
            a[2] += 1
    ranked = sorted(agg.items(), key=lambda kv: (-kv[1][0], -kv[1][1], -kv[1][2]))
    return [(k, v[0], v[1], v[2]) for k, v in ranked]


def _rows(data: Path, sql: str, params: list[object] | None = None) -> tuple[list[str], list[list[object]]]:
    with open_query(data, sql, params or []) as result:
        return result.columns, list(result.rows)


@pytest.fixture
async def stopped_store(tmp_path: Path) -> Path:
    """A data directory whose store holds 40 datagrams of flows, with no sink running."""
    journal = fill_journal(tmp_path / "journal.sqlite", _datagrams(40))
    await run_sink_until(StoreSink(data_dir=tmp_path / "data"), journal)
    journal.close()
    return tmp_path / "data"


@pytest.mark.parametrize(
    "sql",
    ["INSERT INTO flows (agent) VALUES ('x')", "DELETE FROM flows", "UPDATE flows SET bytes = 0",
     "DROP TABLE flows", "CREATE TABLE t (a INT)", "COPY flows TO '/tmp/x.csv'", "ATTACH '/tmp/other.db'",
     "PRAGMA enable_profiling", "SET threads = 1", "CHECKPOINT", "SELECT 1; DELETE FROM flows",
     "INSTALL httpfs"],
)
def test_writes_and_several_statements_are_refused(sql: str) -> None:
    with pytest.raises(QueryRejected):
        check_read_only(sql)


@pytest.mark.parametrize(
    "sql", ["SELECT 1", "WITH a AS (SELECT 1 AS x) SELECT x FROM a", "EXPLAIN SELECT 1", "FROM flows",
            "DESCRIBE flows"],
)
def test_reads_are_allowed(sql: str) -> None:
    assert check_read_only(sql) == sql


async def test_queries_a_stopped_store_read_only(stopped_store: Path) -> None:
    columns, rows = await asyncio.to_thread(
        _rows, stopped_store, "SELECT count(*) AS n, sum(bytes) AS b FROM flows"
    )
    assert columns == ["n", "b"]
    assert rows == [[40 * PER_DATAGRAM, sum(r["octetDeltaCount"] for i in range(40) for r in _records(i))]]
    with pytest.raises(QueryRejected, match="DELETE statements are refused"):
        await asyncio.to_thread(_rows, stopped_store, "DELETE FROM flows")
    with pytest.raises(QueryError, match="no_such_column"):
        await asyncio.to_thread(_rows, stopped_store, "SELECT no_such_column FROM flows")


async def test_values_come_out_as_text_friendly_types(stopped_store: Path) -> None:
    _, rows = await asyncio.to_thread(
        _rows, stopped_store, "SELECT flow_start, extra, src_addr FROM flows ORDER BY flow_start LIMIT 1"
    )
    [[start, extra, src]] = rows
    assert start == "2026-09-21T14:13:20Z"  # START_MS, resolved to UTC
    assert extra is None  # every field of this template has a column
    assert src == TALKERS[0]


async def test_a_socket_left_by_a_killed_gateway_falls_back_to_direct_reading(stopped_store: Path) -> None:
    stale = StorePaths(data_dir=stopped_store).socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(stale))  # bound, never listening: connect() is refused, as after kill -9
    sock.close()
    _, rows = await asyncio.to_thread(_rows, stopped_store, "SELECT count(*) FROM flows")
    assert rows == [[400]]


def test_missing_store_is_named(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFound, match=r"no flow store at .*flows\.duckdb"):
        _rows(tmp_path, "SELECT 1")


@pytest.mark.parametrize("by", ["src_addr", "dst_port"])
async def test_top_ranks_by_bytes_packets_and_flows(stopped_store: Path, by: str) -> None:
    sql, params = top_sql(by=by, limit=5, now=dt.datetime.now(dt.UTC))
    columns, rows = await asyncio.to_thread(_rows, stopped_store, sql, params)
    assert columns == [by, "bytes", "packets", "flows", "pct_bytes"]
    assert [tuple(r[:4]) for r in rows] == _expected_top(40, by)[:5]


async def test_top_filters_by_agent_and_time(stopped_store: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    sql, params = top_sql(by="src_addr", agent="nobody", now=now)
    assert (await asyncio.to_thread(_rows, stopped_store, sql, params))[1] == []
    sql, params = top_sql(by="src_addr", agent="site-a", since_seconds=3600, now=now)
    # Flow times are in 2026-09, long before the last hour.
    assert (await asyncio.to_thread(_rows, stopped_store, sql, params))[1] == []
    later = dt.datetime.fromtimestamp(START_MS / 1000 + 3600, dt.UTC)
    sql, params = top_sql(by="src_addr", agent="site-a", since_seconds=7200, now=later)
    rows = (await asyncio.to_thread(_rows, stopped_store, sql, params))[1]
    assert sum(int(r[3]) for r in rows) == 400  # type: ignore[call-overload]


def test_top_refuses_unknown_columns() -> None:
    with pytest.raises(ValueError, match="cannot rank by 'bytes; DROP TABLE flows'"):
        top_sql(by="bytes; DROP TABLE flows", now=dt.datetime.now(dt.UTC))


async def test_export_writes_parquet_partitioned_by_day(stopped_store: Path, tmp_path: Path) -> None:
    target = tmp_path / "parquet"
    rows = await asyncio.to_thread(
        run_export, stopped_store, target, since_seconds=None, now=dt.datetime.now(dt.UTC)
    )
    assert rows == 400
    assert sorted(p.name for p in target.iterdir()) == ["day=2026-09-21"]
    conn = duckdb.connect()
    back = conn.execute(
        "SELECT count(*), sum(bytes), min(day) "
        f"FROM read_parquet('{target}/*/*.parquet', hive_partitioning=true)"
    ).fetchone()
    conn.close()
    assert back is not None
    assert back[0] == 400
    assert back[1] == sum(r["octetDeltaCount"] for i in range(40) for r in _records(i))
    assert str(back[2]) == "2026-09-21"


async def test_queries_top_and_export_give_right_answers_while_ingesting(tmp_path: Path) -> None:
    total, chunk = 150, 10
    datagrams = _datagrams(total)
    journal = fill_journal(tmp_path / "journal.sqlite", datagrams[:chunk])
    notify = JournalNotify(journal.last_seq())
    data = tmp_path / "data"
    sink = StoreSink(data_dir=data, batch_records=3 * PER_DATAGRAM, read_limit=3, batch_interval=0.0)
    tasks = TaskSet()
    tasks.spawn(sink.run(journal, notify), name="store-sink")
    cursor_sql = "coalesce((SELECT value FROM store_meta WHERE key = 'cursor'), 0)"
    top, params = top_sql(by="src_addr", limit=100, now=dt.datetime.now(dt.UTC))
    mid_ingest = 0
    try:
        async with asyncio.timeout(120):
            await wait_caught_up(sink, 1)
            appended = chunk
            while True:
                # The journal grows while we ask: the gateway's ingest, played by this loop.
                if appended < total:
                    journal.append(datagrams[appended:appended + chunk], stream="site-a",
                                   stream_seqs=list(range(appended + 1, appended + chunk + 1)))
                    appended += chunk
                    notify.publish(journal.last_seq())
                # The cursor is read in the same snapshot as the rows: the rows must be exactly those of the
                # journal entries up to it (entries have seq 1..total, PER_DATAGRAM records each).
                _, rows = await asyncio.to_thread(_rows, data, f"SELECT count(*), {cursor_sql} FROM flows")
                [[count, cursor]] = rows
                assert isinstance(cursor, int)
                assert count == PER_DATAGRAM * cursor
                _, ranked = await asyncio.to_thread(
                    _rows, data, f"SELECT *, {cursor_sql} AS c FROM ({top}) t", params
                )
                at = int(str(ranked[0][-1]))
                assert [tuple(r[:4]) for r in ranked] == _expected_top(at, "src_addr")
                if cursor < appended:
                    mid_ingest += 1
                if cursor == total:
                    break
                if appended == total:
                    await asyncio.sleep(0.05)
            with pytest.raises(QueryRejected):
                await asyncio.to_thread(_rows, data, "DELETE FROM flows")
            exported = await asyncio.to_thread(
                run_export, data, tmp_path / "pq", since_seconds=None, now=dt.datetime.now(dt.UTC)
            )
            assert exported == total * PER_DATAGRAM
            with pytest.raises(QueryError, match="timeout"):
                await asyncio.to_thread(
                    lambda: _rows_timeout(data, "SELECT count(*) FROM range(100000000000) a", 0.3)
                )
            assert sink.status()["queries"]
    finally:
        await tasks.close()
        journal.close()
    assert mid_ingest > 0, "no query landed while the store was behind the journal"
    assert not sink.paths.socket.exists()


def _rows_timeout(data: Path, sql: str, timeout: float) -> list[list[object]]:
    with open_query(data, sql, timeout=timeout) as result:
        return list(result.rows)


async def test_query_socket_works_under_a_data_directory_too_deep_for_a_unix_address(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    journal = fill_journal(tmp_path / "journal.sqlite", _datagrams(3))
    sink = StoreSink(data_dir=deep)
    assert len(str(sink.paths.socket)) > 108
    tasks = TaskSet()
    tasks.spawn(sink.run(journal, JournalNotify(journal.last_seq())), name="store-sink")
    try:
        async with asyncio.timeout(60):
            await wait_caught_up(sink, journal.last_seq())
            _, rows = await asyncio.to_thread(_rows, deep, "SELECT count(*) FROM flows")
        assert rows == [[3 * PER_DATAGRAM]]
        assert sink.status()["queries"] == 1  # answered by the sink, not by opening the file
    finally:
        await tasks.close()
        journal.close()
