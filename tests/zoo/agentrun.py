"""Running the real agent inside a zoo network and checking what came out.

``ZooAgent`` is ``flowtunnel agent`` started as a user would (gateway URL, key, listen address, proxy flags;
nothing about rungs, no test-speed tuning beyond a frequent status file) but inside an ``IsolatedNet``, so the
exposed proxy or portal is its only way out. ``run_zoo`` drives one scenario end to end: gateway up, agent up,
a softflowd v9 capture replayed into the agent from inside the namespace, then it waits for every datagram to
be acknowledged, stops both sides and checks the journal holds exactly the datagrams sent, in order. It
records the time from the agent's start to its first acknowledged batch (printed, and appended as a JSON line
to ``$FLOWTUNNEL_ZOO_RECORD`` when set: bench/ladder.py reads it); no test asserts on it.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.agent.chain import AgentProc, GatewayProc, _env, enroll_agent, flowtunnel, journal, wait_until
from tests.zoo.netns import IsolatedNet

__all__ = ["AGENT", "ZooAgent", "ZooGateway", "ZooResult", "find_rung", "run_zoo", "status_text"]

AGENT = "zoo-site"
FIRST_ACK_DEADLINE = 30.0  # generous: the goal is 15 s with default settings (30 s through a satellite)


class ZooGateway(GatewayProc):
    """The gateway on plain HTTP, or on TLS with ``tls=(cert, key)``."""

    def __init__(self, data: Path, *, tls: tuple[Path, Path] | None = None) -> None:
        extra = ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])] if tls else []
        super().__init__(data, extra=extra)
        self.tls = tls

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _healthy(self) -> bool:
        self._check_alive("gateway")
        ctx = ssl.create_default_context(cafile=str(self.tls[0])) if self.tls else None
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2, context=ctx) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False


class ZooAgent(AgentProc):
    """``flowtunnel agent`` inside ``net``, with only the flags a user gives plus ``extra``."""

    def __init__(
        self, net: IsolatedNet, spool: Path, *, gateway: str, key: str, port: int,
        extra: Sequence[str] = (), env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(spool, gateway=gateway, agent_id=AGENT, key=key, port=port)
        self.net = net
        self.env = dict(env or {})
        self.args = [
            "agent", "--gateway", gateway, "--listen", f"udp://127.0.0.1:{port}", "--spool", str(spool),
            "--agent-id", AGENT, "--key-file", str(self.key_file), "--status-interval", "0.2", *extra,
        ]
        self.started_at = 0.0

    def _spawn(self, cmd: Sequence[str]) -> None:
        env = _env()
        env.setdefault("FLOWTUNNEL_WPAD_URL", "off")  # WPAD only where a test serves one on loopback
        env.update(self.env)
        self.started_at = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.net.command(cmd), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)

    def replay(self, pcap: Path, *, rate: int = 500) -> None:
        """``flowtunnel replay`` of ``pcap`` into the agent, from inside its network."""
        out = self.net.run(flowtunnel("replay", str(pcap), "--to", f"udp://127.0.0.1:{self.port}",
                                      "--rate", str(rate)), capture_output=True, timeout=120, env=_env())
        assert out.returncode == 0, out.stderr.decode(errors="replace")


def status_text(status: Mapping[str, Any] | None) -> str:
    return json.dumps(status or {}, sort_keys=True)


def find_rung(status: Mapping[str, Any] | None) -> str | None:
    """The rung the agent's status names (a ``rung`` key anywhere in it), or None."""
    stack: list[Any] = [status or {}]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            value = item.get("rung")
            if isinstance(value, str) and value:
                return value
            if isinstance(value, Mapping) and isinstance(value.get("name"), str):
                return str(value["name"])
            stack.extend(item.values())
    return None


@dataclass(frozen=True, kw_only=True)
class ZooResult:
    network: str
    first_ack_s: float
    all_acked_s: float
    datagrams: int
    rung: str | None
    status: dict[str, Any]
    agent_log: str


def _record(result: ZooResult) -> None:
    line = {"network": result.network, "first_ack_s": round(result.first_ack_s, 3),
            "all_acked_s": round(result.all_acked_s, 3), "datagrams": result.datagrams, "rung": result.rung}
    print(f"zoo {result.network}: first acknowledged batch {result.first_ack_s:.2f} s after agent start, "
          f"all {result.datagrams} datagrams in {result.all_acked_s:.2f} s, rung {result.rung}")
    path = os.environ.get("FLOWTUNNEL_ZOO_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


def run_zoo(
    tmp_path: Path, network: str, capture: tuple[Path, list[bytes]], *, expose: Mapping[int, int],
    agent_flags: Callable[[ZooGateway], Sequence[str]], env: Mapping[str, str] | None = None,
    tls: tuple[Path, Path] | None = None, deadline: float = FIRST_ACK_DEADLINE,
    during: Callable[[ZooAgent], None] | None = None, gateway_port: int | None = None,
) -> ZooResult:
    """One zoo scenario end to end (see the module docstring); ``expose`` maps ports inside the agent's
    network to host ports; ``gateway_port``, when given, is the port the gateway must listen on (a portal in
    front of it needs to know it before it starts); ``during`` runs while the agent works, before the first
    acknowledgement is awaited."""
    pcap, payloads = capture
    data = tmp_path / "gw"
    key = enroll_agent(data, AGENT)
    gw = ZooGateway(data, tls=tls)
    if gateway_port is not None:
        gw.port = gateway_port
    from tests.peers import free_udp_port

    with gw.start(), IsolatedNet(expose=expose) as net:
        agent = ZooAgent(net, tmp_path / "spool", gateway=gw.url, key=key, port=free_udp_port(),
                         extra=agent_flags(gw), env=env)
        with agent.start():
            agent.replay(pcap)
            if during is not None:
                during(agent)
            try:
                wait_until(lambda: gw.acked(AGENT) > 0, f"first acknowledged batch ({network})",
                           timeout=deadline)
                first = time.monotonic() - agent.started_at
                wait_until(lambda: gw.acked(AGENT) == len(payloads),
                           f"all datagrams acknowledged ({network})", timeout=deadline * 3)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\nagent status: {status_text(agent.status())[:2000]}\n"
                                     f"agent log:\n{agent.log_text()[-3000:]}") from None
            done = time.monotonic() - agent.started_at
            wait_until(lambda: (agent.status() or {}).get("backlog", {}).get("datagrams") == 0, "spool empty")
            status = agent.status() or {}
            assert agent.stop() == 0
        assert gw.stop() == 0
    entries = journal(data, AGENT)
    assert [seq for seq, _ in entries] == list(range(1, len(payloads) + 1)), "each datagram exactly once"
    assert [d.payload for _, d in entries] == payloads, "the store holds exactly the datagrams sent, in order"
    result = ZooResult(network=network, first_ack_s=first, all_acked_s=done, datagrams=len(payloads),
                       rung=find_rung(status), status=status, agent_log=agent.log_text())
    _record(result)
    return result
