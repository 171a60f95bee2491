"""Several ``--gateway`` URLs with the real uploader and real gateways (in-process): the agent moves on when
a gateway cannot be reached, not when a gateway refuses it; per gateway its own connections and probe state.
Exactly once across gateways that share a journal is in tests/scaleout/test_failover.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from flowtunnel.agent.metrics import StatusCollector
from flowtunnel.agent.status import render as render_status
from flowtunnel.agent.transport.post import PostTransport
from flowtunnel.agent.uploader import CURSOR
from tests.agent.conftest import GatewayFactory, enroll, eventually
from tests.agent.test_uploader import AGENT, assert_exactly_once, config, datagrams, open_spool, uploading
from tests.peers import free_tcp_port


async def test_a_dead_first_gateway_moves_the_agent_to_the_next_once(
    tmp_path: Path, gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(800)
    spool = open_spool(tmp_path)
    spool.append(sent)
    dead = f"http://127.0.0.1:{free_tcp_port()}"
    caplog.set_level(logging.INFO, logger="flowtunnel.agent.uploader")
    async with gateway_factory(data) as gw:
        cfg = config(tmp_path, ",".join((dead, gw.url)), key)
        async with uploading(cfg, key, spool) as up:
            await eventually(lambda: spool.cursor(CURSOR) == len(sent), "everything acknowledged")
            status = up.status()
            assert status["gateway"] == gw.url
            assert status["gateway_moves"] == 1
            gateways = status["gateways"]
            assert isinstance(gateways, dict)
            assert gateways[gw.url] == "current"
            assert gateways[dead].startswith("failed: resync: ")
            # Shown in `flowtunnel status` and on /metrics.
            doc = {"agent_id": AGENT, "gateway": status["gateway"], "upload": status}
            text = render_status(doc)
            assert f"gateway        {gw.url}\n" in text
            assert f"gateways       2 of 2 in use, 1 moves; {dead} failed: resync: " in text
            registry = CollectorRegistry(auto_describe=False)
            registry.register(StatusCollector(lambda: doc))
            metrics = generate_latest(registry).decode()
            assert f'flowtunnel_agent_gateway{{agent="{AGENT}",url="{gw.url}"}} 1.0' in metrics
            assert f'flowtunnel_agent_gateway{{agent="{AGENT}",url="{dead}"}} 0.0' in metrics
            assert f'flowtunnel_agent_gateway_moves_total{{agent="{AGENT}"}} 1.0' in metrics
            # Each gateway its own transports (connections, probe trust, pin and portal state).
            rungs = [up._stacks[url]["post"] for url in (dead, gw.url)]
            assert all(isinstance(r, PostTransport) for r in rungs)
            assert rungs[0] is not rungs[1]
            assert rungs[0].client is not rungs[1].client  # type: ignore[attr-defined]
        assert_exactly_once(gw, sent)
    # One line says what happens: the next gateway at once, not "retrying with backoff" first.
    why = gateways[dead].removeprefix("failed: ")
    moves = [r.getMessage() for r in caplog.records if "gateway" in r.getMessage() and why in r.getMessage()]
    assert moves == [f"gateway {dead} failed ({why}): moving to gateway {gw.url} at once"]
    assert not [r for r in caplog.records if "backoff" in r.getMessage()]
    spool.close()


async def test_a_refusal_any_gateway_would_give_does_not_move_it(
    tmp_path: Path, gateway_factory: GatewayFactory
) -> None:
    key = enroll(tmp_path / "gw2", AGENT)
    enroll(tmp_path / "gw1", "someone-else")  # gw1 does not know this agent: it refuses (4xx)
    spool = open_spool(tmp_path)
    spool.append(datagrams(10))
    async with gateway_factory(tmp_path / "gw1") as gw1, gateway_factory(tmp_path / "gw2") as gw2:
        cfg = config(tmp_path, ",".join((gw1.url, gw2.url)), key)
        async with uploading(cfg, key, spool) as up:
            await eventually(lambda: any(c.startswith("http-4") for c in up.stats.failures), "refused")
            status = up.status()
            assert (status["gateway"], status["gateway_moves"]) == (gw1.url, 0)
            assert spool.cursor(CURSOR) == 0
    spool.close()
