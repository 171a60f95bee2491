"""The store sink: each record the exporter sent lands in DuckDB exactly once; loss and errors counted."""

from __future__ import annotations

import datetime as dt
import logging
import time
from pathlib import Path
from typing import Any

import duckdb
import pytest

from flowtunnel.datagram import Datagram
from flowtunnel.gateway.notify import JournalNotify
from flowtunnel.gateway.status import render as render_gateway
from flowtunnel.log import DurableLog, LogConfig
from flowtunnel.netflow import FieldSpec, Template, encode_v9
from flowtunnel.runtime import TaskSet
from flowtunnel.store import StoreSink
from flowtunnel.store.errors import StoreError
from tests.agent.conftest import eventually
from tests.conftest import require
from tests.peers import SoftflowdExport, TraceSummary, capture_softflowd
from tests.store._support import (
    agent_stats,
    exporter_multiset,
    exporter_stats,
    fill_journal,
    normalise_ports,
    run_sink_until,
    store_multiset,
    to_datagrams,
)


@pytest.fixture(scope="module", params=[5, 9, 10], ids=["v5", "v9", "ipfix"])
def export(request: pytest.FixtureRequest, trace: TraceSummary) -> SoftflowdExport:
    require("softflowd", "tshark")
    return capture_softflowd(trace.path, int(request.param))


async def test_rows_equal_the_exporters_records(export: SoftflowdExport, tmp_path: Path) -> None:
    expected = exporter_multiset(export.datagrams, tmp_path)
    assert sum(expected.values()) == export.stats.records
    journal = fill_journal(tmp_path / "journal.sqlite", to_datagrams(export.datagrams))
    sink = StoreSink(data_dir=tmp_path / "data", batch_records=500)
    await run_sink_until(sink, journal)

    assert normalise_ports(store_multiset(sink.paths.database)) == normalise_ports(expected)
    assert journal.cursor("store") == journal.last_seq()
    [exporter] = exporter_stats(sink).values()
    assert exporter["records"] == export.stats.records
    assert exporter["undecodable"] == 0
    assert exporter["version"] == export.version
    [agent] = agent_stats(sink).values()
    assert agent["transit_lost"] == 0
    journal.close()


async def test_flow_times_are_absolute_utc(export: SoftflowdExport, tmp_path: Path) -> None:
    journal = fill_journal(tmp_path / "journal.sqlite", to_datagrams(export.datagrams))
    sink = StoreSink(data_dir=tmp_path / "data")
    await run_sink_until(sink, journal)
    journal.close()
    conn = duckdb.connect(str(sink.paths.database), read_only=True)
    missing, backwards, spread = conn.execute(
        "SELECT count(*) FILTER (flow_start IS NULL OR flow_end IS NULL), "
        "count(*) FILTER (flow_end < flow_start), max(flow_end) - min(flow_start) FROM flows"
    ).fetchone()  # type: ignore[misc]
    conn.close()
    assert missing == 0
    assert backwards == 0
    # The trace spans three minutes; every version must resolve its clock to the same window.
    assert spread < dt.timedelta(minutes=5)


async def test_resumes_after_restart_without_loss_or_duplicates(tmp_path: Path, trace: TraceSummary) -> None:
    require("softflowd", "tshark")
    export = capture_softflowd(trace.path, 9)
    datagrams = to_datagrams(export.datagrams)
    half = len(datagrams) // 2
    journal = fill_journal(tmp_path / "journal.sqlite", datagrams[:half])
    await run_sink_until(StoreSink(data_dir=tmp_path / "data", batch_records=300), journal)
    journal.append(datagrams[half:], stream="site-a", stream_seqs=list(range(half + 1, len(datagrams) + 1)))
    sink = StoreSink(data_dir=tmp_path / "data", batch_records=300)
    await run_sink_until(sink, journal)
    journal.close()
    assert normalise_ports(store_multiset(sink.paths.database)) == normalise_ports(
        exporter_multiset(export.datagrams, tmp_path)
    )


