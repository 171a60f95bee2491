"""Rendering the agent's status.json: what an operator reads, and robustness to partial documents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flowtunnel.agent.status import read_status, render
from flowtunnel.errors import FlowtunnelError

NOW = 1_800_000_000.0

STATUS = {
    "kind": "agent", "agent_id": "site-a", "pid": 4242, "updated": NOW - 1,
    "listen": ["udp://127.0.0.1:2055", "udp://[::1]:2055"], "gateway": "https://gw.example:8443",
    "gateway_acked": 1234,
    "backlog": {"datagrams": 56, "bytes": 3 * 1024 * 1024},
    "spool": {"quota_bytes": 512 * 1024 * 1024, "policy": "drop-oldest"},
    "received": {"datagrams": 1290, "bytes": 1_500_000},
    "rates": {"datagrams_in_per_s": 12.5, "bytes_out_per_s": 2048.0},
    "upload": {
        "proxy": "http://user:***@proxy:3128", "last_attempt": NOW - 5, "last_success": NOW - 65,
        "last_result": "http-503", "consecutive_failures": 3, "next_attempt": NOW + 7,
        "failures": {"http-503": 3, "connection:ClientOSError": 1}, "datagrams": 1234, "batches": 40,
        "body_bytes": 300_000, "gateway_lost": 0, "codecs": {"2": 30, "4": 10},
        "link_bytes_per_s": 150 * 1024,
    },
    "compression_ratio": 4.56,
    "drops": {"spool_full": 17, "receiver_overflow": 0},
    "malformed": {"not_netflow": 2},
    "upstream_loss": {"127.0.0.1/0": {"lost": 12, "received": 900, "resets": 1}},
    "exporters": {"127.0.0.1:40000": {"datagrams": 1290, "last_seen": NOW - 1}},
}


def test_render_shows_what_an_operator_asks_first() -> None:
    text = render(STATUS, now=NOW)
    lines = dict(line.split("  ", 1) for line in text.splitlines() if line and not line.startswith(" "))
    assert lines["agent"].strip() == "site-a (pid 4242)"
    assert "via http://user:***@proxy:3128" in lines["gateway"]
    assert lines["gateway acked"].strip() == "seq 1234"
    assert lines["backlog"].strip() == "56 datagrams, 3.0 MiB of 512.0 MiB quota (drop-oldest)"
    assert lines["last upload"].strip().endswith("(5 s ago): http-503 (3 failures in a row, next try in 7 s)")
    assert "(65 s ago)" in lines["last success"]
    assert lines["rates"].strip() == "12.5 datagrams/s in, 2.0 KiB/s out"
    assert lines["compression"].strip() == "4.56x"
    assert lines["link"].strip() == "150.0 KiB/s measured; batches by codec: zstd+dict 30, columnar+lzma 10"
    assert lines["drops"].strip() == "spool_full=17"
    assert lines["malformed"].strip() == "not_netflow=2 (carried anyway)"
    assert lines["upload errors"].strip() == "connection:ClientOSError=1, http-503=3"
    assert "127.0.0.1:40000: 1290 datagrams" in lines["exporters"]
    assert lines["upstream loss"].strip() == "12 units lost before the agent (127.0.0.1/0: 12)"


def test_render_marks_a_stale_status() -> None:
    assert "stale" in render({**STATUS, "updated": NOW - 600}, now=NOW)
    assert "stale" not in render(STATUS, now=NOW)


def test_render_survives_a_minimal_document() -> None:
    text = render({"kind": "agent"}, now=NOW)
    assert "unknown (not reached yet)" in text
    assert "none seen yet" in text
    assert "not measured yet" in text


def test_read_status_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FlowtunnelError, match="does not exist: no agent has run"):
        read_status(tmp_path)
    (tmp_path / "status.json").write_text("{not json")
    with pytest.raises(FlowtunnelError, match="is not valid JSON"):
        read_status(tmp_path)
    (tmp_path / "status.json").write_text(json.dumps({"kind": "gateway"}))
    with pytest.raises(FlowtunnelError, match="is not an agent status file"):
        read_status(tmp_path)
    (tmp_path / "status.json").write_text(json.dumps(STATUS))
    assert read_status(tmp_path)["agent_id"] == "site-a"


def rows(status: dict[str, object]) -> dict[str, str]:
    text = render(status, now=NOW)
    return {k: v.strip() for k, v in (line.split("  ", 1) for line in text.splitlines() if line[:1] != " ")}


def test_render_shows_kernel_drops_with_what_to_raise() -> None:
    doc = {**STATUS, "drops": {"kernel_rcvbuf": 5486, "spool_full": 0},
           "kernel_drops": {"udp://0.0.0.0:2055": 5486}}
    assert rows(doc)["drops"] == "kernel_rcvbuf=5486 (kernel_rcvbuf: raise --rcvbuf and net.core.rmem_max)"
    uncountable = {**STATUS, "kernel_drops": {"udp://0.0.0.0:2055": None}}
    assert rows(uncountable)["drops"] == "spool_full=17; kernel drops not countable on this system"


def test_render_shows_spool_health() -> None:
    assert rows(STATUS)["spool"] == "ok"
    spool = {**STATUS["spool"], "torn_tails": 2, "disk_full": True}  # type: ignore[dict-item]
    assert rows({**STATUS, "spool": spool})["spool"] == (
        "DISK FULL (appends held until space is freed), "
        "2 torn write-ahead log tails found on open (see the log)"
    )


def test_render_names_the_rung_why_others_failed_and_what_the_path_did() -> None:
    doc = {
        "agent_id": "site-a", "pid": 1, "updated": 0.0,
        "upload": {"rung": "get", "route": "proxy http://127.0.0.1:3128 (absolute URI)",
                   "rungs": {"post": "failed: the proxy http://127.0.0.1:3128 refuses it (http-403)",
                             "ws": "untried", "get": "good"},
                   "captive_portal": "captive portal at http://gw:8080, login page (Hotel Wi-Fi)",
                   "intercepted_by": "CN=Corp CA", "body_limit_by": "the proxy http://127.0.0.1:3128",
                   "max_body": 61440, "oversize": 1},
    }
    text = render(doc, now=0.0)
    assert "get (proxy http://127.0.0.1:3128 (absolute URI)); post failed: the proxy" in text
    assert "captive portal at http://gw:8080, login page (Hotel Wi-Fi)" in text
    assert "by CN=Corp CA" in text
    assert "imposed by the proxy http://127.0.0.1:3128" in text
    assert "1 datagrams too large" in text


def test_render_names_the_content_type_only_when_a_proxy_refused_the_first() -> None:
    doc: dict[str, Any] = {"agent_id": "site-a", "pid": 1, "updated": 0.0,
                           "upload": {"rung": "post", "content_type": "application/x-www-form-urlencoded"}}
    assert "content type   application/x-www-form-urlencoded (not application/vnd" in render(doc, now=0.0)
    doc["upload"]["content_type"] = "application/vnd.flowtunnel.batch"
    assert "content type" not in render(doc, now=0.0)
