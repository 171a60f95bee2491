"""The uploader against the real gateway (in-process), with faults from the link emulator and tinyproxy:
every spooled datagram reaches the journal exactly once and in order, whatever happens in between."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import random
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from flowtunnel.agent.config import AgentConfig
from flowtunnel.agent.policy import LEAN, TIGHT, ArrivalRate
from flowtunnel.agent.status import render as render_status
from flowtunnel.agent.transport.dns import DnsTransport
from flowtunnel.agent.transport.network import RungMemory
from flowtunnel.agent.uploader import CURSOR, RUNG_MEMORY, Uploader
from flowtunnel.datagram import Datagram
from flowtunnel.gateway.service import Gateway
from flowtunnel.log import DurableLog, LogConfig, LogFull
from flowtunnel.netflow import FieldSpec, Template, encode_v9
from flowtunnel.runtime import TaskSet
from flowtunnel.wire import Codec, ack_tag, compact_ack, open_batch, peek_header
from flowtunnel.wire.keys import format_key, generate_key
from tests.agent.conftest import GatewayFactory, enroll, eventually, journal_of
from tests.conftest import require
from tests.linkemu import Action, Fault, LinkEmulator
from tests.peers import Tinyproxy, free_tcp_port

AGENT = "site-a"
BODY = 72 * 1024  # a small body limit for the tests that fill it (the agent accepts down to BODY)


def datagrams(n: int, *, size: int = 300, seed: int = 0) -> list[Datagram]:
    """Incompressible payloads, so batch sizes are predictable."""
    rng = random.Random(seed)
    return [
        Datagram(received_ns=1_800_000_000_000_000_000 + i, exporter="127.0.0.1", exporter_port=40000 + i % 3,
                 local_port=2055, payload=rng.randbytes(size))
        for i in range(n)
    ]


def config(tmp_path: Path, gateway: str, key: bytes, **overrides: Any) -> AgentConfig:
    settings: dict[str, Any] = {
        "gateway": gateway, "spool": tmp_path / "spool", "agent_id": AGENT, "key": format_key(key),
        "latency": 0.05, "backoff_base": 0.05, "backoff_cap": 0.3, "reject_backoff": 60.0,
        "connect_timeout": 2.0, "read_timeout": 2.0, "total_timeout": 5.0,
        # These tests are about the POST rung; the ladder's are in test_proxy_paths.py.
        "rungs": ("post",),
    }
    settings.update(overrides)
    return AgentConfig(**settings)


def open_spool(path: Path, **overrides: Any) -> DurableLog:
    return DurableLog(LogConfig(path=path / "spool.sqlite", quota_bytes=0, **overrides))


@asynccontextmanager
async def uploading(cfg: AgentConfig, key: bytes, spool: DurableLog) -> AsyncIterator[Uploader]:
    up = Uploader(cfg, key, spool)
    await up.open()
    tasks = TaskSet()
    tasks.spawn(up.run(), name="upload")
    try:
        yield up
    finally:
        await tasks.close()
        await up.close()


def assert_exactly_once(gw: Gateway, sent: list[Datagram], first_seq: int = 1) -> None:
    got = journal_of(gw, AGENT)
    assert [seq for seq, _ in got] == list(range(first_seq, first_seq + len(sent)))
    assert [d.payload for _, d in got] == [d.payload for d in sent]
    assert [(d.exporter, d.exporter_port, d.local_port, d.received_ns) for _, d in got] == [
        (d.exporter, d.exporter_port, d.local_port, d.received_ns) for d in sent
    ]


async def test_delivers_in_order_exactly_once_in_bounded_batches_and_trims(
    tmp_path: Path, gateway_factory: GatewayFactory
) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(3000)
    spool = open_spool(tmp_path)
    spool.append(sent[:2000])
    # The gateway refuses any body above BODY with 413: the agent must keep every request below it.
    async with gateway_factory(data, max_body=BODY) as gw:
        cfg = config(tmp_path, gw.url, key, max_body=BODY)
        async with uploading(cfg, key, spool) as up:
            await eventually(lambda: spool.cursor(CURSOR) == 2000, "backlog acknowledged")
            spool.append(sent[2000:])
            up.notify()
            await eventually(lambda: spool.cursor(CURSOR) == 3000, "new datagrams acknowledged")
            assert up.stats.failures == {}
            assert up.stats.batches >= 900_000 // BODY
            assert up.stats.datagrams == 3000
        assert_exactly_once(gw, sent)
    assert spool.stats().entries == 0
    spool.close()


async def test_faults_on_the_link_neither_lose_nor_duplicate(
    tmp_path: Path, gateway_factory: GatewayFactory
) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(1500, size=200, seed=1)
    spool = open_spool(tmp_path)
    spool.append(sent)
    async with gateway_factory(data) as gw:
        host, port = gw.url.removeprefix("http://").rsplit(":", 1)
        async with LinkEmulator(upstream=(host, int(port)), seed=3) as link:
            cfg = config(tmp_path, link.url, key, max_body=BODY, bandwidth=BODY * 4)
            async with uploading(cfg, key, spool) as up:
                # Faults start once batches flow, so they hit batches as well as resynchronisations.
                await eventually(lambda: spool.cursor(CURSOR) > 0, "first batch acknowledged")
                for fault in (
                    Fault(action=Action.ABORT_RESPONSE, after=0, count=2),  # committed, but the ack is lost
                    Fault(action=Action.ANSWER, status=503, retry_after=0, count=2),
                    Fault(action=Action.ABORT_REQUEST, after=2000, count=1),
                    Fault(action=Action.ANSWER, status=502, count=1),
                    Fault(action=Action.ANSWER, status=407, count=1),
                ):
                    link.add_fault(fault)
                await eventually(lambda: spool.cursor(CURSOR) == len(sent), "everything acknowledged")
                assert link.pending_faults() == 0
                failures = up.stats.failures
                assert failures["http-503"] == 2
                assert failures["http-502"] == 1
                assert failures["http-407"] == 1
                assert sum(n for cause, n in failures.items() if cause.startswith("connection:")) >= 3
        # A lost ack is followed by a resynchronisation, not a blind re-send: the gateway saw no duplicate.
        assert gw.metrics.agents[AGENT].duplicates == 0
        assert_exactly_once(gw, sent)
    spool.close()


async def test_gateway_down_for_the_whole_capture_then_started(
    tmp_path: Path, gateway_factory: GatewayFactory
) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    port = free_tcp_port()
    sent = datagrams(800, seed=2)
    spool = open_spool(tmp_path)
    spool.append(sent)
    cfg = config(tmp_path, f"http://127.0.0.1:{port}", key)
    async with uploading(cfg, key, spool) as up:
        await eventually(lambda: up.stats.consecutive_failures >= 3, "the agent noticed the outage")
        assert spool.stats().entries == len(sent)
        async with gateway_factory(data, port=port) as gw:
            await eventually(lambda: spool.cursor(CURSOR) == len(sent), "backlog drained")
            assert up.stats.consecutive_failures == 0
            assert_exactly_once(gw, sent)
    spool.close()


async def test_unknown_agent_is_rejected_loudly_and_keeps_its_data(
    tmp_path: Path, gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "gw"
    enroll(data, "someone-else")
    key = generate_key()
    spool = open_spool(tmp_path)
    spool.append(datagrams(10))
    async with gateway_factory(data) as gw:
        async with uploading(config(tmp_path, gw.url, key), key, spool) as up:
            await eventually(lambda: up.stats.failures["http-401"] >= 1, "401 seen")
            await eventually(lambda: up.stats.next_attempt is not None, "backing off")
            # Long backoff, not a spin: the next attempt is reject_backoff away from the last one.
            assert up.stats.next_attempt is not None
            assert up.stats.last_attempt is not None
            assert up.stats.next_attempt - up.stats.last_attempt >= 59
        assert journal_of(gw, AGENT) == []
    assert spool.stats().entries == 10
    assert any(r.levelname == "ERROR" and "gateway rejected" in r.getMessage() for r in caplog.records)
    spool.close()


async def test_413_from_a_smaller_gateway_limit_shrinks_the_body(
    tmp_path: Path, gateway_factory: GatewayFactory
) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(1000, size=1000, seed=4)
    spool = open_spool(tmp_path)
    spool.append(sent)
    async with gateway_factory(data, max_body=100_000) as gw:
        async with uploading(config(tmp_path, gw.url, key, max_body=1 << 20), key, spool) as up:
            await eventually(lambda: spool.cursor(CURSOR) == len(sent), "everything acknowledged")
            assert up.stats.failures["http-413"] >= 1
            limit = up.status()["max_body"]
            assert isinstance(limit, int)
            assert limit <= 100_000
            assert up.status()["body_limit_by"] == "the gateway"
        assert_exactly_once(gw, sent)
    spool.close()


async def test_a_new_spool_for_an_existing_agent_continues_above_the_gateway_mark(
    tmp_path: Path, gateway_factory: GatewayFactory
) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    first, second = datagrams(100, seed=5), datagrams(50, seed=6)
    async with gateway_factory(data) as gw:
        old = open_spool(tmp_path / "old")
        old.append(first)
        async with uploading(config(tmp_path / "old", gw.url, key), key, old):
            await eventually(lambda: old.cursor(CURSOR) == 100, "first spool delivered")
        old.close()
        new = open_spool(tmp_path / "new")  # the box was re-imaged: same id and key, empty spool
        new.append(second)
        async with uploading(config(tmp_path / "new", gw.url, key), key, new):
            await eventually(lambda: new.cursor(CURSOR) == 150, "second spool delivered")
        assert_exactly_once(gw, first + second)
        assert new.stats().entries == 0
        new.close()


async def test_gateway_that_lost_acknowledged_data_gets_what_the_spool_still_has(
    tmp_path: Path, gateway_factory: GatewayFactory
) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    first, second = datagrams(100, seed=7), datagrams(40, seed=8)
    spool = open_spool(tmp_path)
    spool.append(first)
    async with gateway_factory(data) as gw:
        async with uploading(config(tmp_path, gw.url, key), key, spool):
            await eventually(lambda: spool.cursor(CURSOR) == 100, "first part delivered")
        port = int(gw.url.rsplit(":", 1)[1])
    # The gateway comes back from an old backup: the registry survived, the journal did not.
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(data / "registry.sqlite", restored / "registry.sqlite")
    spool.append(second)
    async with gateway_factory(restored, port=port) as gw2:
        async with uploading(config(tmp_path, gw2.url, key), key, spool) as up:
            await eventually(lambda: spool.cursor(CURSOR) == 140, "second part delivered")
            assert up.stats.gateway_lost == 100
            assert up.status()["gateway_lost"] == 100
        assert_exactly_once(gw2, second, first_seq=101)
    spool.close()


async def test_a_forged_compact_answer_trims_nothing(tmp_path: Path, gateway_factory: GatewayFactory) -> None:
    """The 24-byte answer of ``POST /v1/b`` is trusted no more than the JSON one: an ``acked`` inflated on
    the path (its tag then fails) is ``bad-ack``, nothing trimmed."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(30, seed=4)
    spool = open_spool(tmp_path)
    spool.append(sent)
    tag = ack_tag(key, agent_id=AGENT, request_nonce=os.urandom(12), acked=100_000)
    async with gateway_factory(data) as gw:
        host, port = gw.url.removeprefix("http://").rsplit(":", 1)
        async with LinkEmulator(upstream=(host, int(port))) as link:
            cfg = config(tmp_path, link.url, key)
            link.add_fault(Fault(action=Action.ANSWER, status=200, body=compact_ack(100_000, tag),
                                 content_type="application/octet-stream", match="POST /v1/b ", count=None))
            async with uploading(cfg, key, spool) as up:
                await eventually(lambda: up.stats.failures["bad-ack"] >= 2, "forged answers refused")
            link.clear_faults()
            assert spool.cursor(CURSOR) == 0
            assert spool.stats().entries == 30
            async with uploading(cfg, key, spool):
                await eventually(lambda: spool.cursor(CURSOR) == 30, "everything delivered")
        assert_exactly_once(gw, sent)
    spool.close()


