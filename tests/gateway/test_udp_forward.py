"""The udp-forward sink: each (agent, exporter) re-emitted from its own source address, so a real collector
(nfcapd) keeps agents with clashing template ids apart; templates re-sent when forwarding restarts."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import dpkt
import pytest

from flowtunnel.config import load_settings
from flowtunnel.datagram import Datagram
from flowtunnel.errors import ConfigError
from flowtunnel.gateway.config import DEFAULT_FORWARD_RATE, ForwardTarget, GatewayConfig
from flowtunnel.gateway.sinks.udp_forward import (
    Pacer,
    UdpForwardConfig,
    UdpForwardSink,
    build_ipv4_udp,
    has_templates,
)
from flowtunnel.log import DurableLog, LogConfig
from flowtunnel.netflow import Decoder, FieldSpec, Template, encode_ipfix, encode_v5, encode_v9
from tests.conftest import require
from tests.gateway.util import drained, enroll, post_batch, seal, start_gateway
from tests.peers import Nfcapd, UdpCapture

# Both agents' exporters use template 256 with different layouts: a collector that mixed them up would
# decode one agent's flows with the other's template.
TPL_A = Template(
    template_id=256,
    fields=(
        FieldSpec(8, 4),
        FieldSpec(12, 4),
        FieldSpec(7, 2),
        FieldSpec(11, 2),
        FieldSpec(4, 1),
        FieldSpec(1, 4),
        FieldSpec(2, 4),
        FieldSpec(22, 4),
        FieldSpec(21, 4),
    ),
)
TPL_B = Template(
    template_id=256,
    fields=(
        FieldSpec(1, 4),
        FieldSpec(2, 4),
        FieldSpec(4, 1),
        FieldSpec(11, 2),
        FieldSpec(7, 2),
        FieldSpec(12, 4),
        FieldSpec(8, 4),
        FieldSpec(21, 4),
        FieldSpec(22, 4),
    ),
)
UNIX = int(time.time())


def flows(net: int, n: int, start: int = 0) -> list[dict[str, object]]:
    return [
        {
            "sourceIPv4Address": f"10.{net}.0.{i + 1}",
            "destinationIPv4Address": f"192.0.2.{i + 1}",
            "sourceTransportPort": 1000 + i,
            "destinationTransportPort": 53 if net == 1 else 443,
            "protocolIdentifier": 17 if net == 1 else 6,
            "octetDeltaCount": 100 * (i + 1) + net,
            "packetDeltaCount": i + 1,
            "flowStartSysUpTime": 50_000,
            "flowEndSysUpTime": 59_000,
        }
        for i in range(start, start + n)
    ]


def v9_stream(
    tpl: Template, net: int, *, datagrams: int, per: int, templates_first: bool = True
) -> list[bytes]:
    out = []
    for k in range(datagrams):
        recs = flows(net, per, start=k * per)
        out.append(
            encode_v9(
                templates=[tpl] if (k == 0 and templates_first) else [],
                data=[(tpl, recs)],
                sys_uptime_ms=60_000 + k,
                unix_secs=UNIX,
                sequence=k,
                source_id=0,
            )
        )
    return out


def wrap(payloads: Sequence[bytes], *, exporter: str = "127.0.0.1", port: int = 41000) -> list[Datagram]:
    return [
        Datagram(
            received_ns=time.time_ns(), exporter=exporter, exporter_port=port, local_port=2055, payload=p
        )
        for p in payloads
    ]


def flow_key(rec: dict[str, object]) -> tuple[object, ...]:
    return (rec["src"], rec["dst"], rec["sport"], rec["dport"], rec["proto"], rec["bytes"], rec["packets"])


def sent_key(f: dict[str, object]) -> tuple[object, ...]:
    return (
        f["sourceIPv4Address"],
        f["destinationIPv4Address"],
        f["sourceTransportPort"],
        f["destinationTransportPort"],
        f["protocolIdentifier"],
        f["octetDeltaCount"],
        f["packetDeltaCount"],
    )


async def test_two_agents_with_clashing_templates_appear_as_two_exporters_in_nfcapd(tmp_path: Path) -> None:
    require("nfcapd", "nfdump")
    data = tmp_path / "gw"
    keys = {"site-a": enroll(data, "site-a"), "site-b": enroll(data, "site-b")}
    streams = {
        "site-a": v9_stream(TPL_A, 1, datagrams=3, per=5),
        "site-b": v9_stream(TPL_B, 2, datagrams=3, per=5),
    }
    with Nfcapd(tmp_path) as nf:
        gw = await start_gateway(data, forward=(nf.url,))
        try:
            async with aiohttp.ClientSession() as session:
                for k in range(3):  # interleaved, one datagram per batch per agent
                    for agent, payloads in streams.items():
                        body = seal(agent, keys[agent], k + 1, wrap(payloads[k : k + 1]))
                        assert (await post_batch(session, gw.url, body, agent=agent))[0] == 200
            await drained(gw)
            sink = gw.sinks[0]
            assert isinstance(sink, UdpForwardSink)
            mappings = {(m["agent"], m["exporter"]): str(m["source"]) for m in sink.mappings()}
        finally:
            await gw.stop()
        records = nf.records()
        exporters = nf.exporters()
    assert set(mappings) == {("site-a", "127.0.0.1"), ("site-b", "127.0.0.1")}
    src_a = mappings[("site-a", "127.0.0.1")].rsplit(":", 1)[0]
    src_b = mappings[("site-b", "127.0.0.1")].rsplit(":", 1)[0]
    assert src_a != src_b
    assert {e["ip"] for e in exporters} == {src_a, src_b}
    by_exporter: dict[str, set[tuple[object, ...]]] = {}
    for rec in records:
        by_exporter.setdefault(str(rec["exporter"]), set()).add(flow_key(rec))
    assert by_exporter[src_a] == {sent_key(f) for f in flows(1, 15)}
    assert by_exporter[src_b] == {sent_key(f) for f in flows(2, 15)}


async def test_templates_are_resent_from_the_same_source_when_forwarding_restarts(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    key = enroll(data, "site-a")
    payloads = v9_stream(TPL_A, 1, datagrams=3, per=4)
    with UdpCapture() as first:
        gw = await start_gateway(data, forward=(first.url,))
        async with aiohttp.ClientSession() as session:
            await post_batch(session, gw.url, seal("site-a", key, 1, wrap(payloads[:2])), agent="site-a")
        await drained(gw)
        await gw.stop()
        got = first.wait_for(2)
    assert [p for p, _ in got] == payloads[:2]
    source = got[0][1]
    assert source[0] == "127.0.0.2"
    saved = json.loads((data / "forward-map.json").read_text())
    assert saved["mappings"][0]["address"] == "127.0.0.2"

    # The collector restarted too: it knows no template. The gateway re-announces before the next data.
    with UdpCapture() as second:
        gw = await start_gateway(data, forward=(second.url,))
        try:
            async with aiohttp.ClientSession() as session:
                await post_batch(session, gw.url, seal("site-a", key, 3, wrap(payloads[2:])), agent="site-a")
            await drained(gw)
        finally:
            await gw.stop()
        got = second.wait_for(2)
    assert {addr for _, addr in got} == {source}
    assert has_templates(got[0][0])
    assert got[-1][0] == payloads[2]
    dec = Decoder()
    records = [r for p, _ in got for r in dec.decode(p, exporter="127.0.0.2").records]
    assert [r["sourceIPv4Address"] for r in records] == [f"10.1.0.{i}" for i in range(9, 13)]


async def test_exporters_are_keyed_by_address_not_port(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    key = enroll(data, "site-a")
    v5 = encode_v5(flows(1, 2), sys_uptime_ms=60_000, unix_secs=UNIX)
    batch = (
        wrap([v5], exporter="127.0.0.1", port=1111)
        + wrap([v5], exporter="127.0.0.1", port=2222)
        + wrap([v5], exporter="192.0.2.9", port=1111)
    )
    with UdpCapture() as cap:
        gw = await start_gateway(data, forward=(cap.url,))
        try:
            async with aiohttp.ClientSession() as session:
                await post_batch(session, gw.url, seal("site-a", key, 1, batch), agent="site-a")
            await drained(gw)
        finally:
            await gw.stop()
        got = cap.wait_for(3)
    sources = [addr[0] for _, addr in got]
    assert sources[0] == sources[1]
    assert sources[2] != sources[0]
    assert len({addr for _, addr in got}) == 2


async def test_spoofed_sources_over_a_raw_socket(tmp_path: Path) -> None:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).close()
    except PermissionError:
        pytest.skip("needs CAP_NET_RAW")
    data = tmp_path / "gw"
    key = enroll(data, "site-a")
    ipfix = encode_ipfix(templates=[TPL_A], data=[(TPL_A, flows(1, 3))], export_time=UNIX, domain=7)
    with UdpCapture() as cap:
        gw = await start_gateway(data, forward=(cap.url,), spoof=True, spoof_map=("site-a=127.77.0.5",))
        try:
            async with aiohttp.ClientSession() as session:
                await post_batch(
                    session, gw.url, seal("site-a", key, 1, wrap([ipfix], port=4739)), agent="site-a"
                )
            await drained(gw)
        finally:
            await gw.stop()
        got = cap.wait_for(1)
    assert got == [(ipfix, ("127.77.0.5", 4739))]


def test_has_templates_finds_template_sets_only() -> None:
    assert has_templates(encode_v9(templates=[TPL_A], data=[(TPL_A, flows(1, 1))]))
    assert not has_templates(encode_v9(data=[(TPL_A, flows(1, 1))]))
    assert has_templates(encode_ipfix(templates=[TPL_A]))
    assert not has_templates(encode_ipfix(data=[(TPL_A, flows(1, 1))]))
    assert not has_templates(encode_v5(flows(1, 1), sys_uptime_ms=1, unix_secs=UNIX))
    assert not has_templates(b"\x00\x09\x00")
    assert not has_templates(b"\x00\x09" + b"\x00" * 18 + b"\x01\x00\x00\x00")  # zero-length set: stop


def test_raw_packet_is_valid_ipv4_udp() -> None:
    pkt = build_ipv4_udp("127.1.2.3", 2055, "127.0.0.1", 9995, b"hello netflow", ident=7)
    ip = dpkt.ip.IP(pkt)
    assert (socket.inet_ntoa(ip.src), socket.inet_ntoa(ip.dst), ip.p, ip.id) == (
        "127.1.2.3",
        "127.0.0.1",
        17,
        7,
    )
    udp = ip.data
    assert (udp.sport, udp.dport, bytes(udp.data)) == (2055, 9995, b"hello netflow")
    expected_ip_sum, expected_udp_sum = ip.sum, udp.sum
    ip.sum = 0
    udp.sum = 0
    rebuilt = dpkt.ip.IP(bytes(ip))  # dpkt recomputes both checksums when they are zero
    assert (rebuilt.sum, rebuilt.data.sum) == (expected_ip_sum, expected_udp_sum)


async def test_a_flood_of_exporters_shares_one_source_beyond_the_limit(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    key = enroll(data, "site-a")
    v5 = encode_v5(flows(1, 1), sys_uptime_ms=60_000, unix_secs=UNIX)
    batch = [d for i in range(6) for d in wrap([v5], exporter=f"192.0.2.{i + 1}")]
    with UdpCapture() as cap:
        gw = await start_gateway(data, forward=(cap.url,), max_sources=4)
        sink = gw.sinks[0]
        assert isinstance(sink, UdpForwardSink)
        try:
            async with aiohttp.ClientSession() as session:
                await post_batch(session, gw.url, seal("site-a", key, 1, batch), agent="site-a")
            await drained(gw)
        finally:
            await gw.stop()
        got = cap.wait_for(6)
    sources = [addr[0] for _, addr in got]
    assert sources[:4] == ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    assert sources[4] == sources[5] == "127.0.0.1"  # the shared wildcard socket, routed via loopback
    assert sink.errors == {"too_many_sources": 2}


async def test_ipv6_target_without_an_ipv6_pool_gets_a_socket_per_exporter(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    key = enroll(data, "site-a")
    v5 = encode_v5(flows(1, 1), sys_uptime_ms=60_000, unix_secs=UNIX)
    batch = wrap([v5], exporter="127.0.0.1") + wrap([v5], exporter="::1") + wrap([v5], exporter="127.0.0.1")
    with UdpCapture("::1") as cap:
        gw = await start_gateway(data, forward=(cap.url,))
        try:
            async with aiohttp.ClientSession() as session:
                await post_batch(session, gw.url, seal("site-a", key, 1, batch), agent="site-a")
            await drained(gw)
            sink = gw.sinks[0]
            assert isinstance(sink, UdpForwardSink)
            errors = dict(sink.errors)
        finally:
            await gw.stop()
        got = cap.wait_for(3)
    senders = [addr for _, addr in got]
    assert senders[0] == senders[2] != senders[1]
    assert {host for host, _ in senders} == {"::1"}
    assert errors == {}


async def test_a_restarted_sink_sends_each_datagram_once_per_target(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    key = enroll(data, "site-a")
    v5 = encode_v5(flows(1, 1), sys_uptime_ms=60_000, unix_secs=UNIX)
    with UdpCapture() as cap:
        gw = await start_gateway(data, forward=(cap.url,))
        try:
            sink = gw.sinks[0]
            assert isinstance(sink, UdpForwardSink)
            async with aiohttp.ClientSession() as session:
                await post_batch(session, gw.url, seal("site-a", key, 1, wrap([v5])), agent="site-a")
                await drained(gw)
                # What the supervisor does after a failure: stop, then run (and so start) again.
                task = gw._sink_tasks["udp-forward"]
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                gw._sink_tasks["udp-forward"] = gw._tasks.spawn(gw._supervise(sink), name="sink:again")
                await post_batch(session, gw.url, seal("site-a", key, 2, wrap([v5])), agent="site-a")
                await drained(gw)
        finally:
            await gw.stop()
        got = cap.wait_quiet(0.3)
    assert len(got) == 2
    assert got[0][1] == got[1][1]


async def test_paced_forwarding_keeps_order_and_loses_nothing_at_a_collector_with_a_small_buffer(
    tmp_path: Path,
) -> None:
    """3,000 datagrams of 1 KB in journal reads of 2,000 each, to a collector whose receive buffer holds about
    a hundred: unpaced, a read arrives in one tight loop; at 5,000/s the collector drains every burst."""
    n, rate = 3000, 5000
    payloads = [i.to_bytes(4, "big") + bytes(996) for i in range(n)]
    with DurableLog(LogConfig(path=tmp_path / "journal.sqlite", quota_bytes=0)) as journal:
        journal.append(wrap(payloads), stream="site-a")
        with UdpCapture(rcvbuf=128 << 10) as cap:
            sink = UdpForwardSink(UdpForwardConfig(
                data_dir=tmp_path, targets=(ForwardTarget(host="127.0.0.1", port=cap.port),),
                source_pool=("127.0.0.2-127.0.0.9",), forward_rate=rate,
            ))
            await sink.start(journal)
            started = time.monotonic()
            try:
                after = 0
                while entries := journal.read(after=after, limit=2000):
                    await sink.handle(entries)
                    after = entries[-1].seq
            finally:
                await sink.stop()
            elapsed = time.monotonic() - started
            got = cap.wait_for(n)
            dropped = cap.drops()
    assert dropped == 0
    assert [p for p, _ in got] == payloads
    assert sink.sent == n
    assert sink.paced_waits > 0
    assert elapsed >= (n - 100) / rate  # paced (a lower bound only: the first burst, 25, goes at once)


def test_pacer_spends_a_burst_at_once_then_waits_at_the_rate() -> None:
    pacer = Pacer(1000, 10)
    assert pacer.take(10, 100.0) == 0.0  # the first burst is free
    assert pacer.take(10, 100.0) == pytest.approx(0.010)  # then 10 datagrams cost 10 ms
    assert pacer.take(10, 100.010) == pytest.approx(0.010)
    assert pacer.take(5, 105.0) == 0.0  # idle time refills the bucket, up to one burst
    assert pacer.take(10, 105.0) == pytest.approx(0.005)
    with pytest.raises(ValueError, match="rate"):
        Pacer(0, 10)


def test_forward_rate_setting_from_toml_env_and_flag(tmp_path: Path) -> None:
    def load(toml: str = "", env: dict[str, str] | None = None, **flags: object) -> GatewayConfig:
        cfg_file = None
        if toml:
            cfg_file = tmp_path / "gw.toml"
            cfg_file.write_text(toml)
        return load_settings(GatewayConfig, section="gateway", config_file=cfg_file, env=env or {},
                             flags={"data": str(tmp_path), **flags})

    assert load().forward_rate == DEFAULT_FORWARD_RATE
    assert load(toml="[gateway]\nforward-rate = 500\n").forward_rate == 500
    assert load(env={"FLOWTUNNEL_GATEWAY_FORWARD_RATE": "0"}).forward_rate == 0
    assert load(env={"FLOWTUNNEL_GATEWAY_FORWARD_RATE": "0"}, forward_rate="700").forward_rate == 700
    with pytest.raises(ConfigError, match="forward-rate -1 is outside the allowed range"):
        load(forward_rate="-1")
    with pytest.raises(ValueError, match="forward_rate -5"):
        UdpForwardConfig(data_dir=tmp_path, targets=(), source_pool=(), forward_rate=-5)


async def test_stop_waits_for_a_cancelled_send_still_running_in_its_thread(tmp_path: Path) -> None:
    """A gateway stopping cancels the sink's handle() while its worker thread still sends (to_thread cannot
    stop a thread); stop() used to save the template cache at the same time and fail with "dictionary changed
    size during iteration". It now waits for that thread under the sink's work lock."""
    import threading

    templates = Template(template_id=256, fields=(FieldSpec(8, 4), FieldSpec(12, 4)))
    payloads = [encode_v9(templates=(templates,), source_id=i, sequence=i) for i in range(50)]
    inside = threading.Event()
    release = threading.Event()
    with DurableLog(LogConfig(path=tmp_path / "journal.sqlite", quota_bytes=0)) as journal:
        journal.append(wrap(payloads), stream="site-a")
        with UdpCapture() as cap:
            sink = UdpForwardSink(UdpForwardConfig(
                data_dir=tmp_path, targets=(ForwardTarget(host="127.0.0.1", port=cap.port),),
                source_pool=("127.0.0.2-127.0.0.9",), forward_rate=0,
            ))
            await sink.start(journal)
            send = sink._send

            def slow_send(*args: object, **kwargs: object) -> None:
                inside.set()
                release.wait(5)
                send(*args, **kwargs)  # type: ignore[arg-type]

            sink._send = slow_send  # type: ignore[method-assign]
            task = asyncio.create_task(sink.handle(journal.read(after=0, limit=100)))
            assert await asyncio.to_thread(inside.wait, 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            stopping = asyncio.create_task(sink.stop())
            await asyncio.sleep(0.2)
            assert not stopping.done()  # waits for the thread still sending
            release.set()
            await stopping
    saved = json.loads((tmp_path / UdpForwardSink.TEMPLATES_FILE).read_text())
    assert "site-a" in saved["agents"]
