"""The bytes preference of the ladder with a real agent and gateway on loopback (issue 14): once POST carried
a batch, batches go by the WebSocket rung (no HTTP heads per batch), delivered exactly once; through a squid
that strips Upgrade the agent tries ws once, goes back to POST and stays there."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from flowtunnel.agent.transport.network import local_fingerprint
from flowtunnel.agent.uploader import CURSOR, RUNG_MEMORY
from tests.agent.conftest import GatewayFactory, enroll, eventually, trickle
from tests.agent.squid import Squid
from tests.agent.test_uploader import AGENT, assert_exactly_once, config, datagrams, open_spool, uploading
from tests.conftest import require

RUNGS = ("post", "ws", "get")  # the default ladder


def switches_said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("upload rung")]


async def test_after_the_first_acknowledged_batch_the_agent_moves_to_ws_and_delivers_exactly_once(
    tmp_path: Path, gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A network the agent does not know: the rungs race, POST answers first and carries the first batch;
    the next batches go by ws, for bytes, said once at INFO. Before: every batch went by POST."""
    caplog.set_level(logging.INFO, logger="flowtunnel.agent")
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(60, seed=71)
    spool = open_spool(tmp_path)
    spool.append(sent[:20])
    async with gateway_factory(data) as gw:
        cfg = config(tmp_path, gw.url, key, rungs=RUNGS)
        async with uploading(cfg, key, spool) as up:
            await eventually(lambda: spool.cursor(CURSOR) == 20, "the first part delivered")
            await trickle(up, spool, [sent[20:40], sent[40:]])
            status = up.status()
            assert status["rung"] == "ws"
            assert status["rung_for_bytes"] is True
            assert status["rung_why"] == "fewer bytes per batch than post"
            assert status["rungs"] == {"post": "good", "ws": "good", "get": "untried"}
            assert status["switches"] == 1
            assert up.stats.failures == {}
            rungs = gw.metrics.rungs
            assert rungs["post"]["acked"] >= 1  # the first batch, by the reach order
            assert rungs["ws"]["acked"] >= 2  # the resync on ws, then the batches after it
        assert_exactly_once(gw, sent)
    said = switches_said(caplog)
    assert said == ["upload rung post -> ws: fewer bytes per batch than post (no HTTP heads per batch); "
                    "trying ws now"]
    assert [r.levelno for r in caplog.records if r.getMessage() in said] == [logging.INFO]
    # Remembered for this network: the next start begins on ws.
    assert json.loads((tmp_path / RUNG_MEMORY).read_text())[local_fingerprint()]["rung"] == "ws"
    spool.close()


async def test_through_a_proxy_that_strips_upgrade_it_tries_ws_once_and_stays_on_post(
    tmp_path: Path, gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Squid's default: Upgrade stripped, so the gateway sees no WebSocket handshake. POST remembered for this
    network: the first batch by POST, one try of ws (a path refusal), back to POST (not down to GET), and no
    other switch for ``reprobe_after``. Before: no switch at all (the POST-only part holds before too)."""
    require("squid")
    caplog.set_level(logging.INFO, logger="flowtunnel.agent")
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(60, seed=72)
    spool = open_spool(tmp_path)
    spool.append(sent[:20])
    (tmp_path / RUNG_MEMORY).write_text(json.dumps({local_fingerprint(): "post"}))
    with Squid() as squid:
        async with gateway_factory(data) as gw:
            cfg = config(tmp_path, gw.url, key, proxy=squid.url, rungs=RUNGS)
            async with uploading(cfg, key, spool) as up:
                await eventually(lambda: spool.cursor(CURSOR) == 20, "the first part delivered")
                await trickle(up, spool, [sent[20:40], sent[40:]])
                status = up.status()
                assert status["rung"] == "post"
                assert status["rung_for_bytes"] is False
                states = status["rungs"]
                assert isinstance(states, dict)
                assert states["post"] == "good"
                assert "Upgrade stripped" in states["ws"]
                assert states["get"] == "untried"
                assert status["switches"] == 2
                assert str(status["rung_why"]).startswith("ws failed: ")
                assert "ws" not in gw.metrics.rungs or gw.metrics.rungs["ws"].get("acked", 0) == 0
            assert_exactly_once(gw, sent)
    said = switches_said(caplog)
    assert len(said) == 2, said
    assert said[0] == ("upload rung post -> ws: fewer bytes per batch than post (no HTTP heads per batch); "
                       "trying ws now")
    assert said[1].startswith("upload rung ws -> post: ")
    assert said[1].endswith("(Upgrade stripped) refuses it (ws-upgrade-stripped); ws again in 600 s; "
                            "retrying on post now")
    spool.close()


async def test_with_rungs_post_get_the_agent_stays_on_post(
    tmp_path: Path, gateway_factory: GatewayFactory
) -> None:
    """``--rungs post,get`` turns the preference off."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(40, seed=73)
    spool = open_spool(tmp_path)
    spool.append(sent[:20])
    async with gateway_factory(data) as gw:
        cfg = config(tmp_path, gw.url, key, rungs=("post", "get"))
        async with uploading(cfg, key, spool) as up:
            await eventually(lambda: spool.cursor(CURSOR) == 20, "the first part delivered")
            await trickle(up, spool, [sent[20:]])
            assert up.status()["rung"] == "post"
            assert up.status()["switches"] == 0
        assert_exactly_once(gw, sent)
    spool.close()


async def test_the_batch_that_met_the_switch_goes_after_the_resync_without_another_latency_wait(
    tmp_path: Path, gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch due when the ladder moves to ws goes right after the new rung's resync. Before: it waited
    another ``--latency`` (the aborted attempt counted as a send), and so did a batch retried on another rung
    after a failure: in the zoo, every proxy network took ~1 s longer to deliver everything."""
    latency = 2.0
    waits: list[float] = []
    sleep = asyncio.sleep

    async def watched(delay: float, *args: Any) -> Any:
        if sys._getframe(1).f_code.co_name == "_send_next":  # the caught-up batch's latency wait
            waits.append(delay)
        return await sleep(delay, *args)

    monkeypatch.setattr(asyncio, "sleep", watched)
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(40, seed=74)
    spool = open_spool(tmp_path)
    spool.append(sent[:20])
    async with gateway_factory(data) as gw:
        cfg = config(tmp_path, gw.url, key, rungs=RUNGS, latency=latency)
        async with uploading(cfg, key, spool) as up:
            await eventually(lambda: spool.cursor(CURSOR) == 20, "the first part delivered")
            spool.append(sent[20:])
            up.notify()
            await eventually(lambda: spool.cursor(CURSOR) == 40, "the rest delivered", within=15.0)
            assert up.status()["rung"] == "ws"
        assert_exactly_once(gw, sent)
    # One wait for the second batch (up to --latency after the first), none after the switch.
    assert len([w for w in waits if w > latency / 2]) == 1, waits
    spool.close()
