"""Acceptance: an nfdump-style filter selects exactly the flows nfdump's own filter selects.

One export goes through a gateway that both stores it (the store sink) and forwards it to a real nfcapd (the
udp-forward sink): softflowd's NetFlow v9 for a synthetic trace (TCP/UDP/ICMP, IPv4 and IPv6), plus IPFIX and
v5 records made here to cover the fields softflowd does not send (AS numbers, interfaces, ToS, next hop,
large counters). For each filter of the set, ``nfdump -R DIR 'FILTER'`` and ``flowtunnel query --filter``
must give the same multiset of (src, dst, sport, dport, proto, packets, bytes).
"""

from __future__ import annotations

import asyncio
import csv
import io
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import duckdb
import pytest

from flowtunnel.datagram import Datagram
from flowtunnel.netflow import FieldSpec, Template, encode_ipfix, encode_v5
from flowtunnel.store import compile_filter
from flowtunnel.store.filter import NFDUMP_DST_PORT, NFDUMP_SRC_PORT
from tests.conftest import require
from tests.gateway.util import drained, enroll, post_batch, seal, start_gateway
from tests.peers import Nfcapd, TraceSummary, _json_objects, capture_softflowd

Key = tuple[str, str, int, int, int, int, int]

# The filter set: every primitive the docs list, alone and combined, IPv4 and IPv6.
FILTERS = (
    "any",
    "proto tcp",
    "proto udp",
    "proto icmp",
    "proto 47",
    "not proto tcp",
    "ipv6",
    "inet",
    "host 10.0.0.7",
    "src host 10.1.0.3",
    "dst host 2001:db8:99::2",
    "net 10.0.0.0/16",
    "src net 192.168.0.0/16",
    "dst net 198.51.100.0/25",
    "net 172.16.0.0 255.240.0.0",
    "net 2001:db8::/48",
    "dst net 2001:db8:99::/64",
    "port 53",
    "dst port 443",
    "src port > 60000",
    "dst port <= 80",
    "port in [ 22 25 123 ]",
    "dst port in [80, 8080]",
    "not port 53",
    "src as 64512",
    "dst as > 65000",
    "as 0",
    "not as 0",
    "as in [ 3320 15169 ]",
    "in if 3",
    "out if 2",
    "if 5",
    "bytes > 1k",
    "bytes >= 1M",
    "packets < 3",
    "packets > 1000 and bytes < 2M",
    "flags S",
    "flags SA",
    "flags AF and not flags R",
    "not flags SA",
    "flags X",
    "tos 32",
    "tos > 100",
    "next ip 10.255.0.1",
    "next ip in [ 10.255.0.2 2001:db8:ffff::1 ]",
    "next ip 2001:db8:ffff::1",
    "icmp-type 8",
    "icmp-type 128 or icmp-code 4",
    "proto icmp and dst port 2048",
    "proto icmp6 and not icmp-type 129",
    "flags 0x12",
    "flags > 16 and proto tcp",
    "src port 0",
    "ip in [ 10.0.0.1 10.0.0.2 2001:db8::/32 ]",
    "src or dst net 10.2.0.0/16",
    "src and dst net 10.0.0.0/8",
    "proto tcp and dst port 443 and net 10.0.0.0/8",
    "(proto udp or proto icmp) and not net 198.51.100.0/24",
    "not (port 80 or port 443) && ipv4",
    "proto tcp and (flags R || bytes > 100k) and not src as 0",
    "PROTO UDP AND DST PORT EQ 53",
    "duration > 100",
)


@dataclass(frozen=True, slots=True)
class World:
    flowdir: Path
    geo_db: Path
    database: Path
    data_dir: Path
    stored: int


# ---------------------------------------------------------------------------------------------- the export