@pytest.mark.parametrize("status", [404, 403, 415])
async def test_a_gateway_without_the_compact_route_gets_the_batches_on_v1_batches(
    tmp_path: Path, gateway_factory: GatewayFactory, status: int
) -> None:
    """An older gateway (or a reverse proxy routing only ``/v1/batches``) answers 404 to ``POST /v1/b``, a
    proxy that wants a content type 403 or 415: the agent goes back to ``/v1/batches`` at once, without a
    failure or a backoff, and delivers exactly once."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(40, seed=5)
    spool = open_spool(tmp_path)
    async with gateway_factory(data) as gw:
        host, port = gw.url.removeprefix("http://").rsplit(":", 1)
        async with LinkEmulator(upstream=(host, int(port))) as link:
            link.add_fault(Fault(action=Action.ANSWER, status=status, match="POST /v1/b ", count=None))
            async with uploading(config(tmp_path, link.url, key), key, spool) as up:
                for i in range(0, 40, 10):
                    spool.append(sent[i : i + 10])
                    up.notify()
                    await eventually(lambda i=i: spool.cursor(CURSOR) == i + 10, "delivered")  # type: ignore[misc]
                assert up.stats.failures == {}
                assert not up._rungs["post"].compact  # type: ignore[attr-defined]
            assert link.stats().requests <= 2 + 2 * 4  # probe, one 404, then one request per batch (+ resync)
        assert_exactly_once(gw, sent)
    spool.close()


async def test_a_network_that_refuses_the_compact_route_costs_no_refused_request_after_a_restart(
    tmp_path: Path, gateway_factory: GatewayFactory
) -> None:
    """The fall-back to ``/v1/batches`` is remembered for the network (the rung memory, as the content type
    is): the agent started again there sends its first batch to ``/v1/batches``, no ``POST /v1/b`` refused
    again, and ``status`` says which path its batches take."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(20, seed=6)
    spool = open_spool(tmp_path)
    async with gateway_factory(data) as gw:
        host, port = gw.url.removeprefix("http://").rsplit(":", 1)
        async with LinkEmulator(upstream=(host, int(port))) as link:
            link.add_fault(Fault(action=Action.ANSWER, status=404, match="POST /v1/b ", count=None))
            cfg = config(tmp_path, link.url, key)
            spool.append(sent[:10])
            async with uploading(cfg, key, spool) as up:
                await eventually(lambda: spool.cursor(CURSOR) == 10, "first part delivered")
                assert up.status()["batch_path"] == "/v1/batches"
            refused = link.stats().faults.get("answer-404", 0)
            assert refused >= 1
            spool.append(sent[10:])
            async with uploading(cfg, key, spool) as up:
                assert up.status()["batch_path"] == "/v1/batches"  # before anything was sent
                up.notify()
                await eventually(lambda: spool.cursor(CURSOR) == 20, "second part delivered")
                doc = {"kind": "agent", "upload": up.status()}
                assert "batch path     /v1/batches (POST /v1/b refused" in render_status(doc, now=0.0)
            assert link.stats().faults.get("answer-404", 0) == refused  # none refused after the restart
        assert_exactly_once(gw, sent)
    spool.close()


