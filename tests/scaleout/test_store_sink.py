"""The store sink as its own process on the shared journal: every record stored once, also after a sink was
stopped between its DuckDB commit and its acknowledgement to the stream."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from flowtunnel.journal.jetstream import parse_journal_url
from flowtunnel.store import StoreSink
from tests.gateway.util import post_batch, seal
from tests.natscluster import NatsCluster
from tests.scaleout.util import (
    consumer_floor,
    demo_datagrams,
    enroll_kv,
    feed_two_gateways,
    read_stream,
    reference_rows,
    run_sink_until,
    sink_position,
    start_shared_gateway,
    store_rows,
)


async def test_store_sink_process_stores_every_record_once(cluster: NatsCluster, tmp_path: Path) -> None:
    dgs = demo_datagrams()
    agents = {"site-a": dgs, "site-b": dgs[:60]}
    last = await feed_two_gateways(cluster.url, tmp_path, agents)
    data = tmp_path / "store"
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "flowtunnel", "sink", "store", "--journal", cluster.url, "--data", str(data)]
    # Run, stop (SIGTERM) mid-way, run again: the second run resumes from DuckDB's position.
    for _ in range(2):
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)  # noqa: ASYNC220
        try:
            deadline = time.monotonic() + 60
            while sink_position(data / "sink-store.json", proc.pid) < last:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, "store sink did not catch up"
                await asyncio.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode()
    got = store_rows(data / "store" / "flows.duckdb")
    assert got == await reference_rows(tmp_path, agents)
    assert sum(got.values()) > 0


async def test_a_sink_stopped_between_commit_and_ack_stores_nothing_twice(
    cluster: NatsCluster, tmp_path: Path
) -> None:
    dgs = demo_datagrams()
    agents = {"site-a": dgs[:80]}
    last = await feed_two_gateways(cluster.url, tmp_path, agents)
    cfg = parse_journal_url(cluster.url, create=False)
    data = tmp_path / "store"

    async def run(*, ack: bool) -> StoreSink:
        # ack=False: the process dies after DuckDB's commit, before the ack
        sink = StoreSink(data_dir=data, query_socket=False, batch_interval=0.0)
        await run_sink_until(sink, cfg, "store", last, ack=ack)
        return sink

    first = await run(ack=False)
    assert first.rows_added > 0
    ci = await consumer_floor(cfg, "store")
    assert ci == 0  # nothing was acknowledged: the whole stream is delivered again
    second = await run(ack=True)
    assert second.rows_added == 0  # all skipped by DuckDB's position
    assert await consumer_floor(cfg, "store") == last
    assert store_rows(data / "store" / "flows.duckdb") == await reference_rows(tmp_path, agents)


async def test_a_sink_reads_large_messages_without_stalling(single: NatsCluster, tmp_path: Path) -> None:
    """Messages near the max payload (one per batch) all reach the reader. (The bench's stall — fetches that
    expired after 50 ms losing large messages in transit until ack_wait — needed a loaded 3-node cluster and
    does not reproduce here; this checks the large-message path, not that stall.)"""
    key = await enroll_kv(single.url, "big")
    gw = await start_shared_gateway(single.url, tmp_path / "g")
    pool = demo_datagrams()
    batch = (pool * 4)[:500]  # ~700 KB: one large message per batch
    try:
        async with aiohttp.ClientSession() as http:
            for n in range(24):
                body = seal("big", key, 1 + n * 500, batch)
                status, doc, _ = await post_batch(http, gw.url, body, agent="big")
                assert status == 200, doc
    finally:
        await gw.stop()
    entries = await read_stream(parse_journal_url(single.url))
    assert [e.stream_seq for e in entries] == list(range(1, 24 * 500 + 1))


async def test_a_sink_process_keeps_its_directory_private_and_refuses_a_loose_one(
    single: NatsCluster, tmp_path: Path
) -> None:
    """Issue 17.5 for ``flowtunnel sink``: its directory holds flows in clear (store/flows.duckdb), like the
    gateway's. Before, it was created with the umask (0755, flows.duckdb 0644) and a group-writable one was
    used as it was."""
    last = await feed_two_gateways(single.url, tmp_path, {"site-a": demo_datagrams()[:20]})
    data = tmp_path / "sink"
    cmd = [sys.executable, "-m", "flowtunnel", "sink", "store", "--journal", single.url, "--data", str(data)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, umask=0o022)  # noqa: ASYNC220
    try:
        deadline = time.monotonic() + 60
        while sink_position(data / "sink-store.json", proc.pid) < last:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "store sink did not catch up"
            await asyncio.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    found = {str(p.relative_to(data)): stat.S_IMODE(p.lstat().st_mode) for p in data.rglob("*")}
    assert "store/flows.duckdb" in found, sorted(found)
    assert "sink-store.json" in found, sorted(found)
    loose = {name: f"{mode:04o}" for name, mode in found.items() if mode & 0o077}
    assert loose == {}
    assert stat.S_IMODE(data.stat().st_mode) == 0o700

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o775)
    refused = subprocess.run(  # noqa: ASYNC221
        [*cmd[:-1], str(shared)], capture_output=True, text=True, timeout=60, check=False
    )
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.count("\n") == 1
    assert "writable by group or others" in refused.stderr
    assert list(shared.iterdir()) == []


async def _refused(cmd: list[str]) -> str:
    """Run ``cmd`` (a sink that must refuse to start): its stderr; fails if it keeps running."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)  # noqa: ASYNC220
    try:
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"a second sink ran beside the first: {cmd}") from None
    assert proc.returncode != 0, err.decode()
    return err.decode()


