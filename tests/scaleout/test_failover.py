"""Agents in front of several gateways on one JetStream journal, while a gateway dies (``kill -9``) mid-run:
through haproxy (round robin over two gateways), and with the agent's own failover (``--gateway`` twice). The
stream holds every datagram the agent received exactly once, in order: the gateways share the journal, so the
retry on the surviving gateway after a resync is a duplicate or new, never both."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flowtunnel.agent.config import AgentConfig
from flowtunnel.agent.service import AgentService
from flowtunnel.agent.status import read_status
from flowtunnel.agent.uploader import CURSOR
from flowtunnel.errors import FlowtunnelError
from flowtunnel.journal.jetstream import parse_journal_url
from flowtunnel.wire.keys import format_key
from tests.agent.conftest import eventually
from tests.natscluster import NatsCluster
from tests.scaleout.util import demo_datagrams, enroll_kv, read_stream

AGENT = "edge-1"
ROUNDS = 8  # the demo capture's 154 datagrams this many times: ~1,200 datagrams, ~1.7 MB


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            assert proc.poll() is None, f"{what} exited with {proc.returncode}: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"{what} is not listening on port {port} after 30 s"
            time.sleep(0.05)


@contextlib.contextmanager
def _processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """The processes a test starts, each in its own session; whatever still runs is killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _gateway(procs: list[subprocess.Popen[bytes]], journal: str, data: Path) -> tuple[str, int]:
    port = _port()
    log = data.with_name(data.name + ".log")
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flowtunnel", "gateway", "--journal", journal, "--data", str(data),
             "--listen", f"127.0.0.1:{port}", "--no-store", "--agent-rate", "0", "--journal-quota", "256MiB"],
            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
        )
    procs.append(proc)
    _wait_listening(port, proc, "gateway", log)
    return f"http://127.0.0.1:{port}", proc.pid


def _kill(pid: int) -> None:
    os.killpg(pid, signal.SIGKILL)


HAPROXY_CONF = """\
global
    maxconn 256
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 2
    option redispatch
frontend flowtunnel
    bind 127.0.0.1:{port}
    default_backend gateways
backend gateways
    balance roundrobin
    option httpchk GET /healthz
    timeout check 1s
    server g1 127.0.0.1:{g1} check inter 1s fall 2 rise 2
    server g2 127.0.0.1:{g2} check inter 1s fall 2 rise 2
"""


def _haproxy(procs: list[subprocess.Popen[bytes]], tmp: Path, backends: tuple[int, int]) -> str:
    binary = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK)
                                         else None)
    if binary is None:
        pytest.skip("haproxy not installed (tools/setup-dev.sh installs it)")
    port = _port()
    conf = tmp / "haproxy.cfg"
    conf.write_text(HAPROXY_CONF.format(port=port, g1=backends[0], g2=backends[1]))
    log = tmp / "haproxy.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([binary, "-db", "-f", str(conf)], stdout=err, stderr=err,
                                start_new_session=True)
    procs.append(proc)
    _wait_listening(port, proc, "haproxy", log)
    return f"http://127.0.0.1:{port}"


def _agent_settings(tmp: Path, gateway: str, key: bytes) -> dict[str, object]:
    return {
        "gateway": gateway, "spool": tmp / "spool", "agent_id": AGENT, "key": format_key(key),
        "listen": ("udp://127.0.0.1:0",), "latency": 0.05, "backoff_base": 0.05, "backoff_cap": 0.3,
        "status_interval": 0.1, "commit_interval": 0.01, "shutdown_timeout": 2.0, "rungs": ("post",),
        "connect_timeout": 2.0, "read_timeout": 5.0, "total_timeout": 10.0,
    }


