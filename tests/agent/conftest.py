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

from flowtunnel.datagram import Datagram
from flowtunnel.gateway.config import GatewayConfig
from flowtunnel.gateway.registry import Registry
from flowtunnel.gateway.service import Gateway

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
              "no_proxy")

GatewayFactory = Callable[..., AbstractAsyncContextManager[Gateway]]


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
