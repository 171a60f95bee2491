"""kill -9 of the process running the store sink, mid-stream, repeatedly: each record is still stored once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from flowtunnel.log import DurableLog
from tests.conftest import require
from tests.peers import TraceSummary, capture_softflowd
from tests.store._support import (
    exporter_multiset,
    fill_journal,
    normalise_ports,
    store_multiset,
    to_datagrams,
)

# A sink in its own process, committing small batches (six journal entries each) so kills land mid-stream.
_RUNNER = """
import asyncio, sys
from pathlib import Path
from flowtunnel.gateway.notify import JournalNotify
from flowtunnel.log import DurableLog, LogConfig
from flowtunnel.store import StoreSink

async def main() -> None:
    journal = DurableLog(LogConfig(path=Path(sys.argv[1]), quota_bytes=0))
    sink = StoreSink(data_dir=Path(sys.argv[2]), batch_records=100, read_limit=6, batch_interval=0.0,
                     query_socket=False)
    await sink.run(journal, JournalNotify(journal.last_seq()))

asyncio.run(main())
"""


def _start(journal: Path, data: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _RUNNER, str(journal), str(data)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _wait_cursor(
    journal: DurableLog, proc: subprocess.Popen[bytes], at_least: int, limit: float = 60.0
) -> int:
    deadline = time.monotonic() + limit
    while True:
        cursor = journal.cursor("store")
        if cursor >= at_least:
            return cursor
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise AssertionError(f"sink process exited with {proc.returncode}: {err}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"store cursor at {cursor}, wanted {at_least} within {limit} s")
        time.sleep(0.002)


@pytest.mark.parametrize("version", [9, 10], ids=["v9", "ipfix"])
def test_kill_9_mid_stream_then_restart_stores_each_record_once(
    version: int, tmp_path: Path, trace: TraceSummary
) -> None:
    require("softflowd", "tshark")
    export = capture_softflowd(trace.path, version)
    path = tmp_path / "journal.sqlite"
    journal = fill_journal(path, to_datagrams(export.datagrams))
    last = journal.last_seq()
    data = tmp_path / "data"
    kills = []
    for third in (1, 2):
        proc = _start(path, data)
        try:
            kills.append(_wait_cursor(journal, proc, last * third // 3))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            if proc.stderr:
                proc.stderr.close()
    proc = _start(path, data)
    try:
        _wait_cursor(journal, proc, last)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    journal.close()
    assert all(0 < k < last for k in kills), kills

    database = data / "store" / "flows.duckdb"
    assert normalise_ports(store_multiset(database)) == normalise_ports(
        exporter_multiset(export.datagrams, tmp_path)
    )
    conn = duckdb.connect(str(database), read_only=True)
    (stored_cursor,) = conn.execute("SELECT value FROM store_meta WHERE key = 'cursor'").fetchone()  # type: ignore[misc]
    (records,) = conn.execute("SELECT records FROM exporter_stats").fetchone()  # type: ignore[misc]
    conn.close()
    assert stored_cursor == last
    assert records == export.stats.records  # counters are committed with the rows, so they too count once
