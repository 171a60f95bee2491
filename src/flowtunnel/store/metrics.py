"""Prometheus view of the store sink: rows, decode problems and loss per exporter, transit loss per agent.

A custom collector reading ``StoreSink.status()`` at scrape time, so the numbers in ``/metrics`` and in
``status.json`` are the same ones. The gateway registers it in its own registry:
``registry.register(StoreCollector(sink))``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from flowtunnel.store.sink import StoreSink

__all__ = ["StoreCollector"]

# (status key, metric name, help). Counters per (agent, exporter).
_EXPORTER_COUNTERS = (
    ("datagrams", "flowtunnel_store_datagrams", "Datagrams the store sink decoded or tried to"),
    ("records", "flowtunnel_store_records", "Flow records stored"),
    ("undecodable", "flowtunnel_store_undecodable_datagrams", "Datagrams whose header could not be decoded"),
    ("set_errors", "flowtunnel_store_set_errors", "Sets skipped as malformed or without a template"),
    ("no_template_sets", "flowtunnel_store_no_template_sets", "Data sets that arrived before their template"),
    ("sequence_lost", "flowtunnel_exporter_sequence_lost",
     "Units (v5 flows, v9 packets, IPFIX records) lost between exporter and agent, by sequence numbers"),
    ("sequence_resets", "flowtunnel_exporter_sequence_resets", "Exporter sequence restarts"),
)


class StoreCollector(Collector):
    """Collects the store sink's figures at scrape time."""

    def __init__(self, sink: StoreSink) -> None:
        self._sink = sink

    def collect(self) -> Iterator[Metric]:
        status: dict[str, Any] = self._sink.status()
        exporters: list[dict[str, Any]] = list(status.get("exporters", []))
        for key, name, text in _EXPORTER_COUNTERS:
            family = CounterMetricFamily(name, text, labels=["agent", "exporter"])
            for exp in exporters:
                family.add_metric([exp["agent"], exp["exporter"]], float(exp[key]))
            yield family
        transit = CounterMetricFamily(
            "flowtunnel_transit_lost",
            "Agent datagram sequence numbers that never reached the store (zero by design; non-zero only "
            "when the agent's spool quota dropped datagrams)",
            labels=["agent"],
        )
        for agent in status.get("agents", []):
            transit.add_metric([agent["agent"]], float(agent["transit_lost"]))
        yield transit
        yield GaugeMetricFamily(
            "flowtunnel_store_rows", "Rows in the flows table", value=float(status["rows"])
        )
        yield GaugeMetricFamily(
            "flowtunnel_store_lag", "Journal entries not yet in the store", value=float(status["lag"])
        )
        yield CounterMetricFamily(
            "flowtunnel_store_retention_dropped", "Flows dropped by retention",
            value=float(status["retention_dropped"]),
        )
