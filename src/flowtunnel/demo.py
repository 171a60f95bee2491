"""``flowtunnel demo``: the whole data path on loopback, in one process, with a bundled capture.

A gateway (store + udp-forward to a stand-in collector) and an agent run as asyncio services in a temporary
directory; a byte-counting TCP relay sits between them so the HTTP bytes (both directions, headers included)
can be compared with the raw UDP bytes of the capture. The capture's datagrams are replayed to the agent from
one socket per exporter, then the demo waits until the store and the collector have everything and reports
what arrived. Needs nothing but the installed package: the capture is package data, the collector is a
socket that decodes what it receives with flowtunnel's own codec.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from flowtunnel.capture import find_netflow, read_udp
from flowtunnel.netflow import Decoder, ProtocolError
from flowtunnel.runtime import TaskSet
from flowtunnel.store.query import open_query, top_sql

__all__ = ["DemoConfig", "DemoResult", "Stage", "bundled_capture", "run_demo"]

log = logging.getLogger("flowtunnel.demo")

AGENT_ID = "demo-site"
# Linux's default net.core.rmem_max: enough at demo rates, and asking more only earns a warning.
DEMO_RCVBUF = 212_992
COLLECTOR_RCVBUF = 16 << 20
IP_UDP_OVERHEAD = 28  # IPv4 + UDP headers: what each datagram costs on the wire beyond its payload


def bundled_capture() -> Path:
    """The capture shipped with the package (made by ``tools/make_demo_capture.py``)."""
    return Path(str(resources.files("flowtunnel").joinpath("data/demo.pcap")))


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoConfig:
    """What to replay and how fast; ``keep`` keeps the working directory (gateway data, agent spool)."""

    capture: Path | None = None
    rate: float = 200.0
    timeout: float = 120.0
    keep: Path | None = None

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError(f"demo rate {self.rate} datagrams/s must be > 0")
        if self.timeout <= 0:
            raise ValueError(f"demo timeout {self.timeout} s must be > 0")


@dataclass(slots=True, kw_only=True)
class DemoResult:
    """What the demo measured. ``top`` rows are (src_addr, bytes, packets, flows, pct_bytes)."""

    datagrams_sent: int = 0
    records_sent: int = 0
    records_by_version: dict[int, int] = field(default_factory=dict)
    records_stored: int = 0
    records_forwarded: int = 0
    datagrams_forwarded: int = 0
    raw_udp_bytes: int = 0
    http_bytes_up: int = 0
    http_bytes_down: int = 0
    compression_ratio: float | None = None
    exporters: list[list[object]] = field(default_factory=list)
    top: list[list[object]] = field(default_factory=list)
    sequence_lost: int = 0
    transit_lost: int = 0
    seconds: float = 0.0
    workdir: Path | None = None

    @property
    def http_bytes(self) -> int:
        return self.http_bytes_up + self.http_bytes_down

    @property
    def ok(self) -> bool:
        return self.records_sent == self.records_stored == self.records_forwarded and self.transit_lost == 0


@dataclass(frozen=True, slots=True)
class Stage:
    """A progress report: ``name`` advanced to ``done`` of ``total``."""

    name: str
    done: int
    total: int


Report = Callable[[Stage], None]


class _Collector(asyncio.DatagramProtocol):
    """The stand-in for nfcapd: keeps every datagram the gateway forwards."""

    def __init__(self) -> None:
        self.datagrams: list[tuple[bytes, str]] = []

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.datagrams.append((data, str(addr[0])))


class _Relay:
    """A TCP relay counting the bytes that cross it each way (agent → gateway is "up")."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.up = 0
        self.down = 0
        self._server: asyncio.Server | None = None
        self._tasks = TaskSet()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._tasks.spawn(self._pipe(up_reader, writer, up=False), name="demo-relay-down")
        await self._pipe(reader, up_writer, up=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool) -> None:
        try:
            while data := await reader.read(65536):
                if up:
                    self.up += len(data)
                else:
                    self.down += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._tasks.close()
            await self._server.wait_closed()


def _load_capture(path: Path) -> list[tuple[bytes, str]]:
    return [(n.datagram.payload, n.datagram.src) for n in find_netflow(read_udp(path))]


def _count_records(datagrams: list[tuple[bytes, str]]) -> tuple[int, dict[int, int]]:
    decoder = Decoder()
    total = 0
    by_version: Counter[int] = Counter()
    for payload, exporter in datagrams:
        try:
            msg = decoder.decode(payload, exporter)
        except ProtocolError:
            continue
        total += len(msg.records)
        by_version[msg.version] += len(msg.records)
    return total, dict(by_version)


