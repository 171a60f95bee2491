"""``enroll|revoke|agents --journal nats://...``: the registry in the cluster, seen by every gateway."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp

from flowtunnel.wire.keys import parse_key
from tests.gateway.util import datagrams, post_batch, seal
from tests.natscluster import NatsCluster
from tests.scaleout.util import start_shared_gateway


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flowtunnel", *args], capture_output=True, text=True,
                          timeout=60, check=False)


async def test_enroll_and_revoke_in_the_cluster_reach_every_gateway(
    cluster: NatsCluster, tmp_path: Path
) -> None:
    gws = [await start_shared_gateway(cluster.url, tmp_path / f"g{i}") for i in (1, 2)]
    try:
        out = await asyncio.to_thread(_cli, "enroll", "site-9", "--journal", cluster.url, "--format", "json")
        assert out.returncode == 0, out.stderr
        key = parse_key(json.loads(out.stdout)["key"])
        listed = await asyncio.to_thread(_cli, "agents", "--journal", cluster.url, "--format", "json")
        assert [json.loads(line)["agent_id"] for line in listed.stdout.splitlines()] == ["site-9"]
        async with aiohttp.ClientSession() as http:
            for n, gw in enumerate(gws):
                for _ in range(50):  # the watch delivers the enrolment within moments
                    status, doc, _ = await post_batch(http, gw.url, seal("site-9", key, n + 1,
                                                      datagrams(1, start=n + 1)), agent="site-9")
                    if status == 200:
                        break
                    await asyncio.sleep(0.1)
                assert (status, doc["acked"]) == (200, n + 1), doc
            out = await asyncio.to_thread(_cli, "revoke", "site-9", "--journal", cluster.url)
            assert out.returncode == 0, out.stderr
            for gw in gws:
                for _ in range(50):
                    body = seal("site-9", key, 3, datagrams(1, start=3))
                    status, doc, _ = await post_batch(http, gw.url, body, agent="site-9")
                    if status == 403:
                        break
                    await asyncio.sleep(0.1)
                assert (status, doc["error"]) == (403, "revoked")
    finally:
        for gw in gws:
            await gw.stop()


async def test_a_bucket_just_created_has_its_leader_before_the_first_enrolment(cluster: NatsCluster) -> None:
    """The registry's R3 bucket has no leader for a moment after it is created, and an enrolment then failed
    with "no response from stream" now and then: open() returns only once the bucket has its leader."""
    from flowtunnel.gateway.kvregistry import REGISTRY_BUCKET, KvRegistry
    from flowtunnel.journal.jetstream import parse_journal_url

    reg = KvRegistry(parse_journal_url(cluster.url))
    await reg.open()
    try:
        info = await reg._conn.js.stream_info(f"KV_{REGISTRY_BUCKET}")
        assert info.cluster is not None
        assert info.cluster.leader, info.cluster
        assert (await reg.enroll("first")).agent_id == "first"
    finally:
        await reg.close()


async def test_a_listing_right_after_an_enrolment_holds_it(cluster: NatsCluster) -> None:
    """``agents --journal`` came back empty now and then right after ``enroll`` (about 1 run in 30): the
    listing read through a consumer the cluster may place on a replica a moment behind. It reads from the
    stream's leader now; 200 rounds, each as two separate CLI runs would do it (a fresh connection each)."""
    from flowtunnel.gateway.kvregistry import KvRegistry
    from flowtunnel.journal.jetstream import parse_journal_url

    config = parse_journal_url(cluster.url)
    for i in range(200):
        writer, reader = KvRegistry(config), KvRegistry(config)
        await writer.open()
        try:
            await writer.enroll(f"site-{i}")
        finally:
            await writer.close()
        await reader.open()
        try:
            listed = [e.agent_id for e in await reader.list()]
        finally:
            await reader.close()
        assert sorted(listed) == sorted(f"site-{j}" for j in range(i + 1)), (i, listed[-3:])
