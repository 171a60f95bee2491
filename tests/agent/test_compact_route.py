"""The compact batch route ``POST /v1/b`` refused once is not given up for good: the refusal may have come
from an older gateway, not from the network's proxy, and a gateway upgraded since gets ``/v1/b`` back (one
batch tries it every ``COMPACT_REPROBE`` seconds on ``/v1/batches``, in a running agent and after a
restart). The fall-back itself and its memory across a restart are in test_uploader.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from flowtunnel.agent.transport.network import RungMemory, local_fingerprint
from flowtunnel.agent.transport.post import COMPACT_REPROBE
from flowtunnel.agent.uploader import CURSOR, RUNG_MEMORY, Uploader
from flowtunnel.runtime import TaskSet
from tests.agent.conftest import GatewayFactory, enroll, eventually
from tests.agent.test_uploader import AGENT, assert_exactly_once, config, datagrams, open_spool
from tests.linkemu import Action, Fault, LinkEmulator


class Clock:
    """Unix seconds that a test moves on."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_a_running_agent_tries_the_compact_route_again_and_takes_it_back(
    tmp_path: Path, gateway_factory: GatewayFactory
) -> None:
    """Before: after the first 404 to ``POST /v1/b`` every batch went to ``/v1/batches`` for as long as the
    agent ran, and the network's memory said so for good."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(30, seed=51)
    spool = open_spool(tmp_path)
    clock = Clock()
    async with gateway_factory(data) as gw:
        host, port = gw.url.removeprefix("http://").rsplit(":", 1)
        async with LinkEmulator(upstream=(host, int(port))) as link:
            # An older gateway (or a reverse proxy in front of it) without /v1/b.
            link.add_fault(Fault(action=Action.ANSWER, status=404, match="POST /v1/b ", count=None))
            up = Uploader(config(tmp_path, link.url, key), key, spool, clock=clock)
            await up.open()
            tasks = TaskSet()
            tasks.spawn(up.run(), name="upload")
            try:
                memory = tmp_path / RUNG_MEMORY
                spool.append(sent[:10])
                up.notify()
                await eventually(lambda: spool.cursor(CURSOR) == 10, "first part on /v1/batches")
                assert up.status()["batch_path"] == "/v1/batches"
                refused = link.stats().faults.get("answer-404", 0)
                assert refused == 1
                since = RungMemory(memory).path_since(local_fingerprint())
                assert since is not None
                assert abs(since - clock.now) <= 1
                # Not yet: within COMPACT_REPROBE every batch goes to /v1/batches, no refused request.
                clock.now += COMPACT_REPROBE - 5
                spool.append(sent[10:20])
                up.notify()
                await eventually(lambda: spool.cursor(CURSOR) == 20, "second part on /v1/batches")
                assert link.stats().faults.get("answer-404", 0) == refused
                # The gateway is upgraded; once COMPACT_REPROBE is over, a batch tries /v1/b and keeps it.
                link.clear_faults()
                clock.now += 10
                spool.append(sent[20:])
                up.notify()
                await eventually(lambda: spool.cursor(CURSOR) == 30, "third part on /v1/b")
                assert up.status()["batch_path"] == "/v1/b"
                assert up.stats.failures == {}
                await eventually(lambda: RungMemory(memory).batch_path(local_fingerprint()) == "/v1/b",
                                 "the network's memory says /v1/b")
                assert RungMemory(memory).path_since(local_fingerprint()) is None
            finally:
                await tasks.close()
                await up.close()
        assert_exactly_once(gw, sent)
    spool.close()


@pytest.mark.parametrize("learned", ["long ago", "no date"])
async def test_a_restart_after_the_compact_route_was_refused_long_ago_tries_it_again(
    tmp_path: Path, gateway_factory: GatewayFactory, learned: str
) -> None:
    """The memory of a refused ``/v1/b`` expires (after ``COMPACT_REPROBE``); one without a date (written by
    an agent before this one) counts as expired. Before: it never did."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(10, seed=52)
    spool = open_spool(tmp_path)
    spool.append(sent)
    entry: dict[str, object] = {"rung": "post", "path": "/v1/batches"}
    if learned == "long ago":
        entry["path_since"] = time.time() - COMPACT_REPROBE - 60
    (tmp_path / RUNG_MEMORY).write_text(json.dumps({local_fingerprint(): entry}))
    async with gateway_factory(data) as gw:
        up = Uploader(config(tmp_path, gw.url, key), key, spool)
        await up.open()
        assert up.status()["batch_path"] == "/v1/batches"  # as remembered, until the first batch
        tasks = TaskSet()
        tasks.spawn(up.run(), name="upload")
        try:
            await eventually(lambda: spool.cursor(CURSOR) == len(sent), "delivered")
            assert up.status()["batch_path"] == "/v1/b"
            assert up.stats.failures == {}
        finally:
            await tasks.close()
            await up.close()
        assert_exactly_once(gw, sent)
    assert RungMemory(tmp_path / RUNG_MEMORY).batch_path(local_fingerprint()) == "/v1/b"
    spool.close()
