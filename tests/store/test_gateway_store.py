"""Through the real processes: softflowd → agent → gateway (killed with -9 mid-stream, restarted) → store.

The store must end with exactly the exporter's records, each once, whatever instant the gateway died at.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from flowtunnel.gateway.registry import Registry
from flowtunnel.wire.keys import format_key
from tests.conftest import require
from tests.peers import TraceSummary, capture_softflowd, free_tcp_port, free_udp_port
from tests.store._support import exporter_multiset, normalise_ports, store_multiset


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "flowtunnel", *args], stdout=out, stderr=subprocess.STDOUT
        )


def _until(what: str, check: Callable[[], bool], limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {limit} s")
        time.sleep(0.01)


def _journal_figures(data: Path) -> tuple[int, int]:
    """(last journal seq, store cursor as copied into the journal); the journal is SQLite, readable by all."""
    path = data / "journal.sqlite"
    if not path.exists():
        return 0, 0
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            # meta next_seq: entries are trimmed once every sink has them, the numbering is not.
            row = db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
            last = int(row[0]) - 1 if row else 0
            row = db.execute("SELECT seq FROM cursors WHERE name = 'store'").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return 0, 0
    return int(last), int(row[0]) if row else 0


@pytest.mark.parametrize("version", [5, 10], ids=["v5", "ipfix"])
def test_gateway_killed_mid_stream_stores_each_record_exactly_once(
    version: int, tmp_path: Path, trace: TraceSummary
) -> None:
    require("softflowd", "tshark")
    export = capture_softflowd(trace.path, version)
    data, spool = tmp_path / "gateway", tmp_path / "agent"
    data.mkdir()
    with Registry(data) as registry:
        key = registry.enroll("site-a").key
    port, uport = free_tcp_port(), free_udp_port()
    gateway_args = ["gateway", "--listen", f"127.0.0.1:{port}", "--data", str(data)]
    gateway = _spawn(gateway_args, tmp_path / "gateway.log")
    agent = _spawn(
        ["agent", "--listen", f"udp://127.0.0.1:{uport}", "--gateway", f"http://127.0.0.1:{port}",
         "--spool", str(spool), "--agent-id", "site-a", "--key", format_key(key), "--latency", "100ms",
         "--backoff-base", "100ms", "--backoff-cap", "500ms", "--max-batch-datagrams", "4"],
        tmp_path / "agent.log",
    )
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        _until("agent up", lambda: (spool / "status.json").exists())
        half = len(export.payloads) // 2
        for payload in export.payloads[:half]:
            sender.sendto(payload, ("127.0.0.1", uport))
            time.sleep(0.002)
        # Kill the gateway while the store is part-way through what the journal holds.
        _until("store started on the journal", lambda: _journal_figures(data)[1] > 0)
        os.kill(gateway.pid, signal.SIGKILL)
        gateway.wait()
        last, cursor = _journal_figures(data)
        for payload in export.payloads[half:]:  # the agent spools these while the gateway is down
            sender.sendto(payload, ("127.0.0.1", uport))
            time.sleep(0.002)
        gateway = _spawn(gateway_args, tmp_path / "gateway.log")
        _until(
            "every datagram journaled and stored",
            lambda: _journal_figures(data) == (len(export.payloads), len(export.payloads)),
            limit=120,
        )
        status = json.loads((spool / "status.json").read_text())
    finally:
        sender.close()
        for proc in (agent, gateway):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    assert 0 < cursor <= last < len(export.payloads), (cursor, last)
    assert not any(status["drops"].values()), status["drops"]
    assert normalise_ports(store_multiset(data / "store" / "flows.duckdb")) == normalise_ports(
        exporter_multiset(export.datagrams, tmp_path)
    )
