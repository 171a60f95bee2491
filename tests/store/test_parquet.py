"""The Parquet sink on the embedded journal: file names carry the range they hold, the position comes back
from them after a crash at any moment (nothing written twice, templates rebuilt), writers split the agents,
and ``query --parquet`` answers like the DuckDB store over the same datagrams."""

from __future__ import annotations

import asyncio
import importlib.resources
import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import duckdb
import pytest

from flowtunnel.capture import CaptureReader
from flowtunnel.datagram import Datagram
from flowtunnel.journal import JournalNotify
from flowtunnel.log import DurableLog, LogConfig
from flowtunnel.netflow import FieldSpec, Template, encode_v9
from flowtunnel.runtime import TaskSet
from flowtunnel.store import StoreSink, open_query
from flowtunnel.store.errors import QueryError, QueryRejected
from flowtunnel.store.parquet import (
    ParquetSink,
    file_name,
    in_shard,
    parse_file_name,
    partition,
    scan_files,
)
from flowtunnel.store.query import open_parquet_query
from flowtunnel.store.sandbox import QueryLimits

HOUR_NS = 3600 * 10**9
#: 2026-12-06 21:00:00 UTC
T0 = 1_796_590_800 * 10**9
ALL_SQL = "SELECT * FROM flows ORDER BY ALL"


def demo_datagrams(received_ns: int = T0) -> list[Datagram]:
    """The bundled demo capture's datagrams (real v5/v9/IPFIX)."""
    path = importlib.resources.files("flowtunnel") / "data" / "demo.pcap"
    with CaptureReader(str(path)) as reader:
        return [Datagram(received_ns=received_ns + i, exporter=u.src, exporter_port=u.sport,
                         local_port=u.dport, payload=u.payload) for i, u in enumerate(reader)]


def journal_of(
    path: Path, per_agent: dict[str, list[Datagram]], *, appended_ns: int | None = None
) -> DurableLog:
    journal = DurableLog(LogConfig(path=path, quota_bytes=0))
    for agent, dgs in per_agent.items():
        journal.append(dgs, stream=agent, stream_seqs=range(1, len(dgs) + 1), appended_ns=appended_ns)
    return journal


async def run_until(sink: Any, journal: DurableLog, *, limit: float = 60.0) -> None:
    """Run ``sink`` until its committed position reaches the journal's end, then stop it."""
    target = journal.last_seq()
    tasks = TaskSet()
    task = tasks.spawn(sink.run(journal, JournalNotify(journal.last_seq())), name="sink")
    try:
        async with asyncio.timeout(limit):
            while sink.cursor < target or not sink.running:
                if task.done():
                    task.result()
                    raise AssertionError("sink stopped on its own")
                await asyncio.sleep(0.02)
    finally:
        await tasks.close()


def parquet_rows(out: Path, sql: str = ALL_SQL) -> list[list[object]]:
    with open_parquet_query(out, sql) as result:
        return list(result.rows)


def store_rows(data: Path, sql: str = ALL_SQL) -> list[list[object]]:
    with open_query(data, sql) as result:
        return list(result.rows)


def store_sink(data: Path) -> StoreSink:
    return StoreSink(data_dir=data, query_socket=False, batch_interval=0.0)


def fast(out: Path, **kw: Any) -> ParquetSink:
    settings: dict[str, Any] = {"out": out, "flush_interval": 0.0}
    settings.update(kw)
    return ParquetSink(**settings)


# --- names ------------------------------------------------------------------------------------------------


