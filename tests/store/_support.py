"""Shared pieces of the store tests: journals filled with captured datagrams, running a sink, expectations.

The expectation of "what the exporter sent" comes from tshark's dissector over the same datagrams, so the
store is checked against an independent decoder, never against our own.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import duckdb

from flowtunnel.datagram import Datagram
from flowtunnel.gateway.notify import JournalNotify
from flowtunnel.log import DurableLog, LogConfig
from flowtunnel.runtime import TaskSet
from flowtunnel.store import StoreSink
from tests.peers import Datagram as Captured
from tests.peers import tshark_records, write_pcap

FlowKey = tuple[str | None, str | None, int | None, int | None, int | None, int | None, int | None]

STORE_KEY_SQL = "SELECT src_addr, dst_addr, src_port, dst_port, protocol, bytes, packets FROM flows"


def to_datagrams(captured: Iterable[Captured], *, received_ns: int | None = None) -> list[Datagram]:
    now = time.time_ns() if received_ns is None else received_ns
    return [
        Datagram(received_ns=now + i, exporter=host, exporter_port=port, local_port=2055, payload=payload)
        for i, (payload, (host, port)) in enumerate(captured)
    ]


def fill_journal(
    path: Path, datagrams: Sequence[Datagram], *, agent: str = "site-a", first_stream_seq: int = 1
) -> DurableLog:
    journal = DurableLog(LogConfig(path=path, quota_bytes=0))
    if datagrams:
        journal.append(
            list(datagrams), stream=agent,
            stream_seqs=list(range(first_stream_seq, first_stream_seq + len(datagrams))),
        )
    return journal


def exporter_multiset(captured: Sequence[Captured], workdir: Path) -> Counter[FlowKey]:
    """The flow records in ``captured`` as tshark decodes them (options records excluded)."""
    pcap = workdir / "expected.pcap"
    write_pcap(captured, pcap, dst_port=2055)
    out: Counter[FlowKey] = Counter()
    for r in tshark_records(pcap, ports=(2055,)):
        out[(r["src"], r["dst"], r["sport"], r["dport"], r["proto"], r["octets"], r["packets"])] += 1
    return out


def store_multiset(database: Path) -> Counter[FlowKey]:
    conn = duckdb.connect(str(database), read_only=True)
    try:
        rows: list[Any] = conn.execute(STORE_KEY_SQL).fetchall()
    finally:
        conn.close()
    return Counter(tuple(r) for r in rows)


def normalise_ports(counter: Counter[FlowKey]) -> Counter[FlowKey]:
    """tshark and the codec agree on values; ICMP "ports" differ by exporter (absent vs 0): compare as 0."""
    out: Counter[FlowKey] = Counter()
    for (src, dst, sport, dport, proto, octets, packets), n in counter.items():
        if proto in (1, 58):
            sport, dport = sport or 0, dport or 0
        out[(src, dst, sport, dport, proto, octets, packets)] += n
    return out


async def wait_caught_up(sink: StoreSink, seq: int) -> None:
    """Return once a running ``sink`` has committed entries up to ``seq`` (bound it with a timeout)."""
    while True:
        if sink.running and sink.cursor >= seq:
            return
        await asyncio.sleep(0.02)


def exporter_stats(sink: StoreSink) -> dict[str, dict[str, Any]]:
    """``status()["exporters"]`` keyed by exporter address."""
    items = cast(list[dict[str, Any]], sink.status()["exporters"])
    return {e["exporter"]: e for e in items}


def agent_stats(sink: StoreSink) -> dict[str, dict[str, Any]]:
    """``status()["agents"]`` keyed by agent."""
    items = cast(list[dict[str, Any]], sink.status()["agents"])
    return {a["agent"]: a for a in items}


async def run_sink_until(
    sink: StoreSink, journal: DurableLog, *, seq: int | None = None, limit: float = 60.0
) -> None:
    """Run ``sink`` on ``journal`` until its cursor reaches ``seq`` (default: the last), then stop it."""
    target = journal.last_seq() if seq is None else seq
    notify = JournalNotify(journal.last_seq())
    tasks = TaskSet()
    task = tasks.spawn(sink.run(journal, notify), name="store-sink")
    try:
        async with asyncio.timeout(limit):
            while sink.cursor < target or not sink.running:
                if task.done():
                    task.result()
                    raise AssertionError("store sink stopped on its own")
                await asyncio.sleep(0.02)
    finally:
        await tasks.close()
