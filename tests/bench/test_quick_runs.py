"""Each benchmark runs end to end in a small ``--quick`` form against the real agent, gateway and peers, and
writes its section with the figures a reader needs. Only correctness is checked (zero loss, rows present,
the doc rewritten), never a timing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import require

BENCH = Path(__file__).resolve().parents[2] / "bench"
pytestmark = pytest.mark.slow


def _run(script: str, doc: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--write", "--doc", str(doc), *args],
        capture_output=True, text=True, timeout=240, check=False, cwd=BENCH.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return doc.read_text()


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def test_wire_quick(tmp_path: Path) -> None:
    require("softflowd")
    doc = tmp_path / "b.md"
    text = _run("wire.py", doc, "--streams", "softflowd v9", "--modes", "1s,drain")
    text = _section(text, "Wire efficiency")
    rows = [line for line in text.splitlines() if line.startswith("| softflowd v9 |")]
    assert [r.split(" | ")[1] for r in rows[:2]] == ["1 s", "drain"]
    for row in rows[:2]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[-1] == "none"  # zero loss
        ratio = float(cells[7].strip("*"))
        assert 0 < ratio < float(cells[9])  # below firepass-style, whatever the machine
    assert "Machine:" in text
    assert "What would reach the goals" in text


def test_wire_quick_with_a_quiet_mode_alone(tmp_path: Path) -> None:
    """Regression: with only a quiet mode (2/s) and a Cisco stream no mode ran on, the offline table had no
    batch sizes to compare and the bench crashed (IndexError); now it writes the rows it has, with the bytes
    per request."""
    require("softflowd")
    doc = tmp_path / "b.md"
    text = _section(_run("wire.py", doc, "--streams", "softflowd v9,cisco ipfix", "--modes", "2/s"),
                    "Wire efficiency")
    rows = [line for line in text.splitlines() if line.startswith("| softflowd v9 | 2/s |")]
    assert len(rows) == 2  # the run and its bytes per request
    assert rows[0].rstrip(" |").endswith("none")  # zero loss
    assert "--modes '2/s'" in text


def test_throughput_quick(tmp_path: Path) -> None:
    require("softflowd", "nfcapd", "nfdump")
    doc = tmp_path / "b.md"
    text = _section(_run("throughput.py", doc, "--paths", "journal,nfcapd"), "Throughput")
    assert "| flowtunnel: agent → gateway journal (store off) |" in text
    assert "| nfcapd (nfdump), UDP straight |" in text
    assert "250: ok" in text  # the slowest step passes with zero loss on any machine


def test_footprint_quick(tmp_path: Path) -> None:
    require("softflowd", "nfcapd")
    doc = tmp_path / "b.md"
    text = _section(_run("footprint.py", doc), "Agent footprint")
    rows = [line for line in text.splitlines() if line.startswith(("| 1,000 |", "| 100 |"))]
    assert len(rows) == 2
    assert all(row.rstrip(" |").endswith("none") for row in rows)
    assert "Start-up: the `flowtunnel agent` process" in text


def test_latency_quick(tmp_path: Path) -> None:
    require("softflowd")
    doc = tmp_path / "b.md"
    text = _section(_run("latency.py", doc), "Latency")
    rows = [line for line in text.splitlines() if line.startswith("| flowtunnel")]
    assert len(rows) == 2
    for row in rows:
        assert row.rstrip(" |").endswith("| 0")  # nothing missing


def test_store_quick(tmp_path: Path) -> None:
    require("softflowd", "nfcapd", "nfdump")
    doc = tmp_path / "b.md"
    text = _section(_run("store.py", doc), "Store")
    rows = [line for line in text.splitlines() if line.startswith(("| 5,000 |", "| 10,000 |"))]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == cells[3]  # every record sent was stored
        assert cells[-2] == "none"
        assert cells[-1] == "ok"
    assert "Sustained end to end with zero loss" in text
    assert "nfcapd took 20,000 of 20,000 records" in text


def test_run_rejects_unknown_bench() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--only", "nope"], capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "unknown bench nope" in proc.stderr