def _agent_process(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "flowtunnel", "agent", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


async def _replay(
    address: tuple[str, int], payloads: list[bytes], *, kill_at: int = -1, kill: int = 0
) -> None:
    """Send ``payloads`` to the agent like an exporter (paced), killing process group ``kill`` (-9) after
    ``kill_at`` of them."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        for i, payload in enumerate(payloads):
            if i == kill_at:
                _kill(kill)
            tx.sendto(payload, address)
            if i % 20 == 19:
                await asyncio.sleep(0.02)


class Stuck:
    """True once the acknowledged seq has not moved for ``quiet`` seconds while more is spooled."""

    def __init__(self, acked: Callable[[], int], spooled: Callable[[], int], quiet: float = 0.5) -> None:
        self._acked, self._spooled, self._quiet = acked, spooled, quiet
        self._last = (-1, time.monotonic())

    def __call__(self) -> bool:
        acked, now = self._acked(), time.monotonic()
        if acked != self._last[0]:
            self._last = (acked, now)
            return False
        return self._spooled() > acked and now - self._last[1] >= self._quiet


def _assert_exactly_once(entries: list, payloads: list[bytes]) -> None:  # type: ignore[type-arg]
    mine = [e for e in entries if e.stream == AGENT]
    seqs = [int(e.stream_seq or 0) for e in mine]
    assert seqs == list(range(1, len(payloads) + 1))  # each once, in order
    assert [e.datagram.payload for e in mine] == payloads


async def test_two_gateways_behind_haproxy_one_killed_mid_run(single: NatsCluster, tmp_path: Path) -> None:
    key = await enroll_kv(single.url, AGENT)
    payloads = [d.payload for d in demo_datagrams()] * ROUNDS
    with _processes() as procs:
        g1, g1_pid = _gateway(procs, single.url, tmp_path / "g1")
        g2, _ = _gateway(procs, single.url, tmp_path / "g2")
        balancer = _haproxy(procs, tmp_path, (int(g1.rsplit(":", 1)[1]), int(g2.rsplit(":", 1)[1])))
        agent = AgentService(AgentConfig(**_agent_settings(tmp_path, balancer, key)))  # type: ignore[arg-type]
        await agent.start()
        half = len(payloads) // 2
        try:
            await _replay(agent.receiver.bound[0], payloads[:half])
            await eventually(lambda: agent.spool.cursor(CURSOR) == half, "the first half acknowledged")
            # Freeze g1, so that the next request haproxy gives it hangs there; once the agent waits on one
            # (its acknowledged seq stuck while datagrams wait), kill g1 mid-request.
            os.killpg(g1_pid, signal.SIGSTOP)
            replay = asyncio.ensure_future(_replay(agent.receiver.bound[0], payloads[half:]))
            stuck = Stuck(lambda: agent.spool.cursor(CURSOR), lambda: agent.receiver.stats.spooled)
            await eventually(stuck, "a request hanging on the frozen gateway", within=30)
            _kill(g1_pid)
            await replay
            await eventually(lambda: agent.receiver.stats.spooled == len(payloads), "everything spooled")
            await eventually(lambda: agent.spool.cursor(CURSOR) == len(payloads), "everything acknowledged",
                             within=60)
            # The request g1 held failed (haproxy closes the agent's connection, or answers 502), and the
            # retry after a resync went to g2.
            failures = agent.uploader.stats.failures
            assert any(cause.startswith(("http-5", "connection:")) for cause in failures), failures
        finally:
            await agent.shutdown()
    _assert_exactly_once(await read_stream(parse_journal_url(single.url)), payloads)


async def test_agent_moves_to_its_second_gateway_when_the_first_is_killed(
    single: NatsCluster, tmp_path: Path
) -> None:
    """The real agent process, ``--gateway`` given twice; the first gateway dies mid-run."""
    key = await enroll_kv(single.url, AGENT)
    payloads = [d.payload for d in demo_datagrams()] * ROUNDS
    key_file = tmp_path / "agent.key"
    key_file.write_text(format_key(key))
    udp = _port()
    spool = tmp_path / "spool"
    with _processes() as procs:
        g1, g1_pid = _gateway(procs, single.url, tmp_path / "g1")
        g2, _ = _gateway(procs, single.url, tmp_path / "g2")
        agent = _agent_process(
            "--gateway", g1, "--gateway", g2, "--listen", f"udp://127.0.0.1:{udp}", "--spool", str(spool),
            "--agent-id", AGENT, "--key-file", str(key_file), "--latency", "50ms", "--backoff-base", "50ms",
            "--backoff-cap", "300ms", "--status-interval", "100ms", "--rungs", "post",
            "--connect-timeout", "2s",
        )
        procs.append(agent)

        def status() -> dict[str, Any]:
            try:
                return read_status(spool)
            except FlowtunnelError:  # not written yet
                return {}

        await eventually(lambda: bool(status().get("listen")), "the agent listening", within=30)
        await _replay(("127.0.0.1", udp), payloads, kill_at=len(payloads) // 2, kill=g1_pid)
        await eventually(lambda: status().get("gateway_acked") == len(payloads), "everything acknowledged",
                         within=60)
        doc = status()
        upload = doc["upload"]
        received = doc["received"]
        assert (received["datagrams"], received["bytes"]) == (len(payloads), sum(map(len, payloads)))
        assert (doc["gateway"], upload["gateway"]) == (g2, g2)
        assert upload["gateway_moves"] >= 1
        assert upload["gateways"][g1].startswith("failed: ")
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=30)
        assert agent.returncode == 0, err.decode()
    log = err.decode()
    moved = f"): moving to gateway {g2} at once"
    assert f"gateway {g1} failed (" in log
    assert log.count(moved) == 1  # each move logged once
    _assert_exactly_once(await read_stream(parse_journal_url(single.url)), payloads)