async def test_batches_that_change_nothing_remembered_start_no_thread_for_the_rung_memory(
    tmp_path: Path, gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rung memory is written when what it holds changed (the first batch on a network), not per batch:
    a quiet site's batches cost no worker thread and no disk write for it."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(50, seed=7)
    spool = open_spool(tmp_path)
    calls: list[str] = []
    real = asyncio.to_thread

    async def counting(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        target = func.func if isinstance(func, functools.partial) else func
        if isinstance(getattr(target, "__self__", None), RungMemory):
            calls.append(target.__name__)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counting)
    async with gateway_factory(data) as gw, uploading(config(tmp_path, gw.url, key), key, spool) as up:
        for i in range(0, 50, 10):
            spool.append(sent[i : i + 10])
            up.notify()
            await eventually(lambda i=i: spool.cursor(CURSOR) == i + 10, "delivered")  # type: ignore[misc]
        assert up.stats.batches >= 5
    assert len(calls) == 1, calls  # the first batch taught it the network's rung; the others nothing
    assert RungMemory(tmp_path / RUNG_MEMORY).get(up._network or "") == "post"
    spool.close()


async def test_forged_or_replayed_acknowledgements_trim_nothing(
    tmp_path: Path, gateway_factory: GatewayFactory
) -> None:
    """Someone on the path answers every POST with a huge ``acked``: without a tag, with the genuine tag of
    another request (a replayed answer), beyond 2**64. The agent trusts none, keeps its spool, delivers
    everything."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(60, seed=11)
    spool = open_spool(tmp_path)
    spool.append(sent[:30])
    replayed_tag = ack_tag(key, agent_id=AGENT, request_nonce=os.urandom(12), acked=100_000)
    async with gateway_factory(data) as gw:
        host, port = gw.url.removeprefix("http://").rsplit(":", 1)
        async with LinkEmulator(upstream=(host, int(port))) as link:
            cfg = config(tmp_path, link.url, key)
            for acked, tag in ((100_000, None), (100_000, replayed_tag), (2**64, "A" * 22)):
                forged: dict[str, object] = {"agent": AGENT, "acked": acked, "accepted": 30, "duplicates": 0}
                if tag is not None:
                    forged["tag"] = tag
                link.add_fault(Fault(action=Action.ANSWER, status=200, body=json.dumps(forged).encode(),
                                     content_type="application/json", match="POST /v1/b", count=None))
                async with uploading(cfg, key, spool) as up:
                    await eventually(lambda: up.stats.failures["bad-ack"] >= 2, "forged answers refused")
                    assert up.stats.last_result == "bad-ack"
                link.clear_faults()
                assert spool.cursor(CURSOR) == 0
                assert spool.stats().entries == 30
                assert spool.last_seq() == 30  # not renumbered above the forged mark
            spool.append(sent[30:])
            async with uploading(cfg, key, spool):
                await eventually(lambda: spool.cursor(CURSOR) == 60, "everything delivered")
        assert_exactly_once(gw, sent)
    spool.close()


async def test_a_gateway_that_lost_data_while_the_agent_idled_answers_409_and_the_loss_is_counted(
    tmp_path: Path, gateway_factory: GatewayFactory
) -> None:
    """The journal goes back in time while the agent has nothing to send (restored backup, torn tail): its
    next batch says which seq it saw acknowledged, the gateway answers 409, the agent resynchronises at once
    (not after ``reject_backoff``, 60 s here) and counts what it can no longer re-send."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    first, second = datagrams(100, seed=12), datagrams(40, seed=13)
    spool = open_spool(tmp_path)
    spool.append(first)
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(data / "registry.sqlite", restored / "registry.sqlite")
    async with gateway_factory(data) as gw:
        port = int(gw.url.rsplit(":", 1)[1])
        up = Uploader(config(tmp_path, gw.url, key), key, spool)
        await up.open()
        tasks = TaskSet()
        tasks.spawn(up.run(), name="upload")
        try:
            await eventually(lambda: spool.cursor(CURSOR) == 100, "first part delivered")
            await gw.stop()
            async with gateway_factory(restored, port=port) as gw2:
                spool.append(second)
                up.notify()
                await eventually(lambda: spool.cursor(CURSOR) == 140, "second part delivered")
                assert up.stats.gateway_lost == 100
                assert up.stats.failures["resync"] >= 1
                assert "http-409" not in up.stats.failures
                assert_exactly_once(gw2, second, first_seq=101)
                assert gw2.metrics.agents[AGENT].gap == 0  # the gateway knows the hole is its own loss
        finally:
            await tasks.close()
            await up.close()
    spool.close()


async def test_a_spool_renumbered_before_a_crash_is_delivered_once(
    tmp_path: Path, gateway_factory: GatewayFactory
) -> None:
    """A new spool for an existing agent id moves its datagrams above the gateway's mark in one transaction;
    if the agent dies right after (before it records the gateway's mark), the next start finds them above the
    mark already and delivers them once."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    first, second = datagrams(100, seed=14), datagrams(50, seed=15)
    async with gateway_factory(data) as gw:
        old = open_spool(tmp_path / "old")
        old.append(first)
        async with uploading(config(tmp_path / "old", gw.url, key), key, old):
            await eventually(lambda: old.cursor(CURSOR) == 100, "first spool delivered")
        old.close()
        new = open_spool(tmp_path / "new")
        new.append(second)
        assert new.renumber(101) == 50  # what the resync did before the crash
        assert new.cursor(CURSOR) == 0
        async with uploading(config(tmp_path / "new", gw.url, key), key, new):
            await eventually(lambda: new.cursor(CURSOR) == 150, "second spool delivered")
        assert_exactly_once(gw, first + second)
        new.close()


def test_the_template_cache_lets_later_batches_cut_data_sets_into_columns(tmp_path: Path) -> None:
    """v9 data whose template travelled in an earlier batch: with the agent's template cache the batch is
    smaller than without, and it opens to the same datagrams; a restarted uploader (empty cache) still
    seals it correctly."""
    key = generate_key()
    fields = ((8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (2, 4), (1, 4), (152, 8), (153, 8))
    template = Template(256, tuple(FieldSpec(ie, n) for ie, n in fields))
    rng = random.Random(16)

    def record() -> dict[str, object]:
        return {"sourceIPv4Address": f"10.0.{rng.randrange(4)}.{rng.randrange(256)}",
                "destinationIPv4Address": f"192.0.2.{rng.randrange(256)}",
                "sourceTransportPort": rng.randrange(1024, 65536), "destinationTransportPort": 443,
                "protocolIdentifier": 6, "packetDeltaCount": rng.randrange(1, 100),
                "octetDeltaCount": rng.randrange(40, 100_000),
                "flowStartMilliseconds": 1_800_000_000_000 + rng.randrange(10_000),
                "flowEndMilliseconds": 1_800_000_010_000 + rng.randrange(10_000)}

    def dg(payload: bytes, i: int) -> Datagram:
        return Datagram(received_ns=1_800_000_000_000_000_000 + i, exporter="127.0.0.1", exporter_port=4000,
                        local_port=2055, payload=payload)

    announce = dg(encode_v9(templates=[template], sys_uptime_ms=1000, unix_secs=1_800_000_000), 0)
    data = [dg(encode_v9(data=[(template, [record() for _ in range(20)])], sys_uptime_ms=1000 + i,
                         unix_secs=1_800_000_000, sequence=i), i) for i in range(1, 31)]
    spool = open_spool(tmp_path)
    spool.append([announce, *data])
    entries = spool.read(after=0, limit=100)
    cfg = config(tmp_path, "http://127.0.0.1:9", key)
    warm = Uploader(cfg, key, spool)
    warm._seal(entries[:1])  # the template goes first
    warm_body, warm_batch = warm._seal(entries[1:])
    cold_body, cold_batch = Uploader(cfg, key, spool)._seal(entries[1:])  # restarted: nothing learned
    assert len(warm_batch) == len(cold_batch) == 30
    assert len(warm_body) < 0.9 * len(cold_body)
    for body in (warm_body, cold_body):
        batch = open_batch(body, key=key)
        assert [d.payload for d in batch.datagrams] == [d.payload for d in data]
        assert batch.agent_info["acked"] == 0
    spool.close()


def v9_export(n: int, seed: int = 16) -> list[Datagram]:
    """``n`` NetFlow v9 datagrams of 20 flows each, the template in the first (compressible, like exports)."""
    fields = ((8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (2, 4), (1, 4), (152, 8), (153, 8))
    template = Template(256, tuple(FieldSpec(ie, n) for ie, n in fields))
    rng = random.Random(seed)

    def record() -> dict[str, object]:
        return {"sourceIPv4Address": f"10.0.{rng.randrange(4)}.{rng.randrange(256)}",
                "destinationIPv4Address": f"192.0.2.{rng.randrange(256)}",
                "sourceTransportPort": rng.randrange(1024, 65536), "destinationTransportPort": 443,
                "protocolIdentifier": 6, "packetDeltaCount": rng.randrange(1, 100),
                "octetDeltaCount": rng.randrange(40, 100_000),
                "flowStartMilliseconds": 1_800_000_000_000 + rng.randrange(10_000),
                "flowEndMilliseconds": 1_800_000_010_000 + rng.randrange(10_000)}

    return [
        Datagram(received_ns=1_800_000_000_000_000_000 + i * 1_000_000, exporter="127.0.0.1",
                 exporter_port=4000, local_port=2055,
                 payload=encode_v9(templates=[template] if i == 0 else [],
                                   data=[(template, [record() for _ in range(20)])], sys_uptime_ms=1000 + i,
                                   unix_secs=1_800_000_000, sequence=i))
        for i in range(n)
    ]


def _not_quiet(up: Uploader) -> None:
    """Data arriving at ~35 datagrams/s of 1,400 bytes (1,000 flows/s): above ``policy.TIGHT``'s rate."""
    up.arrival.observe(last_seq=up._spool.last_seq(), raw_bytes=1400, count=1, now=time.time())
    up.arrival.datagrams, up.arrival.mean_size = 35.0, 1400.0
    up.arrival.since = None  # as if measured for long


async def test_a_backlog_goes_as_codec_5_in_batches_that_fill_the_body_limit(tmp_path: Path) -> None:
    """On a slow link, backlog batches (more spooled behind them) are sealed with codec 5 (``SMALL``: preset
    6, field plans reused; codec 4 before issue 14's bytes round); the first sealed
    batch seeds the sizer's ratio, so the next one is read large enough to come close to the body limit (not
    a fraction of it, as a ratio learned slowly from 1 would give); a batch that catches up goes ``LEAN``
    (codec 5 at LZMA2 preset 1: data arriving above a quiet site's rate, within ``LEAN_SHARE``)."""
    key = generate_key()
    spool = open_spool(tmp_path)
    sent = v9_export(1500)
    spool.append(sent)
    up = Uploader(config(tmp_path, "http://127.0.0.1:9", key, max_body=BODY), key, spool)
    up.link.observe(500_000, 100_000, 1.0)  # measured: 100 kB/s of body, 500 kB/s of payload
    _not_quiet(up)
    await up.open()
    try:
        bodies: list[bytes] = []
        after = 0
        while after < len(sent):
            entries = await up._read()  # one batch at a time, no gateway
            entries = [e for e in entries if e.seq > after]
            body, batch = up._seal(entries)
            up._seed_ratio(batch, len(body))
            bodies.append(body)
            after = up._position = batch[-1].seq
    finally:
        await up.close()
    codecs = [peek_header(b).codec for b in bodies]
    assert codecs[:-1] == [Codec.DELTA_LZMA] * (len(bodies) - 1)
    assert codecs[-1] is Codec.DELTA_LZMA  # the batch that caught up
    assert len(bodies[0]) < 0.9 * BODY  # read at ratio 1: a fraction of the limit
    assert all(0.6 * BODY < len(b) <= BODY for b in bodies[1:-1])
    assert len(bodies) >= 3
    got = [d for b in bodies for d in open_batch(b, key=key).datagrams]
    assert got == sent
    spool.close()


@pytest.mark.parametrize(("per_second", "quiet"), [(36, False), (2, True)])
async def test_the_first_batch_is_sealed_for_the_rate_its_datagrams_arrived_at(
    tmp_path: Path, per_second: int, quiet: bool
) -> None:
    """issue 14: before any batch there is no arrival rate, and without one the codec rule takes the site for
    a quiet one; a busy agent's first batch was sealed TIGHT (and started a compression stream whose ~2 MB
    encoder stayed). The first caught-up batch's own receive times give the rate."""
    import dataclasses

    key = generate_key()
    spool = open_spool(tmp_path)
    now = time.time_ns()
    count = max(3, per_second)
    sent = [dataclasses.replace(d, received_ns=now - (count - i) * 1_000_000_000 // per_second)
            for i, d in enumerate(v9_export(count))]
    spool.append(sent)
    up = Uploader(config(tmp_path, "http://127.0.0.1:9", key), key, spool)
    await up.open()
    try:
        entries = await up._read()
        assert len(entries) == count
        _, batch = up._seal(entries)
    finally:
        await up.close()
    assert len(batch) == count
    assert (up._choice is TIGHT) is quiet
    spool.close()


def _backlog_codecs(tmp_path: Path, **overrides: Any) -> list[int]:
    """Seal a spooled v9 backlog batch by batch (no gateway, every batch a backlog one): their codecs."""
    key = generate_key()
    spool = open_spool(tmp_path)
    sent = v9_export(600)
    spool.append(sent)
    link = overrides.pop("link", None)
    arrival = overrides.pop("arrival", 0.0)
    transport = overrides.pop("transport", None)
    up = Uploader(config(tmp_path, "http://127.0.0.1:9", key, max_body=BODY, **overrides), key, spool,
                  transport=transport)
    if link is not None:
        up.link.observe(*link)
    up._last_seq = spool.last_seq()
    # ``arrival`` raw bytes/s arriving, as if measured for long: datagrams of 1,000 bytes
    up.arrival = ArrivalRate(datagrams=arrival / 1000, mean_size=1000.0, last_seq=up._last_seq,
                             stamp=time.time())
    bodies: list[bytes] = []
    after = 0
    while after < len(sent) - 100:
        entries = spool.read(after=after, limit=100)  # 100 at a time: every batch but the last is backlog
        body, batch = up._seal(entries)
        bodies.append(body)
        after = up._position = batch[-1].seq
    spool.close()
    return [peek_header(b).codec for b in bodies]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, "small"),  # nothing arriving, nothing measured: bytes-lean
        # issue 14: measured 20 MB/s, but SMALL keeps up within CPU_SHARE: bytes may be metered
        ({"link": (50_000_000, 10_000_000, 0.5)}, "small"),
        ({"link": (50_000_000, 10_000_000, 0.5), "arrival": 2e6}, "default"),  # SMALL over the share
        ({"link": (50_000_000, 10_000_000, 0.5), "arrival": 20e6}, "fast"),  # nothing within it: the race
        ({"link": (5_000_000, 1_000_000, 5.0), "arrival": 20e6}, "small"),  # ... on a 200 kB/s link
        ({"link": (50_000_000, 10_000_000, 0.5), "bandwidth": 100_000, "arrival": 20e6}, "small"),  # capped
        ({"link": (50_000_000, 10_000_000, 0.5), "daily_bytes": 10**9, "arrival": 20e6}, "small"),  # budget
    ],
)
def test_backlog_batches_are_sealed_bytes_lean_within_the_cpu_share(
    tmp_path: Path, overrides: dict[str, Any], expected: str
) -> None:
    codecs = _backlog_codecs(tmp_path, **overrides)
    assert len(codecs) >= 4
    if expected == "small":
        assert codecs == [Codec.DELTA_LZMA] * len(codecs)
    elif expected == "fast":
        assert codecs == [Codec.ZSTD_DICT] * len(codecs)
    else:  # the sealer's choice: columnar v9 data gets codec 3
        assert Codec.DELTA_LZMA not in codecs
        assert Codec.COLUMNAR in codecs


