"""``kill -9`` of a gateway while it appends a batch, before it answers: the agent's retry lands on the other
gateway, which stores only what the dead one had not (a duplicate, or the rest of a partly appended batch)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp

from flowtunnel.journal.jetstream import JetStreamJournal, parse_journal_url
from tests.gateway.util import post_batch, seal
from tests.natscluster import NatsCluster
from tests.scaleout.util import demo_datagrams, enroll_kv, read_stream, start_shared_gateway


def _port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def _gateway(url: str, data: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowtunnel", "gateway", "--journal", url, "--data", str(data), "--listen",
         f"127.0.0.1:{port}", "--no-store", "--agent-rate", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            assert proc.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.05)


async def test_kill_9_of_a_gateway_mid_append_then_the_retry_on_another(
    cluster: NatsCluster, tmp_path: Path
) -> None:
    key = await enroll_kv(cluster.url, "a1")
    gw2 = await start_shared_gateway(cluster.url, tmp_path / "g2")
    watcher = JetStreamJournal(parse_journal_url(cluster.url))
    await watcher.open(name="test-watch")
    pool = demo_datagrams()
    big = (pool * 40)[:4000]  # ~5.8 MB of datagrams: several stream messages per batch
    seq, outcomes = 1, []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            for kill_after in (0, 1, 2, 4):  # stream messages seen before the kill
                port = _port()
                proc = _gateway(cluster.url, tmp_path / f"g1-{kill_after}", port)
                body = seal("a1", key, seq, big)
                before = int(str((await watcher.stats())["last_seq"]))
                post = asyncio.ensure_future(post_batch(http, f"http://127.0.0.1:{port}", body, agent="a1"))
                deadline = time.monotonic() + 30
                while not post.done() and time.monotonic() < deadline:
                    last = int(str((await watcher.stats())["last_seq"]))
                    if last - before >= kill_after:
                        break
                    await asyncio.sleep(0.005)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
                answered = False
                with contextlib.suppress(aiohttp.ClientError):
                    status, _, _ = await post
                    answered = status == 200
                stored = int(str((await watcher.stats())["last_seq"])) - before
                # The agent did not get (or cannot trust) an answer: it retries on the other gateway.
                status, doc, _ = await post_batch(http, gw2.url, body, agent="a1")
                assert status == 200, doc
                assert doc["acked"] == seq + len(big) - 1
                assert doc["accepted"] + doc["duplicates"] == len(big)
                outcomes.append((kill_after, answered, stored, doc["accepted"], doc["duplicates"]))
                seq += len(big)
    finally:
        await watcher.close()
        await gw2.stop()
    entries = await read_stream(parse_journal_url(cluster.url))
    counts = Counter(int(e.stream_seq or 0) for e in entries)
    assert sorted(counts) == list(range(1, seq))
    assert set(counts.values()) == {1}, outcomes
    # At least one kill landed mid-append (some of the batch stored by the dead gateway, the rest by gw2).
    partial = any(dup and acc for _, _, _, acc, dup in outcomes)
    assert partial or any(dup == len(big) for *_, dup in outcomes), outcomes