_IPFIX4 = Template(template_id=300, fields=(
    FieldSpec(8, 4), FieldSpec(12, 4), FieldSpec(7, 2), FieldSpec(11, 2), FieldSpec(4, 1), FieldSpec(6, 1),
    FieldSpec(5, 1), FieldSpec(1, 8), FieldSpec(2, 8), FieldSpec(10, 4), FieldSpec(14, 4), FieldSpec(16, 4),
    FieldSpec(17, 4), FieldSpec(15, 4), FieldSpec(152, 8), FieldSpec(153, 8),
))
_IPFIX6 = Template(template_id=301, fields=(
    FieldSpec(27, 16), FieldSpec(28, 16), FieldSpec(7, 2), FieldSpec(11, 2), FieldSpec(4, 1), FieldSpec(6, 1),
    FieldSpec(5, 1), FieldSpec(1, 8), FieldSpec(2, 8), FieldSpec(10, 4), FieldSpec(14, 4), FieldSpec(16, 4),
    FieldSpec(17, 4), FieldSpec(62, 16), FieldSpec(152, 8), FieldSpec(153, 8),
))
# ICMP as IPFIX exporters send it: type and code in icmpTypeCodeIPv4/IPv6, no transport ports.
_ICMP4 = Template(template_id=302, fields=(
    FieldSpec(8, 4), FieldSpec(12, 4), FieldSpec(4, 1), FieldSpec(32, 2), FieldSpec(1, 8), FieldSpec(2, 8),
    FieldSpec(152, 8), FieldSpec(153, 8),
))
_ICMP6 = Template(template_id=303, fields=(
    FieldSpec(27, 16), FieldSpec(28, 16), FieldSpec(4, 1), FieldSpec(139, 2), FieldSpec(1, 8),
    FieldSpec(2, 8), FieldSpec(152, 8), FieldSpec(153, 8),
))
_ASES = (0, 0, 3320, 15169, 64512, 65001, 4200000000)
_PORTS = (22, 25, 53, 80, 123, 443, 8080, 60001, 65535)


def _record(rnd: random.Random, i: int, v6: bool, now_ms: int) -> dict[str, object]:
    proto = rnd.choice((6, 6, 6, 17, 17, 47))
    rec: dict[str, object] = {
        "sourceTransportPort": 0 if proto == 47 else rnd.choice((*_PORTS, rnd.randint(1024, 65535))),
        "destinationTransportPort": 0 if proto == 47 else rnd.choice(_PORTS),
        "protocolIdentifier": proto,
        "tcpControlBits": rnd.randint(0, 63) if proto == 6 else 0,
        "ipClassOfService": rnd.choice((0, 0, 32, 184)),
        "octetDeltaCount": rnd.choice(
            (40, 999, 1000, 1001, 150_000, 999_999, 1_000_000, 1_500_000, 5_000_000)
        ),
        "packetDeltaCount": rnd.choice((1, 2, 3, 10, 1001, 4000)),
        "ingressInterface": rnd.randint(1, 5),
        "egressInterface": rnd.randint(1, 5),
        "bgpSourceAsNumber": rnd.choice(_ASES),
        "bgpDestinationAsNumber": rnd.choice(_ASES),
        "flowStartMilliseconds": now_ms - rnd.randint(1000, 60_000),
    }
    rec["flowEndMilliseconds"] = int(rec["flowStartMilliseconds"]) + rnd.choice((0, 50, 100, 101, 5000))  # type: ignore[call-overload]
    if v6:
        rec["sourceIPv6Address"] = f"2001:db8:{rnd.choice((0, 1, 0x99))}::{rnd.randint(1, 4):x}"
        rec["destinationIPv6Address"] = rnd.choice(("2001:db8:99::2", "2001:db8:0:1::5", "fd00::1"))
        rec["ipNextHopIPv6Address"] = rnd.choice(("::", "2001:db8:ffff::1"))
    else:
        rec["sourceIPv4Address"] = rnd.choice(
            (f"10.{rnd.randint(0, 3)}.0.{rnd.randint(1, 8)}", f"172.{rnd.randint(15, 32)}.1.1",
             f"192.168.{rnd.randint(0, 2)}.9")
        )
        rec["destinationIPv4Address"] = rnd.choice(
            (f"198.51.100.{rnd.randint(0, 255)}", f"10.0.0.{rnd.randint(1, 8)}", "203.0.113.5")
        )
        rec["ipNextHopIPv4Address"] = rnd.choice(("0.0.0.0", "10.255.0.1", "10.255.0.2"))
    return rec


