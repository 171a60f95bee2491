"""``top --since`` says which clock it goes by, offers both, and hints when the other clock has the flows.

The exporter here runs a year slow (as a box without RTC does until NTP syncs): its flows "ended" a year ago
by its clock, though flowtunnel received them just now.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowtunnel.datagram import Datagram
from flowtunnel.netflow import FieldSpec, Template, encode_v9
from flowtunnel.store import StoreSink
from tests.store._support import fill_journal, run_sink_until

TEMPLATE = Template(
    256,
    (FieldSpec(8, 4), FieldSpec(12, 4), FieldSpec(4, 1), FieldSpec(1, 8), FieldSpec(2, 8), FieldSpec(152, 8),
     FieldSpec(153, 8)),
)
YEAR_MS = 365 * 86400 * 1000


def _datagrams(count: int, skew_ms: int) -> list[Datagram]:
    now_ms = int(time.time() * 1000) + skew_ms
    return [
        Datagram(
            received_ns=time.time_ns(), exporter="127.0.0.1", exporter_port=40000, local_port=2055,
            payload=encode_v9(
                templates=[TEMPLATE],
                data=[(TEMPLATE, [{
                    "sourceIPv4Address": f"10.7.0.{i + 1}", "destinationIPv4Address": "192.0.2.1",
                    "protocolIdentifier": 17, "octetDeltaCount": 100 * (i + 1), "packetDeltaCount": 1,
                    "flowStartMilliseconds": now_ms - 5000, "flowEndMilliseconds": now_ms - 4000,
                }])],
                sys_uptime_ms=1000 + i, unix_secs=now_ms // 1000, sequence=i, source_id=1,
            ),
        )
        for i in range(count)
    ]


@pytest.fixture
async def slow_exporter_store(tmp_path: Path) -> Path:
    journal = fill_journal(tmp_path / "journal.sqlite", _datagrams(3, -YEAR_MS))
    await run_sink_until(StoreSink(data_dir=tmp_path / "data", query_socket=False), journal)
    journal.close()
    return tmp_path / "data"


def _top(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flowtunnel", "top", *args], capture_output=True, text=True, timeout=120,
        check=False,
    )


def test_help_says_which_time_since_uses() -> None:
    out = _top("--help")
    assert out.returncode == 0
    assert "--time {flow,received}" in out.stdout
    assert "exporter's clock" in out.stdout


def test_an_empty_top_hints_at_the_other_clock(slow_exporter_store: Path) -> None:
    data = str(slow_exporter_store)
    out = _top("--data", data, "--since", "1h", "--format", "json")
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    assert "no flows ended in the last 1h by the exporters' clocks (--time flow)" in out.stderr
    assert "but 3 flows were received in that window" in out.stderr
    assert "--time received" in out.stderr

    out = _top("--data", data, "--since", "1h", "--time", "received", "--format", "json")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    ranked = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["src_addr"], r["bytes"]) for r in ranked] == [("10.7.0.3", 300), ("10.7.0.2", 200),
                                                             ("10.7.0.1", 100)]

    # A window that holds the flows by the exporter's clock but not by the receive time: the other hint.
    out = _top("--data", data, "--since", "400d", "--time", "flow", "--format", "json")
    assert len(out.stdout.splitlines()) == 3
    assert out.stderr == ""
    table = _top("--data", data, "--since", "1h", "--time", "received")
    assert "by receive time" in table.stdout


async def test_no_hint_when_neither_clock_has_flows(tmp_path: Path) -> None:
    journal = fill_journal(tmp_path / "journal.sqlite", [])
    await run_sink_until(StoreSink(data_dir=tmp_path / "data", query_socket=False), journal)
    journal.close()
    out = await asyncio.to_thread(_top, "--data", str(tmp_path / "data"), "--since", "1h", "--format", "json")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


@pytest.mark.parametrize(("args", "message"), [
    (("top", "--since", "99999999d"), "--since 99999999d is outside the allowed range 1s .. 36500d"),
    (("top", "--since", "0s"), "--since 0s is outside the allowed range 1s .. 36500d"),
    (("top", "--since", "nan"), "--since 'nan' is not a duration"),
    (("top", "--timeout", "nan"), "argument --timeout: 'nan' is not a duration"),
    (("top", "--timeout", "-1"), "argument --timeout: '-1' is not a duration"),
    (("query", "--timeout", "99999999d", "SELECT 1"),
     "argument --timeout: 99999999d is outside the allowed range 100ms .. 1d"),
    (("export", "--since", "99999999d", "--parquet", "out.parquet"),
     "--since 99999999d is outside the allowed range 1s .. 36500d"),
])
def test_out_of_range_windows_and_timeouts_are_refused_with_the_range(
    slow_exporter_store: Path, args: tuple[str, ...], message: str
) -> None:
    """Issue 15 item 7 for the store's commands: ``top --since 99999999d`` was a traceback (OverflowError),
    ``--timeout`` took any float."""
    out = subprocess.run(
        [sys.executable, "-m", "flowtunnel", *args, "--data", str(slow_exporter_store)], capture_output=True,
        text=True, timeout=120, check=False, cwd=slow_exporter_store,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"flowtunnel {args[0]}: error: {message}"), out.stderr


def test_export_offers_both_clocks_and_hints_when_empty(slow_exporter_store: Path, tmp_path: Path) -> None:
    """``export --since`` went by the exporter's clock only: a slow exporter's fresh flows could not be
    exported by window at all. ``--time received`` takes them, and an empty export says why."""
    data = str(slow_exporter_store)
    run = [sys.executable, "-m", "flowtunnel", "export", "--data", data, "--since", "1h"]
    out = subprocess.run([*run, "--parquet", str(tmp_path / "flow")], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "exported 0 flows" in out.stdout
    assert ("no flows ended in the last 1h by the exporters' clocks (--time flow), but 3 flows were "
            "received in that window") in out.stderr
    out = subprocess.run([*run, "--time", "received", "--parquet", str(tmp_path / "received")],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "exported 3 flows" in out.stdout
    assert out.stderr == ""
    assert len(list((tmp_path / "received").rglob("*.parquet"))) >= 1
