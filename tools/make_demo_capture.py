"""Make ``src/flowtunnel/data/demo.pcap``, the capture ``flowtunnel demo`` replays.

A synthetic packet trace (made here: a small office whose traffic follows a Zipf-like law, so "top talkers"
has a clear answer) is turned into NetFlow by softflowd three times, as v5, v9 and IPFIX, each captured on a
loopback UDP socket. The datagrams go into one pcap, each version as if sent by its own exporter
(192.0.2.5 v5, 192.0.2.9 v9, 192.0.2.10 IPFIX), interleaved in time order. Everything is generated, so the
file has no licence question. Needs softflowd; run from the repository root:

    python tools/make_demo_capture.py [--out src/flowtunnel/data/demo.pcap] [--flows 800] [--seed 7]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dpkt

EXPORTERS = {5: "192.0.2.5", 9: "192.0.2.9", 10: "192.0.2.10"}
COLLECTOR = ("198.51.100.1", 2055)
MAX_BYTES = 300_000


def make_trace(path: Path, *, flows: int, seed: int) -> None:
    """An Ethernet pcap of ``flows`` TCP/UDP/ICMP conversations between 24 office hosts and 60 servers."""
    rnd = random.Random(seed)
    clients = [bytes((10, 20, 0, 10 + i)) for i in range(24)]
    servers = [bytes((203, 0, 113, 1 + i)) for i in range(30)]
    servers += [bytes((198, 51, 100, 10 + i)) for i in range(30)]
    v6_clients = [b"\x20\x01\x0d\xb8\x00\x20" + bytes(9) + bytes((10 + i,)) for i in range(6)]
    v6_servers = [b"\x20\x01\x0d\xb8\x0b\xad" + bytes(9) + bytes((1 + i,)) for i in range(6)]
    # Zipf-like weights: the first hosts do most of the talking.
    cw = [1 / (i + 1) ** 1.2 for i in range(len(clients))]
    sw = [1 / (i + 1) ** 1.1 for i in range(len(servers))]
    packets: list[tuple[float, bytes]] = []
    base = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    for _ in range(flows):
        v6 = rnd.random() < 0.15
        if v6:
            a, b = rnd.choice(v6_clients), rnd.choice(v6_servers)
        else:
            a = rnd.choices(clients, weights=cw)[0]
            b = rnd.choices(servers, weights=sw)[0]
        kind = rnd.choices(("tcp", "udp", "icmp"), weights=(6, 3, 1))[0]
        sport = rnd.randint(32768, 60999)
        dport = rnd.choices((443, 80, 53, 123, 22, 993), weights=(10, 4, 4, 1, 1, 1))[0]
        heavy = rnd.random() < 0.1
        count = rnd.randint(8, 30) if heavy else rnd.randint(2, 8)
        start = base + rnd.uniform(0, 240)
        for k in range(count):
            forward = k % 2 == 0
            src, dst = (a, b) if forward else (b, a)
            size = rnd.choice((0, 40, 200, 1200, 1400)) if not forward or heavy else rnd.choice((0, 40, 200))
            l4: dpkt.Packet
            if kind == "tcp":
                fin = dpkt.tcp.TH_FIN if k == count - 1 else 0
                flags = dpkt.tcp.TH_SYN if k == 0 else dpkt.tcp.TH_ACK | fin
                l4 = dpkt.tcp.TCP(sport=sport if forward else dport, dport=dport if forward else sport,
                                  flags=flags, data=bytes(size))
                proto = dpkt.ip.IP_PROTO_TCP
            elif kind == "udp":
                l4 = dpkt.udp.UDP(sport=sport if forward else dport, dport=dport if forward else sport,
                                  data=bytes(size))
                l4.ulen = 8 + size
                proto = dpkt.ip.IP_PROTO_UDP
            elif v6:
                l4 = dpkt.icmp6.ICMP6(type=128 if forward else 129, data=bytes(size))
                proto = dpkt.ip.IP_PROTO_ICMP6
            else:
                echo = dpkt.icmp.ICMP.Echo(id=k, seq=k, data=bytes(size))
                l4 = dpkt.icmp.ICMP(type=8 if forward else 0, data=echo)
                proto = dpkt.ip.IP_PROTO_ICMP
            ip: dpkt.Packet
            if v6:
                ip = dpkt.ip6.IP6(src=src, dst=dst, nxt=proto, hlim=64, data=l4)
                ip.plen = len(bytes(l4))
                eth_type = dpkt.ethernet.ETH_TYPE_IP6
            else:
                ip = dpkt.ip.IP(src=src, dst=dst, p=proto, ttl=64, data=l4)
                ip.len = 20 + len(bytes(l4))
                eth_type = dpkt.ethernet.ETH_TYPE_IP
            frame = dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, type=eth_type, data=ip)
            packets.append((start + k * rnd.uniform(0.005, 0.5), bytes(frame)))
    packets.sort(key=lambda p: p[0])
    with path.open("wb") as f:
        writer = dpkt.pcap.Writer(f, snaplen=65535, linktype=dpkt.pcap.DLT_EN10MB)
        for ts, frame in packets:
            writer.writepkt(frame, ts)


def run_softflowd(trace: Path, version: int) -> list[bytes]:
    """softflowd -r on the trace, exporting ``version`` to a loopback socket; returns the datagrams."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["softflowd", "-r", str(trace), "-n", f"127.0.0.1:{port}", "-v", str(version), "-d",
               "-T", "full", "-m", "65536", "-c", "none", "-p", os.path.join(tmp, "pid")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
    out: list[bytes] = []
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], 0.3)
        if not ready:
            break
        out.append(sock.recv(65535))
    sock.close()
    m = re.search(r"Flows exported: \d+ \(\d+ records\) in (\d+) packets", proc.stdout + proc.stderr)
    if m is None or int(m.group(1)) != len(out):
        raise SystemExit(f"softflowd -v {version} reported {m and m.group(1)} datagrams, {len(out)} captured")
    return out