def test_backlog_batches_on_the_dns_rung_go_with_codec_5(tmp_path: Path) -> None:
    """Where every byte costs a share of a DNS query, the backlog goes with codec 5 (field deltas), which the
    DNS rung asks for (since issue 14's bytes round the POST rung's backlog goes with codec 5 too)."""
    dns = DnsTransport(zone="t.example.org", resolver=("127.0.0.1", 9))
    codecs = _backlog_codecs(tmp_path, transport=dns, link=(5_000_000, 1_000_000, 5.0))
    assert len(codecs) >= 4
    assert codecs == [Codec.DELTA_LZMA] * len(codecs)


@pytest.mark.parametrize("dns", [True, False])
def test_a_caught_up_batch_on_the_dns_rung_tries_codec_5_too(tmp_path: Path, dns: bool) -> None:
    """Caught up (nothing spooled behind the batch), the DNS rung seals codec 5 at preset 6 beside the choice
    and keeps the smaller (on 50 softflowd v9 datagrams, codec 5); the POST rung seals ``LEAN`` (codec 5 at
    preset 1) above a quiet site's rate (below it, a stream: ``test_stream``)."""
    key = generate_key()
    spool = open_spool(tmp_path)
    spool.append(v9_export(50))
    transport = DnsTransport(zone="t.example.org", resolver=("127.0.0.1", 9)) if dns else None
    up = Uploader(config(tmp_path, "http://127.0.0.1:9", key), key, spool, transport=transport)
    up._last_seq = spool.last_seq()
    _not_quiet(up)
    body, batch = up._seal(spool.read(after=0, limit=100))
    spool.close()
    assert len(batch) == 50
    assert peek_header(body).codec is Codec.DELTA_LZMA
    if not dns:
        assert up._choice is LEAN