async def test_a_second_sink_on_the_same_files_exits_naming_the_first(
    single: NatsCluster, tmp_path: Path
) -> None:
    """Issue 15 item 3 for sinks: two store sinks on one directory wrote one DuckDB file (whatever their
    names), two parquet writers of one name one state file. The second is refused in one line naming the
    first's pid; parquet writers of other names (shards) share a directory."""
    last = await feed_two_gateways(single.url, tmp_path, {"site-a": demo_datagrams()[:40]})
    data, out = tmp_path / "store", tmp_path / "pq"
    sink = [sys.executable, "-m", "flowtunnel", "sink"]
    store = [*sink, "store", "--journal", single.url, "--data", str(data)]
    parquet = [*sink, "parquet", "--journal", single.url, "--out", str(out)]
    first = subprocess.Popen(store, stderr=subprocess.PIPE)  # noqa: ASYNC220
    writer = subprocess.Popen([*parquet, "--flush", "0s"], stderr=subprocess.PIPE)  # noqa: ASYNC220
    try:
        deadline = time.monotonic() + 60
        while (sink_position(data / "sink-store.json", first.pid) < last
               or sink_position(out / "sink-parquet.json", writer.pid) < last):
            assert first.poll() is None
            assert writer.poll() is None
            assert time.monotonic() < deadline, "the first sinks did not catch up"
            await asyncio.sleep(0.1)
        err = await _refused([*store, "--name", "store-2"])
        assert err.count("\n") == 1, err
        assert f"is in use by another store sink (pid {first.pid}" in err
        err = await _refused([*parquet, "--data", str(tmp_path / "elsewhere")])
        assert err.count("\n") == 1, err
        assert f"is in use by another parquet sink parquet (pid {writer.pid}" in err
        shard = subprocess.Popen([*parquet, "--name", "parquet-b"], stderr=subprocess.PIPE)  # noqa: ASYNC220
        try:
            while sink_position(out / "sink-parquet-b.json", shard.pid) < last:
                assert shard.poll() is None, shard.stderr.read().decode() if shard.stderr else ""
                assert time.monotonic() < deadline, "another parquet writer did not run"
                await asyncio.sleep(0.1)
        finally:
            shard.send_signal(signal.SIGTERM)
            shard.communicate(timeout=30)
        assert first.poll() is None  # untouched
        assert writer.poll() is None
    finally:
        for proc in (first, writer):
            proc.send_signal(signal.SIGTERM)
            _, err_b = proc.communicate(timeout=30)
            assert proc.returncode == 0, err_b.decode()
