"""Helpers for the scale-out tests: enrol in the cluster's registry, start gateways on the shared journal,
read back every datagram of the stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from flowtunnel.datagram import Datagram
from flowtunnel.gateway import Gateway, GatewayConfig
from flowtunnel.gateway.kvregistry import KvRegistry
from flowtunnel.journal.jetstream import JetStreamConfig, JetStreamReader, parse_journal_url
from flowtunnel.log import Entry
from tests.gateway.util import post_batch, seal

__all__ = [
    "demo_datagrams", "enroll_kv", "feed_two_gateways", "read_stream", "reference_rows", "sink_position",
    "start_shared_gateway", "store_rows",
]


async def enroll_kv(url: str, name: str) -> bytes:
    reg = KvRegistry(parse_journal_url(url))
    await reg.open()
    try:
        return (await reg.enroll(name)).key
    finally:
        await reg.close()


async def start_shared_gateway(url: str, data: Path, **overrides: Any) -> Gateway:
    settings: dict[str, Any] = {
        "listen": "127.0.0.1:0", "data": data, "journal": url, "status_interval": 0.2, "store": False,
        "journal_quota": 256 << 20,
    }
    settings.update(overrides)
    gw = Gateway(GatewayConfig(**settings))
    try:
        await gw.start()
    except BaseException:
        await gw.stop()
        raise
    return gw


async def read_stream(config: JetStreamConfig, *, name: str = "test-reader") -> list[Entry]:
    """Every entry in the stream, through a durable consumer (in a worker thread, as a sink reads)."""
    reader = JetStreamReader(config, name)
    await reader.open()
    out: list[Entry] = []
    try:
        after, empty = 0, 0
        while empty < 5:
            got = await asyncio.to_thread(reader.read, after, 10_000)
            if not got:
                empty += 1
                continue
            empty = 0
            out.extend(got)
            after = got[-1].seq
    finally:
        await reader.close()
    return out


def demo_datagrams() -> list[Datagram]:
    """The bundled demo capture's NetFlow datagrams (real v5/v9/IPFIX, decodable by the store)."""
    import importlib.resources

    from flowtunnel.capture import CaptureReader

    path = importlib.resources.files("flowtunnel") / "data" / "demo.pcap"
    with CaptureReader(str(path)) as reader:
        return [
            Datagram(received_ns=1_700_000_000_000_000_000 + i, exporter=u.src, exporter_port=u.sport,
                     local_port=u.dport, payload=u.payload)
            for i, u in enumerate(reader)
        ]


async def reference_rows(tmp: Path, per_agent: dict[str, list[Datagram]]) -> Counter[tuple[Any, ...]]:
    """The store rows the embedded path (SQLite journal, in-process sink) makes of the same datagrams."""
    from flowtunnel.journal import JournalNotify
    from flowtunnel.log import DurableLog, LogConfig
    from flowtunnel.store import StoreSink

    journal = DurableLog(LogConfig(path=tmp / "ref.sqlite", quota_bytes=0))
    try:
        for agent, dgs in per_agent.items():
            journal.append(dgs, stream=agent, stream_seqs=range(1, len(dgs) + 1))
        sink = StoreSink(data_dir=tmp / "ref", query_socket=False, batch_interval=0.0)
        notify = JournalNotify(journal.last_seq())
        task = asyncio.get_running_loop().create_task(sink.run(journal, notify))
        while sink.cursor < journal.last_seq():  # noqa: ASYNC110  (a store cursor has no event)
            await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        journal.close()
    return store_rows(tmp / "ref" / "store" / "flows.duckdb")


ROW_SQL = ("SELECT agent, exporter, src_addr, dst_addr, src_port, dst_port, protocol, bytes, packets "
           "FROM flows")


def store_rows(database: Path) -> Counter[tuple[Any, ...]]:
    import duckdb

    conn = duckdb.connect(str(database), read_only=True)
    try:
        return Counter(tuple(r) for r in conn.execute(ROW_SQL).fetchall())
    finally:
        conn.close()


async def feed_two_gateways(url: str, tmp: Path, agents: dict[str, list]) -> int:  # type: ignore[type-arg]
    """Post each agent's datagrams in batches of 20 alternately to two gateways; the stream's last seq."""
    keys = {a: await enroll_kv(url, a) for a in agents}
    gws = [await start_shared_gateway(url, tmp / f"g{i}") for i in (1, 2)]
    try:
        async with aiohttp.ClientSession() as http:
            for agent, dgs in agents.items():
                for n, start in enumerate(range(0, len(dgs), 20)):
                    body = seal(agent, keys[agent], start + 1, dgs[start : start + 20])
                    status, doc, _ = await post_batch(http, gws[n % 2].url, body, agent=agent)
                    assert status == 200, doc
        assert gws[0].shared_journal is not None
        stats = await gws[0].shared_journal.stats()
        return int(str(stats["last_seq"]))
    finally:
        for gw in gws:
            await gw.stop()


def sink_position(status: Path, pid: int) -> int:
    """A sink's committed position in the status file written by process ``pid`` (0 before)."""
    try:
        doc = json.loads(status.read_text())
    except (OSError, ValueError):
        return 0
    if doc.get("pid") != pid:
        return 0
    return int(doc.get("sink_status", {}).get("cursor", 0))


async def consumer_floor(config: JetStreamConfig, name: str) -> int:
    """What the durable consumer ``name`` has acknowledged (its reader's starting cursor)."""
    reader = JetStreamReader(config, name)
    await reader.open()
    try:
        return reader.cursor(name)
    finally:
        await reader.close()


async def run_sink_until(sink: Any, config: JetStreamConfig, name: str, last: int, *, ack: bool) -> None:
    """Run ``sink`` on a reader of consumer ``name`` until its cursor reaches ``last`` (and, with ``ack``, the
    consumer acknowledged it), then stop it. ``ack=False``: the reader never acknowledges, as a process killed
    after its side effect and before its ack."""
    reader = JetStreamReader(config, name)
    await reader.open()
    if not ack:
        async def no_ack() -> None:
            return None
        reader._ack_now = no_ack  # type: ignore[method-assign]
    task = asyncio.get_running_loop().create_task(sink.run(reader, reader))
    try:
        deadline = time.monotonic() + 60
        while sink.cursor < last or (ack and reader.status()["acked"] != last):
            assert not task.done(), task
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await reader.close()
