"""The Parquet sink on the shared journal: every flow in exactly one file after a sink was killed between a
file's rename and its acknowledgement (or at any moment, with kill -9), two writers with their shares of the
agents write disjoint files, and ``query --parquet`` answers like ``query --data`` on a store sink."""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from flowtunnel.journal.jetstream import JetStreamReader, parse_journal_url
from flowtunnel.store.parquet import ParquetSink, scan_files
from flowtunnel.store.query import open_parquet_query
from tests.natscluster import NatsCluster
from tests.scaleout.util import (
    ROW_SQL,
    consumer_floor,
    demo_datagrams,
    feed_two_gateways,
    reference_rows,
    run_sink_until,
    sink_position,
)


def parquet_rows(out: Path) -> Counter[tuple[Any, ...]]:
    with open_parquet_query(out, ROW_SQL) as result:
        return Counter(tuple(r) for r in result.rows)


def _sink_cmd(url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flowtunnel", "sink", *extra, "--journal", url]


async def _until_position(proc: subprocess.Popen[bytes], status: Path, last: int) -> None:
    deadline = time.monotonic() + 60
    while sink_position(status, proc.pid) < last:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, f"sink did not reach {last}: {status}"
        await asyncio.sleep(0.1)


async def test_a_parquet_sink_killed_between_rename_and_ack_writes_nothing_twice(
    cluster: NatsCluster, tmp_path: Path
) -> None:
    dgs = demo_datagrams()
    agents = {"site-a": dgs[:120], "site-b": dgs[:50]}
    last = await feed_two_gateways(cluster.url, tmp_path, agents)
    cfg = parse_journal_url(cluster.url, create=False)
    out = tmp_path / "pq"

    async def run(*, ack: bool) -> ParquetSink:
        # ack=False: the process dies after its files are renamed, before any ack
        sink = ParquetSink(out=out, flush_interval=0.0, flush_records=200, read_limit=100)
        await run_sink_until(sink, cfg, "parquet", last, ack=ack)
        return sink

    first = await run(ack=False)
    files = scan_files(out, "parquet")
    assert first.rows_added > 0
    assert len(files) > 1
    assert await consumer_floor(cfg, "parquet") == 0  # nothing acknowledged: everything is delivered again
    second = await run(ack=True)
    assert second.rows_added == 0  # every range is in a file already
    assert scan_files(out, "parquet") == files
    assert await consumer_floor(cfg, "parquet") == last
    assert parquet_rows(out) == await reference_rows(tmp_path, agents)


async def test_parquet_sink_processes_killed_at_any_moment_keep_every_flow_once(
    cluster: NatsCluster, tmp_path: Path
) -> None:
    dgs = demo_datagrams()
    agents = {"site-a": dgs, "site-b": dgs[:100], "site-c": dgs[:70]}
    last = await feed_two_gateways(cluster.url, tmp_path, agents)
    out = tmp_path / "pq"
    cmd = _sink_cmd(cluster.url, "parquet", "--out", str(out), "--flush", "0s")
    # kill -9 as soon as a new file appears (mid-way: files are written while acknowledgements lag), twice,
    # then run to the end.
    for _ in range(2):
        before = len(scan_files(out, "parquet"))
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)  # noqa: ASYNC220
        try:
            deadline = time.monotonic() + 60
            while len(scan_files(out, "parquet")) == before and sink_position(out / "sink-parquet.json",
                                                                                proc.pid) < last:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
        finally:
            proc.kill()
            proc.communicate(timeout=30)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)  # noqa: ASYNC220
    try:
        await _until_position(proc, out / "sink-parquet.json", last)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    files = scan_files(out, "parquet")
    ranges = [(f.first, f.last) for f in files]
    assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges)), ranges  # no range twice
    assert parquet_rows(out) == await reference_rows(tmp_path, agents)


async def test_two_parquet_writers_and_a_store_sink_agree(cluster: NatsCluster, tmp_path: Path) -> None:
    dgs = demo_datagrams()
    agents = {f"site-{i}": dgs[: 40 + 20 * i] for i in range(5)}
    last = await feed_two_gateways(cluster.url, tmp_path, agents)
    out = tmp_path / "pq"
    procs = {
        "parquet-1-of-2": subprocess.Popen(  # noqa: ASYNC220
            _sink_cmd(cluster.url, "parquet", "--out", str(out), "--shard", "1/2", "--flush", "0s"),
            stderr=subprocess.PIPE),
        "parquet-2-of-2": subprocess.Popen(  # noqa: ASYNC220
            _sink_cmd(cluster.url, "parquet", "--out", str(out), "--shard", "2/2", "--flush", "0s"),
            stderr=subprocess.PIPE),
        "store": subprocess.Popen(  # noqa: ASYNC220
            _sink_cmd(cluster.url, "store", "--data", str(tmp_path / "store")), stderr=subprocess.PIPE),
    }
    try:
        for name, proc in procs.items():
            status = (tmp_path / "store" if name == "store" else out) / f"sink-{name}.json"
            await _until_position(proc, status, last)
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err.decode()
    writers = [scan_files(out, w) for w in ("parquet-1-of-2", "parquet-2-of-2")]
    assert writers[0]
    assert writers[1]
    agents_of = []
    for w in ("parquet-1-of-2", "parquet-2-of-2"):
        sql = f"SELECT DISTINCT agent FROM read_parquet('{out}/*/*/flows-*-{w}.parquet')"
        with open_parquet_query(out, sql) as result:
            agents_of.append({r[0] for r in result.rows})
    assert not agents_of[0] & agents_of[1]
    assert agents_of[0] | agents_of[1] == set(agents)
    assert parquet_rows(out) == await reference_rows(tmp_path, agents)

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "flowtunnel", "query", *args], capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    sql = "SELECT * FROM flows ORDER BY ALL"
    want = await asyncio.to_thread(cli, "--data", str(tmp_path / "store"), sql)
    assert len(want.splitlines()) > 100
    assert await asyncio.to_thread(cli, "--parquet", str(out), sql) == want
    flt = ("--filter", "proto udp or dst port 443",
           "SELECT agent, count(*), sum(bytes) FROM flows GROUP BY 1 ORDER BY 1")
    assert await asyncio.to_thread(cli, "--parquet", str(out), *flt) == \
        await asyncio.to_thread(cli, "--data", str(tmp_path / "store"), *flt)


async def test_reading_ahead_acknowledges_nothing(single: NatsCluster, tmp_path: Path) -> None:
    """A sink reads past what it committed (parquet gathers several reads into a file; the store decodes the
    next batch during a commit): only ``commit_cursor`` may acknowledge, or a crash loses what was read."""
    dgs = demo_datagrams()
    last = await feed_two_gateways(single.url, tmp_path, {"a": dgs[:100]})
    cfg = parse_journal_url(single.url, create=False)
    reader = JetStreamReader(cfg, "ahead")
    await reader.open()
    try:
        after = 0
        while after < last:
            got = await asyncio.to_thread(reader.read, after, 20)
            if got:
                after = got[-1].seq
        await asyncio.sleep(0.5)  # the acker runs on this loop
        assert reader.status()["acked"] == 0
        reader.commit_cursor("ahead", 2)
        for _ in range(50):
            if reader.status()["acked"] == 2:
                break
            await asyncio.sleep(0.05)
        assert reader.status()["acked"] == 2
    finally:
        await reader.close()
    assert await consumer_floor(cfg, "ahead") == 2
