"""Every start-up problem of agent and gateway ends in one line ``flowtunnel CMD: error: ...`` and a non-zero
exit, never a traceback: missing, unusable, read-only or full directories, busy ports, unreadable key,
certificate or config files. Driven through the real CLI in subprocesses; read-only and full filesystems are
made in a private mount namespace (``unshare -m``), since root ignores mode bits."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.ops.util import Daemon, clean_env
from tests.peers import free_tcp_port


def _needs_namespaces() -> None:
    if os.geteuid() != 0:
        pytest.skip("read-only and full filesystems need root (mount namespaces)")
    if shutil.which("unshare") is None:
        pytest.skip("not installed: unshare (util-linux)")


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("keys")
    done = subprocess.run([sys.executable, "-m", "flowtunnel", "enroll", "x", "--data", str(data), "--format",
                           "json"], capture_output=True, text=True, check=True, env=clean_env())
    path = data / "x.key"
    path.write_text(json.loads(done.stdout)["key"] + "\n")
    return path


def _run(args: list[str], *, setup: str = "") -> subprocess.CompletedProcess[str]:
    """``flowtunnel ARGS``, after ``setup`` (shell) in a private mount namespace when given."""
    cmd = [sys.executable, "-m", "flowtunnel", *args]
    if setup:
        cmd = ["unshare", "-m", "sh", "-ec", setup + '\nexec "$@"', "sh", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False, env=clean_env())


def _one_line_error(done: subprocess.CompletedProcess[str], command: str, *parts: str) -> str:
    assert done.returncode != 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"flowtunnel {command}: error: "), done.stderr
    for part in parts:
        assert part in last, done.stderr
    return last


def _read_only(path: Path) -> str:
    return f"mount --bind {path} {path}\nmount -o remount,bind,ro {path}"


def _full(path: Path) -> str:
    return (f"mount -t tmpfs -o size=256k tmpfs {path}\n"
            f"dd if=/dev/zero of={path}/filler bs=4k 2>/dev/null || true")


def _agent(spool: Path, key: Path, *extra: str) -> list[str]:
    return ["agent", "--gateway", "http://127.0.0.1:1", "--spool", str(spool), "--agent-id", "x",
            "--key-file", str(key), *extra]


def _gateway(data: Path, *extra: str) -> list[str]:
    return ["gateway", "--listen", f"127.0.0.1:{free_tcp_port()}", "--data", str(data), *extra]


# -- agent ---------------------------------------------------------------------------------------------------


def test_agent_spool_on_a_read_only_filesystem(tmp_path: Path, key: Path) -> None:
    _needs_namespaces()
    (tmp_path / "spool").mkdir()
    done = _run(_agent(tmp_path / "spool", key), setup=_read_only(tmp_path))
    _one_line_error(done, "agent", f"{tmp_path}/spool/agent.lock", "Read-only file system")


def test_agent_spool_below_a_read_only_directory(tmp_path: Path, key: Path) -> None:
    _needs_namespaces()
    done = _run(_agent(tmp_path / "new" / "spool", key), setup=_read_only(tmp_path))
    _one_line_error(done, "agent", f"cannot create spool directory {tmp_path}/new/spool", "Read-only")


@pytest.mark.parametrize("pre", ["", "mkdir -p {d}/spool; echo 1 > {d}/spool/agent.lock"])
def test_agent_spool_on_a_full_filesystem(tmp_path: Path, key: Path, pre: str) -> None:
    _needs_namespaces()
    setup = f"mount -t tmpfs -o size=256k tmpfs {tmp_path}\n{pre.format(d=tmp_path)}\n" + (
        f"dd if=/dev/zero of={tmp_path}/filler bs=4k 2>/dev/null || true")
    done = _run(_agent(tmp_path / "spool", key), setup=setup)
    line = _one_line_error(done, "agent")
    assert "No space left on device" in line or "disk full" in line


def test_agent_spool_is_a_file(tmp_path: Path, key: Path) -> None:
    (tmp_path / "spool").write_text("")
    _one_line_error(_run(_agent(tmp_path / "spool", key)), "agent", "cannot create spool directory", "exists")


def test_agent_listen_port_busy(tmp_path: Path, key: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        done = _run(_agent(tmp_path / "spool", key, "--listen", f"udp://127.0.0.1:{port}"))
    _one_line_error(done, "agent", f"cannot listen on udp://127.0.0.1:{port}", "in use")


def test_agent_metrics_port_busy(tmp_path: Path, key: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _run(_agent(tmp_path / "spool", key, "--listen", "udp://127.0.0.1:0", "--metrics-listen",
                           f"127.0.0.1:{port}"))
    _one_line_error(done, "agent", f"cannot listen on metrics address 127.0.0.1:{port}", "in use")


def test_agent_proxy_password_file_unreadable(tmp_path: Path, key: Path) -> None:
    done = _run(_agent(tmp_path / "spool", key, "--proxy", "http://127.0.0.1:3128", "--proxy-user", "u",
                       "--proxy-password-file", str(tmp_path / "missing")))
    _one_line_error(done, "agent", f"cannot read proxy-password-file {tmp_path}/missing", "No such file")


def test_agent_pac_file_missing(tmp_path: Path, key: Path) -> None:
    done = _run(_agent(tmp_path / "spool", key, "--proxy", "auto", "--pac", str(tmp_path / "proxy.pac")))
    _one_line_error(done, "agent", f"cannot read PAC file {tmp_path}/proxy.pac", "No such file")


def test_agent_proxy_password_file_without_a_user(tmp_path: Path, key: Path) -> None:
    done = _run(_agent(tmp_path / "spool", key, "--proxy-password-file", str(tmp_path / "pw")))
    _one_line_error(done, "agent", "proxy-password-file needs proxy-user")


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: None, "No such file or directory"),
    (lambda p: p.mkdir(), "Is a directory"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00key"), "is not text"),
    (lambda p: p.write_text("not-a-key\n"), "is not a valid flowtunnel key"),
])
def test_agent_key_file_unusable(tmp_path: Path, make: Callable[[Path], object], message: str) -> None:
    path = tmp_path / "agent.key"
    make(path)
    done = _run(_agent(tmp_path / "spool", path))
    _one_line_error(done, "agent", str(path), message)


def test_agent_ca_file_unreadable(tmp_path: Path, key: Path) -> None:
    done = _run(_agent(tmp_path / "spool", key, "--ca-file", str(tmp_path / "missing.pem")))
    _one_line_error(done, "agent", f"cannot load CA file {tmp_path}/missing.pem")


# -- gateway -------------------------------------------------------------------------------------------------


def test_gateway_data_on_a_read_only_filesystem(tmp_path: Path) -> None:
    _needs_namespaces()
    (tmp_path / "data").mkdir()
    done = _run(_gateway(tmp_path / "data"), setup=_read_only(tmp_path))
    _one_line_error(done, "gateway", f"{tmp_path}/data", "Read-only file system")


def test_gateway_data_below_a_read_only_directory(tmp_path: Path) -> None:
    _needs_namespaces()
    done = _run(_gateway(tmp_path / "new" / "data"), setup=_read_only(tmp_path))
    _one_line_error(done, "gateway", f"{tmp_path}/new", "Read-only file system")


def test_gateway_data_on_a_full_filesystem(tmp_path: Path) -> None:
    _needs_namespaces()
    (tmp_path / "data").mkdir()
    done = _run(_gateway(tmp_path / "data"), setup=_full(tmp_path))
    line = _one_line_error(done, "gateway")
    assert "No space left on device" in line or "disk is full" in line or "disk full" in line


def test_gateway_data_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("")
    _one_line_error(_run(_gateway(tmp_path / "data")), "gateway", f"{tmp_path}/data", "exists")


def test_gateway_listen_port_busy(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _run(["gateway", "--listen", f"127.0.0.1:{port}", "--data", str(tmp_path), "--no-store"])
    _one_line_error(done, "gateway", f"cannot listen on http://127.0.0.1:{port}", "in use")


def test_gateway_dns_port_busy(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        done = _run(_gateway(tmp_path / "data", "--no-store", "--dns-zone", "t.example.org", "--dns-listen",
                             f"udp://127.0.0.1:{port}"))
    _one_line_error(done, "gateway", f"cannot listen on udp://127.0.0.1:{port} (DNS)", "in use")


def test_gateway_admin_token_file_unreadable(tmp_path: Path) -> None:
    done = _run(_gateway(tmp_path / "data", "--admin-token-file", str(tmp_path / "missing")))
    _one_line_error(done, "gateway", f"cannot read admin token file {tmp_path}/missing", "No such file")


@pytest.mark.parametrize(("cert", "message"), [
    ("garbage", "cannot load TLS certificate"),
    ("dir", "is not a readable file"),
])
def test_gateway_tls_files_unusable(tmp_path: Path, cert: str, message: str) -> None:
    cert_path, key_path = tmp_path / "gw.pem", tmp_path / "gw.key"
    if cert == "dir":
        cert_path.mkdir()
    else:
        cert_path.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    key_path.write_text("garbage\n")
    done = _run(_gateway(tmp_path / "data", "--tls-cert", str(cert_path), "--tls-key", str(key_path)))
    _one_line_error(done, "gateway", message)


# -- config files (both commands) ----------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: None, "cannot read config file {p}: No such file or directory"),
    (lambda p: p.mkdir(), "cannot read config file {p}: Is a directory"),
    (lambda p: p.write_bytes(b"[x]\n\xff\xfe"), "config file {p} is not UTF-8 text"),
    (lambda p: p.write_text("[agent\n"), "config file {p} is not valid TOML"),
])
@pytest.mark.parametrize("command", ["agent", "gateway"])
def test_config_file_unusable(
    tmp_path: Path, command: str, make: Callable[[Path], object], message: str
) -> None:
    path = tmp_path / "flowtunnel.toml"
    make(path)
    done = _run([command, "--config", str(path)])
    _one_line_error(done, command, message.format(p=path))


@pytest.mark.parametrize(("flag", "message"), [
    ("--parquet", "parquet directory {f}: Not a directory"),
    ("--jsonl", "{f}: File exists"),
])
def test_gateway_sink_output_unusable(tmp_path: Path, flag: str, message: str) -> None:
    """A sink whose output cannot be made (a file where its directory should be) says so in one line, and the
    gateway keeps taking batches for it (the journal holds them until the path is fixed). Before: a
    traceback in the log."""
    blocker = tmp_path / "afile"
    blocker.write_text("")
    target = blocker if flag == "--parquet" else blocker / "flows.jsonl"
    with Daemon(_gateway(tmp_path / "data", "--no-store", flag, str(target)), workdir=tmp_path) as gw:
        text = gw.wait_for("failed, restarting")
        assert gw.proc.poll() is None
    assert "Traceback" not in text, text
    line = next(t for t in text.splitlines() if "failed, restarting" in t)
    assert message.format(f=blocker) in line, text
