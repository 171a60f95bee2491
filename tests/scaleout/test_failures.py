"""The shared journal when things go wrong: a full stream, NATS down, a long silence, a dead stream leader,
wrong credentials or no stream at start-up (a real JetStream cluster on loopback)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections import Counter
from pathlib import Path

import aiohttp

from flowtunnel.datagram import Datagram
from flowtunnel.journal.jetstream import JetStreamReader, parse_journal_url
from tests.gateway.util import post_batch, seal
from tests.natscluster import NatsCluster
from tests.scaleout.util import enroll_kv, read_stream, start_shared_gateway


def _dgs(n: int, start: int, size: int = 1000) -> list[Datagram]:
    return [
        Datagram(received_ns=1_700_000_000_000_000_000 + i, exporter="192.0.2.1", exporter_port=2055,
                 local_port=2055, payload=(f"dg-{i}:".encode() * size)[:size])
        for i in range(start, start + n)
    ]


def _exactly_once(entries: list, agents: dict[str, int]) -> None:  # type: ignore[type-arg]
    counts = Counter((e.stream, e.stream_seq) for e in entries)
    want = {(a, s) for a, last in agents.items() for s in range(1, last + 1)}
    assert set(counts) == want
    assert set(counts.values()) == {1}
    for agent in agents:
        seqs = [e.stream_seq for e in entries if e.stream == agent]
        assert seqs == sorted(seqs)  # in order per agent


async def test_full_stream_answers_503_then_drains_once_a_sink_consumed(
    single: NatsCluster, tmp_path: Path
) -> None:
    key = await enroll_kv(single.url, "a1")
    gw = await start_shared_gateway(single.url, tmp_path / "g", journal_quota=1 << 20)
    cfg = parse_journal_url(single.url, create=False)
    reader = JetStreamReader(cfg, "store")
    await reader.open()
    try:
        async with aiohttp.ClientSession() as http:
            seq, refused = 1, None
            for _ in range(40):
                status, doc, headers = await post_batch(http, gw.url, seal("a1", key, seq, _dgs(100, seq)),
                                                        agent="a1")
                if status != 200:
                    refused = (status, doc, headers)
                    break
                seq += 100
            assert refused is not None, "the 1 MiB stream never filled"
            status, doc, headers = refused
            assert status == 503, doc
            assert doc["error"] == "journal-full"
            assert int(headers["Retry-After"]) > 0
            # The agent keeps the batch (spools) and tries again; a sink consumes, the gateway trims.
            got = await asyncio.to_thread(reader.read, 0, 100_000, 64 << 20)
            while got:
                reader.commit_cursor("store", got[-1].seq)
                got = await asyncio.to_thread(reader.read, got[-1].seq, 100_000, 64 << 20)
            for _ in range(100):
                status, doc, _ = await post_batch(http, gw.url, seal("a1", key, seq, _dgs(100, seq)),
                                                  agent="a1")
                if status == 200:
                    break
                await asyncio.sleep(0.1)
            assert status == 200, doc
            last = seq + 99
            assert doc["acked"] == last
    finally:
        await reader.close()
        await gw.stop()
    # Everything acknowledged is there once: trimmed entries were consumed, the rest is in the stream.
    assert gw.metrics.rejects_by_cause.get("journal-full", 0) >= 1


async def test_nats_down_answers_503_with_retry_after_and_nothing_is_lost(
    cluster: NatsCluster, tmp_path: Path
) -> None:
    key = await enroll_kv(cluster.url, "a1")
    gw = await start_shared_gateway(cluster.url, tmp_path / "g", journal_timeout=1.0)
    # Every request is bounded: a gateway that never answers fails here with the nodes' logs, not at the
    # suite's timeout.
    limit = aiohttp.ClientTimeout(total=30)
    try:
        async with aiohttp.ClientSession(timeout=limit) as http:
            status, doc, _ = await post_batch(http, gw.url, seal("a1", key, 1, _dgs(10, 1)), agent="a1")
            assert (status, doc.get("acked")) == (200, 10), doc
            for node in cluster.nodes:
                cluster.kill(node.name)
            status, doc, headers = await post_batch(http, gw.url, seal("a1", key, 11, _dgs(10, 11)),
                                                    agent="a1")
            assert status == 503, doc
            assert doc["error"] == "journal-error"
            assert int(headers["Retry-After"]) > 0
            for node in cluster.nodes:
                cluster.start_node(node.name)
            await asyncio.to_thread(cluster.wait_ready, 60.0)
            deadline = asyncio.get_running_loop().time() + 120
            answers: Counter[int] = Counter()
            while True:
                try:
                    status, doc, _ = await post_batch(http, gw.url, seal("a1", key, 11, _dgs(10, 11)),
                                                      agent="a1")
                except TimeoutError:
                    raise AssertionError(f"the gateway did not answer within 30 s after the cluster came "
                                         f"back (answers so far {dict(answers)}):\n{cluster.log_tails()}") \
                        from None
                answers[status] += 1
                if status == 200:
                    break
                assert status == 503, doc
                assert asyncio.get_running_loop().time() < deadline, \
                    f"still 503 two minutes after the cluster came back ({doc}):\n{cluster.log_tails()}"
                await asyncio.sleep(0.2)
            assert (status, doc.get("acked")) == (200, 20), doc
            # The registry's watch outlived the cluster restart: an agent enrolled now is let in.
            key2 = await enroll_kv(cluster.url, "a2")
            while True:
                status, doc, _ = await post_batch(http, gw.url, seal("a2", key2, 1, _dgs(3, 1)), agent="a2")
                if status == 200:
                    break
                assert asyncio.get_running_loop().time() < deadline + 30, \
                    f"an agent enrolled after the restart is still refused ({status} {doc})"
                await asyncio.sleep(0.2)
    finally:
        async with asyncio.timeout(60):
            await gw.stop()
    _exactly_once(await read_stream(parse_journal_url(cluster.url)), {"a1": 20, "a2": 3})


async def test_agent_silent_longer_than_the_stream_keeps_its_messages(
    single: NatsCluster, tmp_path: Path
) -> None:
    """The agent's messages aged out of the stream (max age 2 s, duplicate window 1 s): the mark comes from
    the KV bucket, so a re-sent batch is still a duplicate, for this gateway and for a new one."""
    key = await enroll_kv(single.url, "quiet")
    gw = await start_shared_gateway(single.url, tmp_path / "g1", journal_max_age=2.0)
    assert gw.shared_journal is not None
    try:
        async with aiohttp.ClientSession() as http:
            status, doc, _ = await post_batch(http, gw.url, seal("quiet", key, 1, _dgs(5, 1)), agent="quiet")
            assert (status, doc["acked"]) == (200, 5)
            await asyncio.sleep(0.5)  # the mark reaches the bucket
            deadline = asyncio.get_running_loop().time() + 30
            while (await gw.shared_journal.stats())["messages"]:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.2)
            gw2 = await start_shared_gateway(single.url, tmp_path / "g2")
            try:
                for target in (gw2, gw):
                    gw.shared_journal.forget("quiet")
                    gw.ingest._hwm.clear()  # type: ignore[union-attr]
                    status, doc, _ = await post_batch(http, target.url, seal("quiet", key, 1, _dgs(5, 1)),
                                                      agent="quiet")
                    assert (status, doc["acked"], doc["accepted"], doc["duplicates"]) == (200, 5, 0, 5)
                status, doc, _ = await post_batch(http, gw2.url, seal("quiet", key, 6, _dgs(2, 6)),
                                                  agent="quiet")
                assert (status, doc["acked"], doc["accepted"]) == (200, 7, 2)
            finally:
                await gw2.stop()
    finally:
        await gw.stop()


async def test_kill_9_of_the_stream_leader_mid_publish(cluster: NatsCluster, tmp_path: Path) -> None:
    """Two agents post through two gateways while the stream's leader is killed: every batch is eventually
    acknowledged (503s are retried as an agent does) and the stream holds each datagram once, in order."""
    keys = {a: await enroll_kv(cluster.url, a) for a in ("a1", "a2")}
    gws = [await start_shared_gateway(cluster.url, tmp_path / f"g{i}") for i in (1, 2)]
    assert gws[0].shared_journal is not None
    batches = 30

    async def agent(http: aiohttp.ClientSession, name: str) -> None:
        seq = 1
        for n in range(batches):
            body = seal(name, keys[name], seq, _dgs(10, seq, 100))
            for attempt in range(300):
                gw = gws[(n + attempt) % 2]  # after a failure, the agent tries the other gateway
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    status, doc, _ = await post_batch(http, gw.url, body, agent=name)
                    if status == 200:
                        assert doc["acked"] == seq + 9
                        break
                    assert status == 503, doc
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"{name}: batch {n} never acknowledged")
            seq += 10

    async def killer() -> None:
        await asyncio.sleep(0.3)
        info = await gws[0].shared_journal.js.stream_info("FLOWTUNNEL")  # type: ignore[union-attr]
        leader = info.cluster.leader
        cluster.kill(leader)
        await asyncio.sleep(2.0)
        cluster.start_node(leader)

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            await asyncio.gather(agent(http, "a1"), agent(http, "a2"), killer())
    finally:
        for gw in gws:
            await gw.stop()
    _exactly_once(await read_stream(parse_journal_url(cluster.url)), {"a1": 10 * batches, "a2": 10 * batches})


def test_wrong_credentials_and_a_missing_stream_are_one_line_errors(tmp_path: Path) -> None:
    from tests.scaleout.conftest import _binary

    with NatsCluster(tmp_path / "auth", size=1, binary=_binary(), user="ft", password="right-pw") as c:
        port = c.nodes[0].client_port
        bad = f"nats://ft:wrong-pw@127.0.0.1:{port}"
        runs = [
            [sys.executable, "-m", "flowtunnel", "gateway", "--journal", bad, "--data", str(tmp_path / "g"),
             "--listen", "127.0.0.1:0"],
            [sys.executable, "-m", "flowtunnel", "sink", "store", "--journal",
             f"nats://ft:right-pw@127.0.0.1:{port}", "--data", str(tmp_path / "s")],
        ]
        outs = [subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False) for cmd in runs]
    gateway, sink = outs
    assert gateway.returncode != 0
    assert "Traceback" not in gateway.stderr
    assert "wrong-pw" not in gateway.stderr
    assert gateway.stderr.strip().splitlines()[-1].startswith("flowtunnel gateway: error: cannot connect"), \
        gateway.stderr
    assert "authorization" in gateway.stderr.lower()
    assert sink.returncode != 0
    assert "Traceback" not in sink.stderr
    last = sink.stderr.strip().splitlines()[-1]
    assert last.startswith("flowtunnel sink: error: journal stream FLOWTUNNEL does not exist"), sink.stderr
    assert "right-pw" not in sink.stderr


async def test_one_agent_cannot_fill_the_stream_for_all(single: NatsCluster, tmp_path: Path) -> None:
    """``journal_agent_messages``: the stream refuses a subject past its quota (429 agent-share, counted);
    another agent still gets in."""
    keys = {a: await enroll_kv(single.url, a) for a in ("greedy", "modest")}
    gw = await start_shared_gateway(single.url, tmp_path / "g", journal_agent_messages=3)
    try:
        async with aiohttp.ClientSession() as http:
            seq = 1
            for _ in range(3):
                body = seal("greedy", keys["greedy"], seq, _dgs(5, seq))
                status, doc, _ = await post_batch(http, gw.url, body, agent="greedy")
                assert status == 200, doc
                seq += 5
            status, doc, headers = await post_batch(http, gw.url, seal("greedy", keys["greedy"], seq,
                                                                       _dgs(5, seq)), agent="greedy")
            assert (status, doc["error"]) == (429, "agent-share"), doc
            assert int(headers["Retry-After"]) > 0
            status, doc, _ = await post_batch(http, gw.url, seal("modest", keys["modest"], 1, _dgs(5, 1)),
                                              agent="modest")
            assert (status, doc["acked"]) == (200, 5)
        assert gw.shared_journal is not None
        assert gw.shared_journal.refused_quota == 1
        assert gw.metrics.rejects_by_cause.get("agent-share") == 1
    finally:
        await gw.stop()


def test_a_server_max_payload_below_one_datagram_is_refused_at_start(tmp_path: Path) -> None:
    import pytest

    from flowtunnel.errors import ConfigError
    from tests.scaleout.conftest import _binary

    with NatsCluster(tmp_path / "small", size=1, binary=_binary(), max_payload=32768) as c, \
            pytest.raises(ConfigError, match="max_payload 32768 is below"):
        asyncio.run(start_shared_gateway(c.url, tmp_path / "g"))
