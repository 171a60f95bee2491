"""Processes for the full-chain tests (tests/e2e/test_chain_*.py): the gateway and the agent run as
``python -m flowtunnel ...`` subprocesses, so a test can ``kill -9`` either at any moment.

Everything listens on 127.0.0.1 on free ports and writes under the test's ``tmp_path``. Readiness is
observed, never slept for: the gateway when ``/healthz`` answers, the agent when its ``status.json`` names
its pid. Each process's stderr goes to a log file the test can read (e.g. to prove the key never appears).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flowtunnel.datagram import Datagram
from flowtunnel.log import DurableLog, LogConfig
from tests.peers import free_tcp_port

__all__ = ["AgentProc", "GatewayProc", "enroll_agent", "journal", "v9_sequence", "wait_until"]

_V9_SEQ = struct.Struct("!I")


def flowtunnel(*args: str) -> list[str]:
    return [sys.executable, "-m", "flowtunnel", *args]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``cond`` until true; raise ``AssertionError`` naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for: {what}")
        time.sleep(0.05)


def v9_sequence(payload: bytes) -> int:
    """The package sequence number of a NetFlow v9 export datagram (softflowd counts from 1 per run)."""
    return int(_V9_SEQ.unpack_from(payload, 12)[0])


def enroll_agent(data: Path, name: str) -> str:
    """``flowtunnel enroll NAME --data DIR --format json`` → the key text."""
    out = subprocess.run(
        flowtunnel("enroll", name, "--data", str(data), "--format", "json"),
        capture_output=True, check=True, timeout=60, env=_env(),
    )
    doc = json.loads(out.stdout)
    assert doc["agent_id"] == name
    return str(doc["key"])


def journal(data: Path, agent: str) -> list[tuple[int, Datagram]]:
    """(agent seq, datagram) of every journal entry of ``agent`` (read with the gateway stopped)."""
    log = DurableLog(LogConfig(path=data / "journal.sqlite", quota_bytes=0))
    try:
        out: list[tuple[int, Datagram]] = []
        after = 0
        while entries := log.read(after=after, limit=10_000, max_bytes=64 << 20):
            out.extend((int(e.stream_seq or 0), e.datagram) for e in entries if e.stream == agent)
            after = entries[-1].seq
        return out
    finally:
        log.close()


class _Proc:
    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, cmd: Sequence[str]) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                list(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env()
            )

    def _check_alive(self, what: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; the exit code."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        self.proc = None
        return code

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class GatewayProc(_Proc):
    """``flowtunnel gateway`` on a fixed free port (so a restart comes back on the same URL)."""

    def __init__(self, data: Path, *, forward: Sequence[str] = (), extra: Sequence[str] = ()) -> None:
        super().__init__(data.parent / f"{data.name}-gateway.log")
        self.data = data
        self.port = free_tcp_port()
        self.forward = tuple(forward)
        self.extra = tuple(extra)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GatewayProc:
        # ``url``'s scheme: a subclass serving TLS (tests/zoo ZooGateway) says https, and an explicit http://
        # would serve plain HTTP beside --tls-cert.
        cmd = ["gateway", "--listen", self.url, "--data", str(self.data), "--no-store",
               "--status-interval", "0.2", *self.extra]
        for target in self.forward:
            cmd += ["--forward", target]
        self._spawn(flowtunnel(*cmd))
        wait_until(self._healthy, "gateway /healthz", timeout=30)
        return self

    def _healthy(self) -> bool:
        self._check_alive("gateway")
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def status(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads((self.data / "status.json").read_text())
        except (OSError, ValueError):
            return {}
        return doc

    def acked(self, agent: str) -> int:
        """The agent's high-water mark from the gateway's status.json (0 if not there yet)."""
        return int(self.status().get("agents", {}).get(agent, {}).get("acked", 0) or 0)

    def sinks_done(self) -> bool:
        """Every sink has handled everything in the journal (per status.json)."""
        doc = self.status()
        journal_last = int(doc.get("journal", {}).get("last_seq", 0) or 0)
        sinks = doc.get("sinks", {})
        return bool(sinks) and journal_last > 0 and all(
            int(s.get("cursor", 0) or 0) >= journal_last for s in sinks.values()
        )


class AgentProc(_Proc):
    """``flowtunnel agent`` listening on ``udp://127.0.0.1:port``, key passed in a file."""

    def __init__(
        self, spool: Path, *, gateway: str, agent_id: str, key: str, port: int, extra: Sequence[str] = ()
    ) -> None:
        super().__init__(spool.parent / f"{spool.name}-agent.log")
        self.spool = spool
        self.port = port
        self.key_file = spool.parent / f"{spool.name}.key"
        self.key_file.write_text(key + "\n")
        self.key_file.chmod(0o600)
        self.args = [
            "agent", "--gateway", gateway, "--listen", f"udp://127.0.0.1:{port}", "--spool", str(spool),
            "--agent-id", agent_id, "--key-file", str(self.key_file), "--latency", "0.1",
            "--backoff-base", "0.1", "--backoff-cap", "0.5", "--status-interval", "0.1",
            "--connect-timeout", "2s", "--read-timeout", "5s", "--total-timeout", "10s", *extra,
        ]

    def start(self) -> AgentProc:
        self._spawn(flowtunnel(*self.args))
        wait_until(self._ready, "agent status.json", timeout=30)
        return self

    def _ready(self) -> bool:
        self._check_alive("agent")
        st = self.status()
        return st is not None and self.proc is not None and st.get("pid") == self.proc.pid

    def status(self) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = json.loads((self.spool / "status.json").read_text())
        except (OSError, ValueError):
            return None
        return doc

    def received(self) -> int:
        st = self.status() or {}
        return int(st.get("received", {}).get("datagrams", 0))

    def spooled_last_seq(self) -> int:
        st = self.status() or {}
        return int(st.get("spool", {}).get("last_seq", 0))
