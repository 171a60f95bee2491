"""softflowd (a real exporter) reads a synthetic trace and exports v5, v9, IPFIX and bidirectional IPFIX to a
loopback socket; every record it says it exported must decode, with no false sequence loss."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from flowtunnel.netflow import Decoder, Message, sniff
from tests.netflow._trace import write_trace

pytestmark = pytest.mark.skipif(shutil.which("softflowd") is None, reason="softflowd not installed")

FLOWS = 2000


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trace") / "trace.pcap"
    write_trace(path, flows=FLOWS)
    return path


def _run_to_end(cmd: list[str], ctl: Path, timeout: float = 60.0) -> str:
    """Run softflowd until it exits; returns its stdout.

    softflowd 1.1.0 with ``-r`` sometimes blocks in accept() on its control socket before reading the file
    (it depends on the socket path). An empty connection to that socket lets it go on: it reads no command
    and carries on with the capture. We connect until the process exits.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"softflowd did not finish within {timeout} s")
            time.sleep(0.02)
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as nudge:
                nudge.connect(str(ctl))
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    return out


def run_softflowd(trace: Path, args: list[str]) -> tuple[list[tuple[bytes, str]], int, int]:
    """Run softflowd on ``trace``; returns (datagrams with sender, records it exported, packets it sent)."""
    tmp = Path(tempfile.mkdtemp(prefix="sf", dir="/tmp"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    try:
        ctl = tmp / "c"
        cmd = [
            "softflowd",
            "-r",
            str(trace),
            "-n",
            f"127.0.0.1:{port}",
            "-d",
            "-c",
            str(ctl),
            "-p",
            str(tmp / "p"),
        ]
        out = _run_to_end([*cmd, *args], ctl)
        match = re.search(r"Flows exported: \d+ \((\d+) records\) in (\d+) packets \(0 failures\)", out)
        assert match, out[:500]
        sock.setblocking(False)
        got: list[tuple[bytes, str]] = []
        while True:
            try:
                data, addr = sock.recvfrom(65535)
            except BlockingIOError:
                break
            got.append((data, f"{addr[0]}:{addr[1]}"))
    finally:
        sock.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return got, int(match.group(1)), int(match.group(2))


@pytest.mark.parametrize(
    ("args", "version", "v6"),
    [
        (["-v", "5"], 5, False),
        (["-v", "9"], 9, True),
        (["-v", "10"], 10, True),
        (["-v", "10", "-b"], 10, True),
    ],
    ids=["v5", "v9", "ipfix", "ipfix-bidir"],
)
def test_softflowd_export_decodes_completely(trace: Path, args: list[str], version: int, v6: bool) -> None:
    datagrams, exported, packets = run_softflowd(trace, args)
    assert len(datagrams) == packets  # loopback with a big buffer: nothing lost in transit
    dec = Decoder()
    messages: list[Message] = []
    for data, sender in datagrams:
        assert sniff(data) == version
        messages.append(dec.decode(data, sender))
    records = [r for m in messages for r in m.records]
    assert all(not m.errors and not m.held for m in messages)
    assert len(records) == exported
    assert dec.counters["sequence_lost"] == 0
    assert dec.counters["sequence_resets"] == 0
    ((_, stats),) = dec.sequence_stats().items()
    assert stats.lost == 0
    # Every flow of the trace is there once, with its addresses and protocol.
    protocols = {r["protocolIdentifier"] for r in records}
    assert protocols == ({1, 6, 17, 58} if v6 else {1, 6, 17})
    v4_sources = {r["sourceIPv4Address"] for r in records if "sourceIPv4Address" in r}
    assert len(v4_sources) == FLOWS - FLOWS // 4
    if v6:
        v6_sources = {r["sourceIPv6Address"] for r in records if "sourceIPv6Address" in r}
        assert "2001:db8::3" in v6_sources
        assert len(v6_sources) == FLOWS // 4
    assert sum(r["packetDeltaCount"] for r in records) > FLOWS  # type: ignore[misc]
    # sysUpTime-relative times became absolute ones (v5/v9: header clock; IPFIX: the options record's
    # systemInitTimeMilliseconds). softflowd -r mixes capture and wall-clock time, so only order is checked.
    for rec in records:
        start, end = rec["flowStartMilliseconds"], rec["flowEndMilliseconds"]
        assert isinstance(start, int)
        assert isinstance(end, int)
        assert 0 <= end - start <= 10_000