async def test_a_failed_commit_drops_the_batch_decoded_meanwhile_and_loses_nothing(
    tmp_path: Path, trace: TraceSummary, caplog: pytest.LogCaptureFixture
) -> None:
    """Commits overlap the decoding of the next batch: when one fails (disk full), the batch decoded past it
    must be dropped and both redone from DuckDB's state, or its rows would be lost or stored twice."""
    require("softflowd", "tshark")
    export = capture_softflowd(trace.path, 9)
    journal = fill_journal(tmp_path / "journal.sqlite", to_datagrams(export.datagrams))
    sink = StoreSink(data_dir=tmp_path / "data", batch_records=300, read_limit=20, retry_delay=0.05)
    real_open = sink._open
    calls = 0

    def open_with_a_failing_commit() -> None:
        real_open()
        db = sink._db
        assert db is not None
        real_commit = db.commit

        def commit(**kwargs: Any) -> None:
            nonlocal calls
            calls += 1
            if calls == 3:  # batches 1-2 stored, batch 4 already being decoded
                raise StoreError("flow store: commit of cursor 0 failed: injected disk full")
            real_commit(**kwargs)

        db.commit = commit  # type: ignore[method-assign]

    sink._open = open_with_a_failing_commit  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="flowtunnel.store"):
        await run_sink_until(sink, journal)
    journal.close()
    assert sink.commit_failures == 1
    assert calls > 4
    assert "injected disk full; reloading the last committed state" in caplog.text
    assert normalise_ports(store_multiset(sink.paths.database)) == normalise_ports(
        exporter_multiset(export.datagrams, tmp_path)
    )
    [exporter] = exporter_stats(sink).values()
    assert exporter["records"] == export.stats.records  # counters not doubled by the redone batch


_TEMPLATE = Template(
    300,
    (FieldSpec(8, 4), FieldSpec(12, 4), FieldSpec(7, 2), FieldSpec(11, 2), FieldSpec(4, 1), FieldSpec(1, 8),
     FieldSpec(2, 8)),
)


def _v9(seq: int, *, template: bool, records: int, base: int) -> bytes:
    rows = [
        {"sourceIPv4Address": f"10.0.0.{base + i}", "destinationIPv4Address": "192.0.2.9",
         "sourceTransportPort": 1000 + i, "destinationTransportPort": 443, "protocolIdentifier": 6,
         "octetDeltaCount": 100 * (i + 1), "packetDeltaCount": i + 1}
        for i in range(records)
    ]
    return encode_v9(templates=[_TEMPLATE] if template else [], data=[(_TEMPLATE, rows)],
                     sys_uptime_ms=10_000 + seq, unix_secs=1_790_000_000, sequence=seq, source_id=1)


def _dg(payload: bytes, *, exporter: str = "192.0.2.1", received_ns: int | None = None) -> Datagram:
    return Datagram(received_ns=received_ns or time.time_ns(), exporter=exporter, exporter_port=40000,
                    local_port=2055, payload=payload)


async def test_templates_survive_a_restart(tmp_path: Path) -> None:
    # The template comes once, in the first datagram; data after the restart must still decode.
    journal = fill_journal(tmp_path / "journal.sqlite", [_dg(_v9(0, template=True, records=3, base=0))])
    await run_sink_until(StoreSink(data_dir=tmp_path / "data"), journal)
    journal.append([_dg(_v9(1, template=False, records=4, base=10))], stream="site-a", stream_seqs=[2])
    sink = StoreSink(data_dir=tmp_path / "data")
    await run_sink_until(sink, journal)
    journal.close()
    conn = duckdb.connect(str(sink.paths.database), read_only=True)
    got = conn.execute("SELECT count(*), sum(bytes) FROM flows").fetchone()
    conn.close()
    assert got == (7, 100 + 200 + 300 + 100 + 200 + 300 + 400)
    [exporter] = exporter_stats(sink).values()
    assert exporter["no_template_sets"] == 0
    assert exporter["sequence_lost"] == 0


