"""``GET /v1/probe`` over a real socket: the gateway proves it holds the agent's key (docs/protocol.md 7.3),
refuses precisely, rate-limits per source, and writes nothing."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import aiohttp
import pytest

from flowtunnel.gateway import Registry
from flowtunnel.wire import AuthenticationFailed, verify_probe
from flowtunnel.wire.probe import encode_b64url
from tests.gateway.util import enroll, journal_entries, start_gateway

AGENT = "site-a"


async def probe(
    session: aiohttp.ClientSession, url: str, query: str
) -> tuple[int, dict[str, object], dict[str, str]]:
    async with session.get(url + "/v1/probe?" + query, allow_redirects=False) as resp:
        return resp.status, await resp.json(content_type=None), dict(resp.headers)


async def test_the_answer_proves_the_gateway_holds_the_agent_key(tmp_path: Path) -> None:
    key = enroll(tmp_path, AGENT)
    gw = await start_gateway(tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            for size in (16, 32):
                nonce = os.urandom(size)
                query = f"agent={AGENT}&nonce={encode_b64url(nonce)}"
                status, doc, headers = await probe(session, gw.url, query)
                assert status == 200
                assert headers["Content-Type"].startswith("application/json")
                assert headers["Cache-Control"] == "no-store"
                assert doc["gateway"] == "flowtunnel"
                assert doc["agent"] == AGENT
                verify_probe(key, AGENT, nonce, doc["mac"])
                with pytest.raises(AuthenticationFailed):  # bound to this nonce
                    verify_probe(key, AGENT, os.urandom(size), doc["mac"])
        assert journal_entries(gw) == []
    finally:
        await gw.stop()


async def test_bad_unknown_and_revoked_probes_are_refused_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    enroll(tmp_path, AGENT)
    enroll(tmp_path, "gone")
    with Registry(tmp_path) as reg:
        reg.revoke("gone")
    gw = await start_gateway(tmp_path, probe_rate=1000.0)
    nonce = encode_b64url(os.urandom(16))
    cases = [
        (f"agent={AGENT}", 400, "bad-probe"),
        (f"nonce={nonce}", 400, "bad-probe"),
        (f"agent={AGENT}&nonce=short", 400, "bad-probe"),
        (f"agent={AGENT}&nonce={'A' * 60}", 400, "bad-probe"),
        (f"agent=..%2F..&nonce={nonce}", 400, "bad-probe"),
        (f"agent=nobody&nonce={nonce}", 401, "unknown-agent"),
        (f"agent=gone&nonce={nonce}", 403, "revoked"),
    ]
    try:
        with caplog.at_level(logging.DEBUG, logger="flowtunnel.gateway"):
            async with aiohttp.ClientSession() as session:
                for _ in range(3):
                    for query, want_status, want_code in cases:
                        status, doc, headers = await probe(session, gw.url, query)
                        assert (status, doc["error"]) == (want_status, want_code), query
                        assert headers["Cache-Control"] == "no-store"
        assert gw.metrics.rejects_by_cause == {"bad-probe": 15, "unknown-agent": 3, "revoked": 3}
        warned = [r for r in caplog.records
                  if r.levelno >= logging.WARNING and "rejected request" in r.message]
        assert sorted(r.message.split(" ")[2].strip("(,") for r in warned) == ["bad-probe", "revoked",
                                                                               "unknown-agent"]
        assert journal_entries(gw) == []
    finally:
        await gw.stop()


async def test_a_flood_of_probes_from_one_source_gets_429_with_retry_after(tmp_path: Path) -> None:
    key = enroll(tmp_path, AGENT)
    gw = await start_gateway(tmp_path, probe_rate=0.5)  # bursts of 20
    try:
        async with aiohttp.ClientSession() as session:
            answers = []
            for _ in range(30):
                nonce = os.urandom(16)
                query = f"agent={AGENT}&nonce={encode_b64url(nonce)}"
                status, doc, headers = await probe(session, gw.url, query)
                answers.append(status)
                if status == 200:
                    verify_probe(key, AGENT, nonce, doc["mac"])
                else:
                    assert doc["error"] == "rate-limited"
                    assert int(headers["Retry-After"]) >= 1
        assert answers.count(200) in (20, 21)  # the burst (plus at most one token refilled meanwhile)
        assert answers.count(429) == 30 - answers.count(200)
        assert gw.metrics.rejects_by_cause == {"rate-limited": answers.count(429)}
    finally:
        await gw.stop()
