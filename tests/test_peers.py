"""The real-peer helpers themselves: a wrong helper would make every end-to-end test wrong in the same way."""

from __future__ import annotations

import base64
import socket
import threading
from collections import Counter
from pathlib import Path

import pytest

from tests.peers import (
    Nfcapd,
    Tinyproxy,
    TraceSummary,
    UdpCapture,
    capture_softflowd,
    make_trace,
    require,
    tshark_records,
    write_pcap,
)


def test_make_trace_is_deterministic_per_seed(tmp_path: Path) -> None:
    a = make_trace(tmp_path / "a.pcap", flows=50, seed=3)
    b = make_trace(tmp_path / "b.pcap", flows=50, seed=3)
    c = make_trace(tmp_path / "c.pcap", flows=50, seed=4)
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.path.read_bytes() != c.path.read_bytes()
    assert a.flows == 50
    assert a.packets >= 100
    assert a.ipv4_flows + a.ipv6_flows == 50


def test_softflowd_v5_records_match_tshark_and_the_trace(tmp_path: Path, trace: TraceSummary) -> None:
    require("softflowd", "tshark")
    export = capture_softflowd(trace.path, 5)
    write_pcap(export.datagrams, tmp_path / "v5.pcap", dst_port=2055)
    records = tshark_records(tmp_path / "v5.pcap", ports=(2055,))
    assert len(records) == export.stats.records
    # v5 carries IPv4 only; every conversation has packets both ways, so two one-way records each.
    assert export.stats.records == 2 * trace.ipv4_flows
    assert {r["proto"] for r in records} == {1, 6, 17}
    assert all(r["version"] == 5 and r["exporter"] == "127.0.0.1" for r in records)


def test_softflowd_bidirectional_ipfix_has_reverse_counters(tmp_path: Path, trace: TraceSummary) -> None:
    require("softflowd", "tshark")
    export = capture_softflowd(trace.path, 10, ("-b",))
    write_pcap(export.datagrams, tmp_path / "v10b.pcap", dst_port=4739)
    records = tshark_records(tmp_path / "v10b.pcap", ports=(4739,))
    assert len(records) == export.stats.records == trace.biflows
    assert all(r["reverse_packets"] for r in records if r["proto"] in (6, 17))
    assert sum(1 for r in records if r["src6"] is not None) == trace.biflows - trace.ipv4_biflows


def test_write_pcap_keeps_ipv6_exporters(tmp_path: Path, trace: TraceSummary) -> None:
    require("softflowd", "tshark")
    export = capture_softflowd(trace.path, 9)
    v6 = [(p, ("2001:db8::7", 9999)) for p in export.payloads]
    write_pcap(v6, tmp_path / "v6.pcap", dst_port=2055)
    write_pcap(export.payloads, tmp_path / "v4.pcap", dst_port=2055)
    over_v6 = tshark_records(tmp_path / "v6.pcap")
    over_v4 = tshark_records(tmp_path / "v4.pcap")
    assert {r["exporter"] for r in over_v6} == {"2001:db8::7"}
    assert {r["exporter"] for r in over_v4} == {"192.0.2.1"}

    def key(r: dict[str, object]) -> tuple[object, ...]:
        return (r["src"], r["dst"], r["sport"], r["dport"], r["proto"], r["octets"], r["packets"])

    assert Counter(map(key, over_v6)) == Counter(map(key, over_v4))
    assert len(over_v4) == export.stats.records


def test_nfcapd_stores_what_softflowd_exported(tmp_path: Path, trace: TraceSummary) -> None:
    require("softflowd", "nfcapd", "nfdump")
    export = capture_softflowd(trace.path, 9)
    with Nfcapd(tmp_path) as nf, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for payload in export.payloads:
            sock.sendto(payload, nf.addr)
        rows = nf.records()  # stops nfcapd, which flushes its file
    assert len(rows) == export.stats.records
    assert {r["exporter"] for r in rows} == {"127.0.0.1"}
    assert sum(r["packets"] for r in rows) == trace.packets
    (exporter,) = nf.exporters()
    assert exporter["version"] == 9
    assert exporter["flows"] == export.stats.records


def test_udp_capture_reports_a_shortfall(tmp_path: Path) -> None:
    with UdpCapture() as cap, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"one", cap.addr)
        assert cap.wait_for(1)[0][0] == b"one"
        with pytest.raises(TimeoutError, match="1 of 2 datagrams"):
            cap.wait_for(2, timeout=0.2)
        assert cap.drops() == 0


def _one_shot_server() -> tuple[socket.socket, threading.Thread]:
    """A TCP server on loopback that answers the first line it reads with ``pong``."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(100)
            conn.sendall(b"pong\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def _connect_via(
    proxy_port: int, target_port: int, auth: tuple[str, str] | None
) -> tuple[bytes, socket.socket]:
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    headers = f"CONNECT 127.0.0.1:{target_port} HTTP/1.1\r\nHost: 127.0.0.1:{target_port}\r\n"
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        headers += f"Proxy-Authorization: Basic {token}\r\n"
    sock.sendall((headers + "\r\n").encode())
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = sock.recv(4096)
        if not chunk:
            break
        reply += chunk
    return reply, sock


def test_tinyproxy_tunnels_connect_only_with_credentials(tmp_path: Path) -> None:
    require("tinyproxy")
    server, thread = _one_shot_server()
    target = server.getsockname()[1]
    with server, Tinyproxy(tmp_path, auth=("agent", "s3cret")) as proxy:
        assert proxy.proxy_url == f"http://agent:s3cret@127.0.0.1:{proxy.port}"
        denied, sock = _connect_via(proxy.port, target, None)
        sock.close()
        assert denied.split(b" ")[1] == b"407"
        allowed, sock = _connect_via(proxy.port, target, ("agent", "s3cret"))
        with sock:
            assert allowed.split(b" ")[1] == b"200"
            sock.sendall(b"ping\n")
            assert sock.recv(100) == b"pong\n"
        thread.join(5)
    assert f"CONNECT 127.0.0.1:{target}" in proxy.log_text()