async def test_bad_input_is_counted_per_exporter_and_the_rest_stored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    datagrams = [
        _dg(b"\x00\x09garbage"),
        _dg(_v9(0, template=True, records=2, base=0)),
        _dg(b"\x00\x63" + bytes(30), exporter="192.0.2.7"),  # version 99
        _dg(_v9(1, template=False, records=1, base=5), exporter="192.0.2.8"),  # no template ever
        _dg(_v9(5, template=False, records=2, base=9)),  # 4 export packets lost upstream
    ]
    journal = fill_journal(tmp_path / "journal.sqlite", datagrams)
    sink = StoreSink(data_dir=tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="flowtunnel.store"):
        await run_sink_until(sink, journal)
    journal.close()
    stats = exporter_stats(sink)
    assert stats["192.0.2.1"]["undecodable"] == 1
    assert stats["192.0.2.1"]["records"] == 4
    assert stats["192.0.2.1"]["sequence_lost"] == 4
    assert stats["192.0.2.7"]["undecodable"] == 1
    assert stats["192.0.2.8"]["no_template_sets"] == 1
    assert stats["192.0.2.8"]["records"] == 0
    assert "undecodable datagram from agent site-a exporter 192.0.2.1" in caplog.text
    conn = duckdb.connect(str(sink.paths.database), read_only=True)
    persisted = conn.execute(
        "SELECT exporter, undecodable, no_template_sets, seq_lost FROM exporter_stats ORDER BY exporter"
    ).fetchall()
    conn.close()
    assert persisted == [("192.0.2.1", 1, 0, 4), ("192.0.2.7", 1, 0, 0), ("192.0.2.8", 0, 1, 0)]


async def test_transit_gaps_are_counted_apart_from_exporter_loss(tmp_path: Path) -> None:
    journal = fill_journal(tmp_path / "journal.sqlite", [_dg(_v9(0, template=True, records=1, base=0))])
    # The agent's datagrams 2..4 never reached the gateway (its spool quota dropped them).
    journal.append([_dg(_v9(1, template=False, records=1, base=1))], stream="site-a", stream_seqs=[5])
    sink = StoreSink(data_dir=tmp_path / "data")
    await run_sink_until(sink, journal)
    journal.close()
    [agent] = agent_stats(sink).values()
    assert agent["transit_lost"] == 3
    [exporter] = exporter_stats(sink).values()
    assert exporter["sequence_lost"] == 0


async def test_retention_drops_old_flows_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = time.time_ns() - 3 * 86400 * 10**9
    journal = fill_journal(tmp_path / "journal.sqlite", [
        _dg(_v9(0, template=True, records=3, base=0), received_ns=old),
        _dg(_v9(1, template=False, records=2, base=3)),
    ])
    sink = StoreSink(data_dir=tmp_path / "data", retain_seconds=86400, retention_interval=0.05)
    with caplog.at_level(logging.INFO, logger="flowtunnel.store"):
        await run_sink_until(sink, journal)
        # Retention runs between steps; give it one more turn after the old rows were committed.
        deadline = time.monotonic() + 10
        while sink.retention_dropped < 3 and time.monotonic() < deadline:
            await run_sink_until(sink, journal)
    journal.close()
    assert sink.retention_dropped == 3
    assert "store retention: dropped 3 flows received before" in caplog.text
    conn = duckdb.connect(str(sink.paths.database), read_only=True)
    assert conn.execute("SELECT count(*) FROM flows").fetchone() == (2,)
    conn.close()


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="retain_seconds -1"):
        StoreSink(data_dir=tmp_path, retain_seconds=-1)
    with pytest.raises(ValueError, match="batch_records 0"):
        StoreSink(data_dir=tmp_path, batch_records=0)


async def test_ipv6_exporters_are_stored_by_address(tmp_path: Path) -> None:
    journal = fill_journal(tmp_path / "journal.sqlite", [
        _dg(_v9(0, template=True, records=2, base=0), exporter="2001:db8::7"),
        _dg(_v9(0, template=True, records=1, base=50), exporter="192.0.2.1"),
    ])
    sink = StoreSink(data_dir=tmp_path / "data")
    await run_sink_until(sink, journal)
    journal.close()
    conn = duckdb.connect(str(sink.paths.database), read_only=True)
    rows = conn.execute("SELECT exporter, count(*) FROM flows GROUP BY 1 ORDER BY 1").fetchall()
    conn.close()
    assert rows == [("192.0.2.1", 1), ("2001:db8::7", 2)]
    assert set(exporter_stats(sink)) == {"192.0.2.1", "2001:db8::7"}


