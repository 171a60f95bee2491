"""Fixtures for the agent tests: a real in-process gateway (``flowtunnel.gateway.service.Gateway``),
enrolled agents, and an environment without proxy variables (a developer's HTTP_PROXY must not capture test
traffic)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import flowtunnel.gateway.ingest as ingest_module
from flowtunnel.agent.uploader import CURSOR, Uploader
from flowtunnel.datagram import Datagram
from flowtunnel.gateway.config import GatewayConfig
from flowtunnel.gateway.registry import Registry
from flowtunnel.gateway.service import Gateway
from flowtunnel.log import DurableLog
from flowtunnel.wire import Batch, peek_header

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
              "no_proxy")

GatewayFactory = Callable[..., AbstractAsyncContextManager[Gateway]]
Opened = list[tuple[int, int, int, int]]  # (first seq, datagrams, header flags, dict id)


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)


def enroll(data_dir: Path, name: str) -> bytes:
    """Enroll agent ``name`` at the gateway data directory; its raw key."""
    with Registry(data_dir) as reg:
        return reg.enroll(name).key


@pytest.fixture
def gateway_factory() -> GatewayFactory:
    """``async with gateway_factory(data_dir, port=0, **config) as gw:`` a running gateway (no sinks)."""

    @asynccontextmanager
    async def make(data_dir: Path, *, port: int = 0, **overrides: Any) -> AsyncIterator[Gateway]:
        overrides.setdefault("store", False)
        overrides.setdefault("status_interval", 0.2)
        gw = Gateway(GatewayConfig(listen=f"127.0.0.1:{port}", data=data_dir, **overrides))
        await gw.start()
        try:
            yield gw
        finally:
            await gw.stop()

    return make


def journal_of(gw: Gateway, agent: str) -> list[tuple[int, Datagram]]:
    """(agent seq, datagram) of every journal entry of ``agent``, in journal order."""
    assert gw.journal is not None
    out: list[tuple[int, Datagram]] = []
    after = 0
    while True:
        entries = gw.journal.read(after=after, limit=10_000, max_bytes=64 << 20)
        if not entries:
            return out
        out.extend((int(e.stream_seq or 0), e.datagram) for e in entries if e.stream == agent)
        after = entries[-1].seq


async def eventually(cond: Callable[[], bool | Awaitable[bool]], what: str, within: float = 20.0) -> None:
    """Wait until ``cond()`` holds (polling); fail naming ``what`` after ``within`` seconds."""
    try:
        async with asyncio.timeout(within):
            while True:
                value = cond()
                if not isinstance(value, bool):
                    value = await value
                if value:
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out after {within} s waiting for: {what}")


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> Opened:
    """(first seq, datagrams, header flags, dict id) of every batch the gateway tried to open, in order."""
    seen: Opened = []
    real: Callable[..., Batch] = getattr(ingest_module, "open_batch")  # noqa: B009 (not re-exported)

    def spy(body: bytes, **kwargs: Any) -> Batch:
        header = peek_header(body)
        seen.append((header.first_seq, header.count, header.flags, header.dict_id))
        return real(body, **kwargs)

    monkeypatch.setattr(ingest_module, "open_batch", spy)
    return seen


async def trickle(up: Uploader, spool: DurableLog, chunks: list[list[Datagram]]) -> None:
    """Append ``chunks`` one at a time, each acknowledged before the next (one batch each)."""
    for chunk in chunks:
        spool.append(chunk)
        up.notify()
        target = spool.last_seq()
        await eventually(lambda target=target: spool.cursor(CURSOR) == target, "acknowledged")  # type: ignore[misc]


def ingest_of(gw: Gateway) -> ingest_module.Ingest:
    """The ingest of a running in-process gateway."""
    assert gw.ingest is not None
    return gw.ingest
