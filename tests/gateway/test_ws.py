"""``GET /v1/ws`` (docs/protocol.md 7.4) with aiohttp's WebSocket client: batches as binary messages, answers
in order with "status", the same ingest and dedup as POST, and every hostile or slow client bounded."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from flowtunnel.gateway import Gateway, Registry
from flowtunnel.wire import COMPACT_ACK_BYTES, parse_compact_ack, peek_header, seal_batch, verify_ack
from tests.gateway.util import datagrams, enroll, journal_entries, post_batch, seal, start_gateway

AGENT = "site-a"
PROTO = ("flowtunnel.v1",)


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    enroll(tmp_path, AGENT)
    gateway = await start_gateway(tmp_path, max_body=64 << 10, body_timeout=1.0, max_ws_per_agent=2)
    yield gateway
    await gateway.stop()


def key_of(gw: Gateway) -> bytes:
    with Registry(gw.data_dir) as reg:
        entry = reg.get(AGENT)
        assert entry is not None
        return entry.key


def connect(session: aiohttp.ClientSession, gw: Gateway, **kw: Any) -> Any:
    headers = kw.pop("headers", {"X-Flowtunnel-Agent": AGENT})
    return session.ws_connect(gw.url + "/v1/ws", protocols=kw.pop("protocols", PROTO), headers=headers, **kw)


async def answer(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive(timeout=10)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    doc = json.loads(msg.data)
    assert isinstance(doc, dict)
    return doc


async def test_batches_are_acked_in_order_with_tags_and_journaled_once(gw: Gateway) -> None:
    key = key_of(gw)
    bodies = [seal(AGENT, key, 1, datagrams(3)), seal(AGENT, key, 4, datagrams(2, start=3)),
              seal(AGENT, key, 1, datagrams(3))]  # the last is a replay: acked, nothing new
    async with aiohttp.ClientSession() as session, connect(session, gw) as ws:
        assert ws.protocol == "flowtunnel.v1"
        for body in bodies[:2]:  # pipelined: both sent before either answer is read
            await ws.send_bytes(body)
        docs = [await answer(ws), await answer(ws)]
        await ws.send_bytes(bodies[2])
        docs.append(await answer(ws))
    assert [(d["status"], d["acked"], d["accepted"], d["duplicates"]) for d in docs] == [
        (200, 3, 3, 0), (200, 5, 2, 0), (200, 5, 0, 3)]
    for doc, body in zip(docs, bodies, strict=True):
        nonce = peek_header(body).nonce
        verify_ack(key, agent_id=AGENT, request_nonce=nonce, acked=doc["acked"], tag=doc["tag"])
    assert [e.datagram for e in journal_entries(gw)] == datagrams(5)
    ws_rung = gw.metrics.rungs["ws"]
    assert (ws_rung["acked"], ws_rung["refused"]) == (3, 0)
    assert ws_rung["requests"] == 4  # the upgrade and three messages
    assert ws_rung["bytes_in"] > sum(map(len, bodies))
    assert ws_rung["bytes_out"] > 3 * 60


async def test_flowtunnel_v2_acknowledges_with_24_binary_bytes_and_refuses_in_json(gw: Gateway) -> None:
    """An agent offering ``flowtunnel.v2`` first gets it: each acknowledgement is one binary message of 24
    bytes (``wire.compact_ack``: acked u64 and the tag), 26 bytes on the wire where the JSON text took ~105;
    a refusal is still the JSON text. Offered only ``flowtunnel.v1`` (older agents), the JSON answers stay."""
    key = key_of(gw)
    first, second = seal(AGENT, key, 1, datagrams(3)), seal(AGENT, key, 4, datagrams(2, start=3))
    async with aiohttp.ClientSession() as session, connect(
            session, gw, protocols=("flowtunnel.v2", "flowtunnel.v1")) as ws:
        assert ws.protocol == "flowtunnel.v2"
        upgrade = gw.metrics.rungs["ws"]["bytes_out"]  # the 101 answer
        await ws.send_bytes(first)
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.BINARY
        assert len(msg.data) == COMPACT_ACK_BYTES == 24
        acked, tag = parse_compact_ack(msg.data)
        verify_ack(key, agent_id=AGENT, request_nonce=peek_header(first).nonce, acked=acked, tag=tag)
        assert acked == 3
        assert gw.metrics.rungs["ws"]["bytes_out"] - upgrade == 26  # the whole answer, frame head included
        await ws.send_bytes(b"garbage")
        assert (await answer(ws))["status"] == 400
    async with aiohttp.ClientSession() as session, connect(session, gw) as ws:
        assert ws.protocol == "flowtunnel.v1"
        await ws.send_bytes(second)
        doc = await answer(ws)
        assert (doc["status"], doc["acked"]) == (200, 5)
    assert [e.datagram for e in journal_entries(gw)] == datagrams(5)


async def test_refusals_come_in_order_with_the_post_status_and_code(gw: Gateway) -> None:
    key = key_of(gw)
    async with aiohttp.ClientSession() as session, connect(session, gw) as ws:
        await ws.send_bytes(b"garbage")
        await ws.send_bytes(seal(AGENT, os.urandom(32), 1, datagrams(1)))
        await ws.send_bytes(seal("other", key, 1, datagrams(1)))
        await ws.send_bytes(seal(AGENT, key, 1, datagrams(1)))
        docs = [await answer(ws) for _ in range(4)]
    assert [(d["status"], d.get("error")) for d in docs] == [
        (400, "bad-magic"), (401, "authentication-failed"), (400, "agent-mismatch"), (200, None)]
    assert [e.datagram for e in journal_entries(gw)] == datagrams(1)


async def test_a_gap_the_agent_did_not_declare_is_refused_as_out_of_order(gw: Gateway) -> None:
    """Regression: a pipelined batch k+1 overtaking a refused batch k would have been journaled with a gap,
    and k then dropped as a duplicate below the mark (lost)."""
    key = key_of(gw)
    later = seal(AGENT, key, 4, datagrams(2, start=3))
    async with aiohttp.ClientSession() as session, connect(session, gw) as ws:
        await ws.send_bytes(later)
        doc = await answer(ws)
        assert (doc["status"], doc["error"], doc["acked"]) == (409, "out-of-order", 0)
        await ws.send_bytes(seal(AGENT, key, 1, datagrams(5)))
        assert (await answer(ws))["acked"] == 5
        await ws.send_bytes(seal(AGENT, key, 9, datagrams(1, start=8)))
        assert (await answer(ws))["error"] == "out-of-order"
        await ws.send_bytes(seal_batch(agent_id=AGENT, key=key, first_seq=9, datagrams=datagrams(1, start=8),
                                       nonce=os.urandom(12), agent_info={"spool_first": 9}))
        doc = await answer(ws)
        assert (doc["status"], doc["acked"]) == (200, 9)  # a declared gap (the agent's own drops) passes
    assert gw.journal is not None
    assert gw.journal.get_state(f"hwm:{AGENT}") == 9


async def test_post_holds_a_batch_to_the_spool_start_it_declares(gw: Gateway) -> None:
    key = key_of(gw)
    async with aiohttp.ClientSession() as session:
        undeclared = seal(AGENT, key, 4, datagrams(1, start=3))
        status, doc, _ = await post_batch(session, gw.url, undeclared, agent=AGENT)
        assert (status, doc["acked"]) == (200, 4)  # today's agents: a gap is their drops
        lying = seal_batch(agent_id=AGENT, key=key, first_seq=8, datagrams=datagrams(1, start=7),
                           nonce=os.urandom(12), agent_info={"spool_first": 6})
        status, doc, _ = await post_batch(session, gw.url, lying, agent=AGENT)
        assert (status, doc["error"], doc["acked"]) == (409, "out-of-order", 4)


@pytest.mark.parametrize(
    ("headers", "protocols", "query", "status", "cause"),
    [
        ({}, PROTO, "", 400, "no-agent-header"),
        ({"X-Flowtunnel-Agent": AGENT}, (), "", 400, "ws-handshake"),
        ({"X-Flowtunnel-Agent": AGENT}, ("chat",), "", 400, "ws-handshake"),
        ({"X-Flowtunnel-Agent": "../etc"}, PROTO, "", 400, "ws-handshake"),
        ({"X-Flowtunnel-Agent": "nobody"}, PROTO, "", 401, "unknown-agent"),
        ({}, PROTO, "?agent=nobody", 401, "unknown-agent"),
        ({"X-Flowtunnel-Agent": "gone"}, PROTO, "", 403, "revoked"),
    ],
)
async def test_bad_handshakes_are_refused_before_the_upgrade(
    gw: Gateway, headers: dict[str, str], protocols: tuple[str, ...], query: str, status: int, cause: str
) -> None:
    with Registry(gw.data_dir) as reg:
        reg.enroll("gone")
        reg.revoke("gone")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            async with session.ws_connect(gw.url + "/v1/ws" + query, protocols=protocols, headers=headers):
                pass
        assert info.value.status == status
        async with session.get(gw.url + "/v1/ws", headers=headers) as resp:  # no upgrade at all
            assert resp.status == 400
    assert gw.metrics.rejects_by_cause.get(cause, 0) >= 1
    assert journal_entries(gw) == []


async def test_the_agent_id_may_come_in_the_query(gw: Gateway) -> None:
    key = key_of(gw)
    async with aiohttp.ClientSession() as session, session.ws_connect(
        gw.url + f"/v1/ws?agent={AGENT}", protocols=PROTO
    ) as ws:
        await ws.send_bytes(seal(AGENT, key, 1, datagrams(1)))
        assert (await answer(ws))["acked"] == 1


async def test_hostile_messages_close_the_connection_with_their_code(gw: Gateway) -> None:
    key = key_of(gw)
    async with aiohttp.ClientSession() as session:
        async with connect(session, gw) as ws:
            await ws.send_str("hello")
            msg = await ws.receive(timeout=10)
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert ws.close_code == 1003
        async with connect(session, gw) as ws:
            await ws.send_bytes(os.urandom(65 << 10))  # over max_body (64 KiB)
            msg = await ws.receive(timeout=10)
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert ws.close_code == 1009
        async with connect(session, gw) as ws:  # the gateway keeps serving
            await ws.send_bytes(seal(AGENT, key, 1, datagrams(1)))
            assert (await answer(ws))["status"] == 200
    causes = gw.metrics.rejects_by_cause
    assert (causes["ws-text"], causes["too-large"]) == (1, 1)
    assert [e.datagram for e in journal_entries(gw)] == datagrams(1)


async def test_a_connection_without_an_authenticated_batch_is_closed_and_counted(gw: Gateway) -> None:
    async with aiohttp.ClientSession() as session, connect(session, gw) as ws:
        await ws.send_bytes(b"garbage")
        assert (await answer(ws))["error"] == "bad-magic"
        msg = await ws.receive(timeout=10)  # body_timeout is 1 s in this gateway
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 1008
    assert gw.metrics.rejects_by_cause["ws-unauthenticated"] == 1


async def test_per_agent_connections_are_bounded_unauthenticated_ones_make_room(gw: Gateway) -> None:
    key = key_of(gw)
    async with aiohttp.ClientSession() as session:
        first = await connect(session, gw)
        second = await connect(session, gw)
        await second.send_bytes(seal(AGENT, key, 1, datagrams(1)))
        assert (await answer(second))["status"] == 200
        third = await connect(session, gw)  # max_ws_per_agent = 2: the unauthenticated first one goes
        msg = await first.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert first.close_code == 1008
        await third.send_bytes(seal(AGENT, key, 2, datagrams(1, start=1)))
        assert (await answer(third))["acked"] == 2
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:  # both authenticated now: 503
            await connect(session, gw)
        assert info.value.status == 503
        for ws in (first, second, third):
            await ws.close()


async def test_idle_and_silent_clients_are_dropped_and_shutdown_says_going_away(tmp_path: Path) -> None:
    key = enroll(tmp_path, AGENT)
    gw = await start_gateway(tmp_path, ws_idle_timeout=1.0, ws_heartbeat=1.0)
    try:
        async with aiohttp.ClientSession() as session:
            async with connect(session, gw) as ws:
                await ws.send_bytes(seal(AGENT, key, 1, datagrams(1)))
                assert (await answer(ws))["status"] == 200
                msg = await ws.receive(timeout=10)  # pings are answered, but no batch comes: idle
                assert msg.type is aiohttp.WSMsgType.CLOSE
                assert ws.close_code == 1000
            async with connect(session, gw, autoping=False) as ws:
                await ws.send_bytes(seal(AGENT, key, 2, datagrams(1, start=1)))
                assert (await answer(ws))["status"] == 200
                got = [await ws.receive(timeout=10)]  # a ping, never answered: the gateway hangs up
                while got[-1].type is aiohttp.WSMsgType.PING:
                    got.append(await ws.receive(timeout=10))
                assert got[-1].type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                        aiohttp.WSMsgType.ERROR)
            ws = await connect(session, gw)
            await ws.send_bytes(seal(AGENT, key, 3, datagrams(1, start=2)))
            assert (await answer(ws))["status"] == 200
            stopping = asyncio.create_task(gw.stop())
            msg = await ws.receive(timeout=10)
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert ws.close_code == 1001
            await ws.close()
            await stopping
    finally:
        await gw.stop()


async def test_a_failure_inside_the_gateway_closes_with_1011_logged_once(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    key = key_of(gw)
    assert gw.ingest is not None

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bug")

    with monkeypatch.context() as patch:
        patch.setattr(gw.ingest, "deliver", broken)
        async with aiohttp.ClientSession() as session:
            for _ in range(2):
                async with connect(session, gw) as ws:
                    await ws.send_bytes(seal(AGENT, key, 1, datagrams(1)))
                    msg = await ws.receive(timeout=10)
                    assert msg.type is aiohttp.WSMsgType.CLOSE
                    assert ws.close_code == 1011
    assert sum("failed (repeats" in r.message for r in caplog.records) == 1
    async with aiohttp.ClientSession() as session, connect(session, gw) as ws:
        await ws.send_bytes(seal(AGENT, key, 1, datagrams(1)))
        assert (await answer(ws))["acked"] == 1
