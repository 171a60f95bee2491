"""Test helper: write a synthetic packet trace (pcap) of many small flows for softflowd to export."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import dpkt

__all__ = ["write_trace"]


def _eth(ip: dpkt.Packet, v6: bool) -> bytes:
    eth = dpkt.ethernet.Ethernet(
        src=b"\x02\x00\x00\x00\x00\x01",
        dst=b"\x02\x00\x00\x00\x00\x02",
        type=dpkt.ethernet.ETH_TYPE_IP6 if v6 else dpkt.ethernet.ETH_TYPE_IP,
        data=ip,
    )
    return bytes(eth)


def write_trace(path: Path, *, flows: int, seed: int = 7, start: float = 1_700_000_000.0) -> int:
    """Write ``flows`` distinct flows (TCP, UDP, ICMP; IPv4 and IPv6), 1-3 packets each. Returns packets."""
    rng = random.Random(seed)
    packets = 0
    with path.open("wb") as f:
        writer = dpkt.pcap.Writer(f, linktype=dpkt.pcap.DLT_EN10MB)
        ts = start
        for i in range(flows):
            v6 = i % 4 == 3
            kind = ("tcp", "udp", "icmp")[i % 3]
            n = rng.randint(1, 3)
            for _ in range(n):
                ts += 0.0005
                payload = b"x" * rng.randint(0, 200)
                transport: dpkt.Packet
                if kind == "tcp":
                    transport = dpkt.tcp.TCP(
                        sport=1024 + i % 60000, dport=80, flags=dpkt.tcp.TH_ACK, data=payload
                    )
                    proto = socket.IPPROTO_TCP
                elif kind == "udp":
                    transport = dpkt.udp.UDP(sport=2000 + i % 60000, dport=53, data=payload)
                    transport.ulen = 8 + len(payload)
                    proto = socket.IPPROTO_UDP
                elif v6:
                    transport = dpkt.icmp6.ICMP6(type=128, code=0, data=dpkt.icmp6.ICMP6.Echo(id=i, seq=1))
                    proto = socket.IPPROTO_ICMPV6
                else:
                    transport = dpkt.icmp.ICMP(type=8, code=0, data=dpkt.icmp.ICMP.Echo(id=i % 65536, seq=1))
                    proto = socket.IPPROTO_ICMP
                if v6:
                    ip: dpkt.Packet = dpkt.ip6.IP6(
                        src=socket.inet_pton(socket.AF_INET6, f"2001:db8::{i % 65536:x}"),
                        dst=socket.inet_pton(socket.AF_INET6, "2001:db8:ffff::1"),
                        nxt=proto,
                        hlim=64,
                        data=transport,
                    )
                    ip.plen = len(bytes(transport))
                else:
                    ip = dpkt.ip.IP(
                        src=socket.inet_aton(f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"),
                        dst=socket.inet_aton("192.0.2.1"),
                        p=proto,
                        ttl=64,
                        data=transport,
                    )
                    ip.len = 20 + len(bytes(transport))
                writer.writepkt(_eth(ip, v6), ts=ts)
                packets += 1
    return packets
