"""``--filter`` on ``flowtunnel query``, ``top`` and ``export``, and nfdump's ``-s`` spellings on ``top``, as
a user runs them (own process), on a stopped store and through a running sink's query socket."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
from pathlib import Path

import duckdb
import pytest

from flowtunnel.store import QueryError, StorePaths
from flowtunnel.store.server import QueryClient
from tests.cli._support import aflowtunnel


def count(data: Path, where: str) -> int:
    conn = duckdb.connect(str(data / "store" / "flows.duckdb"), read_only=True)
    try:
        row = conn.execute(f"SELECT count(*) FROM flows WHERE {where}").fetchone()
    finally:
        conn.close()
    return int(row[0]) if row else 0


async def test_query_with_a_filter_alone_prints_the_selected_flows(stopped_store: Path) -> None:
    out = await aflowtunnel(
        "query", "--data", str(stopped_store), "--filter", "proto udp", "--format", "json"
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert rows
    assert {r["protocol"] for r in rows} == {17}
    assert len(rows) == count(stopped_store, "protocol = 17")
    assert "extra" in rows[0]  # every column


async def test_query_with_sql_and_a_filter_sees_only_the_selected_flows(stopped_store: Path) -> None:
    out = await aflowtunnel(
        "query", "--data", str(stopped_store), "-f", "ipv6 and dst port 53",
        "SELECT count(*) AS n, count(DISTINCT protocol) AS protos FROM flows",
    )
    assert out.returncode == 0, out.stderr
    n, protos = next(csv.reader(io.StringIO(out.stdout.splitlines()[1])))
    assert int(n) == count(stopped_store, "dst_addr LIKE '%:%' AND dst_port = 53") > 0
    assert int(protos) >= 1


@pytest.mark.parametrize("command", [
    ("query",), ("query", "SELECT 1"), ("top",), ("export", "--parquet", "PQ"),
])
async def test_a_bad_filter_fails_with_one_line_pointing_at_the_token(
    stopped_store: Path, tmp_path: Path, command: tuple[str, ...]
) -> None:
    args = [a.replace("PQ", str(tmp_path / "pq")) for a in command]
    out = await aflowtunnel(*args, "--data", str(stopped_store), "--filter", "prot udp")
    assert out.returncode == 1
    assert out.stderr == (
        f"flowtunnel {command[0]}: error: unknown keyword 'prot' at column 1; did you mean 'proto'?\n"
    )
    assert not (tmp_path / "pq").exists()


async def test_query_needs_sql_or_a_filter(stopped_store: Path) -> None:
    out = await aflowtunnel("query", "--data", str(stopped_store))
    assert out.returncode == 2
    assert "give SQL, or --filter FILTER, or both" in out.stderr


async def test_top_learns_nfdump_stat_spellings(stopped_store: Path) -> None:
    nfdump_style = await aflowtunnel(
        "top", "--data", str(stopped_store), "-s", "dstport/flows", "--filter", "proto tcp",
        "--format", "json",
    )
    ours = await aflowtunnel(
        "top", "--data", str(stopped_store), "--by", "dst_port", "--order", "flows", "--filter", "proto tcp",
        "--format", "json",
    )
    assert nfdump_style.returncode == 0, nfdump_style.stderr
    assert nfdump_style.stdout == ours.stdout
    rows = [json.loads(line) for line in nfdump_style.stdout.splitlines()]
    assert [r["flows"] for r in rows] == sorted((r["flows"] for r in rows), reverse=True)
    assert sum(r["flows"] for r in rows) <= count(stopped_store, "protocol = 6")
    alias = await aflowtunnel("top", "--data", str(stopped_store), "--by", "srcip", "--format", "json")
    plain = await aflowtunnel("top", "--data", str(stopped_store), "--by", "src_addr", "--format", "json")
    assert alias.returncode == 0, alias.stderr
    assert alias.stdout == plain.stdout


@pytest.mark.parametrize(("args", "message"), [
    (("-s", "srcip/bps"), "cannot order by 'bps'"),
    (("--by", "geo"), "cannot rank by 'geo'"),
    (("-s", "srcip", "--by", "dst_port"), "give --by or -s/--stat, not both"),
    (("-s", "srcip/flows", "--order", "bytes"), "-s srcip/flows orders by flows, --order says bytes"),
])
async def test_top_bad_rankings_exit_2(stopped_store: Path, args: tuple[str, ...], message: str) -> None:
    out = await aflowtunnel("top", "--data", str(stopped_store), *args)
    assert out.returncode == 2
    assert message in out.stderr


async def test_filters_work_through_the_query_socket(running_store: Path, tmp_path: Path) -> None:
    out = await aflowtunnel("query", "--data", str(running_store), "--filter", "proto icmp or proto 58",
                            "SELECT count(*) FROM flows")
    assert out.returncode == 0, out.stderr
    icmp = int(out.stdout.splitlines()[1])
    assert icmp > 0
    out = await aflowtunnel("top", "--data", str(running_store), "-s", "proto/packets", "-f", "ipv6",
                            "--format", "json")
    assert out.returncode == 0, out.stderr
    assert {json.loads(line)["protocol"] for line in out.stdout.splitlines()} <= {6, 17, 58}
    out = await aflowtunnel("export", "--data", str(running_store), "--parquet", str(tmp_path / "pq"),
                            "--filter", "proto icmp or proto 58")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"exported {icmp} flows to")
    conn = duckdb.connect()
    back = conn.execute(
        f"SELECT count(*), min(protocol) FROM read_parquet('{tmp_path}/pq/*/*.parquet')"
    ).fetchone()
    conn.close()
    assert back is not None
    assert back[0] == icmp
    assert back[1] in (1, 58)


async def test_the_query_server_refuses_a_bad_filter_itself(running_store: Path, tmp_path: Path) -> None:
    def ask() -> None:
        client = QueryClient.connect(StorePaths(data_dir=running_store).socket)
        assert client is not None
        with client:
            client.export(tmp_path / "pq", since_seconds=None, now=dt.datetime.now(dt.UTC), timeout=30,
                          flow_filter="port 80'; COPY flows TO '/tmp/x'")

    with pytest.raises(QueryError, match="quoted string"):
        await asyncio.to_thread(ask)
    assert not (tmp_path / "pq").exists()
