"""``flowtunnel query``, ``top`` and ``export`` as a user runs them, in their own process.

While a store sink runs in this (test) process, DuckDB's lock keeps other processes out of the database file:
the commands must then go through the sink's query socket. ``top --by src_addr`` must agree with nfdump.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import socket
import subprocess
from pathlib import Path

import duckdb

from tests.cli._support import aflowtunnel
from tests.conftest import require
from tests.peers import Nfcapd, SoftflowdExport


async def test_query_prints_csv_by_default(stopped_store: Path, export: SoftflowdExport) -> None:
    out = await aflowtunnel(
        "query", "--data", str(stopped_store), "SELECT count(*) AS flows, sum(packets) AS p FROM flows"
    )
    assert out.returncode == 0, out.stderr
    rows = list(csv.reader(io.StringIO(out.stdout)))
    assert rows[0] == ["flows", "p"]
    assert int(rows[1][0]) == export.stats.records


async def test_query_json_is_one_object_per_row(stopped_store: Path) -> None:
    out = await aflowtunnel(
        "query", "--data", str(stopped_store), "--format", "json",
        "SELECT src_addr, dst_addr, bytes, extra, flow_start FROM flows "
        "ORDER BY bytes DESC, src_addr LIMIT 3",
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert set(first) == {"src_addr", "dst_addr", "bytes", "extra", "flow_start"}
    assert isinstance(first["bytes"], int)
    assert isinstance(first["extra"], dict)  # the JSON column comes out nested, not as a string
    assert first["flow_start"].endswith("Z")


async def test_query_table(stopped_store: Path) -> None:
    out = await aflowtunnel("query", "--data", str(stopped_store), "--format", "table",
                            "SELECT protocol, count(*) AS n FROM flows GROUP BY 1 ORDER BY 1")
    assert out.returncode == 0, out.stderr
    assert "protocol" in out.stdout
    assert "│" in out.stdout


async def test_writes_fail_with_a_one_line_reason(stopped_store: Path) -> None:
    out = await aflowtunnel("query", "--data", str(stopped_store), "DROP TABLE flows")
    assert out.returncode == 1
    assert out.stderr.strip() == (
        "flowtunnel query: error: the store is read-only for queries: DROP statements are refused "
        "(use SELECT or EXPLAIN)"
    )
    conn = duckdb.connect(str(stopped_store / "store" / "flows.duckdb"), read_only=True)
    assert conn.execute("SELECT count(*) > 0 FROM flows").fetchone() == (True,)
    conn.close()


async def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    out = await aflowtunnel("query", "SELECT 1")
    assert out.returncode == 2
    assert "no data directory" in out.stderr
    out = await aflowtunnel("top", "--data", str(tmp_path), "--since", "soon")
    assert out.returncode == 2
    assert "--since" in out.stderr
    out = await aflowtunnel("query", "--data", str(tmp_path), "SELECT 1")
    assert out.returncode == 1
    assert "no flow store at" in out.stderr


async def test_commands_go_through_the_query_socket_while_the_sink_holds_the_database(
    running_store: Path, export: SoftflowdExport, tmp_path: Path
) -> None:
    out = await aflowtunnel("query", "--data", str(running_store), "SELECT count(*) FROM flows")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1] == str(export.stats.records)
    out = await aflowtunnel("top", "--data", str(running_store), "--by", "protocol", "--format", "json")
    assert out.returncode == 0, out.stderr
    assert sum(json.loads(line)["flows"] for line in out.stdout.splitlines()) == export.stats.records
    out = await aflowtunnel("query", "--data", str(running_store), "DELETE FROM flows")
    assert out.returncode == 1
    assert "read-only" in out.stderr
    out = await aflowtunnel("export", "--data", str(running_store), "--parquet", str(tmp_path / "pq"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"exported {export.stats.records} flows to")
    conn = duckdb.connect()
    back = conn.execute(f"SELECT count(*) FROM read_parquet('{tmp_path}/pq/*/*.parquet')").fetchone()
    conn.close()
    assert back == (export.stats.records,)


def _nfdump_top_src(nf: Nfcapd) -> dict[str, tuple[int, int, int]]:
    nf.stop()
    files = sorted(p for p in nf.flowdir.rglob("nfcapd.*") if ".current." not in p.name)
    assert files, nf.log_text()
    out: dict[str, tuple[int, int, int]] = {}
    for path in files:
        proc = subprocess.run(
            ["nfdump", "-r", str(path), "-s", "srcip/bytes", "-n", "0", "-o", "csv", "-q"],
            capture_output=True, text=True, timeout=60, check=True,
        )
        for row in csv.DictReader(io.StringIO(proc.stdout.split("\n\n")[0])):
            if not row.get("val"):
                continue
            flows, packets, octets = out.get(row["val"], (0, 0, 0))
            out[row["val"]] = (flows + int(row["fl"]), packets + int(row["pkt"]), octets + int(row["byt"]))
    return out


async def test_top_by_src_addr_agrees_with_nfdump(
    running_store: Path, export: SoftflowdExport, tmp_path: Path
) -> None:
    require("nfcapd", "nfdump")
    with Nfcapd(tmp_path) as nf:
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i, payload in enumerate(export.payloads):
            sender.sendto(payload, nf.addr)
            if i % 20 == 19:
                await asyncio.sleep(0.002)  # nfcapd reads one datagram at a time: do not overrun its buffer
        sender.close()
        await asyncio.sleep(0.5)
        expected = await asyncio.to_thread(_nfdump_top_src, nf)
    out = await aflowtunnel(
        "top", "--data", str(running_store), "--by", "src_addr", "--limit", "100000", "--format", "csv"
    )
    assert out.returncode == 0, out.stderr
    got = {
        row["src_addr"]: (int(row["flows"]), int(row["packets"]), int(row["bytes"]))
        for row in csv.DictReader(io.StringIO(out.stdout))
    }
    assert sum(f for f, _, _ in expected.values()) == export.stats.records
    assert got == expected
    # And the ranking itself: the first ten by bytes are the same addresses with the same totals.
    top_expected = sorted(expected.items(), key=lambda kv: -kv[1][2])[:10]
    top_got = list(got.items())[:10]
    assert [v[2] for _, v in top_got] == [v[2] for _, v in top_expected]
