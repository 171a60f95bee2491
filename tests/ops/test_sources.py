"""``flowtunnel sources``: the source address:port a collector sees maps back to (agent, original exporter),
as text, CSV and JSON, for bound pool addresses and for spoofed sources."""

from __future__ import annotations

import csv
import io
import json
import socket
import time
from pathlib import Path

import aiohttp
import pytest

from flowtunnel.cli import main
from flowtunnel.netflow import encode_v5
from tests.gateway.test_udp_forward import flows, wrap
from tests.gateway.util import drained, enroll, post_batch, seal, start_gateway
from tests.peers import UdpCapture

UNIX = int(time.time())


async def _forward(data: Path, cap: UdpCapture, **overrides: object) -> None:
    """Two agents, each with an exporter at 127.0.0.1 (the usual field box) and site-a with a second one."""
    keys = {name: enroll(data, name) for name in ("site-a", "site-b")}
    v5 = encode_v5(flows(1, 2), sys_uptime_ms=60_000, unix_secs=UNIX)
    gw = await start_gateway(data, forward=(cap.url,), **overrides)
    try:
        async with aiohttp.ClientSession() as session:
            batch_a = wrap([v5], exporter="127.0.0.1", port=2055) + wrap([v5], exporter="10.9.9.9", port=9995)
            await post_batch(session, gw.url, seal("site-a", keys["site-a"], 1, batch_a), agent="site-a")
            batch_b = wrap([v5], exporter="127.0.0.1", port=2055)
            await post_batch(session, gw.url, seal("site-b", keys["site-b"], 1, batch_b), agent="site-b")
        await drained(gw)
        gw.write_status()
    finally:
        await gw.stop()


def _sources(data: Path, fmt: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["sources", "--data", str(data), "--format", fmt]) == 0
    return capsys.readouterr().out


async def test_sources_name_what_the_collector_sees(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "gw"
    with UdpCapture() as cap:
        await _forward(data, cap)
        got = cap.wait_for(3)
    seen = {addr for _, addr in got}  # (address, port) the collector received from
    assert len(seen) == 3

    rows = [json.loads(line) for line in _sources(data, "json", capsys).splitlines()]
    by_source = {(r["source_address"], r["source_port"]): (r["agent"], r["exporter"]) for r in rows}
    assert set(by_source) == seen
    assert sorted(by_source.values()) == [
        ("site-a", "10.9.9.9"), ("site-a", "127.0.0.1"), ("site-b", "127.0.0.1")
    ]
    assert {r["mode"] for r in rows} == {"bound"}

    table = list(csv.DictReader(io.StringIO(_sources(data, "csv", capsys))))
    assert [(r["source_address"], int(r["source_port"]), r["agent"], r["exporter"]) for r in table] == [
        (r["source_address"], r["source_port"], r["agent"], r["exporter"]) for r in rows
    ]

    text = _sources(data, "text", capsys)
    assert text.splitlines()[0].split() == ["collector", "sees", "agent", "exporter", "mode"]
    for (addr, port), (agent, exporter) in by_source.items():
        assert any(line.split()[:3] == [f"{addr}:{port}", agent, exporter] for line in text.splitlines())


async def test_spoofed_sources_keep_the_exporter_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).close()
    except PermissionError:
        pytest.skip("spoofing needs CAP_NET_RAW")
    data = tmp_path / "gw"
    with UdpCapture() as cap:
        await _forward(data, cap, spoof=True, spoof_map=("site-b=127.77.0.5",))
        got = cap.wait_for(3)
    assert ("127.77.0.5", 2055) in {addr for _, addr in got}
    rows = [json.loads(line) for line in _sources(data, "json", capsys).splitlines()]
    b = next(r for r in rows if r["agent"] == "site-b")
    assert (b["source_address"], b["source_port"], b["exporter"], b["mode"]) == (
        "127.77.0.5", "*", "127.0.0.1", "spoofed"
    )


def test_no_sources_yet_and_no_data_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sources", "--data", str(tmp_path)]) == 0
    assert "no forwarded sources yet" in capsys.readouterr().out
    assert main(["sources", "--data", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"flowtunnel sources: error: no gateway data directory at {tmp_path}/nowhere"
