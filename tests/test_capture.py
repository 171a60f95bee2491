"""``flowtunnel.capture``: whole UDP datagrams out of every common link type, the rest counted by reason."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import dpkt
import pytest

from flowtunnel.capture import CaptureError, CaptureReader, CaptureStats, UdpDatagram, find_netflow, read_udp
from flowtunnel.netflow import encode_v5
from tests.corpus import VENDOR
from tests.peers import capture_softflowd, make_trace, require, write_pcap

V5 = encode_v5(
    [{"sourceIPv4Address": "192.0.2.10", "destinationIPv4Address": "198.51.100.1", "packetDeltaCount": 1}],
    sys_uptime_ms=1000, unix_secs=1_700_000_000,
)
SRC4, DST4 = socket.inet_aton("192.0.2.1"), socket.inet_aton("127.0.0.1")
SRC6, DST6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1"), socket.inet_pton(socket.AF_INET6, "::1")


def udp(payload: bytes, sport: int = 4000, dport: int = 2055) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def ipv4(l4: bytes, *, proto: int = 17, frag: int = 0) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, frag, 64, proto, 0, SRC4, DST4) + l4


def ipv6(l4: bytes, *, nxt: int = 17, ext: bytes = b"") -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(ext) + len(l4), nxt, 64, SRC6, DST6) + ext + l4


def ether(ip: bytes, *, vlan: bool = False) -> bytes:
    ethertype = b"\x86\xdd" if ip[0] >> 4 == 6 else b"\x08\x00"
    tag = b"\x81\x00\x00\x2a" if vlan else b""
    return b"\x04" * 6 + b"\x02" * 6 + tag + ethertype + ip


def write(
    path: Path, frames: list[bytes], linktype: int = dpkt.pcap.DLT_EN10MB, snaplen: int = 65535
) -> Path:
    with path.open("wb") as f:
        writer = dpkt.pcap.Writer(f, linktype=linktype, snaplen=snaplen)
        for i, frame in enumerate(frames):
            writer.writepkt(frame[:snaplen], 1_700_000_000 + i)
    return path


def read(path: Path) -> tuple[list[UdpDatagram], CaptureReader]:
    reader = read_udp(path)
    return list(reader), reader


@pytest.mark.parametrize(
    ("linktype", "frame"),
    [
        (dpkt.pcap.DLT_EN10MB, ether(ipv4(udp(V5)))),
        (dpkt.pcap.DLT_EN10MB, ether(ipv4(udp(V5)), vlan=True)),
        (113, b"\x00\x00\x03\x04\x00\x06" + b"\x02" * 6 + b"\x00\x00" + b"\x08\x00" + ipv4(udp(V5))),  # SLL
        (276, b"\x08\x00\x00\x00" + b"\x00\x00\x00\x01" + b"\x03\x04\x00\x06" + b"\x02" * 8 + ipv4(udp(V5))),
        (101, ipv4(udp(V5))),  # raw IP
        (228, ipv4(udp(V5))),  # raw IPv4
        (0, struct.pack("<I", 2) + ipv4(udp(V5))),  # BSD null, little-endian host
        (108, struct.pack("!I", 2) + ipv4(udp(V5))),  # OpenBSD loop, network order
    ],
    ids=["ethernet", "vlan", "sll", "sll2", "raw", "ipv4", "null", "loop"],
)
def test_link_types(tmp_path: Path, linktype: int, frame: bytes) -> None:
    (dgram,), reader = read(write(tmp_path / "c.pcap", [frame], linktype))
    assert dgram == UdpDatagram(
        time=1_700_000_000.0, src="192.0.2.1", sport=4000, dst="127.0.0.1", dport=2055, payload=V5
    )
    assert dgram.exporter == "192.0.2.1:4000"
    assert reader.stats.udp == 1


def test_ipv6_with_extension_header(tmp_path: Path) -> None:
    hop_by_hop = bytes([17, 0]) + b"\x01\x04\x00\x00\x00\x00"  # next header UDP, 8 bytes, PadN
    frames = [ether(ipv6(udp(V5, 5000, 4739), nxt=0, ext=hop_by_hop)), ether(ipv6(udp(V5, 5001, 4739)))]
    dgrams, _ = read(write(tmp_path / "v6.pcap", frames))
    assert [(d.src, d.sport, d.dst, d.payload) for d in dgrams] == [
        ("2001:db8::1", 5000, "::1", V5), ("2001:db8::1", 5001, "::1", V5)
    ]
    assert dgrams[0].exporter == "[2001:db8::1]:5000"


def test_fragments_truncations_and_other_traffic_are_counted(tmp_path: Path) -> None:
    frag6 = bytes([17, 0, 0, 1, 0, 0, 0, 7])  # fragment header: offset 0, more fragments
    frames = [
        ether(ipv4(udp(V5), frag=0x2000)),  # first fragment (MF set)
        ether(ipv4(udp(V5)[:16], frag=185)),  # a later fragment
        ether(ipv6(udp(V5), nxt=44, ext=frag6)),
        ether(ipv4(udp(V5)))[:60],  # cut by the snap length
        ether(ipv4(b"\x00" * 20, proto=6)),  # TCP
        b"\xff" * 6 + b"\x02" * 6 + b"\x08\x06" + b"\x00" * 28,  # ARP
        ether(ipv4(udp(V5))),
    ]
    dgrams, reader = read(write(tmp_path / "mixed.pcap", frames))
    assert [d.payload for d in dgrams] == [V5]
    stats = reader.stats
    assert (stats.packets, stats.udp, stats.fragments, stats.truncated, stats.not_udp, stats.not_ip) == (
        7, 1, 3, 1, 1, 1
    )
    assert not stats.truncated_file


def test_file_cut_short_keeps_what_came_before(tmp_path: Path) -> None:
    path = write(tmp_path / "cut.pcap", [ether(ipv4(udp(V5)))] * 3)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    dgrams, reader = read(path)
    assert len(dgrams) == 2
    assert reader.stats.truncated_file


def test_pcapng(tmp_path: Path) -> None:
    path = tmp_path / "c.pcapng"
    with path.open("wb") as f:
        writer = dpkt.pcapng.Writer(f, linktype=dpkt.pcap.DLT_EN10MB)
        writer.writepkt(ether(ipv4(udp(V5))), 1_700_000_000.5)
    (dgram,), reader = read(path)
    assert reader.format == "pcapng"
    assert dgram.payload == V5
    assert dgram.time == pytest.approx(1_700_000_000.5)


def test_find_netflow_sniffs_and_filters_ports(tmp_path: Path) -> None:
    frames = [ether(ipv4(udp(V5, dport=2055))), ether(ipv4(udp(b"\x00\x05junk", dport=2055))),
              ether(ipv4(udp(V5, dport=9995)))]
    path = write(tmp_path / "c.pcap", frames)
    assert [(n.version, n.datagram.dport) for n in find_netflow(read_udp(path))] == [(5, 2055), (5, 9995)]
    assert [n.datagram.dport for n in find_netflow(read_udp(path), ports=[9995])] == [9995]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"", "not a pcap or pcapng capture (starts with an empty file"),
        (b"GIF89a\x00\x00", "not a pcap or pcapng capture (starts with 47494638"),
        (b"\xd4\xc3\xb2\xa1\x02\x00", "unreadable"),
    ],
    ids=["missing", "empty", "gif", "short-header"],
)
def test_bad_files_raise_capture_error(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "bad.pcap"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CaptureError, match=r"bad\.pcap") as info:
        CaptureReader(path)
    assert message in str(info.value)


# --- the memory-mapped fast path against the general per-frame path ------------------------------------

VENDOR_CAPTURES = sorted(VENDOR.glob("*.pcap"))


def both_paths(path: Path) -> tuple[list[UdpDatagram], CaptureStats]:
    """Datagrams and stats of ``path`` by the fast path, after asserting the general path gives the same."""
    with CaptureReader(path) as fast:
        fast_dgrams = list(fast)
    with CaptureReader(path, fast_path=False) as general:
        general_dgrams = list(general)
    assert fast_dgrams == general_dgrams
    assert fast.stats == general.stats
    return fast_dgrams, fast.stats


@pytest.mark.parametrize("pcap", VENDOR_CAPTURES, ids=[p.name for p in VENDOR_CAPTURES])
def test_fast_path_equals_general_path_on_vendor_corpus(pcap: Path) -> None:
    dgrams, stats = both_paths(pcap)
    assert dgrams
    assert stats.udp == len(dgrams)


def test_fast_path_equals_general_path_on_softflowd_export(tmp_path: Path) -> None:
    require("softflowd")
    trace = make_trace(tmp_path / "trace.pcap", flows=300, seed=11)
    # The trace itself: TCP, UDP and ICMP over IPv4 and IPv6, most frames not for the inline branch.
    dgrams, stats = both_paths(trace.path)
    assert stats.packets == trace.packets
    assert stats.not_udp > 0
    assert any(":" in d.src for d in dgrams)
    export = capture_softflowd(trace.path, 10)
    pcap = tmp_path / "export.pcap"
    write_pcap(export.datagrams, pcap, dst_port=4739)
    dgrams, stats = both_paths(pcap)
    assert [d.payload for d in dgrams] == export.payloads
    assert stats.udp == stats.packets == export.stats.datagrams


def ipv4_raw(l4: bytes, *, total: int | None = None, ihl: int = 5, proto: int = 17) -> bytes:
    options = b"\x01" * (ihl * 4 - 20)  # NOPs
    length = 20 + len(options) + len(l4) if total is None else total
    head = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, length, 1, 0, 64, proto, 0, SRC4, DST4)
    return head + options + l4


@pytest.mark.parametrize(
    ("frame", "payload", "reason"),
    [
        (ether(ipv4(udp(V5))) + b"\x00" * 6, V5, "udp"),  # Ethernet padding after the IP packet
        (ether(ipv4_raw(udp(V5), total=0)), V5, "udp"),  # TSO capture: IP total length 0
        (ether(ipv4_raw(udp(V5), ihl=6)), V5, "udp"),  # IP options: the general path's case
        (ether(ipv4_raw(udp(V5), total=30)), None, "truncated"),  # UDP longer than the IP packet says
        (ether(ipv4(udp(V5)))[:100], None, "truncated"),  # cut by the snap length
        (ether(ipv4(udp(b"")))[:41], None, "truncated"),  # not even a whole UDP header
        (ether(ipv4(struct.pack("!HHHH", 1, 2, 4, 0)))[:42], None, "truncated"),  # UDP length below 8
        (ether(ipv4(udp(b"")), vlan=True), b"", "udp"),  # empty datagram behind a VLAN tag
        (ether(ipv4(udp(V5), frag=0x2000)), None, "fragments"),
        (ether(ipv4_raw(b"\x00" * 20, proto=6)), None, "not_udp"),
        (ether(ipv6(udp(V5))), V5, "udp"),
    ],
    ids=["padding", "tso", "options", "udp-too-long", "snap", "short-udp", "ulen-7", "vlan-empty", "fragment",
         "tcp", "ipv6"],
)
def test_fast_path_edge_frames(tmp_path: Path, frame: bytes, payload: bytes | None, reason: str) -> None:
    path = write(tmp_path / "edge.pcap", [ether(ipv4(udp(V5))), frame, ether(ipv4(udp(V5)))])
    dgrams, stats = both_paths(path)
    assert [d.payload for d in dgrams] == [V5, *([] if payload is None else [payload]), V5]
    assert getattr(stats, reason) == (3 if reason == "udp" else 1)
    assert stats.packets == 3


@pytest.mark.parametrize("cut", [1, 10, 17], ids=["frame-cut-1", "frame-cut-10", "partial-record-header"])
def test_file_cut_short_alike_on_both_paths(tmp_path: Path, cut: int) -> None:
    path = write(tmp_path / "cut.pcap", [ether(ipv4(udp(V5)))] * 3)
    path.write_bytes(path.read_bytes()[:-cut] if cut != 17 else path.read_bytes() + b"\x00" * 10)
    dgrams, stats = both_paths(path)
    assert len(dgrams) == (3 if cut == 17 else 2)
    assert stats.truncated_file
