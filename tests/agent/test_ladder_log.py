"""What the agent's log says about its rungs is what it does: a switch says the new rung is tried now (no
"retrying with backoff" or "retrying in 60 s" before an immediate retry), each switch is one line, and the
start-up line names the route batches take (``POST /v1/b`` by default, not ``/v1/batches``)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import pytest

from flowtunnel.agent.transport import Answer, Hints, Rejected
from flowtunnel.agent.transport.network import local_fingerprint
from flowtunnel.agent.uploader import CURSOR, RUNG_MEMORY, Uploader
from flowtunnel.runtime import TaskSet
from flowtunnel.wire.keys import generate_key
from tests.agent.conftest import GatewayFactory, enroll, eventually
from tests.agent.test_uploader import AGENT, assert_exactly_once, config, datagrams, open_spool

PROXY = "http://127.0.0.1:3128"


class RefusedByTheProxy:
    """A POST rung that a proxy on the path refuses (a 403 that is not the gateway's), every time."""

    name = "post"

    async def exchange(self, batch: bytes, hints: Hints) -> Answer:
        return Rejected(cause="http-403", detail=f"{hints.what}: HTTP 403 from the proxy {PROXY} (Forbidden)",
                        by=f"the proxy {PROXY}")

    async def close(self) -> None:
        pass


async def test_a_rung_switch_says_the_next_rung_is_tried_now_once_and_nothing_says_it_waits(
    tmp_path: Path, gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A network where POST worked before and a proxy now refuses it: the agent steps down to GET pieces at
    once, re-probes POST later and steps down again. Before: each step down was logged as "...; refused by
    the proxy ..., not by the gateway: retrying in 60 s" and then "upload rung post -> get: ...", and the
    batch went again at once."""
    caplog.set_level(logging.DEBUG, logger="flowtunnel.agent")
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(40, seed=41)
    spool = open_spool(tmp_path)
    spool.append(sent[:30])
    (tmp_path / RUNG_MEMORY).write_text(json.dumps({local_fingerprint(): "post"}))
    async with gateway_factory(data) as gw:
        cfg = config(tmp_path, gw.url, key, rungs=("post", "get"), reject_backoff=60.0)
        up = Uploader(cfg, key, spool)
        await up.open()
        await up._stacks[gw.url]["post"].close()
        up._stacks[gw.url]["post"] = RefusedByTheProxy()
        up._ladder.reprobe_after = 1.0
        tasks = TaskSet()
        tasks.spawn(up.run(), name="upload")
        try:
            # Well within reject_backoff (60 s): the switch did retry at once.
            await eventually(lambda: spool.cursor(CURSOR) == 30, "delivered by GET pieces", within=15.0)
            await asyncio.sleep(1.1)  # the next batch re-probes POST first
            spool.append(sent[30:])
            up.notify()
            await eventually(lambda: spool.cursor(CURSOR) == 40, "delivered after the re-probe", within=15.0)
            assert up.status()["rung"] == "get"
            switches = up._ladder.switches
        finally:
            await tasks.close()
            await up.close()
        assert_exactly_once(gw, sent)
    said = [r.getMessage() for r in caplog.records]
    refused = f"the proxy {PROXY} refuses it (http-403); retrying on get now"
    assert [m for m in said if m.startswith("upload rung")] == [
        f"upload rung post -> get: {refused}",
        "upload rung get -> post: re-probing post after 1 s on get; trying post now",
        f"upload rung post -> get: {refused}",
    ]
    assert switches == 3  # each switch logged once
    # What failed is said, without a wait the agent does not make.
    assert f"resync: HTTP 403 from the proxy {PROXY} (Forbidden); refused by the proxy {PROXY}, not by the " \
           "gateway" in said
    assert not [m for m in said if "retrying in" in m or "backoff" in m]
    spool.close()


@pytest.mark.parametrize(("rungs", "memory", "route"), [
    (("post",), None, "POST /v1/b"),
    (("post",), {"rung": "post", "path": "/v1/batches", "path_since": time.time()}, "POST /v1/batches"),
    (("post", "ws", "get"), {"rung": "ws"}, "WebSocket messages on /v1/ws"),
    (("post", "ws", "get"), None, "the first rung to answer on this new network (post: POST /v1/b, ws: "
                                  "WebSocket messages on /v1/ws, get: GET /v1/g/... pieces)"),
])
async def test_the_start_up_line_names_the_route_batches_take(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, rungs: tuple[str, ...],
    memory: dict[str, object] | None, route: str,
) -> None:
    """Before: "uploading to http://gw/v1/batches (...)" whatever the rung and path."""
    caplog.set_level(logging.INFO, logger="flowtunnel.agent.uploader")
    if memory is not None:
        (tmp_path / RUNG_MEMORY).write_text(json.dumps({local_fingerprint(): memory}))
    key = generate_key()
    spool = open_spool(tmp_path)
    up = Uploader(config(tmp_path, "http://127.0.0.1:9/", key, rungs=rungs), key, spool)
    await up.open()  # nothing is sent yet
    await up.close()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("uploading to")]
    assert len(said) == 1
    assert said[0].startswith(f"uploading to http://127.0.0.1:9 as agent {AGENT}: batches by {route} (direct")
    spool.close()