def test_file_names_carry_the_range_and_the_writer() -> None:
    assert file_name(7, 42, "host-2") == "flows-7-42-host-2.parquet"
    assert parse_file_name("flows-7-42-host-2.parquet") == (7, 42, "host-2")
    assert parse_file_name("flows-7-42-parquet-3-of-4.parquet") == (7, 42, "parquet-3-of-4")
    for foreign in ("flows-7-42.parquet", "flows-9-3-w.parquet", "flows-0-3-w.parquet", ".tmp-7-42-w.parquet",
                    "flows-7-42-w.parquet.tmp", "part-0.parquet"):
        assert parse_file_name(foreign) is None, foreign
    with pytest.raises(ValueError, match="empty"):
        file_name(5, 4, "w")
    assert partition(T0) == "day=2026-12-06/hour=21"
    assert partition(T0 + 3 * HOUR_NS) == "day=2026-12-07/hour=00"


def test_shards_split_the_agents() -> None:
    agents = [f"site-{i}" for i in range(200)]
    parts = [{a for a in agents if in_shard(a, (i, 3))} for i in (1, 2, 3)]
    assert set().union(*parts) == set(agents)
    assert sum(len(p) for p in parts) == len(agents)
    assert all(parts)


def test_bad_writer_names_and_shards_are_refused(tmp_path: Path) -> None:
    from flowtunnel.errors import ConfigError

    for bad in ("", "a/b", "-x", "a.b", "x" * 65):
        with pytest.raises(ConfigError, match="writer name"):
            ParquetSink(out=tmp_path, writer=bad)
    with pytest.raises(ConfigError, match="shard 3/2"):
        ParquetSink(out=tmp_path, shard=(3, 2))


# --- the same rows as the store ----------------------------------------------------------------------------


async def test_parquet_answers_the_same_sql_as_the_duckdb_store(tmp_path: Path) -> None:
    dgs = demo_datagrams()
    journal = journal_of(tmp_path / "j.sqlite", {"site-a": dgs, "site-b": dgs[:60]}, appended_ns=T0 + 5)
    try:
        await run_until(store_sink(tmp_path / "data"), journal)
        await run_until(fast(tmp_path / "pq", flush_records=100, read_limit=50), journal)
    finally:
        journal.close()
    want = store_rows(tmp_path / "data")
    assert len(want) > 100
    assert parquet_rows(tmp_path / "pq") == want
    files = scan_files(tmp_path / "pq", "parquet")
    assert len(files) > 1  # several files, contiguous ranges, the whole journal
    assert files[0].first == 1
    assert files[-1].last <= journal.last_seq()
    assert all(a.last + 1 == b.first for a, b in itertools.pairwise(files))
    assert {f.path.parent.relative_to(tmp_path / "pq").as_posix() for f in files} == {
        "day=2026-12-06/hour=21"}
    sql = ("SELECT agent, protocol, count(*), sum(bytes), min(received), max(flow_end) FROM flows "
           "GROUP BY ALL ORDER BY ALL")
    assert parquet_rows(tmp_path / "pq", sql) == store_rows(tmp_path / "data", sql)
    with open_parquet_query(tmp_path / "pq", "SELECT * FROM flows LIMIT 0") as pq, \
            open_query(tmp_path / "data", "SELECT * FROM flows LIMIT 0") as st:
        assert (pq.columns, pq.types) == (st.columns, st.types)


async def test_a_batch_is_cut_where_the_hour_changes(tmp_path: Path) -> None:
    journal = DurableLog(LogConfig(path=tmp_path / "j.sqlite", quota_bytes=0))
    try:
        for seq in range(1, 5):
            journal.append([_v9(seq, template=seq == 1, records=2)], stream="a", stream_seqs=[seq],
                           appended_ns=T0 + HOUR_NS - 1 if seq < 3 else T0 + HOUR_NS)
        await run_until(fast(tmp_path / "pq"), journal)
    finally:
        journal.close()
    files = scan_files(tmp_path / "pq", "parquet")
    by_hour = {f.path.parent.name: f for f in files}
    assert set(by_hour) == {"hour=21", "hour=22"}
    hours = parquet_rows(tmp_path / "pq", "SELECT DISTINCT hour(received) FROM flows ORDER BY 1")
    assert hours == [[21], [22]]
    assert [(f.first, f.last) for f in files] == [(1, 2), (3, 4)]


