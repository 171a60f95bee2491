"""``flowtunnel demo`` end to end, as the README runs it: exit status 0 and a summary whose counts match."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import duckdb


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flowtunnel", "demo", "--rate", "1000", *args],
        capture_output=True, text=True, timeout=240, check=False,
        env={**os.environ, "COLUMNS": "120"},
    )


def test_demo_runs_end_to_end_and_reports_matching_counts(tmp_path: Path) -> None:
    out = _demo("--keep", str(tmp_path / "work"))
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(r"│\s+(\d+)\s+│\s+(\d+)\s+│\s+(\d+)\s+│", out.stdout)
    assert m is not None, out.stdout
    sent, stored, forwarded = (int(g) for g in m.groups())
    assert sent == stored == forwarded > 1000
    assert "OK: every record sent was stored and forwarded, exactly once" in out.stdout
    assert "top talkers" in out.stdout
    assert "HTTP / raw UDP" in out.stdout
    assert re.search(r"in transit 0", out.stdout)
    # What the demo stored is there afterwards, with the gateway stopped.
    conn = duckdb.connect(str(tmp_path / "work" / "gateway" / "store" / "flows.duckdb"), read_only=True)
    assert conn.execute("SELECT count(*) FROM flows").fetchone() == (sent,)
    assert conn.execute("SELECT count(DISTINCT version) FROM flows").fetchone() == (3,)
    conn.close()


def test_demo_cleans_up_its_temporary_directory(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "flowtunnel", "demo", "--rate", "2000"], capture_output=True, text=True,
        timeout=240, check=False, env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_exit_2() -> None:
    out = _demo("--capture", "/nonexistent.pcap")
    assert out.returncode == 2
    assert "--capture /nonexistent.pcap: no such file" in out.stderr