def _sender(exporter: str) -> socket.socket:
    """A UDP socket standing in for ``exporter``: 127.0.0.N for 192.0.2.N where loopback allows."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    last = exporter.rsplit(".", 1)[-1] if "." in exporter else "1"
    try:
        sock.bind((f"127.0.0.{last}", 0))
    except OSError:
        sock.bind(("127.0.0.1", 0))  # a loopback with only 127.0.0.1 (not Linux)
    return sock


async def _wait(what: str, done: Callable[[], int], total: int, report: Report) -> None:
    while True:
        n = done()
        report(Stage(what, min(n, total), total))
        if n >= total:
            return
        await asyncio.sleep(0.05)


async def run_demo(config: DemoConfig, report: Report) -> DemoResult:
    """Run the demo; ``report`` gets progress. Raises ``TimeoutError`` if the data does not arrive in time."""
    capture = config.capture or bundled_capture()
    datagrams = await asyncio.to_thread(_load_capture, capture)
    result = DemoResult(datagrams_sent=len(datagrams))
    result.records_sent, result.records_by_version = await asyncio.to_thread(_count_records, datagrams)
    result.raw_udp_bytes = sum(len(p) + IP_UDP_OVERHEAD for p, _ in datagrams)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if config.keep is not None:
            workdir = config.keep
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flowtunnel-demo-")))
        result.workdir = workdir
        async with asyncio.timeout(config.timeout):
            await _run(workdir, datagrams, result, config, report)
    result.seconds = time.monotonic() - started
    return result


async def _run(
    workdir: Path, datagrams: list[tuple[bytes, str]], result: DemoResult, config: DemoConfig, report: Report
) -> None:
    # Imported here: the demo is the only command that needs both services in one process.
    from flowtunnel.agent.config import AgentConfig
    from flowtunnel.agent.service import AgentService
    from flowtunnel.gateway.config import GatewayConfig
    from flowtunnel.gateway.registry import Registry
    from flowtunnel.gateway.service import Gateway
    from flowtunnel.wire.keys import format_key

    loop = asyncio.get_running_loop()
    # The collector shares the event loop with the gateway, which forwards a whole batch before yielding:
    # a receive buffer as large as nfcapd's keeps the burst in the kernel instead of dropping it.
    csock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    csock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, COLLECTOR_RCVBUF)
    csock.bind(("127.0.0.1", 0))
    transport, collector = await loop.create_datagram_endpoint(_Collector, sock=csock)
    cport = transport.get_extra_info("sockname")[1]
    data = workdir / "gateway"
    data.mkdir(parents=True, exist_ok=True)
    with Registry(data) as registry:
        key = registry.enroll(AGENT_ID).key
    gateway = Gateway(GatewayConfig(
        listen="127.0.0.1:0", data=data, forward=(f"udp://127.0.0.1:{cport}",), status_interval=0.5,
        registry_ttl=0.5,
    ))
    relay: _Relay | None = None
    agent: AgentService | None = None
    senders: dict[str, socket.socket] = {}
    try:
        await gateway.start()
        host, port = gateway.config.listen_host_port[0], int(gateway.url.rsplit(":", 1)[1])
        relay = _Relay((host, port))
        relay_url = await relay.start()
        agent = AgentService(
            AgentConfig(gateway=relay_url, listen=("udp://127.0.0.1:0",), spool=workdir / "agent",
                        agent_id=AGENT_ID, key=format_key(key), latency=0.5, status_interval=0.5,
                        rcvbuf=DEMO_RCVBUF),
            key=key,
        )
        await agent.start()
        agent_port = agent.receiver.bound[0][1]
        total = len(datagrams)
        gap = 1.0 / config.rate
        for i, (payload, exporter) in enumerate(datagrams):
            sock = senders.get(exporter)
            if sock is None:
                sock = senders[exporter] = _sender(exporter)
            sock.sendto(payload, ("127.0.0.1", agent_port))
            report(Stage("replay", i + 1, total))
            await asyncio.sleep(gap)
        running_agent = agent
        await _wait("upload", lambda: int(running_agent.uploader.stats.gateway_acked or 0), total, report)
        journal = gateway.journal
        assert journal is not None
        store = next(s for s in gateway.sinks if s.name == "store")
        forward = next(s for s in gateway.sinks if s.name != "store")
        last = journal.last_seq()
        await _wait("store", lambda: _cursor(store.status()), last, report)
        await _wait("forward", lambda: _cursor(forward.status()), last, report)
        # The forward sink has sent everything; give loopback UDP a moment to deliver the last datagrams.
        await asyncio.sleep(0.2)
        result.datagrams_forwarded = len(collector.datagrams)
        result.records_forwarded, _ = await asyncio.to_thread(_count_records, list(collector.datagrams))
        await asyncio.to_thread(_query_store, data, result)
        status = store.status()
        result.sequence_lost = sum(int(e["sequence_lost"]) for e in _items(status, "exporters"))
        result.transit_lost = sum(int(a["transit_lost"]) for a in _items(status, "agents"))
        up = agent.uploader.status()
        ratio = up.get("compression_ratio")
        result.compression_ratio = float(ratio) if isinstance(ratio, int | float) else None
    finally:
        for sock in senders.values():
            sock.close()
        if agent is not None:
            await agent.shutdown()
        if relay is not None:
            result.http_bytes_up, result.http_bytes_down = relay.up, relay.down
        await gateway.stop()
        if relay is not None:
            await relay.close()
        transport.close()


def _cursor(status: dict[str, object]) -> int:
    cursor = status.get("cursor")
    return cursor if isinstance(cursor, int) else 0


def _items(status: dict[str, object], key: str) -> list[dict[str, Any]]:
    items = status.get(key)
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _query_store(data: Path, result: DemoResult) -> None:
    with open_query(data, "SELECT count(*) FROM flows") as res:
        result.records_stored = int(str(next(res.rows)[0]))
    with open_query(
        data,
        "SELECT exporter, version, count(*) AS flows, sum(bytes) AS bytes FROM flows GROUP BY ALL ORDER BY 1",
    ) as res:
        result.exporters = list(res.rows)
    sql, params = top_sql(by="src_addr", limit=5, now=dt.datetime.now(dt.UTC))
    with open_query(data, sql, params) as res:
        result.top = list(res.rows)
