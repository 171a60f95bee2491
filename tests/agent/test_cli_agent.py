"""``flowtunnel agent`` as a user runs it: flags, config file and env together; one-line errors with exit 2;
SIGTERM flushes and exits 0."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flowtunnel.agent.config import AgentConfig
from flowtunnel.cli import main
from flowtunnel.wire.keys import format_key, generate_key
from tests.agent.chain import wait_until
from tests.peers import free_tcp_port, free_udp_port

KEY = format_key(generate_key())


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flowtunnel", "agent", *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_help_documents_every_setting() -> None:
    out = run("--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for f in dataclasses.fields(AgentConfig):
        assert f"--{f.name.replace('_', '-')}" in text, f.name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "gateway URL is required"),
        (("--gateway", "http://127.0.0.1:1", "--spool", "/tmp/x", "--agent-id", "a", "--key", KEY,
          "--listen", "udp://nowhere"), "is not udp://HOST:PORT"),
        (("--gateway", "http://127.0.0.1:1", "--spool", "/tmp/x", "--agent-id", "a", "--key", KEY,
          "--max-body", "huge"), "--max-body: 'huge' is not a size"),
        (("--gateway", "http://127.0.0.1:1", "--spool", "/tmp/x", "--agent-id", "a", "--key", KEY,
          "--latency", "99999999d"), "--latency: latency 99999999d is outside the allowed range 10ms .. 1h"),
        (("--gateway", "http://127.0.0.1:1", "--spool", "/tmp/x", "--agent-id", "a",
          "--key", "ftk1_not-a-real-key"), "key is not a valid flowtunnel key"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(
    args: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in [v for v in os.environ if v.startswith("FLOWTUNNEL_")]:
        monkeypatch.delenv(var)
    assert main(["agent", *args]) == 2
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("flowtunnel agent: error: ")
    assert message in lines[0]
    assert "ftk1_not-a-real-key" not in stderr


def test_config_file_env_and_flags_then_sigterm_flushes(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    port = free_udp_port()
    conf = tmp_path / "agent.toml"
    conf.write_text(
        f'[agent]\ngateway = "http://127.0.0.1:{free_tcp_port()}"\nspool = "{spool}"\nagent-id = "cli-test"\n'
        'status-interval = "100ms"\nshutdown-timeout = "500ms"\nbackoff-cap = "200ms"\n'
    )
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["FLOWTUNNEL_AGENT_KEY"] = KEY
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowtunnel", "agent", "--config", str(conf), "--listen", f"udp://127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    try:
        status_path = spool / "status.json"
        wait_until(lambda: status_path.exists() or proc.poll() is not None, "status.json")
        assert proc.poll() is None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            for i in range(20):
                tx.sendto(b"\x00\x09" + bytes(18) + i.to_bytes(2, "big"), ("127.0.0.1", port))
        wait_until(lambda: json.loads(status_path.read_text())["received"]["datagrams"] == 20, "received")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    status = json.loads(status_path.read_text())
    assert status["backlog"]["datagrams"] == 20  # no gateway: everything waits in the spool
    assert status["listen"] == [f"udp://127.0.0.1:{port}"]
    log = stderr.decode()
    assert "stopping" in log
    assert KEY not in log