def test_caught_up_batches_above_a_quiet_sites_rate_reuse_codec_5s_field_plans(tmp_path: Path) -> None:
    """issue 14 (the fast link's row): ``LEAN`` batches take codec 5's field plans from the uploader's
    ``PlanCache``, chosen for the first batch and reused for the next ones (choosing them is most of codec
    5's CPU), and every batch opens to its datagrams."""
    key = generate_key()
    spool = open_spool(tmp_path)
    sent = v9_export(120)
    spool.append(sent)
    up = Uploader(config(tmp_path, "http://127.0.0.1:9", key), key, spool)
    _not_quiet(up)
    got: list[Datagram] = []
    after, chosen = 0, []
    while after < len(sent):
        up._last_seq = after + 30  # each batch caught up: the datagrams arrive 30 at a time
        body, batch = up._seal(spool.read(after=after, limit=30))
        assert up._choice is LEAN
        assert peek_header(body).codec is Codec.DELTA_LZMA
        got += open_batch(body, key=key).datagrams
        chosen.append(up._plans.chosen)
        after = batch[-1].seq
    spool.close()
    assert got == sent
    assert len(chosen) == 4
    assert chosen[0] > 0
    assert chosen == [chosen[0]] * 4


async def test_a_backlog_to_a_loopback_gateway_goes_bytes_lean(
    tmp_path: Path, gateway_factory: GatewayFactory
) -> None:
    """On loopback the measured link is fast, but nothing arrives meanwhile: the agent keeps up with codec 5
    within its CPU share, so the backlog drains bytes-lean (issue 14: before, the fast link picked zstd
    level 3 and a metered link paid for it); so does it with a bandwidth cap of 100 kB/s."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = v9_export(3000)
    spool = open_spool(tmp_path)
    spool.append(sent)
    async with gateway_factory(data) as gw:
        up = Uploader(config(tmp_path, gw.url, key, max_batch_datagrams=500), key, spool)
        await up.open()
        try:
            assert await up.drain()
        finally:
            await up.close()
        assert_exactly_once(gw, sent)
        assert up.stats.batches >= 6
        assert (up.link.body_rate or 0) > 0
        assert up.stats.codecs[Codec.DELTA_LZMA] >= up.stats.batches // 2
        assert sum(up.stats.codecs.values()) == up.stats.batches
        assert up.status()["link_bytes_per_s"] == round(up.link.body_rate or -1)

        more = v9_export(1000, seed=17)
        spool.append(more)
        up = Uploader(config(tmp_path, gw.url, key, max_batch_datagrams=250, bandwidth=100_000), key, spool)
        await up.open()
        try:
            assert await up.drain()
        finally:
            await up.close()
        # all but the one that caught up (a quiet site's stream frame: codec 5 or 6)
        assert up.stats.codecs[Codec.DELTA_LZMA] >= up.stats.batches - 1
        assert_exactly_once(gw, sent + more)
    spool.close()


def test_the_newest_committed_datagrams_are_batched_from_memory_as_the_spool_holds_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the receiver committed is read back from memory exactly as ``DurableLog.read`` would give it;
    anything that breaks the run (a gap, a quota drop, the memory bound) sends the uploader to the spool."""
    key = generate_key()
    spool = open_spool(tmp_path)
    up = Uploader(config(tmp_path, "http://127.0.0.1:9", key), key, spool)
    up._delivery.wants_resync = False  # resynchronised: commits are kept in memory from here
    sent = datagrams(30)

    def commit(chunk: list[Datagram]) -> None:
        up.spooled(spool.append(chunk), chunk)

    def same(after: int, limit: int = 1000, max_bytes: int = 1 << 20) -> bool:
        cached = up._read_tail(after, limit, max_bytes)
        return cached is not None and cached == spool.read(after=after, limit=limit, max_bytes=max_bytes)

    commit(sent[:10])
    commit(sent[10:20])
    assert same(0)
    assert same(3, limit=5)
    assert same(3, max_bytes=1000)  # 300-byte payloads: 3 fit
    assert same(7)
    assert up._last_seq == 20
    assert same(12)  # entries at or below the mark are discarded as it moves on
    assert up._read_tail(5, 1000, 1 << 20) is None
    assert up._read_tail(20, 1000, 1 << 20) is None  # nothing above the last seq: ask the spool

    spool.advance_seq(100)  # seqs jump (as after a resync): the run restarts at the next commit
    commit(sent[20:25])
    assert up._read_tail(20, 1000, 1 << 20) is None
    assert same(99)

    monkeypatch.setattr("flowtunnel.agent.uploader.TAIL_BYTES", 3 * 300)
    commit(sent[25:28])
    commit(sent[28:30])
    assert up._read_tail(104, 1000, 1 << 20) is None  # the oldest left memory
    assert same(106)

    up.stats.consecutive_failures = 1  # the gateway is unreachable: keep nothing in memory
    commit(datagrams(2, seed=5))
    assert up._read_tail(106, 1000, 1 << 20) is None
    spool.close()