def test_an_empty_store_is_an_empty_flows_view(tmp_path: Path) -> None:
    assert parquet_rows(tmp_path, "SELECT count(*) FROM flows") == [[0]]


# --- crash recovery ----------------------------------------------------------------------------------------

_TEMPLATE = Template(template_id=300, fields=(
    FieldSpec(8, 4), FieldSpec(12, 4), FieldSpec(7, 2), FieldSpec(11, 2), FieldSpec(4, 1), FieldSpec(1, 4),
    FieldSpec(2, 4),
))


def _v9(seq: int, *, template: bool, records: int) -> Datagram:
    rows = [
        {"sourceIPv4Address": f"10.0.{seq}.{i}", "destinationIPv4Address": "192.0.2.9",
         "sourceTransportPort": 1000 + i, "destinationTransportPort": 443, "protocolIdentifier": 6,
         "octetDeltaCount": 100 * (i + 1), "packetDeltaCount": i + 1}
        for i in range(records)
    ]
    payload = encode_v9(templates=[_TEMPLATE] if template else [], data=[(_TEMPLATE, rows)],
                        sys_uptime_ms=10_000 + seq, unix_secs=1_790_000_000, sequence=seq, source_id=1)
    return Datagram(received_ns=T0 + seq, exporter="192.0.2.1", exporter_port=40000, local_port=2055,
                    payload=payload)


class _Died(BaseException):
    """Stands for the process dying (kill -9) at that point: nothing after it runs."""


async def test_a_crash_between_the_rename_and_the_state_writes_nothing_twice(tmp_path: Path) -> None:
    # Only the first datagram carries the template: after the crash the sink must rebuild it from the entries
    # a file already holds (decoded again, rows dropped), or later data would not decode.
    journal = DurableLog(LogConfig(path=tmp_path / "j.sqlite", quota_bytes=0))
    out = tmp_path / "pq"
    try:
        journal.append([_v9(0, template=True, records=3)], stream="a", stream_seqs=[1], appended_ns=T0)
        journal.append([_v9(1, template=False, records=4)], stream="a", stream_seqs=[2], appended_ns=T0)
        await run_until(fast(out, read_limit=1, flush_records=1), journal)
        assert [(f.first, f.last) for f in scan_files(out, "parquet")] == [(1, 1), (2, 2)]
        journal.append([_v9(2, template=False, records=5)], stream="a", stream_seqs=[3], appended_ns=T0)
        # The next file is renamed into place, then the process dies before its state (and so its position)
        # is written.
        dying = fast(out, read_limit=1, flush_records=1)

        def die(seq: int) -> None:
            raise _Died
        dying._write_state = die  # type: ignore[method-assign]
        tasks = TaskSet()
        task = tasks.spawn(dying.run(journal, JournalNotify(journal.last_seq())), name="dying")
        with pytest.raises(_Died):
            await asyncio.wait_for(task, 30)
        await tasks.close()
        assert [(f.first, f.last) for f in scan_files(out, "parquet")] == [(1, 1), (2, 2), (3, 3)]
        assert journal.cursor("parquet") == 2
        journal.append([_v9(3, template=False, records=6)], stream="a", stream_seqs=[4], appended_ns=T0)
        again = fast(out, read_limit=1, flush_records=1)
        await run_until(again, journal)
    finally:
        journal.close()
    assert again.replayed == 1
    assert [(f.first, f.last) for f in scan_files(out, "parquet")] == [(1, 1), (2, 2), (3, 3), (4, 4)]
    counts = parquet_rows(out, "SELECT split_part(src_addr, '.', 3)::INT AS seq, count(*) FROM flows "
                          "GROUP BY 1 ORDER BY 1")
    assert counts == [[0, 3], [1, 4], [2, 5], [3, 6]]
    state = json.loads((out / "_flowtunnel" / "parquet.json").read_text())
    assert state["seq"] == 4
    exporters = cast(list[dict[str, Any]], again.status()["exporters"])
    [exporter] = exporters
    assert exporter["records"] == 3 + 4 + 5 + 6  # the replayed entry counted once
    assert exporter["no_template_sets"] == 0


