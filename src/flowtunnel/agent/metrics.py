"""The agent's optional Prometheus endpoint (``--metrics-listen HOST:PORT``): ``GET /metrics``.

Values come from the status snapshot the agent writes every ``status_interval`` (so a scrape never touches the
spool's lock): backlog (datagrams, bytes, age of the oldest), drops by cause, datagrams received, upload
bytes on the wire and their rate, the acknowledged sequence, the gateway in use and the moves between
gateways, and ``flowtunnel_build_info``. Its own registry,
so several agents can run in one test process.

Resource handling: one aiohttp server bound from ``start`` until ``close``; a listen address that cannot be
bound raises ``ConfigError`` naming it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from flowtunnel.buildinfo import register_build_info
from flowtunnel.errors import ConfigError

__all__ = ["AgentMetricsServer", "StatusCollector"]

log = logging.getLogger("flowtunnel.agent")

_P = "flowtunnel_agent_"


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class StatusCollector(Collector):
    """Prometheus metrics from the agent's status document (``AgentService.status``)."""

    def __init__(self, snapshot: Callable[[], Mapping[str, Any] | None]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        doc = self._snapshot()
        if not doc:
            return
        agent = str(doc.get("agent_id", ""))
        backlog = doc.get("backlog") or {}
        yield from self._gauge("backlog_datagrams", "Datagrams spooled, not yet acknowledged by the gateway",
                               agent, backlog.get("datagrams"))
        yield from self._gauge("backlog_bytes", "Bytes of spooled datagrams not yet acknowledged", agent,
                               backlog.get("bytes"))
        oldest = _num(backlog.get("oldest_received"))
        age = max(0.0, time.time() - oldest) if oldest is not None else 0.0
        yield from self._gauge("backlog_oldest_age_seconds", "Age of the oldest spooled datagram (0: none)",
                               agent, age)
        drops = CounterMetricFamily(_P + "dropped_datagrams", "Datagrams the agent dropped, by cause",
                                    labels=["agent", "cause"])
        for cause, n in sorted((doc.get("drops") or {}).items()):
            if _num(n) is not None:
                drops.add_metric([agent, str(cause)], float(n))
        yield drops
        received = doc.get("received") or {}
        yield from self._counter("received_datagrams", "Datagrams received from exporters", agent,
                                 received.get("datagrams"))
        yield from self._counter("received_bytes", "Datagram bytes received from exporters", agent,
                                 received.get("bytes"))
        upload = doc.get("upload") or {}
        yield from self._counter("upload_wire_bytes", "Request body bytes put on the wire to the gateway, "
                                 "failed attempts included", agent, upload.get("sent_bytes"))
        yield from self._counter("upload_datagrams", "Datagrams the gateway acknowledged since start", agent,
                                 upload.get("datagrams"))
        yield from self._gauge("upload_rate_bytes_per_second", "Upload rate over the last status interval",
                               agent, (doc.get("rates") or {}).get("bytes_out_per_s"))
        yield from self._gauge("acked_seq", "Highest sequence number the gateway acknowledged", agent,
                               doc.get("gateway_acked"))
        yield from self._gauge("last_upload_timestamp_seconds", "Unix time of the last acknowledged upload",
                               agent, upload.get("last_success"))
        rungs = upload.get("rungs")
        if isinstance(rungs, dict):
            rung = GaugeMetricFamily(_P + "upload_rung", "The transport rung in use (1) and the others (0)",
                                     labels=["agent", "rung"])
            for name in rungs:
                rung.add_metric([agent, str(name)], 1.0 if name == upload.get("rung") else 0.0)
            yield rung
        for_bytes = upload.get("rung_for_bytes")
        if isinstance(for_bytes, bool):
            yield from self._gauge("upload_rung_for_bytes", "1 when the rung in use was chosen for fewer "
                                   "bytes per batch (ws once post worked), 0 when for reaching the gateway",
                                   agent, float(for_bytes))
        gateways = upload.get("gateways")
        if isinstance(gateways, dict):
            gateway = GaugeMetricFamily(_P + "gateway", "The gateway in use (1) and the other gateways "
                                        "listed (0), by URL", labels=["agent", "url"])
            for url in gateways:
                gateway.add_metric([agent, str(url)], 1.0 if url == upload.get("gateway") else 0.0)
            yield gateway
        yield from self._counter("gateway_moves", "Moves from one gateway to another since start (failover)",
                                 agent, upload.get("gateway_moves"))
        yield from self._counter("upload_rung_switches", "Switches between transport rungs since start",
                                 agent, upload.get("switches"))
        yield from self._counter("upload_oversize_datagrams", "Datagrams too large for the path's body limit "
                                 "even alone (kept in the spool)", agent, upload.get("oversize"))

    @staticmethod
    def _gauge(name: str, text: str, agent: str, value: object) -> Iterator[Metric]:
        v = _num(value)
        if v is not None:
            g = GaugeMetricFamily(_P + name, text, labels=["agent"])
            g.add_metric([agent], v)
            yield g

    @staticmethod
    def _counter(name: str, text: str, agent: str, value: object) -> Iterator[Metric]:
        v = _num(value)
        if v is not None:
            c = CounterMetricFamily(_P + name, text, labels=["agent"])
            c.add_metric([agent], v)
            yield c


class AgentMetricsServer:
    """``GET /metrics`` on ``host:port`` (port 0 picks a free one; ``url`` says which)."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], Mapping[str, Any] | None]) -> None:
        self.host, self.port = host, port
        self.registry = CollectorRegistry(auto_describe=False)
        register_build_info(self.registry, component="agent")
        self.registry.register(StatusCollector(snapshot))
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            reason = str(exc.strerror or exc).rsplit(": ", 1)[-1]
            shown = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
            raise ConfigError(f"cannot listen on metrics address {shown}: {reason}") from None
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"
        log.info("metrics on %s/metrics", self.url)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