def _icmp(rnd: random.Random, v6: bool, now_ms: int) -> dict[str, object]:
    start = now_ms - rnd.randint(1000, 60_000)
    rec: dict[str, object] = {
        "protocolIdentifier": 58 if v6 else 1, "octetDeltaCount": rnd.choice((64, 84, 1500)),
        "packetDeltaCount": rnd.choice((1, 2, 5)), "flowStartMilliseconds": start,
        "flowEndMilliseconds": start + rnd.choice((0, 200)),
    }
    if v6:
        rec["icmpTypeCodeIPv6"] = rnd.choice((128 * 256, 129 * 256, 1 * 256 + 4, 0))
        rec["sourceIPv6Address"] = f"2001:db8:1::{rnd.randint(1, 4):x}"
        rec["destinationIPv6Address"] = "2001:db8:99::2"
    else:
        rec["icmpTypeCodeIPv4"] = rnd.choice((8 * 256, 0, 3 * 256 + 3, 11 * 256))
        rec["sourceIPv4Address"] = f"10.0.0.{rnd.randint(1, 8)}"
        rec["destinationIPv4Address"] = f"198.51.100.{rnd.randint(0, 255)}"
    return rec


def crafted_ipfix(seed: int, *, datagrams: int = 20, per: int = 15) -> list[bytes]:
    rnd = random.Random(seed)
    now_ms = int(time.time() * 1000)
    out = []
    for k in range(datagrams):
        v4 = [_record(rnd, k * per + j, False, now_ms) for j in range(per)]
        v6 = [_record(rnd, k * per + j, True, now_ms) for j in range(per // 3)]
        icmp4 = [_icmp(rnd, False, now_ms) for _ in range(3)]
        icmp6 = [_icmp(rnd, True, now_ms) for _ in range(2)]
        out.append(encode_ipfix(
            templates=[_IPFIX4, _IPFIX6, _ICMP4, _ICMP6] if k == 0 else [],
            data=[(_IPFIX4, v4), (_IPFIX6, v6), (_ICMP4, icmp4), (_ICMP6, icmp6)],
            export_time=now_ms // 1000, sequence=k * (per + per // 3 + 5), domain=7,
        ))
    return out


def crafted_v5(seed: int, *, datagrams: int = 5, per: int = 20) -> list[bytes]:
    rnd = random.Random(seed)
    now = int(time.time())
    out = []
    for k in range(datagrams):
        recs = [_record(rnd, j, False, now * 1000) for j in range(per)]
        for r in recs[:3]:  # ICMP in v5: type and code in the destination port, or byte-swapped in the source
            r["protocolIdentifier"] = 1
            r["tcpControlBits"] = 0
            r["sourceTransportPort"], r["destinationTransportPort"] = rnd.choice(
                ((0, 8 * 256), (8, 0), (0, 0), (3 + 3 * 256, 0))
            )
        for r in recs:
            r["bgpSourceAsNumber"] = int(r["bgpSourceAsNumber"]) & 0xFFFF  # type: ignore[call-overload]
            r["bgpDestinationAsNumber"] = int(r["bgpDestinationAsNumber"]) & 0xFFFF  # type: ignore[call-overload]
            r["ingressInterface"] = int(r["ingressInterface"])  # type: ignore[call-overload]
            r["packetDeltaCount"] = min(int(r["packetDeltaCount"]), 0xFFFFFFFF)  # type: ignore[call-overload]
        out.append(encode_v5(recs, sys_uptime_ms=600_000, unix_secs=now, sequence=k * per))
    return out


async def _build(tmp_path: Path, exports: dict[str, list[bytes]]) -> World:
    data = tmp_path / "gw"
    with Nfcapd(tmp_path) as nf:
        gw = await start_gateway(data, store=True, forward=(nf.url,))
        try:
            async with aiohttp.ClientSession() as session:
                for n, (exporter, payloads) in enumerate(exports.items()):
                    agent = f"site-{n}"
                    key = enroll(data, agent)
                    seq = 1
                    for start in range(0, len(payloads), 20):
                        chunk = payloads[start : start + 20]
                        dgs = [
                            Datagram(received_ns=time.time_ns(), exporter=exporter, exporter_port=40000,
                                     local_port=2055, payload=p)
                            for p in chunk
                        ]
                        body = seal(agent, key, seq, dgs)
                        status, doc, _ = await post_batch(session, gw.url, body, agent=agent)
                        assert status == 200, doc
                        seq += len(chunk)
            await drained(gw, "udp-forward")
            await drained(gw, "store")
        finally:
            await gw.stop()
        nf.stop()
    database = data / "store" / "flows.duckdb"
    conn = duckdb.connect(str(database), read_only=True)
    row = conn.execute("SELECT count(*) FROM flows").fetchone()
    conn.close()
    # nfdump 1.7.1 refuses 'as' filters without a geo database (its AS primitive sets the geo flag); an
    # empty flow file passes as an empty one.
    geo_db = tmp_path / "empty-geo.nf"
    await asyncio.to_thread(
        subprocess.run, ["nfdump", "-R", str(nf.flowdir), "-w", str(geo_db), "not any"], capture_output=True,
        timeout=60, check=True,
    )
    return World(flowdir=nf.flowdir, geo_db=geo_db, database=database, data_dir=data,
                 stored=int(row[0]) if row else 0)


@pytest.fixture(scope="module")
def world(trace: TraceSummary, tmp_path_factory: pytest.TempPathFactory) -> World:
    require("softflowd", "nfcapd", "nfdump")
    softflowd = capture_softflowd(trace.path, 9)
    exports = {
        "127.0.0.1": softflowd.payloads,
        "127.0.0.2": crafted_ipfix(seed=5),
        "127.0.0.3": crafted_v5(seed=6),
    }
    return asyncio.run(_build(tmp_path_factory.mktemp("filters"), exports))


# ---------------------------------------------------------------------------------------------- both sides


def nfdump_flows(world: World, text: str) -> Counter[Key]:
    proc = subprocess.run(
        ["nfdump", "-G", str(world.geo_db), "-R", str(world.flowdir), "-q", "-o", "json", text],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, f"nfdump refused {text!r}: {proc.stderr}"
    out: Counter[Key] = Counter()
    for raw in _json_objects(proc.stdout):
        if raw.get("type") != "FLOW":
            continue
        if "icmp_type" in raw:  # ICMP: nfdump shows type and code, kept as destination port type*256+code
            sport, dport = 0, int(raw["icmp_type"]) * 256 + int(raw["icmp_code"])
        else:
            sport, dport = int(raw["src_port"]), int(raw["dst_port"])
        out[(
            str(raw.get("src4_addr") or raw.get("src6_addr")),
            str(raw.get("dst4_addr") or raw.get("dst6_addr")),
            sport, dport, int(raw["proto"]), int(raw["in_packets"]), int(raw["in_bytes"]),
        )] += 1
    return out


# The store keeps the exporter's ports; nfdump rewrites them for ICMP (source 0, destination type*256+code).
_KEY_SQL = (
    f"SELECT src_addr, dst_addr, {NFDUMP_SRC_PORT}, {NFDUMP_DST_PORT}, protocol, packets, bytes FROM flows"
)


def store_flows(world: World, text: str) -> Counter[Key]:
    flt = compile_filter(text)
    conn = duckdb.connect(str(world.database), read_only=True)
    try:
        rows = conn.execute(f"{_KEY_SQL} WHERE {flt.where}", list(flt.params)).fetchall()
    finally:
        conn.close()
    return Counter(tuple(r) for r in rows)


def test_the_export_reached_both_sides(world: World) -> None:
    everything = nfdump_flows(world, "any")
    assert world.stored == sum(everything.values())
    assert world.stored > 2000


@pytest.mark.parametrize("text", FILTERS)
def test_filter_selects_what_nfdump_selects(world: World, text: str) -> None:
    expected = nfdump_flows(world, text)
    got = store_flows(world, text)
    missing, extra = expected - got, got - expected
    summary = f"{text!r}: nfdump {sum(expected.values())} flows, store {sum(got.values())}"
    assert not missing, f"{summary}; missing {list(missing.items())[:3]}"
    assert not extra, f"{summary}; extra {list(extra.items())[:3]}"


def test_filters_select_something_and_not_everything(world: World) -> None:
    # A set where every filter matched all flows or none would prove little.
    total = world.stored
    sizes = {text: sum(store_flows(world, text).values()) for text in FILTERS}
    assert sum(1 for n in sizes.values() if 0 < n < total) >= 40, sizes


def test_query_cli_with_filter_prints_the_same_flows(world: World) -> None:
    text = "proto tcp and dst port 443 and net 10.0.0.0/8"
    out = subprocess.run(
        [sys.executable, "-m", "flowtunnel", "query", "--data", str(world.data_dir), "--filter", text,
         "SELECT src_addr, dst_addr, src_port, dst_port, protocol, packets, bytes FROM flows"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stderr
    rows = list(csv.reader(io.StringIO(out.stdout)))[1:]
    got = Counter((r[0], r[1], int(r[2]), int(r[3]), int(r[4]), int(r[5]), int(r[6])) for r in rows)
    assert got == nfdump_flows(world, text)
