"""Exactly once across rungs: one batch in flight on POST, WebSocket and GET-only at the same time is
journaled once, and a batch that overtakes its predecessor on a pipelining rung is refused instead of opening
a gap."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import aiohttp

from tests.gateway.util import datagrams, enroll, journal_entries, post_batch, seal, start_gateway

AGENT = "site-a"


def b64(body: bytes) -> str:
    return base64.urlsafe_b64encode(body).rstrip(b"=").decode()


async def over_get(session: aiohttp.ClientSession, url: str, body: bytes, batch_id: str) -> dict[str, Any]:
    text = b64(body)
    half = len(text) // 2
    doc: dict[str, Any] = {}
    for i, part in ((1, text[half:]), (0, text[:half])):
        async with session.get(f"{url}/v1/g/{AGENT}/{batch_id}/{i}/2/{part}") as resp:
            doc = await resp.json()
    return doc


async def over_ws(session: aiohttp.ClientSession, url: str, body: bytes) -> dict[str, Any]:
    async with session.ws_connect(url + "/v1/ws", protocols=("flowtunnel.v1",),
                                  headers={"X-Flowtunnel-Agent": AGENT}) as ws:
        await ws.send_bytes(body)
        msg = await ws.receive(timeout=10)
        doc = json.loads(msg.data)
        assert isinstance(doc, dict)
        return doc


async def test_one_batch_on_three_rungs_at_once_is_journaled_once(tmp_path: Path) -> None:
    key = enroll(tmp_path, AGENT)
    gw = await start_gateway(tmp_path, max_inflight_per_agent=3)
    try:
        body = seal(AGENT, key, 1, datagrams(20))
        async with aiohttp.ClientSession() as session:
            posted, ws_doc, get_doc = await asyncio.gather(
                post_batch(session, gw.url, body, agent=AGENT),
                over_ws(session, gw.url, body),
                over_get(session, gw.url, body, "00000000000000a1"),
            )
        docs = [posted[1], ws_doc, get_doc]
        assert [d["acked"] for d in docs] == [20, 20, 20]
        assert sorted(d["accepted"] for d in docs) == [0, 0, 20]
        assert [e.datagram for e in journal_entries(gw)] == datagrams(20)
        acked = {r: gw.metrics.rungs[r]["acked"] for r in ("post", "ws", "get")}
        assert acked == {"post": 1, "ws": 1, "get": 1}
    finally:
        await gw.stop()


async def test_a_get_batch_completing_before_its_predecessor_waits_for_it(tmp_path: Path) -> None:
    """Regression: batch 2 completing first was journaled with a gap, and batch 1 then counted as duplicates
    below the mark: its datagrams lost."""
    key = enroll(tmp_path, AGENT)
    gw = await start_gateway(tmp_path)
    try:
        first, second = seal(AGENT, key, 1, datagrams(3)), seal(AGENT, key, 4, datagrams(3, start=3))
        async with aiohttp.ClientSession() as session:
            doc = await over_get(session, gw.url, second, "00000000000000b2")
            assert (doc["error"], doc["acked"]) == ("out-of-order", 0)
            assert (await over_get(session, gw.url, first, "00000000000000b1"))["acked"] == 3
            assert (await over_get(session, gw.url, second, "00000000000000b3"))["acked"] == 6
        assert [e.datagram for e in journal_entries(gw)] == datagrams(6)
    finally:
        await gw.stop()