def test_a_commit_that_dropped_old_entries_empties_the_memory(tmp_path: Path) -> None:
    key = generate_key()
    spool = DurableLog(LogConfig(path=tmp_path / "spool.sqlite", quota_bytes=20 * (300 + 9 + 48)))
    up = Uploader(config(tmp_path, "http://127.0.0.1:9", key), key, spool)
    up._delivery.wants_resync = False  # resynchronised: commits are kept in memory from here
    sent = datagrams(30)
    first = spool.append(sent[:10])
    up.spooled(first, sent[:10])
    second = spool.append(sent[10:30])  # over the quota: DROP_OLDEST deletes the first ten
    assert second.dropped > 0
    up.spooled(second, sent[10:30])
    assert up._read_tail(0, 1000, 1 << 20) is None
    spool.close()


async def test_backlog_and_drops_reach_the_gateway(tmp_path: Path, gateway_factory: GatewayFactory) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    spool = open_spool(tmp_path)
    spool.append(datagrams(50))
    async with gateway_factory(data) as gw:
        up = Uploader(config(tmp_path, gw.url, key), key, spool,
                      dropped=lambda: {"spool_full": 7, "receiver_overflow": 0})
        await up.open()
        try:
            assert await up.drain()
        finally:
            await up.close()
        stats = gw.metrics.agents[AGENT]
        assert stats.dropped == {"spool_full": 7}
        assert stats.backlog is not None
    spool.close()


