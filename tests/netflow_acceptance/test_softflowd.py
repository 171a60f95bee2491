"""Acceptance: softflowd's own exports (v5, v9, IPFIX, bidirectional IPFIX) decode to what it sent.

A generated trace (TCP/UDP/ICMP over IPv4 and IPv6) goes through ``softflowd -r``; the datagrams it sends are
captured on loopback and written to a pcap. Our records must number exactly what softflowd says it exported
and equal tshark's decoding of the same pcap, record by record (as multisets).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.netflow_acceptance._compare import multiset_diff, our_key, ours, tshark_key
from tests.peers import TraceSummary, capture_softflowd, require, tshark_records, write_pcap

REVERSE_OCTETS = ("reverseOctetDeltaCount", "29305.1")  # RFC 5103 reverse IE, by IANA name or PEN.id
REVERSE_PACKETS = ("reversePacketDeltaCount", "29305.2")


def _reverse(rec: dict[str, Any], keys: tuple[str, str]) -> int | None:
    for key in keys:
        value = rec.get(key)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            return int(value, 16)
    return None


@pytest.mark.parametrize(
    ("version", "extra"),
    [(5, ()), (9, ()), (10, ()), (10, ("-b",))],
    ids=["v5", "v9", "ipfix", "ipfix-biflow"],
)
def test_softflowd_export_decodes_like_tshark(
    tmp_path: Path, trace: TraceSummary, version: int, extra: tuple[str, ...]
) -> None:
    require("softflowd", "tshark")
    export = capture_softflowd(trace.path, version, extra)
    pcap = tmp_path / "export.pcap"
    write_pcap(export.datagrams, pcap, dst_port=2055)

    records, summary = ours(pcap)
    theirs = tshark_records(pcap, ports=(2055,))

    assert summary.records == len(records) == export.stats.records
    assert (summary.undecodable, summary.set_errors, summary.no_template) == (0, 0, 0)
    assert summary.sequence_lost == 0
    assert {r["_version"] for r in records} == {version}
    ours_set, theirs_set = Counter(map(our_key, records)), Counter(map(tshark_key, theirs))
    assert ours_set == theirs_set, multiset_diff(ours_set, theirs_set)
    # Every kind of flow made it: TCP, UDP, ICMP, and IPv6 where the version carries it.
    assert {r["protocolIdentifier"] for r in records} >= {1, 6, 17}
    if version != 5:
        assert any("sourceIPv6Address" in r for r in records)
    if extra:
        reverse = Counter((_reverse(r, REVERSE_OCTETS), _reverse(r, REVERSE_PACKETS)) for r in records)
        expected = Counter((r["reverse_octets"], r["reverse_packets"]) for r in theirs)
        assert reverse == expected
