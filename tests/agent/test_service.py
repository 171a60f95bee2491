"""The whole agent in-process (receiver + spool + uploader + status) against the real gateway."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import flowtunnel.agent.service as service_mod
from flowtunnel.agent.config import AgentConfig
from flowtunnel.agent.service import STATUS_FILE, AgentService
from flowtunnel.agent.status import read_status, render
from flowtunnel.agent.uploader import CURSOR
from flowtunnel.errors import ConfigError
from flowtunnel.log import MIN_DISK_QUOTA, FullPolicy
from flowtunnel.statusfile import write_json_atomic
from flowtunnel.wire.keys import format_key, generate_key
from tests.agent.conftest import GatewayFactory, enroll, eventually, journal_of
from tests.peers import free_tcp_port

AGENT = "site-b"


def config(tmp_path: Path, gateway: str, key: bytes, **overrides: Any) -> AgentConfig:
    settings: dict[str, Any] = {
        "gateway": gateway, "spool": tmp_path / "spool", "agent_id": AGENT, "key": format_key(key),
        "listen": ("udp://127.0.0.1:0",), "latency": 0.05, "backoff_base": 0.05, "backoff_cap": 0.3,
        "status_interval": 0.1, "commit_interval": 0.01, "shutdown_timeout": 2.0,
    }
    settings.update(overrides)
    return AgentConfig(**settings)


@asynccontextmanager
async def running(cfg: AgentConfig) -> AsyncIterator[AgentService]:
    service = AgentService(cfg)
    await service.start()
    try:
        yield service
    finally:
        await service.shutdown()


def send(service: AgentService, payloads: list[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        for p in payloads:
            tx.sendto(p, service.receiver.bound[0])


def spooled(agent: AgentService, n: int) -> bool:
    return agent.receiver.stats.spooled == n


def v9(seq: int, size: int = 100) -> bytes:
    return b"\x00\x09" + b"\x00" * 10 + seq.to_bytes(4, "big") + b"\x00\x00\x00\x01" + bytes(size)


def _disk_bytes(directory: Path) -> int:
    """Bytes on disk under ``directory``; a file renamed away between listing and stat (the agent's status
    file is written to a temporary name and renamed) counts as gone."""
    total = 0
    for f in directory.iterdir():
        with contextlib.suppress(FileNotFoundError):
            total += f.stat().st_blocks * 512
    return total


async def test_udp_in_journal_out_with_status(tmp_path: Path, gateway_factory: GatewayFactory) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    payloads = [v9(i) for i in range(500)] + [b"not netflow"]
    async with gateway_factory(data) as gw, running(config(tmp_path, gw.url, key)) as agent:
        send(agent, payloads)
        await eventually(lambda: agent.spool.cursor(CURSOR) == len(payloads), "everything acknowledged")
        assert [p for _, p in ((s, d.payload) for s, d in journal_of(gw, AGENT))] == payloads
        await eventually(
            lambda: read_status(tmp_path / "spool").get("gateway_acked") == len(payloads), "status updated"
        )
        status = read_status(tmp_path / "spool")
        assert status["backlog"] == {"datagrams": 0, "bytes": 0, "oldest_received": None}
        assert status["received"]["datagrams"] == len(payloads)
        assert status["malformed"] == {"not_netflow": 1}
        assert status["drops"] == {"spool_full": 0}
        assert status["upload"]["last_result"] == "ok"
        assert status["compression_ratio"] > 1
        (exporter,) = status["exporters"]
        assert exporter.startswith("127.0.0.1:")
        text = render(status)
        assert f"agent          {AGENT}" in text
        assert "seq 501" in text
        assert "not_netflow=1 (carried anyway)" in text


async def test_shutdown_flushes_to_the_spool_and_the_next_start_delivers(
    tmp_path: Path, gateway_factory: GatewayFactory
) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    port = free_tcp_port()
    payloads = [v9(i) for i in range(300)]
    cfg = config(tmp_path, f"http://127.0.0.1:{port}", key, shutdown_timeout=0.5)
    async with running(cfg) as agent:
        send(agent, payloads)
        await eventually(lambda: agent.receiver.stats.datagrams == len(payloads), "all received")
    # The gateway was never up: all of it waits in the spool, and status.json says so.
    status = json.loads((tmp_path / "spool" / STATUS_FILE).read_text())
    assert status["backlog"]["datagrams"] == len(payloads)
    assert status["upload"]["consecutive_failures"] >= 1
    assert "failures in a row" in render(status)
    async with gateway_factory(data, port=port) as gw, running(cfg) as agent:
        await eventually(lambda: agent.spool.cursor(CURSOR) == len(payloads), "backlog delivered")
        assert [d.payload for _, d in journal_of(gw, AGENT)] == payloads


async def test_second_agent_on_the_same_spool_is_refused(tmp_path: Path) -> None:
    cfg = config(tmp_path, f"http://127.0.0.1:{free_tcp_port()}", bytes(32), shutdown_timeout=0)
    async with running(cfg):
        with pytest.raises(ConfigError, match="is in use by another agent"):
            await AgentService(cfg).start()


async def test_unbindable_listen_address_is_a_config_error(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        cfg = config(tmp_path, "http://127.0.0.1:1", bytes(32), listen=(f"udp://127.0.0.1:{port}",))
        with pytest.raises(ConfigError, match=f"cannot listen on udp://127.0.0.1:{port}"):
            await AgentService(cfg).start()
    # Nothing stays locked after a failed start.
    async with running(config(tmp_path, "http://127.0.0.1:1", bytes(32), shutdown_timeout=0)):
        pass


@pytest.mark.parametrize("policy", ["drop-oldest", "refuse-new"])
async def test_spool_quota_applies_its_policy_and_counts_every_drop(
    tmp_path: Path, gateway_factory: GatewayFactory, policy: str
) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    port = free_tcp_port()
    payloads = [v9(i, size=1200) for i in range(400)]
    cfg = config(tmp_path, f"http://127.0.0.1:{port}", key, spool_quota=MIN_DISK_QUOTA,
                 full_policy=FullPolicy(policy))
    async with running(cfg) as agent:
        for i in range(50, len(payloads) + 1, 50):  # in steps, so the spool takes several commits
            send(agent, payloads[i - 50:i])
            await eventually(functools.partial(spooled, agent, i), "spooled")
        agent.status()  # refreshes the spool's drop count
        dropped = agent.drops()["spool_full"]
        assert 0 < dropped < len(payloads)
        async with gateway_factory(data, port=port) as gw:
            await eventually(lambda: agent.spool.stats().entries == 0, "what was kept is delivered")
            got = [d.payload for _, d in journal_of(gw, AGENT)]
            assert len(got) + dropped == len(payloads)
            if policy == "drop-oldest":
                assert got == payloads[dropped:]
            else:
                assert got == payloads[:len(got)]
            assert gw.metrics.agents[AGENT].dropped == {"spool_full": dropped}
        status = agent.status()
        assert status["drops"] == {"spool_full": dropped}
        assert f"spool_full={dropped}" in render(status)


@pytest.mark.parametrize("policy", ["drop-oldest", "refuse-new"])
async def test_spool_quota_bounds_the_spool_directory_on_disk(
    tmp_path: Path, gateway_factory: GatewayFactory, policy: str
) -> None:
    """Issue 17.9: with ``--spool-quota 2MiB`` and the gateway down the spool directory peaked at 7,356 KiB.
    Its files (database, WAL, WAL index, reserve) now stay within the quota; the directory also holds
    status.json and the lock file, a few KiB (the documented slack)."""
    key = generate_key()
    port = free_tcp_port()  # no gateway there
    quota = 2 << 20
    cfg = config(tmp_path, f"http://127.0.0.1:{port}", key, spool_quota=quota, full_policy=FullPolicy(policy))
    spool_dir = tmp_path / "spool"
    peak = 0
    async with running(cfg) as agent:
        for i in range(0, 4000, 250):  # 5.6 MB of datagrams, in several group commits
            send(agent, [v9(n, size=1400) for n in range(i, i + 250)])
            await eventually(functools.partial(spooled, agent, i + 250), "spooled")
            peak = max(peak, _disk_bytes(spool_dir))
        agent.status()
        assert agent.drops()["spool_full"] > 0
        stats = agent.spool.stats()
        assert stats.disk_bytes <= quota
        assert stats.bytes > quota // 3  # the quota is used for data, not only overhead
    assert peak <= quota + (16 << 10), f"spool directory peaked at {peak} bytes for a {quota}-byte quota"


async def test_status_file_is_rewritten_only_when_something_changed(
    tmp_path: Path, gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quiet site's status costs no disk write (issue 14): between heartbeats the file is rewritten only
    when what it says changes; a change (a datagram) is written at the next tick, and the heartbeat keeps an
    unchanged file fresh for readers."""
    writes: list[float] = []
    real = write_json_atomic

    def counting(path: Path, doc: object, *, durable: bool = True) -> None:
        if path.name == STATUS_FILE:
            writes.append(time.monotonic())
        real(path, doc, durable=durable)

    monkeypatch.setattr(service_mod, "write_json_atomic", counting)
    monkeypatch.setattr(service_mod, "STATUS_HEARTBEAT", 1.0)
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    cfg = functools.partial(config, tmp_path, key=key, status_interval=0.05)
    async with gateway_factory(data) as gw, running(cfg(gateway=gw.url)) as agent:
        # the first resync and the rates' first readings change the status a few times
        await eventually(lambda: agent.uploader.stats.resyncs >= 1, "first resync")
        await asyncio.sleep(0.3)
        before = len(writes)
        await asyncio.sleep(0.9)  # ~18 ticks; two heartbeats are 1 s apart: at most one of them
        assert len(writes) - before <= 1
        send(agent, [v9(1)])
        await eventually(
            lambda: read_status(tmp_path / "spool").get("gateway_acked") == 1, "the datagram in the status"
        )
        quiet = len(writes)
        await asyncio.sleep(2.5)  # ~50 ticks: the rates falling back to zero, then heartbeats only
        assert 2 <= len(writes) - quiet <= 5
        assert read_status(tmp_path / "spool")["received"]["datagrams"] == 1


async def test_spool_caps_sqlites_page_cache_and_the_journal_keeps_the_default(
    tmp_path: Path, gateway_factory: GatewayFactory
) -> None:
    """Issue 14: a growing spool filled SQLite's default 2 MB page cache with pages not read again (1.7 MB of
    RSS while the gateway is unreachable); the spool's cache is capped, the gateway's journal keeps it."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    port = free_tcp_port()
    cfg = config(tmp_path, f"http://127.0.0.1:{port}", key)
    async with gateway_factory(data, port=port) as gw, running(cfg) as agent:
        assert service_mod.SPOOL_CACHE_KIB <= 512
        assert agent.spool._db.execute("PRAGMA cache_size").fetchone()[0] == -service_mod.SPOOL_CACHE_KIB
        assert gw.journal is not None
        assert gw.journal._db.execute("PRAGMA cache_size").fetchone()[0] == -2000
