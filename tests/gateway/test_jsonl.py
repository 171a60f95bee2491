"""The jsonl sink: one JSON object per decoded record, IANA names plus provenance, templates kept across
restarts, undecodable datagrams counted and skipped."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from flowtunnel.gateway.sinks.jsonl import json_value
from tests.gateway.test_udp_forward import TPL_A, flows, v9_stream, wrap
from tests.gateway.util import drained, enroll, post_batch, seal, start_gateway


async def test_records_are_written_as_json_lines_across_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    out = tmp_path / "out" / "flows.jsonl"
    key = enroll(data, "site-a")
    payloads = v9_stream(TPL_A, 1, datagrams=3, per=4)
    gw = await start_gateway(data, jsonl=str(out))
    async with aiohttp.ClientSession() as session:
        body = seal("site-a", key, 1, wrap([*payloads[:2], b"\x00\x09garbage"], port=2056))
        assert (await post_batch(session, gw.url, body, agent="site-a"))[0] == 200
    await drained(gw, "jsonl")
    status = gw.status()["sinks"]["jsonl"]  # type: ignore[index]
    await gw.stop()
    assert status["records"] == 8
    assert sum(status["errors"].values()) == 1

    # After a restart the data-only datagram still decodes: the template cache was persisted.
    gw = await start_gateway(data, jsonl=str(out))
    try:
        async with aiohttp.ClientSession() as session:
            body = seal("site-a", key, 4, wrap(payloads[2:], port=2056))
            assert (await post_batch(session, gw.url, body, agent="site-a"))[0] == 200
        await drained(gw, "jsonl")
    finally:
        await gw.stop()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 12
    assert [r["sourceIPv4Address"] for r in lines] == [f"10.1.0.{i}" for i in range(1, 13)]
    first = lines[0]
    assert first["octetDeltaCount"] == flows(1, 1)[0]["octetDeltaCount"]
    assert (first["_agent"], first["_exporter"], first["_version"], first["_domain"]) == (
        "site-a",
        "127.0.0.1",
        9,
        0,
    )
    assert first["_template"] == 256
    assert first["_seq"] == 1
    assert lines[-1]["_seq"] == 4
    assert first["_received"].endswith("+00:00")


def test_json_values() -> None:
    import datetime as dt
    import ipaddress

    assert json_value(b"\x01\xff") == "01ff"
    assert json_value(ipaddress.ip_address("2001:db8::1")) == "2001:db8::1"
    assert json_value(dt.datetime(2026, 1, 2, tzinfo=dt.UTC)) == "2026-01-02T00:00:00+00:00"
    assert json_value({"a": [b"\x00", 1]}) == {"a": ["00", 1]}
    assert json_value(None) is None
