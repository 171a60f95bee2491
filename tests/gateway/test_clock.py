"""The gateway acts on its own clock: it journals its receive time with every datagram and reports how far
each agent's clock is off (issue 17.8: an agent 1 h slow lost fresh flows to retention)."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import aiohttp
import pytest

from flowtunnel.datagram import Datagram
from flowtunnel.gateway.status import render
from flowtunnel.wire import seal_batch
from tests.gateway.util import datagrams, enroll, journal_entries, post_batch, start_gateway

HOUR = 3600 * 10**9


def shifted(dgs: list[Datagram], offset_ns: int) -> list[Datagram]:
    """The datagrams as an agent whose clock is ``offset_ns`` off would have stamped them just now."""
    now = time.time_ns()
    return [dataclasses.replace(d, received_ns=now + offset_ns + i) for i, d in enumerate(dgs)]


async def test_journal_keeps_the_gateways_receive_time_and_status_reports_each_agents_skew(
    tmp_path: Path,
) -> None:
    data = tmp_path / "gw"
    keys = {name: enroll(data, name) for name in ("slow", "fast", "sealed")}
    gw = await start_gateway(data)
    try:
        async with aiohttp.ClientSession() as session:
            before = time.time_ns()
            for first in (1, 4):  # two batches each: the skew is a median over batches
                for name, offset in (("slow", -HOUR), ("fast", 2 * HOUR)):
                    body = seal_batch(agent_id=name, key=keys[name], first_seq=first, nonce=os.urandom(12),
                                      datagrams=shifted(datagrams(3, start=first), offset))
                    status, doc, _ = await post_batch(session, gw.url, body, agent=name)
                    assert status == 200, doc
            # An agent that seals its clock (agent info clock_ms) is measured by it even for old datagrams (a
            # backlog): 30 min fast, with datagrams received by it an hour before.
            body = seal_batch(agent_id="sealed", key=keys["sealed"], first_seq=1, nonce=os.urandom(12),
                              datagrams=shifted(datagrams(2), -HOUR // 2),
                              agent_info={"clock_ms": (time.time_ns() + HOUR // 2) // 10**6})
            status, doc, _ = await post_batch(session, gw.url, body, agent="sealed")
            assert status == 200, doc
            after = time.time_ns()
        entries = journal_entries(gw)
        assert len(entries) == 14
        for e in entries:
            assert e.appended_ns is not None
            assert before <= e.appended_ns <= after  # the gateway's clock ...
        slow = [e for e in entries if e.stream == "slow"]
        assert all(e.datagram.received_ns < before - HOUR + 60 * 10**9 for e in slow)  # ... the agent's kept
        skews = {name: gw.metrics.agents[name].clock_skew for name in keys}
        assert skews["slow"] == pytest.approx(-3600, abs=30)
        assert skews["fast"] == pytest.approx(7200, abs=30)
        assert skews["sealed"] == pytest.approx(1800, abs=30)
        metrics = gw.metrics.render().decode()
        assert 'flowtunnel_gateway_agent_clock_skew_seconds{agent="slow"} -3' in metrics
        doc = gw.status()
        agents = doc["agents"]
        assert isinstance(agents, dict)
        assert agents["fast"]["clock_skew_s"] == pytest.approx(7200, abs=30)
        text = render(doc)
        assert "clock skew" in text
        assert "-60 min" in text
        assert "+2.0 h" in text
    finally:
        await gw.stop()