async def test_a_sink_whose_every_commit_fails_says_so_in_status(tmp_path: Path) -> None:
    """Issue 17.11: the store sink showed ``running`` while every commit failed."""
    journal = fill_journal(tmp_path / "journal.sqlite", [_dg(_v9(0, template=True, records=3, base=0))])
    sink = StoreSink(data_dir=tmp_path / "data", retry_delay=0.02)
    real_open = sink._open
    failing = True

    def open_with_failing_commits() -> None:
        real_open()
        db = sink._db
        assert db is not None
        real_commit = db.commit

        def commit(**kwargs: Any) -> None:
            if failing:
                raise StoreError("flow store: commit of cursor 1 failed: injected disk full")
            real_commit(**kwargs)

        db.commit = commit  # type: ignore[method-assign]

    sink._open = open_with_failing_commits  # type: ignore[method-assign]
    notify = JournalNotify(journal.last_seq())
    tasks = TaskSet()
    tasks.spawn(sink.run(journal, notify), name="store-sink")
    try:
        await eventually(lambda: sink.commit_failures >= 3, "three failed commits")
        status = sink.status()
        since = status["failing_since"]
        assert isinstance(since, float)
        assert "injected disk full" in str(status["last_error"])
        text = render_gateway({"kind": "gateway", "sinks": {"store": status}}, now=since + 75)
        [line] = [x for x in text.splitlines() if x.strip().startswith("store ") and "failing" not in x]
        assert "FAILING" in line
        assert "running" not in line
        assert "store commits failing since" in text
        assert "(75 s ago)" in text
        failing = False
        await eventually(
            lambda: sink.cursor == journal.last_seq() and sink.status()["failing_since"] is None, "recovered"
        )
        assert "FAILING" not in render_gateway({"kind": "gateway", "sinks": {"store": sink.status()}})
    finally:
        await tasks.close()
        journal.close()


async def test_retention_and_received_use_the_gateways_clock_not_the_agents(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 17.8, with the gateway's ``--retain 300s``: an agent 1 h slow had fresh flows deleted 30 s after
    they arrived; one 2 h fast had its flows kept 2 h too long. ``received`` is the gateway's receive time
    (journaled with the entry), ``agent_received`` the agent's."""
    now = time.time_ns()
    hour = 3600 * 10**9
    journal = DurableLog(LogConfig(path=tmp_path / "journal.sqlite", quota_bytes=0))
    # Just arrived from an agent 1 h slow: its clock says an hour ago.
    journal.append([_dg(_v9(0, template=True, records=3, base=0), received_ns=now - hour)],
                   stream="slow", stream_seqs=[1], appended_ns=now)
    # Arrived 400 s ago (beyond retention) from an agent 2 h fast: its clock says 2 h from now, less 400 s.
    journal.append([_dg(_v9(0, template=True, records=2, base=10), received_ns=now + 2 * hour - 400 * 10**9)],
                   stream="fast", stream_seqs=[1], appended_ns=now - 400 * 10**9)
    sink = StoreSink(data_dir=tmp_path / "data", retain_seconds=300, retention_interval=0.05)
    with caplog.at_level(logging.INFO, logger="flowtunnel.store"):
        await run_sink_until(sink, journal)
        deadline = time.monotonic() + 10
        while sink.retention_dropped < 2 and time.monotonic() < deadline:
            await run_sink_until(sink, journal)
    journal.close()
    assert sink.retention_dropped == 2  # the fast agent's two flows, received 400 s ago by the gateway
    conn = duckdb.connect(str(sink.paths.database), read_only=True)
    rows = conn.execute(
        "SELECT agent, epoch_us(received), epoch_us(agent_received) FROM flows ORDER BY agent"
    ).fetchall()
    conn.close()
    assert rows == [("slow", now // 1000, (now - hour) // 1000)] * 3  # fresh flows of the slow agent kept