async def test_through_tinyproxy_with_basic_auth(tmp_path: Path, gateway_factory: GatewayFactory) -> None:
    require("tinyproxy")
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(300, seed=9)
    spool = open_spool(tmp_path)
    spool.append(sent)
    with Tinyproxy(tmp_path, auth=("flow", "s3cret")) as proxy:
        async with gateway_factory(data) as gw:
            cfg = config(tmp_path, gw.url, key, proxy=proxy.proxy_url)
            async with uploading(cfg, key, spool) as up:
                await eventually(lambda: spool.cursor(CURSOR) == len(sent), "delivered through the proxy")
                assert up.stats.failures == {}
            assert_exactly_once(gw, sent)
        assert "/v1/b " in proxy.log_text()
    spool.close()


async def test_wrong_proxy_password_is_a_retried_407(tmp_path: Path, gateway_factory: GatewayFactory) -> None:
    require("tinyproxy")
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    spool = open_spool(tmp_path)
    spool.append(datagrams(5))
    with Tinyproxy(tmp_path, auth=("flow", "s3cret")) as proxy:
        async with gateway_factory(data) as gw:
            cfg = config(tmp_path, gw.url, key, proxy=proxy.url.replace("://", "://flow:wrong@"))
            async with uploading(cfg, key, spool) as up:
                await eventually(lambda: up.stats.failures["http-407"] >= 2, "407 retried with backoff")
            assert journal_of(gw, AGENT) == []
    assert spool.stats().entries == 5
    spool.close()


