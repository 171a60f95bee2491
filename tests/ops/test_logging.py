"""``--log-format text|json`` for long-running commands; no timestamp when stderr is the journal."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest

from flowtunnel.runtime import JsonFormatter, stderr_is_journal
from tests.ops.util import Daemon, run_cli
from tests.peers import free_tcp_port

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


def _gateway(tmp_path: Path, *flags: str, env: dict[str, str] | None = None) -> str:
    """Start a gateway with ``flags``, wait until it listens, stop it; its stderr."""
    args = ["gateway", "--listen", f"127.0.0.1:{free_tcp_port()}", "--data", str(tmp_path / "gw"),
            "--no-store", *flags]
    with Daemon(args, workdir=tmp_path, env=env) as gw:
        gw.wait_for("listening on")
        assert gw.stop() == 0
        return gw.text()


def test_json_lines_for_log_shippers(tmp_path: Path) -> None:
    text = _gateway(tmp_path, "--log-format", "json")
    lines = text.strip().splitlines()
    assert lines
    docs = [json.loads(line) for line in lines]  # every line is one JSON object
    listening = [d for d in docs if d["message"].startswith("listening on")]
    assert listening
    assert listening[0]["level"] == "INFO"
    assert listening[0]["logger"] == "flowtunnel.gateway"
    assert TIMESTAMP.match(listening[0]["time"])


def test_log_format_before_the_command_and_from_the_environment(tmp_path: Path) -> None:
    for env, flags in (({}, ("--log-format", "json")), ({"FLOWTUNNEL_LOG_FORMAT": "json"}, ())):
        port = free_tcp_port()
        args = [*flags, "gateway", "--listen", f"127.0.0.1:{port}", "--data", str(tmp_path / "gw"),
                "--no-store"]
        with Daemon(args, workdir=tmp_path, env=env) as gw:
            gw.wait_for("listening on")
            gw.stop()
            assert all(json.loads(line) for line in gw.text().strip().splitlines())


def test_text_lines_have_a_timestamp_off_the_journal(tmp_path: Path) -> None:
    text = _gateway(tmp_path)
    line = next(line for line in text.splitlines() if "listening on" in line)
    assert TIMESTAMP.match(line)
    assert " INFO flowtunnel.gateway: listening on" in line


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_no_timestamp_when_stderr_is_the_journal(tmp_path: Path, fmt: str) -> None:
    """systemd sets JOURNAL_STREAM=DEV:INODE of the stream it connects stderr to; the daemon's stderr file
    here stands in for it, so the check that the variable names stderr (not an inherited one) passes."""
    log = tmp_path / "daemon.stderr"
    log.touch()
    st = os.stat(log)
    port = free_tcp_port()
    args = ["gateway", "--listen", f"127.0.0.1:{port}", "--data", str(tmp_path / "gw"), "--no-store",
            "--log-format", fmt]
    # Daemon reopens the same file (truncating), so the inode JOURNAL_STREAM names is stderr's.
    with Daemon(args, workdir=tmp_path, env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}) as gw:
        gw.wait_for("listening on")
        gw.stop()
        text = gw.text()
    assert not TIMESTAMP.search(text), text
    line = next(line for line in text.splitlines() if "listening on" in line)
    if fmt == "json":
        doc = json.loads(line)
        assert "time" not in doc
        assert doc["level"] == "INFO"
    else:
        assert line.startswith("<6>INFO flowtunnel.gateway: listening on")


def test_an_inherited_journal_stream_is_ignored(tmp_path: Path) -> None:
    """A JOURNAL_STREAM naming another file (stderr redirected by a wrapper) keeps the timestamps."""
    assert not stderr_is_journal({"JOURNAL_STREAM": "1:2"})
    text = _gateway(tmp_path, env={"JOURNAL_STREAM": "1:2"})
    assert TIMESTAMP.search(text)


def test_json_formatter_keeps_exceptions_on_one_line() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", ("here",), exc_info=None)
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["message"] == "failed here"
    assert "RuntimeError: boom" in doc["exception"]


def test_bad_log_format_is_one_line(tmp_path: Path) -> None:
    done = run_cli(["gateway", "--data", str(tmp_path), "--no-store"], env={"FLOWTUNNEL_LOG_FORMAT": "xml"})
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "flowtunnel gateway: error: log format 'xml' (FLOWTUNNEL_LOG_FORMAT) is not one of text, json"
    )


def test_the_agent_logs_json_too(tmp_path: Path) -> None:
    done = run_cli(["enroll", "site-a", "--data", str(tmp_path / "gw"), "--key-file", str(tmp_path / "k")])
    assert done.returncode == 0, done.stderr
    args = ["agent", "--gateway", f"http://127.0.0.1:{free_tcp_port()}", "--spool", str(tmp_path / "spool"),
            "--agent-id", "site-a", "--key-file", str(tmp_path / "k"), "--listen", "udp://127.0.0.1:0",
            "--log-format", "json"]
    with Daemon(args, workdir=tmp_path, name="agent") as agent:
        agent.wait_for("running")
        assert agent.stop() == 0
        lines = agent.text().strip().splitlines()
    docs = [json.loads(line) for line in lines]
    assert any(d["logger"] == "flowtunnel.agent.service" and "running" in d["message"] for d in docs)
