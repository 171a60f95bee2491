"""The gateway service: sinks fed from the journal, the journal trimmed only behind the slowest sink, a
failing sink restarted, status.json kept current."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import flowtunnel.gateway.service as service
from flowtunnel.gateway import Gateway, GatewayConfig, run_gateway
from flowtunnel.gateway.sinks import CursorSink
from flowtunnel.log import Entry
from tests.gateway.test_udp_forward import TPL_A, v9_stream, wrap
from tests.gateway.util import datagrams, drained, enroll, post_batch, seal, start_gateway
from tests.peers import UdpCapture, free_tcp_port


class Recorder(CursorSink):
    """A sink that records what it handled; fails on its first call if asked to."""

    def __init__(self, name: str, *, fail_once: bool = False, hold: asyncio.Event | None = None) -> None:
        super().__init__()
        self.name = name
        self.seen: list[int] = []
        self._fail = fail_once
        self._hold = hold

    async def handle(self, entries: Sequence[Entry]) -> None:
        if self._hold is not None:
            await self._hold.wait()
        if self._fail:
            self._fail = False
            raise RuntimeError("sink broke")
        self.seen.extend(e.seq for e in entries)


async def test_store_and_forward_sinks_consume_and_the_journal_is_trimmed(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    key = enroll(data, "site-a")
    payloads = v9_stream(TPL_A, 1, datagrams=3, per=4)
    with UdpCapture() as cap:
        gw = await start_gateway(data, store=True, forward=(cap.url,))
        try:
            async with aiohttp.ClientSession() as session:
                body = seal("site-a", key, 1, wrap(payloads))
                assert (await post_batch(session, gw.url, body, agent="site-a"))[0] == 200
            await drained(gw, "udp-forward")
            await drained(gw, "store")
            assert gw.journal is not None
            async with asyncio.timeout(20):
                # trimmed by the housekeeping task, which writes status.json right after the trim
                while gw.journal.stats().entries or not (data / "status.json").exists():  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            status: dict[str, Any] = gw.status()
            metrics_text = gw.metrics.render().decode()
            assert json.loads((data / "status.json").read_text())["kind"] == "gateway"
        finally:
            await gw.stop()
        assert [p for p, _ in cap.wait_for(3)] == payloads
    assert status["sinks"]["store"]["rows"] == 12
    assert status["sinks"]["udp-forward"]["sent"] == 3
    assert status["journal"]["last_seq"] == 3
    assert "flowtunnel_store_rows 12.0" in metrics_text


async def test_journal_is_kept_for_the_slowest_sink(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    key = enroll(data, "site-a")
    release = asyncio.Event()
    fast, slow = Recorder("fast"), Recorder("slow", hold=release)
    gw = Gateway(
        GatewayConfig(listen="127.0.0.1:0", data=data, store=False, status_interval=0.05),
        extra_sinks=[fast, slow],
    )
    await gw.start()
    try:
        async with aiohttp.ClientSession() as session:
            await post_batch(session, gw.url, seal("site-a", key, 1, datagrams(5)), agent="site-a")
        await drained(gw, "fast")
        await asyncio.sleep(0.3)  # several housekeeping rounds
        assert gw.journal is not None
        assert gw.journal.stats().entries == 5
        assert gw.status()["sinks"]["slow"]["lag"] == 5  # type: ignore[index]
        release.set()
        await drained(gw, "slow")
        async with asyncio.timeout(10):
            while gw.journal.stats().entries:  # noqa: ASYNC110 - trimmed by the housekeeping task
                await asyncio.sleep(0.02)
    finally:
        await gw.stop()
    assert fast.seen == slow.seen == [1, 2, 3, 4, 5]


async def test_a_failing_sink_is_restarted_and_resumes_from_its_cursor(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    key = enroll(data, "site-a")
    flaky = Recorder("flaky", fail_once=True)
    gw = Gateway(GatewayConfig(listen="127.0.0.1:0", data=data, store=False), extra_sinks=[flaky])
    gw.sink_restart_delay = 0.05
    await gw.start()
    try:
        async with aiohttp.ClientSession() as session:
            await post_batch(session, gw.url, seal("site-a", key, 1, datagrams(3)), agent="site-a")
        await drained(gw, "flaky")
        text = gw.metrics.render().decode()
    finally:
        await gw.stop()
    assert flaky.seen == [1, 2, 3]
    assert 'flowtunnel_gateway_sink_errors_total{cause="crashed",sink="flaky"} 1.0' in text


async def test_the_gateway_command_settles_the_collector_once_it_listens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # settle_gc freezes the whole process: recorded here, not run (tests/test_runtime.py runs it).
    port = free_tcp_port()
    seen: list[bool] = []

    def listening() -> None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=5):
            seen.append(True)
            return
        seen.append(False)

    monkeypatch.setattr(service, "settle_gc", listening)
    stop = asyncio.Event()
    task = asyncio.create_task(run_gateway(
        GatewayConfig(listen=f"127.0.0.1:{port}", data=tmp_path / "gw", store=False), stop))
    async with asyncio.timeout(20):
        while not seen:  # noqa: ASYNC110 - set by the gateway once it started
            await asyncio.sleep(0.02)
    stop.set()
    assert await task == 0
    assert seen == [True]  # once, and only once it listens
