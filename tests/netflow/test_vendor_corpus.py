"""Real Cisco v9/IPFIX captures (tests/data/vendor): template, options template, flow and options record
counts must match the corpus README (tshark's and an independent walker's counts), with no errors."""

from __future__ import annotations

import socket
from pathlib import Path

import dpkt
import pytest

from flowtunnel.netflow import Decoder, Message, sniff
from tests.corpus import VENDOR

CORPUS = VENDOR

# file: (datagrams, templates, options templates, flow records, options records) from the README table.
EXPECTED = {
    "cisco-nfv9-t313.pcap": (40, 1, 0, 51, 0),
    "cisco-nfv9-t313-short.pcap": (11, 1, 0, 11, 0),
    "cisco-nfv9-t260-t313.pcap": (25, 4, 0, 35, 0),
    "cisco-ipfix-t260-t263.pcap": (6, 2, 0, 12, 0),
    "cisco-ipfix-v6-sampling-opt.pcap": (5, 4, 1, 3, 1),
    "cisco-ipfix-v6-mix.pcap": (11, 5, 0, 13, 0),
    "cisco-ipfix-srv6-bmp-a.pcap": (583, 294, 104, 657, 338),
    "cisco-ipfix-srv6-bmp-b.pcap": (277, 26, 104, 109, 338),
    "cisco-ipfix-mpls-v6-bmp-a.pcap": (596, 297, 108, 748, 351),
    "cisco-ipfix-mpls-v6-bmp-b.pcap": (622, 305, 108, 716, 351),
    "cisco-ipfix-srv6-bgp.pcap": (40, 6, 4, 43, 10),
    "cisco-ipfix-mpls-v6-bgp.pcap": (66, 33, 12, 74, 39),
    "cisco-ipfix-srv6-v6-bgp-lcomms.pcap": (64, 33, 12, 75, 39),
}

def export_datagrams(path: Path) -> list[tuple[bytes, str]]:
    """UDP payloads to the export ports 9991/9992, with the sender as "ip:port" / "[ip]:port"."""
    out: list[tuple[bytes, str]] = []
    with path.open("rb") as f:
        for _, frame in dpkt.pcap.Reader(f):
            ip = dpkt.ethernet.Ethernet(frame).data
            udp = ip.data
            if not isinstance(udp, dpkt.udp.UDP) or udp.dport not in (9991, 9992):
                continue
            if isinstance(ip, dpkt.ip6.IP6):
                sender = f"[{socket.inet_ntop(socket.AF_INET6, ip.src)}]:{udp.sport}"
            else:
                sender = f"{socket.inet_ntoa(ip.src)}:{udp.sport}"
            out.append((bytes(udp.data), sender))
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_vendor_capture_counts_match_readme(name: str) -> None:
    datagrams = export_datagrams(CORPUS / name)
    dec = Decoder()
    messages: list[Message] = [dec.decode(data, sender) for data, sender in datagrams]
    n_dgrams, n_templates, n_options_templates, n_records, n_options_records = EXPECTED[name]
    assert len(messages) == n_dgrams
    assert all(sniff(data) in (9, 10) for data, _ in datagrams)
    assert sum(1 for m in messages for t in m.templates if not t.options) == n_templates
    assert sum(1 for m in messages for t in m.templates if t.options) == n_options_templates
    assert sum(len(m.records) for m in messages) == n_records
    assert sum(len(m.options_records) for m in messages) == n_options_records
    assert [e for m in messages for e in m.errors] == []
    assert sum(m.held for m in messages) == 0  # every template arrives before its data in file order


def test_vendor_records_carry_typed_values() -> None:
    dec = Decoder()
    records = [r for data, sender in export_datagrams(CORPUS / "cisco-nfv9-t260-t313.pcap")
               for r in dec.decode(data, sender).records]  # fmt: skip
    assert {r.domain for r in records} == {2081, 2193}
    for rec in records:
        assert isinstance(rec["octetDeltaCount"], int)
        assert isinstance(rec["packetDeltaCount"], int)
        addr = rec.get("sourceIPv4Address", rec.get("sourceIPv6Address"))
        assert isinstance(addr, str)
        assert ":" in addr or addr.count(".") == 3
        # v9 sysUpTime-relative times are resolved against the header clock.
        start = rec["flowStartMilliseconds"]
        assert isinstance(start, int)
        assert 1_500_000_000_000 < start < 2_000_000_000_000


def test_scope_port_true_still_decodes_corpus_with_stable_ports() -> None:
    """The corpus exporters keep their source port, so RFC 7011 scoping (with port) decodes everything too."""
    from flowtunnel.netflow import DecoderConfig

    dec = Decoder(DecoderConfig(scope_port=True))
    datagrams = export_datagrams(CORPUS / "cisco-ipfix-mpls-v6-bgp.pcap")
    messages = [dec.decode(data, sender) for data, sender in datagrams]
    assert sum(len(m.records) for m in messages) == 74
    assert all(":" in key for key, _ in dec.sequence_stats())
