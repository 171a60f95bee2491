"""Record keys for comparing flowtunnel's decoding with tshark's: what both must agree on, per record."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

from flowtunnel.cli.decode import DecodeSummary, decode_capture

FlowKey = tuple[Any, ...]


def ours(pcap: Path, *, ports: list[int] | None = None) -> tuple[list[dict[str, Any]], DecodeSummary]:
    """``flowtunnel decode`` (JSON) of ``pcap``: the flow records and the run's summary."""
    out = io.StringIO()
    summary = decode_capture(pcap, out, ports=ports)
    return [json.loads(line) for line in out.getvalue().splitlines()], summary


def our_key(rec: dict[str, Any]) -> FlowKey:
    exporter = rec["_exporter"]
    host = exporter[1 : exporter.index("]")] if exporter.startswith("[") else exporter.rpartition(":")[0]
    return (
        host,
        rec.get("sourceIPv4Address"),
        rec.get("destinationIPv4Address"),
        rec.get("sourceIPv6Address"),
        rec.get("destinationIPv6Address"),
        rec.get("sourceTransportPort"),
        rec.get("destinationTransportPort"),
        rec.get("protocolIdentifier"),
        rec.get("octetDeltaCount"),
        rec.get("packetDeltaCount"),
    )


def tshark_key(rec: dict[str, Any]) -> FlowKey:
    return (
        rec["exporter"],
        rec["src4"],
        rec["dst4"],
        rec["src6"],
        rec["dst6"],
        rec["sport"],
        rec["dport"],
        rec["proto"],
        rec["octets"],
        rec["packets"],
    )


def multiset_diff(a: Counter[FlowKey], b: Counter[FlowKey], limit: int = 5) -> str:
    """A short account of how two multisets of record keys differ, for assertion messages."""
    only_a = list((a - b).elements())
    only_b = list((b - a).elements())
    return (
        f"{len(only_a)} only in ours, e.g. {only_a[:limit]}; "
        f"{len(only_b)} only in tshark's, e.g. {only_b[:limit]}"
    )
