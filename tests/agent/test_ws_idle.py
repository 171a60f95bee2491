"""An idle WebSocket agent answers the gateway's pings and keeps its connection: the next batch goes on it,
without a failed attempt, a resync or a new upgrade (~700 bytes). A real agent and gateway, with the gateway's
ping interval (``ws_heartbeat``) shortened to 1 s: it drops a connection whose pong does not come within
half of it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from flowtunnel.agent.transport.ws import WsTransport
from flowtunnel.agent.uploader import CURSOR
from tests.agent.conftest import GatewayFactory, enroll, eventually
from tests.agent.test_uploader import AGENT, assert_exactly_once, config, datagrams, open_spool, uploading


async def test_an_idle_websocket_answers_the_gateways_pings_and_keeps_its_connection(
    tmp_path: Path, gateway_factory: GatewayFactory
) -> None:
    """Before: nothing read the connection between batches, the pings went unanswered, the gateway dropped
    the connection 1.5 heartbeats into the quiet, and the next batch met a dead connection
    (``connection:lost``, a backoff, then a resync and a new upgrade)."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(20, seed=61)
    spool = open_spool(tmp_path)
    spool.append(sent[:10])
    async with gateway_factory(data, ws_heartbeat=1.0) as gw:
        cfg = config(tmp_path, gw.url, key, rungs=("ws",))
        async with uploading(cfg, key, spool) as up:
            await eventually(lambda: spool.cursor(CURSOR) == 10, "first part delivered")
            ws = up._rungs["ws"]
            assert isinstance(ws, WsTransport)
            sock = ws._sock
            assert sock is not None
            requests = gw.metrics.rungs["ws"]["requests"]  # the upgrade and each batch
            await asyncio.sleep(4.0)  # idle for 4 heartbeats: dropped after 1.5 without pongs
            spool.append(sent[10:])
            up.notify()
            await eventually(lambda: spool.cursor(CURSOR) == 20, "second part delivered")
            assert ws._sock is sock  # the same connection
            assert up.stats.failures == {}
            assert gw.metrics.rungs["ws"]["requests"] == requests + 1  # one batch, no new upgrade
        assert_exactly_once(gw, sent)
    spool.close()
