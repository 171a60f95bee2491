"""What a red-team pass broke at the gateway's ingest (issue 17, items 2-6): hostile advisory headers, replays
changing status figures, one enrolled agent flooding the journal, nonce reuse; each fixed behaviour here."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from flowtunnel.agent.config import MIN_BODY, AgentConfig
from flowtunnel.agent.policy import BatchSizer
from flowtunnel.datagram import Datagram
from flowtunnel.gateway import Gateway, GatewayConfig
from flowtunnel.gateway.metrics import MAX_FIGURE, parse_count, parse_dropped_header
from flowtunnel.gateway.status import render
from flowtunnel.wire import seal_batch
from tests.gateway.util import datagrams, enroll, journal_entries, post_batch, seal, start_gateway

AGENT = "site-a"
OTHER = "site-b"


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Gateway, bytes, aiohttp.ClientSession]]:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    gw = await start_gateway(data)
    async with aiohttp.ClientSession() as session:
        yield gw, key, session
    await gw.stop()


async def status_of(gw: Gateway, session: aiohttp.ClientSession, agent: str = AGENT) -> dict[str, object]:
    async with session.get(gw.url + "/v1/status") as resp:
        assert resp.status == 200
        doc = await resp.json()
    agents = doc["agents"]
    assert isinstance(agents, dict)
    result: dict[str, object] = agents[agent]
    return result


def sealed(key: bytes, first_seq: int, dgs: list[Datagram], *, agent: str = AGENT,
           info: dict[str, int] | None = None, nonce: bytes | None = None) -> bytes:
    return seal_batch(agent_id=agent, key=key, first_seq=first_seq, datagrams=dgs,
                      nonce=nonce if nonce is not None else os.urandom(12), agent_info=info)


# -- 17.2: advisory headers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("7", 7), (" 7 ", 7), ("²", None), ("٣", None), ("9" * 5000, None), ("9" * 20, MAX_FIGURE), ("-1", None),
     ("", None), ("0x10", None), ("1e3", None), (None, None)],
)
def test_counts_in_advisory_headers_are_ascii_bounded_and_clamped(
    text: str | None, expected: int | None
) -> None:
    assert parse_count(text) == expected


def test_dropped_header_skips_what_is_not_ascii_digits() -> None:
    assert parse_dropped_header("a=²,spool_full=3,b=" + "9" * 100) == {"spool_full": 3}
    assert parse_dropped_header("evil=18446744073709551615") == {"evil": MAX_FIGURE}
    assert parse_dropped_header("x=1," * 2000) == {}  # longer than any honest value: ignored whole


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Flowtunnel-Backlog": "9" * 5000},
        {"X-Flowtunnel-Backlog": "²"},
        {"X-Flowtunnel-Dropped": "a=²"},
        {"X-Flowtunnel-Dropped": "a=" + "9" * 5000},
    ],
    ids=["backlog-5000-nines", "backlog-superscript", "dropped-superscript", "dropped-5000-nines"],
)
async def test_hostile_advisory_headers_never_fail_a_committed_batch(
    env: tuple[Gateway, bytes, aiohttp.ClientSession], headers: dict[str, str],
) -> None:
    """Before: 500 with a traceback after the journal commit, so the agent re-sent a batch already stored."""
    gw, key, session = env
    status, doc, _ = await post_batch(session, gw.url, seal(AGENT, key, 1, datagrams(3)), agent=AGENT,
                                      headers=headers)
    assert (status, doc["acked"], doc["accepted"]) == (200, 3, 3)
    figures = await status_of(gw, session)
    assert (figures["datagrams"], figures["backlog"], figures["dropped"]) == (3, None, {})


async def test_replayed_and_unauthenticated_requests_change_no_status_figure(
    env: tuple[Gateway, bytes, aiohttp.ClientSession],
) -> None:
    gw, key, session = env
    body = seal(AGENT, key, 1, datagrams(3))
    honest = {"X-Flowtunnel-Backlog": "7", "X-Flowtunnel-Dropped": "spool_full=3"}
    status, _, _ = await post_batch(session, gw.url, body, agent=AGENT, headers=honest)
    assert status == 200
    before = await status_of(gw, session)
    assert (before["backlog"], before["dropped"]) == (7, {"spool_full": 3})
    lies = {"X-Flowtunnel-Backlog": str(10**21), "X-Flowtunnel-Dropped": f"evil={2**64 - 1},spool_full=0"}
    # An exact replay (captured on the path), a re-sealed duplicate without new data, a forged batch.
    status, doc, _ = await post_batch(session, gw.url, body, agent=AGENT, headers=lies)
    assert (status, doc["acked"], doc["accepted"]) == (200, 3, 0)
    status, doc, _ = await post_batch(session, gw.url, seal(AGENT, key, 1, datagrams(3)), agent=AGENT,
                                      headers=lies)
    assert (status, doc["accepted"], doc["duplicates"]) == (200, 0, 3)
    status, _, _ = await post_batch(session, gw.url, seal(AGENT, os.urandom(32), 4, datagrams(1, start=3)),
                                    agent=AGENT, headers=lies)
    assert status == 401
    after = await status_of(gw, session)
    assert (after["backlog"], after["dropped"]) == (7, {"spool_full": 3})
    assert (after["replayed"], after["datagrams"], after["duplicates"]) == (1, 3, 3)
    assert after["batches"] == 2  # the original and the re-sealed duplicate; not the replay
    assert 'flowtunnel_gateway_replayed_requests_total{agent="site-a"} 1.0' in gw.metrics.render().decode()


async def test_sealed_figures_win_over_the_clear_text_headers(
    env: tuple[Gateway, bytes, aiohttp.ClientSession],
) -> None:
    gw, key, session = env
    body = sealed(key, 1, datagrams(2), info={"acked": 0, "backlog": 5, "dropped:spool_full": 2})
    clear = {"X-Flowtunnel-Backlog": "99", "X-Flowtunnel-Dropped": "spool_full=77"}
    status, _, _ = await post_batch(session, gw.url, body, agent=AGENT, headers=clear)
    assert status == 200
    figures = await status_of(gw, session)
    assert (figures["backlog"], figures["dropped"]) == (5, {"spool_full": 2})


# -- 17.6: nonce reuse --------------------------------------------------------------------------------------


async def test_nonce_reuse_under_one_key_is_counted_and_an_exact_copy_is_not(
    env: tuple[Gateway, bytes, aiohttp.ClientSession],
) -> None:
    gw, key, session = env
    nonce = os.urandom(12)
    first = sealed(key, 1, datagrams(2), nonce=nonce)
    assert (await post_batch(session, gw.url, first, agent=AGENT))[0] == 200
    assert (await post_batch(session, gw.url, first, agent=AGENT))[0] == 200  # a copy: replay, not reuse
    # Different content under the same key and nonce: still accepted (it authenticates), but counted.
    status, doc, _ = await post_batch(session, gw.url, sealed(key, 3, datagrams(2, start=2), nonce=nonce),
                                      agent=AGENT)
    assert (status, doc["accepted"]) == (200, 2)
    figures = await status_of(gw, session)
    assert (figures["nonce_reused"], figures["replayed"]) == (1, 1)
    assert 'flowtunnel_gateway_nonce_reuse_total{agent="site-a"} 1.0' in gw.metrics.render().decode()
    assert len(journal_entries(gw)) == 4


# -- 17.3: one agent flooding -------------------------------------------------------------------------------


def zeros(n: int, *, size: int = 300, start: int = 0) -> list[Datagram]:
    """``n`` datagrams of ``size`` zero bytes: a body of a kilobyte or so expands to ``n * size``."""
    return [Datagram(received_ns=1_700_000_000_000_000_000 + i, exporter="127.0.0.1", exporter_port=40000,
                     local_port=2055, payload=bytes(size)) for i in range(start, start + n)]


async def test_a_batch_of_more_datagrams_than_an_agent_sends_is_refused_before_opening(
    env: tuple[Gateway, bytes, aiohttp.ClientSession],
) -> None:
    gw, key, session = env
    body = seal(AGENT, key, 1, zeros(100_000))
    assert len(body) < 4096  # the 1,118-byte body carried 100,000 datagrams of 300 zero bytes
    status, doc, _ = await post_batch(session, gw.url, body, agent=AGENT)
    assert (status, doc["error"]) == (413, "limit-exceeded")
    assert "20000" in doc["detail"]
    assert journal_entries(gw) == []


def test_the_agents_default_batches_fit_the_gateways_default_limits() -> None:
    """The real agent (agent/uploader.py) reads at most max_batch_datagrams and aims at its sizer's raw
    target; both must pass a gateway with default settings, or its batches would bounce with 413."""
    agent_batch = _default(AgentConfig, "max_batch_datagrams")
    agent_body = _default(AgentConfig, "max_body")
    gateway = GatewayConfig(data=Path("x"))
    assert agent_batch <= gateway.max_batch_datagrams
    sizer = BatchSizer(max_body=agent_body)
    sizer.ratio = sizer.max_ratio
    # raw target plus one more datagram (the read may end on one), plus the record headers (<= 16 B each)
    worst = sizer.raw_target() + 65_535 + 16 * agent_batch
    assert worst <= gateway.max_raw
    assert agent_body <= gateway.max_body
    assert gateway.max_body >= MIN_BODY


def _default(cls: type, name: str) -> int:
    value = next(f.default for f in dataclasses.fields(cls) if f.name == name)
    assert isinstance(value, int)
    return value


async def test_a_flooding_agent_is_held_back_while_another_agent_is_served(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    rogue_key, honest_key = enroll(data, AGENT), enroll(data, OTHER)
    # Small budgets, so that a few batches of the rogue agent reach them.
    gw = await start_gateway(data, agent_rate=256 << 10, agent_burst=1 << 20)
    try:
        async with aiohttp.ClientSession() as session:
            seq = 0
            refused: tuple[int, dict[str, object], dict[str, str]] | None = None
            for _ in range(20):
                body = seal(AGENT, rogue_key, seq + 1, zeros(2000))
                got = await post_batch(session, gw.url, body, agent=AGENT)
                if got[0] != 200:
                    refused = got
                    break
                seq += 2000
                # The other agent's batches go through all along.
                status, _, _ = await post_batch(session, gw.url, seal(OTHER, honest_key, seq // 2000,
                                                                      datagrams(1, start=seq)), agent=OTHER)
                assert status == 200
            assert refused is not None, "20 batches of 600 KB each passed a 1 MiB burst"
            status, doc, headers = refused
            assert (status, doc["error"]) == (429, "agent-rate")
            assert 1 <= int(headers["Retry-After"]) <= 10
            status, _, _ = await post_batch(session, gw.url, seal(OTHER, honest_key, 1000,
                                                                  datagrams(1, start=999)), agent=OTHER)
            assert status == 200
            figures = await status_of(gw, session)
            assert figures["rejected"] == {"agent-rate": 1}
            assert (await status_of(gw, session, OTHER))["rejected"] == {}
        text = gw.metrics.render().decode()
        assert 'flowtunnel_gateway_rejected_requests_total{agent="site-a",cause="agent-rate"} 1.0' in text
    finally:
        await gw.stop()


async def test_one_agent_cannot_take_more_than_its_share_of_the_journal(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    rogue_key, honest_key = enroll(data, AGENT), enroll(data, OTHER)
    # No sink consumes: everything stays in the journal. Quota 4 MiB, one agent may hold 1 MiB of it.
    gw = await start_gateway(data, journal_quota=4 << 20, journal_agent_share=0.25, agent_rate=0)
    try:
        async with aiohttp.ClientSession() as session:
            seq = 0
            for _ in range(10):
                status, doc, headers = await post_batch(
                    session, gw.url, seal(AGENT, rogue_key, seq + 1, zeros(1000)), agent=AGENT
                )
                if status != 200:
                    break
                seq += 1000
            assert (status, doc["error"]) == (429, "agent-share")
            assert int(headers["Retry-After"]) >= 1
            assert gw.budgets is not None
            held = gw.budgets.held(AGENT)
            assert 0 < held <= 1 << 20
            # The rest of the journal is still there for the others.
            body = seal(OTHER, honest_key, 1, zeros(1000))
            status, _, _ = await post_batch(session, gw.url, body, agent=OTHER)
            assert status == 200
            assert (await status_of(gw, session))["journal_bytes"] == held
    finally:
        await gw.stop()


async def test_a_restarted_gateway_counts_what_the_journal_holds_against_the_share(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    settings: dict[str, object] = {"journal_quota": 4 << 20, "journal_agent_share": 0.25, "agent_rate": 0}
    gw = await start_gateway(data, **settings)
    try:
        async with aiohttp.ClientSession() as session:
            status, _, _ = await post_batch(session, gw.url, seal(AGENT, key, 1, zeros(3000)), agent=AGENT)
            assert status == 200
        assert gw.budgets is not None
        held = gw.budgets.held(AGENT)
    finally:
        await gw.stop()
    gw = await start_gateway(data, **settings)
    try:
        assert gw.budgets is not None
        assert gw.budgets.held(AGENT) == held
        async with aiohttp.ClientSession() as session:
            body = seal(AGENT, key, 3001, zeros(1000))
            status, doc, _ = await post_batch(session, gw.url, body, agent=AGENT)
        assert (status, doc["error"]) == (429, "agent-share")
    finally:
        await gw.stop()


def test_budget_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="journal_agent_share 0 is outside"):
        GatewayConfig(data=Path("x"), journal_agent_share=0)
    with pytest.raises(ValueError, match=r"agent-burst 10 is outside the allowed range 1MiB \.\. 1TiB"):
        GatewayConfig(data=Path("x"), agent_burst=10)
    assert json.dumps(dataclasses.asdict(GatewayConfig(data=Path("x"))), default=str)


def test_status_shows_journal_share_replays_and_nonce_reuse() -> None:
    doc = {"kind": "gateway", "agents": {AGENT: {
        "acked": 9, "journal_bytes": 3 << 20, "rejected": {"agent-rate": 2}, "replayed": 4, "nonce_reused": 1,
    }}}
    text = render(doc, now=0.0)
    assert "journal" in text
    assert "3.0 MiB" in text
    assert "NONCE_REUSE=1, agent-rate=2, replayed=4" in text


async def test_a_flooding_agent_is_held_back_on_the_websocket_rung_too(tmp_path: Path) -> None:
    """WebSocket messages do not pass through the POST handler's header check: ingest applies the budget."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    gw = await start_gateway(data, agent_rate=256 << 10, agent_burst=1 << 20)
    try:
        async with aiohttp.ClientSession() as session, session.ws_connect(
            gw.url + "/v1/ws", protocols=("flowtunnel.v1",), headers={"X-Flowtunnel-Agent": AGENT},
        ) as ws:
            seq = 0
            doc: dict[str, object] = {}
            for _ in range(20):
                await ws.send_bytes(seal(AGENT, key, seq + 1, zeros(2000)))
                msg = await ws.receive(timeout=10)
                doc = json.loads(msg.data)
                if doc["status"] != 200:
                    break
                seq += 2000
        assert (doc["status"], doc["error"]) == (429, "agent-rate")
        assert isinstance(doc["retry_after"], int)
        assert doc["retry_after"] >= 1
    finally:
        await gw.stop()