def write_capture(path: Path, streams: dict[int, list[bytes]]) -> int:
    """One pcap, the versions interleaved 2 ms apart, each from its exporter address to the collector."""
    items: list[tuple[float, int, bytes]] = []
    for version, datagrams in streams.items():
        for i, payload in enumerate(datagrams):
            items.append((i / max(1, len(datagrams)), version, payload))
    items.sort(key=lambda x: (x[0], x[1]))
    start = 1_767_225_840.0
    with path.open("wb") as f:
        writer = dpkt.pcap.Writer(f, snaplen=65535, linktype=dpkt.pcap.DLT_EN10MB)
        for n, (_, version, payload) in enumerate(items):
            udp = dpkt.udp.UDP(sport=40000 + version, dport=COLLECTOR[1], data=payload)
            udp.ulen = 8 + len(payload)
            ip = dpkt.ip.IP(src=socket.inet_aton(EXPORTERS[version]), dst=socket.inet_aton(COLLECTOR[0]),
                            p=dpkt.ip.IP_PROTO_UDP, ttl=64, data=udp)
            ip.len = 20 + udp.ulen
            frame = dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, type=dpkt.ethernet.ETH_TYPE_IP,
                                           data=ip)
            writer.writepkt(bytes(frame), start + n * 0.002)
    return len(items)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("src/flowtunnel/data/demo.pcap"))
    parser.add_argument("--flows", type=int, default=800)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.pcap"
        make_trace(trace, flows=args.flows, seed=args.seed)
        streams = {version: run_softflowd(trace, version) for version in (5, 9, 10)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    count = write_capture(args.out, streams)
    size = args.out.stat().st_size
    sizes = ", ".join(f"v{v}: {len(d)}" for v, d in streams.items())
    print(f"wrote {args.out}: {count} datagrams ({sizes}), {size} bytes")
    if size > MAX_BYTES:
        print(f"warning: {size} bytes is over the {MAX_BYTES}-byte budget; use fewer --flows",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

