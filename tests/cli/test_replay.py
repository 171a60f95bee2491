"""``flowtunnel replay``: every NetFlow datagram of a capture reaches the receiver, in order, unchanged."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import dpkt
import pytest

from flowtunnel.cli import main
from flowtunnel.cli.replay import parse_target
from flowtunnel.netflow import encode_v5
from tests.peers import SoftflowdExport, UdpCapture, capture_softflowd, make_trace, require, write_pcap

RECORD: dict[str, object] = {
    "sourceIPv4Address": "192.0.2.10", "destinationIPv4Address": "198.51.100.20", "protocolIdentifier": 17,
    "octetDeltaCount": 100, "packetDeltaCount": 1,
}


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> SoftflowdExport:
    require("softflowd")
    trace = make_trace(tmp_path_factory.mktemp("trace") / "trace.pcap", flows=300, seed=9)
    return capture_softflowd(trace.path, 10)


def _v5(sequence: int) -> bytes:
    return encode_v5([RECORD], sys_uptime_ms=1000, unix_secs=1_700_000_000, sequence=sequence)


def _merge(path: Path, *parts: Path) -> None:
    frames: list[tuple[float, bytes]] = []
    for part in parts:
        with part.open("rb") as f:
            frames += [(float(ts), bytes(buf)) for ts, buf in dpkt.pcap.Reader(f)]
    frames.sort(key=lambda item: item[0])
    with path.open("wb") as f:
        writer = dpkt.pcap.Writer(f)
        for ts, buf in frames:
            writer.writepkt(buf, ts)


def test_every_datagram_arrives_in_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], export: SoftflowdExport
) -> None:
    pcap = tmp_path / "export.pcap"
    write_pcap(export.datagrams, pcap, dst_port=4739)
    with UdpCapture() as cap:
        code = main(["replay", str(pcap), "--to", cap.url, "--rate", "0"])
        got = cap.wait_for(len(export.datagrams))
        cap.wait_quiet(0.2)
        assert cap.drops() == 0
    assert code == 0
    assert [payload for payload, _ in got] == export.payloads
    assert len(cap.datagrams) == len(export.datagrams)
    err = capsys.readouterr().err
    assert f"sent {len(export.datagrams)} of {len(export.datagrams)} export datagrams (IPFIX: " in err
    assert cap.url in err


@pytest.mark.parametrize(
    "pacing", [["--rate", "2000"], ["--speed", "50"], []], ids=["rate", "speed", "default"]
)
def test_paced_replay_over_ipv6(tmp_path: Path, pacing: list[str]) -> None:
    pcap = tmp_path / "v5.pcap"
    sent = [_v5(i) for i in range(40)]
    write_pcap(sent, pcap, dst_port=2055, interval=0.01)
    with UdpCapture("::1") as cap:
        assert main(["replay", str(pcap), "--to", cap.url, *pacing]) == 0
        got = cap.wait_for(len(sent))
    assert [payload for payload, _ in got] == sent
    assert {addr[0] for _, addr in got} == {"::1"}


def test_port_and_exporter_filters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_pcap([_v5(1), _v5(2)], tmp_path / "a.pcap", dst_port=2055, src=("192.0.2.1", 1000))
    write_pcap(
        [_v5(3)], tmp_path / "b.pcap", dst_port=9995, src=("192.0.2.2", 1000), start=1_700_000_000.0005
    )
    write_pcap([b"not netflow at all"], tmp_path / "c.pcap", dst_port=2055, start=1_700_000_000.0007)
    pcap = tmp_path / "mixed.pcap"
    _merge(pcap, tmp_path / "a.pcap", tmp_path / "b.pcap", tmp_path / "c.pcap")
    with UdpCapture() as cap:
        assert main(["replay", str(pcap), "--to", cap.url, "--rate", "0", "--port", "2055"]) == 0
        assert cap.wait_for(2)
        assert main(["replay", str(pcap), "--to", cap.url, "--rate", "0", "--exporter", "192.0.2.2"]) == 0
        cap.wait_for(3)
        cap.wait_quiet(0.2)
    assert cap.payloads == [_v5(1), _v5(2), _v5(3)]
    err = capsys.readouterr().err.splitlines()
    assert "skipped 2 other UDP datagrams" in err[0]  # the junk one, and the one to port 9995
    assert "skipped 1 other UDP datagrams, 2 from other exporters" in err[1]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("127.0.0.1:2055", "is not udp://HOST:PORT"),
        ("tcp://127.0.0.1:2055", "is not udp://HOST:PORT"),
        ("udp://127.0.0.1", "has no port"),
        ("udp://::1:2055", "without brackets"),
        ("udp://127.0.0.1:99999", "not in 1..65535"),
    ],
)
def test_bad_targets_are_refused_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str, message: str
) -> None:
    pcap = tmp_path / "v5.pcap"
    write_pcap([_v5(1)], pcap, dst_port=2055)
    assert main(["replay", str(pcap), "--to", target]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert message in err
    with pytest.raises(ValueError, match="udp://"):
        parse_target("http://x:1")


def test_missing_capture_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(tmp_path / "nope.pcap"), "--to", "udp://127.0.0.1:9"]) == 2
    assert capsys.readouterr().err == f"flowtunnel replay: error: {tmp_path / 'nope.pcap'}: no such file\n"


def test_sigterm_stops_sending_and_reports(tmp_path: Path) -> None:
    pcap = tmp_path / "v5.pcap"
    write_pcap([_v5(i) for i in range(200)], pcap, dst_port=2055)
    with UdpCapture() as cap:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flowtunnel", "replay", str(pcap), "--to", cap.url, "--rate", "20"],
            stderr=subprocess.PIPE, text=True,
        )
        cap.wait_for(1, timeout=60)  # it is sending: now interrupt it
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 128 + signal.SIGTERM
        assert "interrupted" in err
        sent = int(err.split("sent ")[1].split(" ")[0])
        assert 1 <= sent < 200
        cap.wait_for(sent, timeout=10)
        assert len(cap.wait_quiet(0.3)) == sent
