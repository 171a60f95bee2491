"""Exactly once across gateways sharing a JetStream journal (a real 3-node cluster on loopback)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import aiohttp

from flowtunnel.journal.jetstream import parse_journal_url
from flowtunnel.log import Entry
from tests.gateway.util import datagrams, post_batch, seal
from tests.natscluster import NatsCluster
from tests.scaleout.util import enroll_kv, read_stream, start_shared_gateway


def _seqs(entries: list[Entry]) -> Counter[tuple[str, int | None]]:
    return Counter((e.stream, e.stream_seq) for e in entries)


async def test_gateways_racing_the_same_batches_store_each_once(cluster: NatsCluster, tmp_path: Path) -> None:
    key = await enroll_kv(cluster.url, "a1")
    gw1 = await start_shared_gateway(cluster.url, tmp_path / "g1")
    gw2 = await start_shared_gateway(cluster.url, tmp_path / "g2")
    try:
        async with aiohttp.ClientSession() as http:
            seq = 1
            for size in (5, 1, 7, 3, 10, 2, 6, 4, 8, 9):
                body = seal("a1", key, seq, datagrams(size, start=seq))
                # The same sealed batch to both gateways at once, twice each: one append wins.
                answers = await asyncio.gather(*(
                    post_batch(http, gw.url, body, agent="a1") for gw in (gw1, gw2, gw2, gw1)
                ))
                for status, doc, _ in answers:
                    assert status == 200, doc
                    assert doc["acked"] == seq + size - 1
                assert sum(doc["accepted"] for _, doc, _ in answers) == size
                seq += size
    finally:
        await gw1.stop()
        await gw2.stop()
    entries = await read_stream(parse_journal_url(cluster.url))
    counts = _seqs(entries)
    assert sorted(counts) == [("a1", s) for s in range(1, seq)]
    assert set(counts.values()) == {1}
    assert [e.datagram.payload for e in entries] == [f"dg-{i}".encode() for i in range(1, seq)]


async def test_a_different_gateway_answers_the_resync_and_drops_duplicates(
    cluster: NatsCluster, tmp_path: Path
) -> None:
    key = await enroll_kv(cluster.url, "a2")
    gw1 = await start_shared_gateway(cluster.url, tmp_path / "g1")
    gw2 = await start_shared_gateway(cluster.url, tmp_path / "g2")
    try:
        async with aiohttp.ClientSession() as http:
            status, doc, _ = await post_batch(http, gw1.url, seal("a2", key, 1, datagrams(10, start=1)),
                                              agent="a2")
            assert (status, doc["acked"]) == (200, 10)
            # gw2 caches nothing yet; then gw1 moves the mark behind gw2's back.
            status, doc, _ = await post_batch(http, gw2.url, seal("a2", key, 5, datagrams(8, start=5)),
                                              agent="a2")
            assert (status, doc["acked"], doc["accepted"], doc["duplicates"]) == (200, 12, 2, 6)
            status, doc, _ = await post_batch(http, gw1.url, seal("a2", key, 11, datagrams(5, start=11)),
                                              agent="a2")
            # gw1's cached mark (10) is stale: the compare-and-set refuses, gw1 re-reads and decides again.
            assert (status, doc["acked"], doc["accepted"], doc["duplicates"]) == (200, 15, 3, 2)
            assert gw1.shared_journal is not None
            assert gw1.shared_journal.conflicts >= 1
    finally:
        await gw1.stop()
        await gw2.stop()
    counts = _seqs(await read_stream(parse_journal_url(cluster.url)))
    assert sorted(counts) == [("a2", s) for s in range(1, 16)]
    assert set(counts.values()) == {1}