async def test_a_failed_write_is_retried_and_loses_nothing(tmp_path: Path) -> None:
    from flowtunnel.store.errors import StoreError

    dgs = demo_datagrams()
    journal = journal_of(tmp_path / "j.sqlite", {"site-a": dgs}, appended_ns=T0)
    sink = fast(tmp_path / "pq", flush_records=100, read_limit=50, retry_delay=0.01)
    real = sink._write_file
    calls: list[int] = []

    def flaky(batch: Any) -> None:
        calls.append(batch.first)
        if len(calls) == 2:  # the disk is full once, after a first file
            raise StoreError("parquet sink parquet: writing ... failed: No space left on device")
        real(batch)
    sink._write_file = flaky  # type: ignore[method-assign]
    try:
        await run_until(store_sink(tmp_path / "data"), journal)
        await run_until(sink, journal)
    finally:
        journal.close()
    status = sink.status()
    assert (status["commit_failures"], status["failing_since"]) == (1, None)
    assert "No space left" in str(status["last_error"])
    assert calls[1] == calls[2]  # the same range again, after reloading the state
    assert parquet_rows(tmp_path / "pq") == store_rows(tmp_path / "data")


async def test_a_lost_state_resumes_after_the_journals_position(tmp_path: Path) -> None:
    journal = DurableLog(LogConfig(path=tmp_path / "j.sqlite", quota_bytes=0))
    out = tmp_path / "pq"
    try:
        for seq in (1, 2):
            journal.append([_v9(seq, template=True, records=2)], stream="a", stream_seqs=[seq],
                           appended_ns=T0)
        await run_until(fast(out), journal)
        journal.trim(2)  # consumed: gone from the journal
        (out / "_flowtunnel" / "parquet.json").unlink()
        journal.append([_v9(3, template=True, records=3)], stream="a", stream_seqs=[3], appended_ns=T0)
        again = fast(out)
        await run_until(again, journal)
    finally:
        journal.close()
    assert [(f.first, f.last) for f in scan_files(out, "parquet")] == [(1, 2), (3, 3)]
    assert parquet_rows(out, "SELECT count(*) FROM flows") == [[2 + 2 + 3]]


async def test_a_write_interrupted_before_its_rename_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "pq"
    partial = out / "day=2026-12-06" / "hour=21" / ".tmp-1-9-parquet.parquet"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"PAR1 half a file")
    journal = journal_of(tmp_path / "j.sqlite", {"a": demo_datagrams()[:30]}, appended_ns=T0)
    try:
        await run_until(fast(out), journal)
    finally:
        journal.close()
    assert not partial.exists()
    assert parquet_rows(out, "SELECT count(*) > 0 FROM flows") == [[True]]


async def test_writers_with_their_shards_write_disjoint_files_holding_every_flow(tmp_path: Path) -> None:
    dgs = demo_datagrams()
    agents = {f"site-{i}": dgs[: 20 + 10 * i] for i in range(6)}
    journal = journal_of(tmp_path / "j.sqlite", agents, appended_ns=T0)
    out = tmp_path / "pq"
    try:
        await run_until(store_sink(tmp_path / "data"), journal)
        for i in (1, 2):
            await run_until(fast(out, writer=f"w{i}", shard=(i, 2)), journal)
    finally:
        journal.close()
    per_writer = [parquet_rows(out, "SELECT DISTINCT agent FROM "
                               f"read_parquet('{out}/*/*/flows-*-w{i}.parquet') ORDER BY 1") for i in (1, 2)]
    assert per_writer[0]
    assert per_writer[1]
    assert not {a[0] for a in per_writer[0]} & {a[0] for a in per_writer[1]}
    assert parquet_rows(out) == store_rows(tmp_path / "data")


