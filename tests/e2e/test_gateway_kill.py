"""The ``flowtunnel gateway`` process killed with SIGKILL mid-stream, while a client (standing in for the
agent) retries every batch until it is acknowledged: the journal ends with every datagram exactly once, in
order. Also: SIGTERM stops it cleanly, and bad configuration fails fast with one line."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from flowtunnel.cli import main
from flowtunnel.datagram import Datagram
from flowtunnel.gateway import Registry
from flowtunnel.netflow import encode_v5
from flowtunnel.wire import parse_key
from tests.conftest import require
from tests.gateway.util import BATCH_CONTENT_TYPE, enroll, journal_entries, seal
from tests.peers import Nfcapd, free_tcp_port

AGENT = "field-1"
PER_BATCH = 25
BATCHES = 40


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flowtunnel", *args], capture_output=True, text=True, timeout=60, check=False
    )


class GatewayProcess:
    """``flowtunnel gateway`` as a child process; ``start`` waits for its "listening on" line."""

    def __init__(self, data: Path, port: int, *extra: str) -> None:
        self.data = data
        self.port = port
        self.extra = extra
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_path(self, n: int) -> Path:
        return self.data.parent / f"gateway-{n}.log"

    def stdout_path(self, n: int) -> Path:
        return self.data.parent / f"gateway-{n}.out"

    async def start(self) -> None:
        self.starts += 1
        log = self.log_path(self.starts).open("wb")
        out = self.stdout_path(self.starts).open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "flowtunnel",
            "gateway",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--data",
            str(self.data),
            "--no-store",
            "--status-interval",
            "0.2",
            *self.extra,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=log,
        )
        log.close()
        out.close()
        async with asyncio.timeout(30):
            while b"listening on" not in self.log_path(self.starts).read_bytes():
                if self.proc.returncode is not None:
                    raise RuntimeError(self.log_path(self.starts).read_text())
                await asyncio.sleep(0.02)

    async def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await self.proc.wait()


def _batch(i: int) -> list[Datagram]:
    first = i * PER_BATCH
    return [
        Datagram(
            received_ns=1_000 + n,
            exporter="127.0.0.1",
            exporter_port=40000,
            local_port=2055,
            payload=f"datagram {n}".encode() * 3,
        )
        for n in range(first, first + PER_BATCH)
    ]


async def _send_until_acked(session: aiohttp.ClientSession, gw: GatewayProcess, key: bytes, i: int) -> None:
    doc = await _send(session, gw, seal(AGENT, key, i * PER_BATCH + 1, _batch(i)))
    assert doc["acked"] == (i + 1) * PER_BATCH


async def _send(session: aiohttp.ClientSession, gw: GatewayProcess, body: bytes) -> dict[str, Any]:
    headers = {"Content-Type": BATCH_CONTENT_TYPE, "X-Flowtunnel-Agent": AGENT}
    while True:
        try:
            async with session.post(gw.url + "/v1/batches", data=body, headers=headers) as resp:
                if resp.status == 200:
                    doc: dict[str, Any] = await resp.json()
                    return doc
                assert resp.status == 503, await resp.text()
        except (aiohttp.ClientError, ConnectionError):
            pass
        await asyncio.sleep(0.05)


async def test_kill_9_mid_stream_loses_and_doubles_nothing(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    enrolled = _cli("enroll", AGENT, "--data", str(data), "--format", "json")
    assert enrolled.returncode == 0, enrolled.stderr
    doc = json.loads(enrolled.stdout)
    key = parse_key(doc["key"])
    gw = GatewayProcess(data, free_tcp_port())
    await gw.start()
    rng = random.Random(20261126)
    kills = 0
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for i in range(BATCHES):
                if i in (8, 19, 31):
                    # Kill while this batch is in flight: before, during or after its commit.
                    sender = asyncio.ensure_future(_send_until_acked(session, gw, key, i))
                    await asyncio.sleep(rng.uniform(0.0, 0.03))
                    assert await gw.kill() == -signal.SIGKILL
                    kills += 1
                    await gw.start()
                    await sender
                else:
                    await _send_until_acked(session, gw, key, i)
    finally:
        await gw.kill()
    assert kills == 3
    entries = journal_entries(data)
    assert [e.stream_seq for e in entries] == list(range(1, BATCHES * PER_BATCH + 1))
    assert [e.datagram for e in entries] == [d for i in range(BATCHES) for d in _batch(i)]
    assert all(e.stream == AGENT for e in entries)


async def test_sigterm_stops_cleanly_and_leaves_a_status_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "gw"
    assert main(["enroll", AGENT, "--data", str(data), "--format", "json"]) == 0
    key = parse_key(json.loads(capsys.readouterr().out)["key"])
    gw = GatewayProcess(data, free_tcp_port(), "--jsonl", "-")
    await gw.start()
    v5 = encode_v5(
        [
            {
                "sourceIPv4Address": "10.0.0.1",
                "destinationIPv4Address": "10.0.0.2",
                "octetDeltaCount": 1234,
                "packetDeltaCount": 2,
            }
        ],
        sys_uptime_ms=1000,
        unix_secs=1_700_000_000,
    )
    dgram = Datagram(received_ns=1, exporter="127.0.0.1", exporter_port=9, local_port=2055, payload=v5)
    async with aiohttp.ClientSession() as session:
        await _send(session, gw, seal(AGENT, key, 1, [dgram]))
    async with asyncio.timeout(20):
        while not gw.stdout_path(1).read_bytes().endswith(b"\n"):  # noqa: ASYNC110 - another process
            await asyncio.sleep(0.02)
    assert await gw.kill(signal.SIGTERM) == 0
    (record,) = [json.loads(line) for line in gw.stdout_path(1).read_text().splitlines()]
    assert (record["sourceIPv4Address"], record["octetDeltaCount"], record["_agent"]) == (
        "10.0.0.1",
        1234,
        AGENT,
    )
    log = gw.log_path(1).read_text()
    assert "stopped" in log
    assert "Traceback" not in log
    status = json.loads((data / "status.json").read_text())
    assert status["kind"] == "gateway"
    assert AGENT in status["agents"]
    assert main(["status", "--data", str(data)]) == 0
    assert AGENT in capsys.readouterr().out


def test_bad_configuration_fails_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["gateway", "--data", str(tmp_path), "--forward", "tcp://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0
    assert "forward target 'tcp://127.0.0.1:9' is not udp://HOST:PORT" in err
    assert main(["gateway", "--listen", "127.0.0.1:1"]) == 2
    assert "data directory is required" in capsys.readouterr().err
    monkeypatch.setenv("FLOWTUNNEL_GATEWAY_MAX_BODY", "lots")
    assert main(["gateway", "--data", str(tmp_path)]) == 2
    assert "FLOWTUNNEL_GATEWAY_MAX_BODY" in capsys.readouterr().err


async def _forwarded_all(session: aiohttp.ClientSession, gw: GatewayProcess) -> bool:
    try:
        async with session.get(gw.url + "/v1/status") as resp:
            return bool((await resp.json())["sinks"]["udp-forward"]["lag"] == 0)
    except (aiohttp.ClientError, ConnectionError):
        return False


async def test_kill_9_while_forwarding_to_nfcapd_delivers_every_flow_at_least_once(tmp_path: Path) -> None:
    require("nfcapd", "nfdump")
    data = tmp_path / "gw"
    assert _cli("enroll", AGENT, "--data", str(data), "--format", "json").returncode == 0
    with Registry(data) as reg:
        entry = reg.get(AGENT)
    assert entry is not None
    # 30 v5 datagrams of 10 flows, each flow unique by its source port.
    sent = [
        [
            {
                "sourceIPv4Address": "10.9.0.1",
                "destinationIPv4Address": "10.9.0.2",
                "sourceTransportPort": i * 10 + j,
                "destinationTransportPort": 53,
                "protocolIdentifier": 17,
                "octetDeltaCount": 100,
                "packetDeltaCount": 1,
            }
            for j in range(10)
        ]
        for i in range(30)
    ]
    payloads = [
        encode_v5(recs, sys_uptime_ms=1000, unix_secs=1_700_000_000, sequence=i * 10)
        for i, recs in enumerate(sent)
    ]
    dgrams = [
        Datagram(received_ns=i, exporter="127.0.0.1", exporter_port=9, local_port=2055, payload=p)
        for i, p in enumerate(payloads)
    ]
    with Nfcapd(tmp_path) as nf:
        gw = GatewayProcess(data, free_tcp_port(), "--forward", nf.url, "--max-inflight", "4")
        await gw.start()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                for i in range(0, 30, 3):
                    await _send(session, gw, seal(AGENT, entry.key, i + 1, dgrams[i : i + 3]))
                    if i == 12:
                        assert await gw.kill() == -signal.SIGKILL
                        await gw.start()
                async with asyncio.timeout(60):
                    while not await _forwarded_all(session, gw):  # noqa: ASYNC110 - polls another process
                        await asyncio.sleep(0.1)
        finally:
            assert await gw.kill(signal.SIGTERM) == 0
        records = nf.records()
    got = [r["sport"] for r in records]
    # Every flow arrived; some maybe twice: the sink's step in flight at the kill (here at most everything
    # journaled before it, 15 datagrams of 10 flows) is re-sent after the restart.
    assert set(got) == set(range(300))
    assert len(got) - 300 <= 150
    # From the same source address before and after the restart: one exporter at the collector.
    assert {r["exporter"] for r in records} == {"127.0.0.2"}


async def test_kill_9_during_group_commits_keeps_every_acknowledged_batch_once(tmp_path: Path) -> None:
    # Batches of many agents share one journal commit (group commit): every batch acknowledged before a
    # kill -9 is in the journal exactly once right after it, and after the restart every agent's seqs are
    # there once, in order.
    agents, per_batch, batches = 12, 10, 12
    data = tmp_path / "gw"
    keys = {f"site-{a}": enroll(data, f"site-{a}") for a in range(agents)}
    gw = GatewayProcess(data, free_tcp_port())
    await gw.start()
    acked: dict[str, int] = dict.fromkeys(keys, 0)

    def batch(a: int, i: int) -> list[Datagram]:
        return [Datagram(received_ns=1_000 + n, exporter="127.0.0.1", exporter_port=40000, local_port=2055,
                         payload=f"site-{a} datagram {n}".encode())
                for n in range(i * per_batch, (i + 1) * per_batch)]

    async def agent(session: aiohttp.ClientSession, a: int) -> None:
        name = f"site-{a}"
        headers = {"Content-Type": BATCH_CONTENT_TYPE, "X-Flowtunnel-Agent": name}
        for i in range(batches):
            body = seal(name, keys[name], i * per_batch + 1, batch(a, i))
            while True:
                try:
                    async with session.post(gw.url + "/v1/batches", data=body, headers=headers) as resp:
                        if resp.status == 200:
                            acked[name] = (await resp.json())["acked"]
                            break
                        assert resp.status == 503, await resp.text()
                except (aiohttp.ClientError, ConnectionError):
                    pass
                await asyncio.sleep(0.02)

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            senders = [asyncio.ensure_future(agent(session, a)) for a in range(agents)]
            async with asyncio.timeout(60):
                while sum(acked.values()) < agents * per_batch * batches // 3:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            async with session.get(gw.url + "/metrics") as resp:
                text = await resp.text()
            metrics = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                       if line.startswith("flowtunnel_gateway_journal_commit")}
            assert await gw.kill() == -signal.SIGKILL
            seen = dict(acked)  # every one of these was answered before the kill
            journaled: dict[str, list[int | None]] = {name: [] for name in keys}
            for e in journal_entries(data):
                journaled[e.stream].append(e.stream_seq)
            for name, upto in seen.items():
                assert journaled[name][:upto] == list(range(1, upto + 1)), name
                assert len(set(journaled[name])) == len(journaled[name]), name
            await gw.start()
            async with asyncio.timeout(120):
                await asyncio.gather(*senders)
    finally:
        await gw.kill()
    # The batches did share commits (batch pieces / commits: the mean group size).
    assert metrics["flowtunnel_gateway_journal_commits_total"] < metrics[
        "flowtunnel_gateway_journal_commit_batches_total"]
    entries = journal_entries(data)
    for a in range(agents):
        name = f"site-{a}"
        mine = [e for e in entries if e.stream == name]
        assert [e.stream_seq for e in mine] == list(range(1, batches * per_batch + 1))
        assert [e.datagram for e in mine] == [d for i in range(batches) for d in batch(a, i)]
