"""The proxy password never reaches a log line or a file (issue 15 item 2), checked the way an operator would
find it: ``flowtunnel agent`` runs as a process (debug log, text and JSON) through every proxy failure these
tests can provoke with real peers, then its whole stderr, ``flowtunnel status --spool`` and every file in the
spool directory (status, rung memory, the spool database) are searched for the password's bytes."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.agent.chain import AgentProc, GatewayProc, _env, enroll_agent, flowtunnel
from tests.agent.squid import Squid
from tests.agent.test_uploader import self_signed
from tests.conftest import require
from tests.peers import Tinyproxy, free_tcp_port, free_udp_port

PASSWORD = "Zq7-pw-s3cret"
USER = "fieldbox"


@dataclass(frozen=True, kw_only=True)
class Failure:
    """One way through a proxy: the gateway, the proxy flags, and what the agent's log must show (so the
    failure was really met)."""

    name: str
    gateway: str
    flags: list[str]
    said: str = ""
    delivered: bool = False


def _v5(seq: int) -> bytes:
    head = (5).to_bytes(2, "big") + (1).to_bytes(2, "big") + (1000).to_bytes(4, "big")
    head += int(time.time()).to_bytes(4, "big") + (0).to_bytes(4, "big") + seq.to_bytes(4, "big")
    return head + bytes(4) + bytes(48)


def _failures(agent: AgentProc) -> int:
    up = (agent.status() or {}).get("upload") or {}
    return sum(int(v) for v in (up.get("failures") or {}).values())


def _everything(agent: AgentProc, spool: Path) -> bytes:
    """The agent's stderr, what ``status`` prints (text and JSON) and the bytes of every spool file."""
    out = [agent.log_text().encode()]
    for extra in ([], ["--format", "json"]):
        done = subprocess.run(flowtunnel("status", "--spool", str(spool), *extra), capture_output=True,
                              timeout=60, env=_env(), check=False)
        out += [done.stdout, done.stderr]
    out += [p.read_bytes() for p in sorted(spool.rglob("*")) if p.is_file()]
    return b"\n".join(out)


@pytest.mark.slow
def test_the_proxy_password_is_in_no_log_line_and_no_file(tmp_path: Path) -> None:
    require("squid", "tinyproxy")
    cert, cert_key, pin = self_signed(tmp_path)
    data = tmp_path / "gw"
    key = enroll_agent(data, "site-a")
    pw_file = tmp_path / "proxy-password"
    pw_file.write_text(PASSWORD + "\n")
    pw_file.chmod(0o600)
    tls_port = free_tcp_port()
    with (
        # Plain HTTP, and HTTPS on another port than 443 (which squid refuses to CONNECT to by default).
        GatewayProc(data, extra=["--listen", f"https://127.0.0.1:{tls_port}", "--tls-cert", str(cert),
                                 "--tls-key", str(cert_key)]).start() as plain,
        Squid(auth=True) as squid,  # squid's default: CONNECT only to port 443
        Tinyproxy(tmp_path, auth=(USER, "another-password")) as strict,  # 407 to our password
    ):
        tls_url = f"https://127.0.0.1:{tls_port}"
        with_pw = squid.url_with(USER, PASSWORD)
        refused = f"refused CONNECT to port {tls_port}"
        failures = [
            Failure(name="proxy-not-there", gateway=plain.url,
                    flags=["--proxy", f"http://{USER}:{PASSWORD}@127.0.0.1:{free_tcp_port()}"]),
            Failure(name="connect-refused", gateway=tls_url, said=refused,
                    flags=["--pin-sha256", pin, "--proxy", with_pw]),
            Failure(name="connect-refused-password-file", gateway=tls_url, said=refused,
                    flags=["--pin-sha256", pin, "--proxy", squid.url, "--proxy-user", USER,
                           "--proxy-password-file", str(pw_file)]),
            Failure(name="gateway-down", gateway=f"http://127.0.0.1:{free_tcp_port()}",
                    flags=["--proxy", with_pw]),
            Failure(name="login-refused", gateway=plain.url, said="407",
                    flags=["--proxy", strict.url.replace("http://", f"http://{USER}:{PASSWORD}@")]),
            Failure(name="delivered", gateway=plain.url, delivered=True, flags=["--proxy", with_pw]),
        ]
        for n, failure in enumerate(failures):
            spool = tmp_path / f"spool-{failure.name}"
            fmt = "json" if n % 2 else "text"
            agent = AgentProc(spool, gateway=failure.gateway, agent_id="site-a", key=key,
                              port=free_udp_port(),
                              extra=["--log-format", fmt, "--reject-backoff", "1s", *failure.flags])
            agent.args.insert(0, "--log-level=debug")
            with agent.start(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                deadline = time.monotonic() + 60
                while not _met(agent, failure):
                    assert time.monotonic() < deadline, f"{failure.name}: {agent.log_text()[-3000:]}"
                    sock.sendto(_v5(n), ("127.0.0.1", agent.port))
                    time.sleep(0.2)
                if failure.said:
                    assert failure.said in agent.log_text(), (failure.name, agent.log_text()[-3000:])
                assert agent.stop() == 0
            text = _everything(agent, spool)
            assert PASSWORD.encode() not in text, failure.name
            if failure.name != "connect-refused-password-file":
                assert f"{USER}:***@".encode() in text, failure.name  # the proxy is named, masked
            if fmt == "json":
                assert all(json.loads(line) for line in agent.log_text().splitlines())


def _met(agent: AgentProc, failure: Failure) -> bool:
    if failure.delivered:
        return int(((agent.status() or {}).get("upload") or {}).get("acked") or 0) > 0
    return _failures(agent) >= 2
