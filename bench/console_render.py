"""Console benchmark, the browser's side: the agents page with 500 agents in headless Chromium.

bench/console.py times the server; this times the page: the console's routes serve stand-in data (the
browser tests' ``HostileData``, widened to ``--agents`` agents with 6 h sparklines) from a thread, Debian's
chromium logs in, and for ``--seconds`` of the page's 3 s refreshes it records, per refresh, the time from
the answer's arrival to the table being rebuilt, and every long task (> 50 ms on the page's main thread).

Run from the repository root: ``python bench/console_render.py`` (needs chromium and chromium-driver).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from typing import Any, cast

from aiohttp import web

from _common import utc_now  # puts the repository root on sys.path, for tests.e2e below
from flowtunnel.gateway.console import Console, ConsoleData, OperatorAuth, add_console

from tests.e2e.test_console_browser import (  # isort: skip (after _common, which makes it importable)
    TOKEN,
    HostileData,
    css,
    log_in,
    wait_for,
)

_WATCH = """
window.__long = []; window.__rebuilt = []; window.__arrived = 0;
new PerformanceObserver((list) => { for (const e of list.getEntries()) window.__long.push(e.duration); })
  .observe({type: "longtask"});
const fetchBefore = window.fetch;
window.fetch = async (...args) => {
  const r = await fetchBefore(...args); window.__arrived = performance.now(); return r;
};
new MutationObserver(() => {
  if (window.__arrived) { window.__rebuilt.push(performance.now() - window.__arrived); window.__arrived = 0; }
}).observe(document.querySelector("#agents tbody"), {childList: true});
"""


class ManyAgents(HostileData):
    def __init__(self, agents: int) -> None:
        super().__init__()
        self.count = agents

    async def agents(self) -> dict[str, Any]:
        doc = await super().agents()
        spark = [[int(self.now) // 600 * 600 - 600 * i, 1000 * i] for i in range(36)]
        doc["agents"] = [dict(self._row(f"agent-{i}"), spark=spark) for i in range(self.count)]
        doc["states"] = {"alive": self.count}
        return doc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    loop = asyncio.new_event_loop()
    auth = OperatorAuth(TOKEN, session_ttl=3600, clock=time.time)
    console = Console(auth=auth, data=cast(ConsoleData, ManyAgents(args.agents)), session_ttl=3600)
    app = web.Application()
    add_console(app, console)
    runner = web.AppRunner(app)

    async def start() -> str:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    threading.Thread(target=loop.run_forever, daemon=True).start()
    url = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-proxy-server", "--window-size=1400,900"):
        opts.add_argument(arg)
    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must not download anything
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        os.environ.pop(name, None)
    load = [os.getloadavg()[0]]
    driver = webdriver.Chrome(options=opts, service=Service(executable_path="/usr/bin/chromedriver"))
    try:
        log_in(driver, url)
        wait_for(driver, lambda d: len(css(d, "#agents tbody tr")) == args.agents, "every agent's row", 60)
        driver.execute_script(_WATCH)
        time.sleep(args.seconds)
        rebuilt = [round(x) for x in driver.execute_script("return window.__rebuilt")]
        long_tasks = [round(x) for x in driver.execute_script("return window.__long")]
    finally:
        driver.quit()
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
    load.append(os.getloadavg()[0])
    print(f"{utc_now()}, {args.agents} agents, 1-minute load average {load[0]:.1f} -> {load[1]:.1f}: answer "
          f"to table rebuilt per refresh {rebuilt} ms; long tasks {long_tasks} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
