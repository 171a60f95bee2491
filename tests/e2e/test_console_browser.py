"""The operator console in a real browser: headless Chromium (Debian's, driven by its chromedriver through
Selenium; nothing is downloaded) against a running chain: ``flowtunnel replay`` of the packaged demo capture →
agent → gateway (store on). The page must show what ``status.json`` and the store hold.

One gateway serves the whole module (the tests read like one operator's session, in order). With
``FLOWTUNNEL_CONSOLE_SHOTS=DIR`` the tests save a PNG of each page there (docs/console/ is made that way).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any, cast

import pytest

from flowtunnel.cli.sources import read_sources
from flowtunnel.gateway.console import Console, ConsoleData, OperatorAuth, add_console
from flowtunnel.gateway.console.data import Table
from tests.agent.chain import AgentProc, GatewayProc, enroll_agent, flowtunnel, wait_until
from tests.conftest import require
from tests.peers import UdpCapture, free_udp_port

pytestmark = pytest.mark.timeout(180)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "browser-test-operator-token-0123456789"
# Seconds: short, so that a stopped agent turns late, then silent, within the test; each state lasts over
# two of the agents page's 3 s refreshes, so the page shows each one even when a refresh is slow.
LATE, SILENT = 7, 15


class StoreGatewayProc(GatewayProc):
    """``GatewayProc`` with the store sink on (the chain helper turns it off) and the console's options."""

    def start(self) -> StoreGatewayProc:
        cmd = ["gateway", "--listen", f"127.0.0.1:{self.port}", "--data", str(self.data),
               "--status-interval", "0.2", *self.extra]
        self._spawn(flowtunnel(*cmd))
        wait_until(self._healthy, "gateway /healthz", timeout=30)
        return self


