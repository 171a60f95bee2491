"""The store's Prometheus collector: per-exporter loss and decode errors, transit loss per agent."""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from flowtunnel.datagram import Datagram
from flowtunnel.netflow import FieldSpec, Template, encode_v9
from flowtunnel.store import StoreCollector, StoreSink
from tests.store._support import fill_journal, run_sink_until

_T = Template(256, (FieldSpec(8, 4), FieldSpec(12, 4), FieldSpec(1, 8), FieldSpec(2, 8)))


def _dg(seq: int, payload: bytes | None = None) -> Datagram:
    body = payload if payload is not None else encode_v9(
        templates=[_T], data=[(_T, [{"sourceIPv4Address": "10.0.0.1", "destinationIPv4Address": "10.0.0.2",
                                     "octetDeltaCount": 10, "packetDeltaCount": 1}])],
        sys_uptime_ms=1000 + seq, unix_secs=1_790_000_000, sequence=seq,
    )
    return Datagram(received_ns=time.time_ns(), exporter="192.0.2.1", exporter_port=9995, local_port=2055,
                    payload=body)


async def test_metrics_show_rows_loss_and_errors(tmp_path: Path) -> None:
    journal = fill_journal(tmp_path / "journal.sqlite", [_dg(0), _dg(1), _dg(7), _dg(8, b"junk")])
    journal.append([_dg(9)], stream="site-a", stream_seqs=[10])  # agent seqs 5..9 never arrived
    sink = StoreSink(data_dir=tmp_path / "data")
    await run_sink_until(sink, journal)
    journal.close()
    registry = CollectorRegistry()
    registry.register(StoreCollector(sink))
    text = generate_latest(registry).decode()
    labels = 'agent="site-a",exporter="192.0.2.1"'
    assert f"flowtunnel_store_records_total{{{labels}}} 4.0" in text
    assert f"flowtunnel_store_undecodable_datagrams_total{{{labels}}} 1.0" in text
    # v9 packets 2..6 never came; 8 came as junk, which the sequence numbers cannot tell from a loss.
    assert f"flowtunnel_exporter_sequence_lost_total{{{labels}}} 6.0" in text
    assert 'flowtunnel_transit_lost_total{agent="site-a"} 5.0' in text
    assert "flowtunnel_store_rows 4.0" in text
    assert "flowtunnel_store_lag 0.0" in text