# --- the command line --------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flowtunnel", *args], capture_output=True, text=True,
                          timeout=120, check=False)


async def test_query_parquet_on_the_command_line_matches_query_data(tmp_path: Path) -> None:
    dgs = demo_datagrams()
    journal = journal_of(tmp_path / "j.sqlite", {"site-a": dgs}, appended_ns=T0)
    try:
        await run_until(store_sink(tmp_path / "data"), journal)
        await run_until(fast(tmp_path / "pq"), journal)
    finally:
        journal.close()
    for extra in ([], ["--filter", "proto tcp and dst port 443"]):
        sql = "SELECT src_addr, dst_addr, dst_port, sum(bytes) AS b FROM flows GROUP BY ALL ORDER BY ALL"
        want = _cli("query", "--data", str(tmp_path / "data"), *extra, sql)
        got = _cli("query", "--parquet", str(tmp_path / "pq"), *extra, sql)
        assert want.returncode == 0, want.stderr
        assert got.returncode == 0, got.stderr
        assert got.stdout == want.stdout
        assert len(got.stdout.splitlines()) > 2
    top = _cli("top", "--parquet", str(tmp_path / "pq"), "--format", "csv")
    assert top.returncode == 0, top.stderr
    assert top.stdout == _cli("top", "--data", str(tmp_path / "data"), "--format", "csv").stdout


def test_query_parquet_keeps_the_sandbox(tmp_path: Path) -> None:
    (tmp_path / "pq").mkdir()
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    out = _cli("query", "--parquet", str(tmp_path / "pq"), f"SELECT * FROM read_csv('{secret}')")
    assert out.returncode == 1
    assert "disabled by configuration" in out.stderr or "Permission" in out.stderr
    for sql, reason in (("COPY (SELECT 1) TO '/tmp/x.csv'", "read-only"),
                        ("SELECT 1; SELECT 2", "exactly one statement"),
                        ("SELECT current_setting('memory_limit') FROM flows, (SELECT 1) WHERE false "
                         "UNION ALL SELECT 'x' FROM query('SET threads = 64')", "refused")):
        out = _cli("query", "--parquet", str(tmp_path / "pq"), sql)
        assert out.returncode == 1, sql
        assert reason in out.stderr, out.stderr
    both = _cli("query", "--parquet", str(tmp_path / "pq"), "--data", str(tmp_path), "SELECT 1")
    assert both.returncode != 0
    assert "not both" in both.stderr


async def test_duckdb_reads_the_files_without_flowtunnel(tmp_path: Path) -> None:
    """The files are plain Parquet with the store's types (any engine reads them)."""
    journal = journal_of(tmp_path / "j.sqlite", {"a": demo_datagrams()[:20]}, appended_ns=T0)
    try:
        await run_until(fast(tmp_path / "pq", flush_records=10**6), journal)
    finally:
        journal.close()
    [path] = (tmp_path / "pq" / "day=2026-12-06" / "hour=21").glob("flows-*.parquet")
    conn = duckdb.connect()
    described = conn.execute(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM '{path}')")
    types = dict(described.fetchall())
    assert types["received"] == "TIMESTAMP WITH TIME ZONE"
    assert types["bytes"] == "UBIGINT"
    assert types["extra"] == "JSON"