async def test_http_proxy_from_the_environment(
    tmp_path: Path, gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    require("tinyproxy")
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(20, seed=10)
    spool = open_spool(tmp_path)
    spool.append(sent)
    with Tinyproxy(tmp_path) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        async with gateway_factory(data) as gw:
            async with uploading(config(tmp_path, gw.url, key), key, spool):
                await eventually(lambda: spool.cursor(CURSOR) == len(sent), "delivered via HTTP_PROXY")
            assert_exactly_once(gw, sent)
        assert "/v1/b " in proxy.log_text()
    spool.close()


async def test_no_proxy_bypasses_the_environment_proxy(
    tmp_path: Path, gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    spool = open_spool(tmp_path)
    spool.append(datagrams(5))
    # A proxy that does not exist: only a bypass can deliver.
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_tcp_port()}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    async with gateway_factory(data) as gw, uploading(config(tmp_path, gw.url, key), key, spool) as up:
        await eventually(lambda: spool.cursor(CURSOR) == 5, "delivered directly")
        assert up.stats.failures == {}
    spool.close()


@pytest.mark.parametrize(("no_proxy", "bypassed"), [
    ("127.0.0.1", True), ("*", True), (".example.net,127.0.0.1", True),
    ("127.0.0.1:8080", True),  # that port only: the gateway's
    ("127.0.0.1:9", False),  # before: ports were ignored, so another port's entry bypassed the proxy too
    ("127.0.0.0/8", True),  # before: CIDR blocks were not read, so the proxy was used
    ("10.0.0.0/8 example.net", False),  # blank-separated, none matching
])
def test_no_proxy_is_read_one_way_for_every_route(no_proxy: str, bypassed: bool) -> None:
    """The environment's NO_PROXY means the same to the client as to proxy discovery (ports, CIDR blocks,
    blanks), so a proxy is not skipped by one and used by the other."""
    from flowtunnel.agent.transport.post import choose_proxy

    proxy = "http://proxy.example:3128"
    env = {"http_proxy": proxy, "no_proxy": no_proxy}
    assert choose_proxy("http://127.0.0.1:8080", None, env) == (None if bypassed else proxy)


async def test_pac_routes_are_tried_in_order_when_one_cannot_be_connected_to(
    tmp_path: Path, gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    """``PROXY a; PROXY b; DIRECT`` with neither proxy there: the batches go DIRECT, the third route, which
    stays in use; the change is logged once. Before: only the first route was used, and nothing arrived."""
    pytest.importorskip("dukpy")
    caplog.set_level(logging.INFO)
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(30, seed=12)
    spool = open_spool(tmp_path)
    spool.append(sent[:10])
    dead = [free_tcp_port(), free_tcp_port()]
    pac = tmp_path / "proxy.pac"
    pac.write_text("function FindProxyForURL(url, host) {\n"
                   f"  return 'PROXY 127.0.0.1:{dead[0]}; PROXY 127.0.0.1:{dead[1]}; DIRECT';\n}}\n")
    async with gateway_factory(data) as gw:
        cfg = config(tmp_path, gw.url, key, proxy="auto", pac=str(pac))
        async with uploading(cfg, key, spool) as up:
            await eventually(lambda: spool.cursor(CURSOR) == 10, "delivered on the third route")
            spool.append(sent[10:])
            up.notify()
            await eventually(lambda: spool.cursor(CURSOR) == len(sent), "the rest on the same route")
            assert up.status()["route"] == "direct"
        assert_exactly_once(gw, sent)
    changes = [r.getMessage() for r in caplog.records if "now going direct (from pac)" in r.getMessage()]
    assert len(changes) == 1, changes
    assert f"127.0.0.1:{dead[0]}" in changes[0]
    spool.close()


def self_signed(tmp_path: Path) -> tuple[Path, Path, str]:
    """A certificate for 127.0.0.1 (its own CA), its key, and the SHA-256 of its DER form."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flowtunnel test gateway")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "gw.crt", tmp_path / "gw.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    return cert_path, key_path, cert.fingerprint(hashes.SHA256()).hex()


@pytest.mark.parametrize(
    ("trust", "cause"),
    [
        ("ca", None),
        ("pin", None),
        ("ca+pin", None),
        ("ca+wrong-pin", "tls:pin-mismatch"),
        ("nothing", "tls:handshake"),
    ],
)
async def test_tls_with_custom_ca_and_pinning(
    tmp_path: Path, gateway_factory: GatewayFactory, trust: str, cause: str | None
) -> None:
    cert, cert_key, pin = self_signed(tmp_path)
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(30, seed=11)
    spool = open_spool(tmp_path)
    spool.append(sent)
    settings: dict[str, Any] = {}
    if "ca" in trust:
        settings["ca_file"] = cert
    if trust.endswith("pin"):
        settings["pin_sha256"] = ("00" * 32) if "wrong" in trust else pin
    async with gateway_factory(data, tls_cert=cert, tls_key=cert_key) as gw:
        assert gw.url.startswith("https://")
        async with uploading(config(tmp_path, gw.url, key, **settings), key, spool) as up:
            if cause is None:
                await eventually(lambda: spool.cursor(CURSOR) == len(sent), "delivered over TLS")
                assert up.stats.failures == {}
            else:
                await eventually(lambda: up.stats.failures[cause] >= 1, f"refused with {cause}")
        if cause is None:
            assert_exactly_once(gw, sent)
        else:
            assert journal_of(gw, AGENT) == []
    spool.close()


async def test_https_gateway_through_tinyproxy_connect(
    tmp_path: Path, gateway_factory: GatewayFactory
) -> None:
    require("tinyproxy")
    cert, cert_key, _ = self_signed(tmp_path)
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(50, seed=12)
    spool = open_spool(tmp_path)
    spool.append(sent)
    with Tinyproxy(tmp_path, auth=("flow", "s3cret")) as proxy:
        async with gateway_factory(data, tls_cert=cert, tls_key=cert_key) as gw:
            cfg = config(tmp_path, gw.url, key, proxy=proxy.proxy_url, ca_file=cert)
            async with uploading(cfg, key, spool) as up:
                await eventually(lambda: spool.cursor(CURSOR) == len(sent), "delivered through CONNECT")
                assert up.stats.failures == {}
            assert_exactly_once(gw, sent)
        assert "CONNECT" in proxy.log_text()
    spool.close()


async def test_daily_budget_stops_uploads_until_midnight_and_persists(
    tmp_path: Path, gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(40, size=500, seed=13)
    spool = open_spool(tmp_path)
    spool.append(sent)
    # Batches of 10 datagrams (~5 kB each): the first of the day always goes, the budget stops the next.
    async with gateway_factory(data) as gw:
        cfg = config(tmp_path, gw.url, key, daily_bytes=6000, max_batch_datagrams=10)
        async with uploading(cfg, key, spool) as up:
            await eventually(
                lambda: any("daily upload budget" in r.getMessage() for r in caplog.records), "budget reached"
            )
            assert spool.cursor(CURSOR) == 10
            assert up.stats.next_attempt is not None
        assert [seq for seq, _ in journal_of(gw, AGENT)] == list(range(1, 11))
    days = spool.states("budget:")
    assert len(days) == 1
    assert next(iter(days.values())) > 5000
    spool.close()


async def test_a_gateway_that_answers_resyncs_but_refuses_every_batch_is_not_reported_healthy(
    tmp_path: Path, gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 17.11: after each 503 the resync succeeded, which reset the failure streak (and the backoff),
    set "last success" and logged "reachable again" every cycle, while nothing was acknowledged."""
    caplog.set_level(logging.INFO, logger="flowtunnel.agent.uploader")
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(20, seed=21)
    spool = open_spool(tmp_path)
    spool.append(sent)
    async with gateway_factory(data, retry_after=1) as gw:
        journal = gw.journal
        assert journal is not None
        # The gateway's group commit writes through append_group: that is where the journal is "full".
        real_append = journal.append_group

        def full(*args: Any, **kwargs: Any) -> Any:
            raise LogFull("journal full (test)", path=str(journal.path))

        journal.append_group = full  # type: ignore[method-assign]
        async with uploading(config(tmp_path, gw.url, key), key, spool) as up:
            await eventually(lambda: up.stats.failures["http-503"] >= 3, "several 503s")
            assert up.stats.resyncs >= 3  # every one of them answered 200
            assert up.stats.consecutive_failures >= 3  # ... and none ended the episode
            assert up.stats.last_ack is None
            assert up.stats.unacked_since is not None
            assert not any("reachable again" in r.getMessage() or "acknowledging data again" in r.getMessage()
                           for r in caplog.records)
            doc = {"kind": "agent", "upload": up.status(), "backlog": {"datagrams": len(sent)}}
            text = render_status(doc, now=up.stats.unacked_since + 42)
            assert "NOT ACKNOWLEDGED for 42 s" in text
            journal.append_group = real_append  # type: ignore[method-assign]
            await eventually(lambda: spool.cursor(CURSOR) == len(sent), "delivered once the journal has room")
            assert up.stats.consecutive_failures == 0
            assert up.stats.unacked_since is None
            assert up.stats.last_ack is not None
            again = [r for r in caplog.records if "acknowledging data again" in r.getMessage()]
            assert len(again) == 1  # once per episode
        assert_exactly_once(gw, sent)
    spool.close()


def test_lean_is_a_seal_once_way_tried_beside_zstd_then_sealed_alone_while_it_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14: above a quiet site's rate LEAN (codec 5) is one of the seal-once ways (``SealWays``): a trial
    batch is sealed LEAN and with zstd (codecs 3 and 2) and the smaller kept; while LEAN wins (on
    softflowd-like v9 it does) the next batches are sealed LEAN alone, one call each. On data where zstd
    wins (the Cisco IPFIX captures, whose records zstd's bundled dictionary knows) the trial keeps zstd."""
    from flowtunnel.agent import uploader as uploader_module

    calls: list[dict[str, Any]] = []
    real = uploader_module.seal_batch_and_context  # type: ignore[attr-defined]

    def counting(**kw: Any) -> tuple[bytes, bytes]:
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(uploader_module, "seal_batch_and_context", counting)
    key = generate_key()
    spool = open_spool(tmp_path)
    spool.append(v9_export(90))
    up = Uploader(config(tmp_path, "http://127.0.0.1:9", key), key, spool)
    _not_quiet(up)
    codecs: list[list[object]] = []
    after = 0
    while after < 90:
        up._last_seq = after + 30
        calls.clear()
        body, batch = up._seal(spool.read(after=after, limit=30))
        assert up._choice is LEAN
        assert peek_header(body).codec is Codec.DELTA_LZMA
        codecs.append([kw.get("codec") for kw in calls])
        after = batch[-1].seq
    spool.close()
    # one way at a time (peak RSS); LEAN first, with the LZMA2 encoder kept from the batch before
    trial = [Codec.DELTA_LZMA, Codec.COLUMNAR, Codec.ZSTD_DICT]
    assert codecs == [trial, [Codec.DELTA_LZMA], [Codec.DELTA_LZMA]]
