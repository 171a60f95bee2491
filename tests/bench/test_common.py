"""The shared bench helpers: markdown tables, section replacement in the benchmarks page, /proc readings, UDP
socket checks and the paced sender."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

import _common as common
from latency import delays, pct


def test_md_table_aligns_and_escapes() -> None:
    text = common.md_table(["a", "b"], [[1, "x|y"]], "lr")
    assert text.splitlines() == ["| a | b |", "|---|---:|", "| 1 | x\\|y |"]
    with pytest.raises(ValueError, match="3 letters for 2 columns"):
        common.md_table(["a", "b"], [], "lrr")
    with pytest.raises(ValueError, match="1 cells for 2 columns"):
        common.md_table(["a", "b"], [[1]])


def test_replace_section_keeps_other_sections_and_orders_new_ones(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n\n## Decoding\n\ndecode text\n\n## Store\n\nstore text\n")
    common.replace_section(doc, "Latency", "lat 1")
    common.replace_section(doc, "Wire efficiency", "wire 1")
    text = doc.read_text()
    assert text.index("## Wire efficiency") < text.index("## Latency") < text.index("## Decoding")
    common.replace_section(doc, "Latency", "lat 2\n\nmore")
    text = doc.read_text()
    assert "lat 1" not in text
    assert "lat 2\n\nmore\n" in text
    assert "decode text" in text
    assert "store text" in text
    assert text.count("## Latency") == 1
    assert text.startswith("# Benchmarks\n\nintro\n")


def test_replace_section_creates_the_page(tmp_path: Path) -> None:
    doc = tmp_path / "new" / "benchmarks.md"
    common.replace_section(doc, "Throughput", "body")
    text = doc.read_text()
    assert text.startswith("# Benchmarks")
    assert text.rstrip().endswith("## Throughput\n\nbody")


def test_proc_readings_of_this_process() -> None:
    start = common.cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    assert common.cpu_seconds(os.getpid()) >= start
    assert common.peak_rss_kib(os.getpid()) > 1000
    assert "CPUs" in common.machine()
    assert "Python" in common.machine()


def test_udp_helpers_see_a_bound_socket_and_its_queue() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        port = rx.getsockname()[1]
        assert common.udp_drops(port) == 0
        common.send_paced([b"a" * 10, b"b" * 20], ("127.0.0.1", port), 0)
        assert common.wait_udp_drained(port, timeout=0.1) is False  # two datagrams wait in the queue
        assert rx.recv(100) == b"a" * 10
        assert rx.recv(100) == b"b" * 20
        assert common.wait_udp_drained(port, timeout=5)


def test_paced_sender_stamps_every_datagram_and_latency_matching() -> None:
    payloads = [bytes([i]) * 30 for i in range(20)]
    with common.UdpCapture() as cap:
        stamps: list[float] = []
        common.send_paced(payloads, cap.addr, 1000, stamps=stamps)
        cap.wait_for(len(payloads), timeout=10)
        found, missing = delays([*payloads, b"never sent"], [*stamps, time.monotonic()], cap)
    assert len(stamps) == len(payloads)
    assert stamps == sorted(stamps)
    assert missing == 1
    assert len(found) == len(payloads)
    assert all(d >= 0 for d in found)
    assert pct([3.0, 1.0, 2.0], 50) == 2.0
    assert pct([1.0, 2.0, 3.0, 4.0], 100) == 4.0


def test_raw_udp_bytes_and_vendor_streams() -> None:
    streams = common.vendor_streams()
    by_version = {s.version: s for s in streams}
    assert by_version["IPFIX"].payloads
    assert by_version["v9"].payloads
    s = by_version["v9"]
    assert s.raw_bytes == sum(len(p) for p in s.payloads) + 28 * len(s.payloads)


def test_replace_section_keeps_the_hand_written_subsections(tmp_path: Path) -> None:
    """A bench's ``--write`` replaced its whole section, subsections too: the notes sessions wrote under
    ``### ...`` headings (what changed, measured how) went with it. It replaces the text under ``##`` only."""
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# B\n\n## Store\n\nold table\n\n### Earlier run\n\nnotes\n\n## Latency\n\nlat\n")
    common.replace_section(doc, "Store", "new table")
    assert doc.read_text() == (
        "# B\n\n## Store\n\nnew table\n\n### Earlier run\n\nnotes\n\n## Latency\n\nlat\n"
    )