def test_the_parquet_query_path_keeps_the_stores_sandbox(tmp_path: Path) -> None:
    """The guarantees of tests/store/test_query_sandbox.py, on the Parquet path: nothing outside DIR is read,
    nothing is written, no setting changes, no extension, and the memory and time limits hold."""
    out = tmp_path / "pq"
    out.mkdir()
    secret = tmp_path / "registry.sqlite"
    secret.write_bytes(b"SQLite format 3\0 key 00112233445566778899")
    for sql in [f"SELECT content FROM read_blob('{secret}')", f"SELECT content FROM read_text('{secret}')",
                f"SELECT * FROM glob('{tmp_path}/*')", "SELECT * FROM read_csv('/etc/passwd')",
                f"SELECT * FROM read_blob('{out}/../registry.sqlite')", f"FROM '{secret}'",
                "SELECT * FROM read_parquet('http://127.0.0.1:9/x.parquet')"]:
        with pytest.raises(QueryError) as caught:
            parquet_rows(out, sql)
        assert "00112233" not in str(caught.value)
        assert "root:" not in str(caught.value)
    evil = tmp_path / "evil.csv"
    for sql in [f"COPY (SELECT 1) TO '{evil}'", f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{evil}'",
                "SET GLOBAL memory_limit = '64GB'", "SET enable_external_access = true", "INSTALL httpfs",
                "LOAD httpfs", "ATTACH ':memory:' AS m", "CHECKPOINT", "SELECT * FROM query('SELECT 1')"]:
        with pytest.raises(QueryRejected):
            parquet_rows(out, sql)
    assert not evil.exists()
    with pytest.raises(QueryError, match=r"after its 0\.3 s timeout"), \
            open_parquet_query(out, "SELECT count(*) FROM range(100000000000) a", timeout=0.3) as result:
        list(result.rows)
    bomb = "SELECT max(x) FROM (SELECT list(i) AS x FROM range(400000000) t(i))"
    with pytest.raises(QueryError, match=r"Out of Memory.*the store's limit of 64MiB"), \
            open_parquet_query(out, bomb, limits=QueryLimits(memory_limit="64MiB")) as result:
        list(result.rows)


# --- in a gateway ------------------------------------------------------------------------------------------


async def test_a_gateway_runs_the_parquet_sink_from_the_registry(tmp_path: Path) -> None:
    import aiohttp

    from tests.gateway.util import enroll, post_batch, seal, start_gateway

    data, out = tmp_path / "gw", tmp_path / "pq"
    key = enroll(data, "site-a")
    gw = await start_gateway(data, store=True, parquet=out, parquet_flush=0.0, status_interval=0.05)
    try:
        assert [s.name for s in gw.sinks] == ["store", "parquet"]
        dgs = demo_datagrams()
        async with aiohttp.ClientSession() as http:
            for start in range(0, len(dgs), 50):
                status, doc, _ = await post_batch(http, gw.url, seal("site-a", key, start + 1,
                                                                    dgs[start : start + 50]), agent="site-a")
                assert status == 200, doc
        assert gw.journal is not None
        last = gw.journal.last_seq()
        sinks = {s.name: s for s in gw.sinks}

        def behind() -> bool:
            assert gw.journal is not None
            cursors = [cast(int, sinks[s].status()["cursor"]) for s in ("store", "parquet")]
            # The journal is trimmed once both hold everything.
            return min(cursors) < last or gw.journal.stats().entries > 0

        async with asyncio.timeout(30):
            while behind():  # noqa: ASYNC110 - positions live in the sinks' threads
                await asyncio.sleep(0.05)
    finally:
        await gw.stop()
    assert parquet_rows(out) == store_rows(data)
    assert len(parquet_rows(out)) > 100


def test_sink_options_belong_to_their_kind() -> None:
    nats = ("--journal", "nats://127.0.0.1:9")
    wrong = _cli("sink", "jsonl", *nats, "--data", "/nonexistent", "--shard", "1/2")
    assert wrong.returncode == 2
    assert "sink jsonl does not take --shard (it takes: --output)" in wrong.stderr
    no_out = _cli("sink", "parquet", "--journal", "nats://127.0.0.1:9")
    assert no_out.returncode == 2
    assert "sink parquet needs --out DIR" in no_out.stderr
    bad = _cli("sink", "parquet", *nats, "--out", "/nonexistent", "--shard", "3/2")
    assert bad.returncode == 2
    assert "--shard '3/2' is not I/N" in bad.stderr