def _shot(driver: Any, name: str) -> None:
    where = os.environ.get("FLOWTUNNEL_CONSOLE_SHOTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(where) / f"{name}.png"))


def replay_demo(port: int) -> None:
    """``flowtunnel replay`` of the packaged demo capture to an agent on ``udp://127.0.0.1:port``."""
    demo = resources.files("flowtunnel").joinpath("data", "demo.pcap")
    with resources.as_file(demo) as pcap:
        subprocess.run(flowtunnel("replay", str(pcap), "--to", f"udp://127.0.0.1:{port}", "--rate", "0"),
                       check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("console")
    data = tmp / "gw"
    keys = {name: enroll_agent(data, name) for name in ("hotel-12", "ship-3")}
    token_file = tmp / "admin.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    collector = UdpCapture()  # a collector behind the udp-forward sink: the console maps its sources back
    extra = ["--admin-token-file", str(token_file), "--console-late", f"{LATE}s",
             "--console-silent", f"{SILENT}s", "--forward", collector.url]
    with collector, StoreGatewayProc(data, extra=extra).start() as gw:
        agents = {}
        try:
            for name in keys:
                agents[name] = AgentProc(tmp / f"spool-{name}", gateway=gw.url, agent_id=name, key=keys[name],
                                         port=free_udp_port()).start()
                replay_demo(agents[name].port)
            for name, agent in agents.items():

                def acked(a: AgentProc = agent, n: str = name) -> bool:
                    return a.received() > 0 and gw.acked(n) == a.spooled_last_seq()

                wait_until(acked, f"{name}'s datagrams acknowledged")
            wait_until(gw.sinks_done, "the store caught up")
            yield {"gw": gw, "agents": agents, "data": data}
        finally:
            for agent in agents.values():
                agent.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require("chromium", "chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-proxy-server", "--window-size=1400,900", "--lang=en"):
        opts.add_argument(arg)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "true")  # selenium-manager must not try to download a driver or a browser
        for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
            env.delenv(name, raising=False)  # Selenium talks to chromedriver on loopback, never via a proxy
        driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
        try:
            yield driver
        finally:
            driver.quit()


def wait_for(driver: Any, cond: Any, what: str, timeout: float = 20.0) -> Any:
    from selenium.common.exceptions import (
        StaleElementReferenceException,
        TimeoutException,
        WebDriverException,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    def look(d: Any) -> Any:
        try:
            return cond(d)
        except WebDriverException as exc:
            # Chromium reports an element replaced during a navigation this way too, not only as stale.
            if "does not belong to the document" in str(exc.msg):
                return False
            raise

    # Elements vanish while a page loads or a poll rebuilds a table: look again.
    ignored = (IndexError, StaleElementReferenceException)
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=ignored).until(
            look, message=what)
    except TimeoutException:
        shown = [e.text for e in css(driver, "#error")]
        logs = driver.get_log("browser")
        raise AssertionError(f"timed out after {timeout} s waiting for {what} on {driver.current_url}; "
                             f"error box {shown}; browser log {logs}") from None


def css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def log_in(driver: Any, url: str, token: str = TOKEN) -> None:
    driver.get(url + "/console")
    driver.delete_all_cookies()  # a fresh login each time (the cookie is visible under /console only)
    driver.get(url + "/console")
    box = wait_for(driver, lambda d: css(d, "input[name=token]"), "the login form")[0]
    box.send_keys(token)
    css(driver, "#submit")[0].click()
    wait_for(driver, lambda d: css(d, "#logout") or css(d, "#denied")[0].is_displayed(), "the login's answer")


def query_cli(data: Path, sql: str) -> list[list[Any]]:
    out = subprocess.run(flowtunnel("query", "--data", str(data), "--format", "json", sql),
                         capture_output=True, text=True, check=True, timeout=60)
    return [list(json.loads(line).values()) for line in out.stdout.splitlines() if line.strip()]


def test_refused_without_the_token(chain: dict[str, Any], browser: Any) -> None:
    url = chain["gw"].url
    browser.delete_all_cookies()
    log_in(browser, url, token="not-the-token-at-all-xxxxxxxx")
    wait_for(browser, lambda d: css(d, "#denied") and css(d, "#denied")[0].is_displayed(), "the refusal")
    _shot(browser, "login")
    browser.get(url + "/console/flows")
    assert css(browser, "input[name=token]"), "a page without a session sends the browser to the login form"
    browser.get(url + "/console/api/agents")
    assert "log in" in browser.page_source


def test_agents_page_shows_the_numbers_of_status_and_the_store(chain: dict[str, Any], browser: Any) -> None:
    gw, data = chain["gw"], chain["data"]
    log_in(browser, gw.url)
    rows = wait_for(browser, lambda d: len(css(d, "#agents tbody tr")) == 2 and css(d, "#agents tbody tr"),
                    "two agent rows")
    assert [r.get_attribute("data-agent") for r in rows] == ["hotel-12", "ship-3"]
    status = gw.status()["agents"]
    for row in rows:
        agent = row.get_attribute("data-agent")
        wire = css(row, "td[data-col=wire]")[0]
        assert int(wire.get_attribute("data-wire")) == status[agent]["http_bytes"]
        assert int(wire.get_attribute("data-raw")) == status[agent]["datagram_bytes"]
        assert css(row, "td[data-col=rung]")[0].text == "post"
        assert css(row, ".spark canvas"), "a sparkline is drawn"
    # The collector's view mapped back (issue 15 item 9): the rows 'flowtunnel sources' lists.
    sources = read_sources(data)
    assert {str(r["agent"]) for r in sources} == {"hotel-12", "ship-3"}
    shown = wait_for(browser, lambda d: len(css(d, "#sources tbody tr")) == len(sources)
                     and css(d, "#sources tbody tr"), "the collector's sources")
    assert [[td.text for td in css(tr, "td")] for tr in shown] == [
        [f"{r['source_address']}:{r['source_port']}", r["agent"], r["exporter"], r["mode"]] for r in sources]
    _shot(browser, "agents")

    # The agent page: its exporters, with the store's record count.
    css(browser, "a.agent-link")[0].click()
    wait_for(browser, lambda d: css(d, "#exporters tbody tr"), "the exporters of hotel-12")
    assert css(browser, "#agent-id")[0].text == "hotel-12"
    records = query_cli(data, "SELECT count(*) FROM flows WHERE agent = 'hotel-12'")[0][0]
    exporters = css(browser, "#exporters tbody tr")
    shown = sum(int(css(tr, "td[data-col=records]")[0].text) for tr in exporters)
    assert shown == records > 0
    assert css(browser, "dd[data-fact='records stored']")[0].text == str(records)
    wait_for(browser, lambda d: css(d, "#chart canvas"), "the exporter chart")
    own = [r for r in sources if r["agent"] == "hotel-12"]
    rows = wait_for(browser, lambda d: css(d, "#sources tbody tr"), "hotel-12's sources")
    assert [[td.text for td in css(tr, "td")] for tr in rows] == [
        [f"{r['source_address']}:{r['source_port']}", r["exporter"], r["mode"]] for r in own]
    _shot(browser, "agent")


def test_flows_page_filters_top_talkers(chain: dict[str, Any], browser: Any) -> None:
    gw, data = chain["gw"], chain["data"]
    log_in(browser, gw.url)
    browser.get(gw.url + "/console/flows")
    wait_for(browser, lambda d: css(d, "#top tbody tr"), "top talkers")
    from selenium.webdriver.support.ui import Select

    Select(css(browser, "#by")[0]).select_by_value("protocol")
    box = css(browser, "#filter")[0]
    box.send_keys("proto udp")
    css(browser, "#apply")[0].click()
    expected = query_cli(data, "SELECT count(*) FROM flows WHERE protocol = 17")[0][0]

    def udp_only(d: Any) -> bool:
        rows = [[td.text for td in css(tr, "td")] for tr in css(d, "#top tbody tr")]
        return len(rows) == 1 and rows[0][0] == "17" and rows[0][3] == str(expected)

    assert expected > 0
    wait_for(browser, udp_only, f"one protocol row: 17 with the store's {expected} UDP flows")
    box.clear()
    box.send_keys("prot udp")
    css(browser, "#apply")[0].click()
    err = wait_for(browser, lambda d: css(d, "#error") and css(d, "#error")[0].is_displayed() and
                   css(d, "#error")[0], "the filter error")
    assert "did you mean 'proto'" in err.text
    box.clear()
    box.send_keys("proto tcp")
    css(browser, "#apply")[0].click()
    wait_for(browser, lambda d: not css(d, "#error")[0].is_displayed(), "the error cleared")
    wait_for(browser, lambda d: css(d, "#chart canvas"), "the series chart")
    _shot(browser, "flows")


def test_query_page_escapes_what_it_shows(chain: dict[str, Any], browser: Any) -> None:
    gw = chain["gw"]
    log_in(browser, gw.url)
    browser.get(gw.url + "/console/query")
    from selenium.webdriver.support.ui import Select

    Select(css(browser, "#mode")[0]).select_by_value("sql")
    hostile = '<img src=x id=pwned onerror="document.title=`pwned`">'
    css(browser, "#q")[0].send_keys(f"SELECT '{hostile}' AS \"<b>col</b>\", count(*) AS flows FROM flows")
    css(browser, "#run")[0].click()
    cell = wait_for(browser, lambda d: css(d, "#result tbody td") and css(d, "#result tbody td")[0],
                    "the query result")
    assert cell.text == hostile
    assert css(browser, "#result thead th")[0].text == "<b>col</b>"
    assert not css(browser, "#pwned")
    assert not css(browser, "#result b")
    assert browser.title != "pwned"
    href = css(browser, "#csv")[0].get_attribute("href")
    assert "format=csv" in href
    css(browser, "#q")[0].clear()
    Select(css(browser, "#mode")[0]).select_by_value("filter")
    css(browser, "#q")[0].send_keys("proto udp and dst port 53")
    css(browser, "#run")[0].click()
    wait_for(browser, lambda d: "rows" in css(d, "#note")[0].text, "the filter's rows")
    _shot(browser, "query")
    Select(css(browser, "#mode")[0]).select_by_value("sql")
    css(browser, "#q")[0].clear()
    css(browser, "#q")[0].send_keys("DELETE FROM flows")
    css(browser, "#run")[0].click()
    err = wait_for(browser, lambda d: css(d, "#error")[0].is_displayed() and css(d, "#error")[0], "refusal")
    assert "read-only" in err.text


def test_a_stopped_agent_turns_late_then_silent(chain: dict[str, Any], browser: Any) -> None:
    """An agent is alive while it is heard from: one with nothing to send is not, so ship-3, idle since the
    chain started, may be late or silent already (when this test only stopped it, it saw "silent" from the
    start and never "late" after the other tests). It gets fresh flows, shows alive, is stopped, and the page,
    without a reload, shows it late, then silent: each in turn, none skipped."""
    gw, agent = chain["gw"], chain["agents"]["ship-3"]
    log_in(browser, gw.url)
    seen: list[str] = []

    def state(d: Any) -> str:
        rows = css(d, "#agents tr[data-agent='ship-3']")
        now = str(rows[0].get_attribute("data-state")) if rows else ""
        if now and (not seen or seen[-1] != now):
            seen.append(now)
        return now

    before = gw.acked("ship-3")
    replay_demo(agent.port)
    wait_until(lambda: before < gw.acked("ship-3") == agent.spooled_last_seq(),
               "ship-3's new datagrams acknowledged")
    wait_for(browser, lambda d: state(d) == "alive", "ship-3 alive", timeout=LATE)
    del seen[:-1]
    agent.stop()
    wait_for(browser, lambda d: state(d) == "late", "ship-3 late", timeout=SILENT + 10)
    _shot(browser, "agents-late")
    wait_for(browser, lambda d: state(d) == "silent", "ship-3 silent", timeout=SILENT + 10)
    assert seen == ["alive", "late", "silent"]


# -- names that are markup -----------------------------------------------------------------------------

HOSTILE_AGENT = '<img src=x id=pwned-agent onerror="document.title=`pwned`">'
HOSTILE_EXPORTER = '"><svg id=pwned-exporter onload="document.title=`pwned`"></svg>'
HOSTILE_CAUSE = "<b id=pwned-cause>spool_full</b>"


class HostileData:
    """Console data whose every name is markup. Enrolment refuses such agent ids and the wire carries
    exporters as binary addresses, so only a stand-in for ``ConsoleData`` can serve them: this checks that the
    pages would show them as text anyway (agents, agent, flows: table cells, links, facts, chart legends)."""

    compile = staticmethod(ConsoleData.compile)

    def __init__(self) -> None:
        self.now = time.time()

    def _row(self, agent_id: str) -> dict[str, Any]:
        return {
            "id": agent_id, "state": "alive", "last_seen": self.now - 5, "enrolled": True, "backlog": 3,
            "backlog_age": 12.0, "upload_bps": 1000.0, "wire_bytes": 1000, "raw_bytes": 4000, "ratio": 4.0,
            "datagrams": 10, "acked": 10, "rung": HOSTILE_CAUSE, "rejected": {HOSTILE_CAUSE: 1},
            "drops": {f"agent:{HOSTILE_CAUSE}": 2, "transit": 0}, "records": 100, "exporters": 1,
            "spark": [[int(self.now) // 600 * 600, 500]],
        }

    def _series(self, names: list[str]) -> dict[str, Any]:
        times = [int(self.now) // 60 * 60 - 60 * i for i in range(3, -1, -1)]
        return {"bucket_s": 60, "times": times, "group_by": "agent",
                "groups": {n: {m: [1, 2, 3, 4] for m in ("bytes", "packets", "flows")} for n in names}}

    async def agents(self) -> dict[str, Any]:
        return {"now": self.now, "late_s": 300, "silent_s": 3600, "spark_bucket_s": 600,
                "spark_range_s": 21600, "states": {"alive": 2},
                "agents": [self._row(HOSTILE_AGENT), self._row("plain-agent")],
                "rungs": {HOSTILE_CAUSE: {"requests": 1}}, "rejected": {}, "sinks": {}, "store_error": None}

    async def agent(self, agent_id: str, range_text: str | None) -> dict[str, Any]:
        exporter = {"exporter": HOSTILE_EXPORTER, "datagrams": 1, "records": 100, "options_records": 0,
                    "undecodable": 0, "set_errors": 0, "no_template_sets": 0, "seq_expected": 1,
                    "seq_received": 1, "seq_lost": 0, "seq_resets": 0, "last_version": 9,
                    "first_seen": HOSTILE_CAUSE, "last_seen": HOSTILE_CAUSE}
        return {"now": self.now, "agent": self._row(agent_id), "exporters": [exporter],
                "series": self._series([HOSTILE_EXPORTER]), "range_s": 21600, "clamped": False,
                "store_error": HOSTILE_CAUSE, "sources": (await self.sources())["sources"]}

    async def sources(self, agent_id: str | None = None) -> dict[str, Any]:
        return {"sources": [{"source_address": HOSTILE_EXPORTER, "source_port": 40000, "agent": HOSTILE_AGENT,
                             "exporter": HOSTILE_EXPORTER, "mode": HOSTILE_CAUSE}], "error": None}

    async def series(self, **_: Any) -> dict[str, Any]:
        return self._series([HOSTILE_AGENT, HOSTILE_EXPORTER])

    async def top(self, **_: Any) -> Table:
        return Table(columns=["src_addr", HOSTILE_CAUSE, "packets", "flows"], types=["VARCHAR"] * 4,
                     rows=[[HOSTILE_EXPORTER, HOSTILE_AGENT, 1, 1]], truncated=False)


@pytest.fixture(scope="module")
def hostile_console() -> Iterator[str]:
    """The console's routes over ``HostileData``, served from a thread on loopback; yields its URL."""
    import asyncio
    import threading

    from aiohttp import web

    loop = asyncio.new_event_loop()
    auth = OperatorAuth(TOKEN, session_ttl=3600, clock=time.time)
    console = Console(auth=auth, data=cast(ConsoleData, HostileData()), session_ttl=3600)
    app = web.Application()
    add_console(app, console)
    runner = web.AppRunner(app)

    async def start() -> str:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def no_injection(driver: Any) -> None:
    for marker in ("#pwned-agent", "#pwned-exporter", "#pwned-cause", "main img", "main svg", "main b"):
        assert not css(driver, marker), f"{marker} was created from data on {driver.current_url}"
    assert driver.title != "pwned"


def test_agent_ids_and_exporter_names_that_are_markup_show_as_text(
    hostile_console: str, browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    url = hostile_console
    log_in(browser, url)
    rows = wait_for(browser, lambda d: len(css(d, "#agents tbody tr")) == 2 and css(d, "#agents tbody tr"),
                    "two agent rows")
    assert rows[0].get_attribute("data-agent") == HOSTILE_AGENT
    assert css(rows[0], "a.agent-link")[0].text == HOSTILE_AGENT
    assert HOSTILE_CAUSE in css(rows[0], "td[data-col=drops]")[0].text
    assert css(rows[0], "td[data-col=rung]")[0].text == HOSTILE_CAUSE
    assert css(browser, "#rungs tbody td")[0].text == HOSTILE_CAUSE
    source = wait_for(browser, lambda d: css(d, "#sources tbody tr"), "the collector's sources")[0]
    assert [td.text for td in css(source, "td")] == [
        f"{HOSTILE_EXPORTER}:40000", HOSTILE_AGENT, HOSTILE_EXPORTER, HOSTILE_CAUSE]
    no_injection(browser)

    css(browser, "a.agent-link")[0].click()  # the id travels in the URL, percent-encoded
    wait_for(browser, lambda d: css(d, "#exporters tbody tr"), "the hostile agent's exporters")
    assert css(browser, "#agent-id")[0].text == HOSTILE_AGENT
    assert css(browser, "td[data-col=exporter]")[0].text == HOSTILE_EXPORTER
    wait_for(browser, lambda d: css(d, "#chart .u-legend"), "the exporter chart's legend")
    assert HOSTILE_EXPORTER in css(browser, "#chart .u-legend")[0].text
    # The store's error, as text (it was cleared by the page's refresh, never shown, until 2026-12-06).
    err = wait_for(browser, lambda d: css(d, "#error")[0].is_displayed() and css(d, "#error")[0].text,
                   "the store's error")
    assert err == f"store: {HOSTILE_CAUSE}"
    facts = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#agent-facts dt")]
    assert f"agent:{HOSTILE_CAUSE}" in facts
    assert f"rejected {HOSTILE_CAUSE}" in facts
    assert css(browser, "#sources tbody td[data-col=mode]")[0].text == HOSTILE_CAUSE
    no_injection(browser)

    browser.get(url + "/console/flows")
    wait_for(browser, lambda d: css(d, "#top tbody td"), "top talkers")
    assert [td.text for td in css(browser, "#top tbody td")][:2] == [HOSTILE_EXPORTER, HOSTILE_AGENT]
    assert css(browser, "#top thead th")[1].text == HOSTILE_CAUSE
    legend = wait_for(browser, lambda d: css(d, "#chart .u-legend") and css(d, "#chart .u-legend")[0].text,
                      "the series chart's legend")
    assert HOSTILE_AGENT in legend
    assert HOSTILE_EXPORTER in legend
    no_injection(browser)
