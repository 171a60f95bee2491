"""NetFlow v9 (RFC 3954): templates and options templates, FlowSet walking, held data, errors per set."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest

from flowtunnel.netflow import (
    Decoder,
    FieldSpec,
    MalformedSet,
    MalformedTemplate,
    Template,
    Truncated,
    encode_v9,
)
from flowtunnel.netflow.encoder import DataSet

FLOW_T = Template(
    256,
    (
        FieldSpec(8, 4),  # sourceIPv4Address
        FieldSpec(12, 4),  # destinationIPv4Address
        FieldSpec(1, 4),  # octetDeltaCount, reduced from 8 to 4 bytes
        FieldSpec(2, 4),  # packetDeltaCount
        FieldSpec(7, 2),
        FieldSpec(11, 2),
        FieldSpec(4, 1),
        FieldSpec(6, 1),  # tcpControlBits, reduced from 2 to 1 byte
        FieldSpec(22, 4),  # flowStartSysUpTime
        FieldSpec(21, 4),  # flowEndSysUpTime
        FieldSpec(27, 16),  # sourceIPv6Address
        FieldSpec(56, 6),  # sourceMacAddress
    ),
)
OPTIONS_T = Template(257, (FieldSpec(1, 4), FieldSpec(34, 4), FieldSpec(35, 1)), scope_count=1)
FLOW = {
    "sourceIPv4Address": "10.1.2.3",
    "destinationIPv4Address": "10.3.2.1",
    "octetDeltaCount": 4_000_000_000,
    "packetDeltaCount": 17,
    "sourceTransportPort": 40000,
    "destinationTransportPort": 53,
    "protocolIdentifier": 17,
    "tcpControlBits": 0,
    "flowStartSysUpTime": 9_000,
    "flowEndSysUpTime": 9_900,
    "sourceIPv6Address": "2001:db8::42",
    "sourceMacAddress": "02:00:5e:10:00:01",
}


def v9(
    templates: Sequence[Template] = (),
    data: Sequence[DataSet] = (),
    *,
    sequence: int = 0,
    source_id: int = 7,
    unix_secs: int = 1_700_000_000,
    count: int | None = None,
    align: int = 1,
) -> bytes:
    """A v9 datagram whose exporter clock reads 1_700_000_000 s at uptime 10 s."""
    return encode_v9(
        templates=templates, data=data, sys_uptime_ms=10_000, unix_secs=unix_secs, sequence=sequence,
        source_id=source_id, count=count, align=align,
    )  # fmt: skip


def test_v9_templates_and_data_round_trip() -> None:
    dec = Decoder()
    data = v9(
        templates=[FLOW_T, OPTIONS_T],
        data=[(FLOW_T, [FLOW, FLOW]), (OPTIONS_T, [{"scopeSystem": 1, "samplingInterval": 100}])],
        sequence=1,
    )
    msg = dec.decode(data, "192.0.2.1:1234")
    assert msg.templates == [FLOW_T, OPTIONS_T]
    assert (msg.version, msg.domain, msg.export_time, msg.sys_uptime_ms) == (9, 7, 1_700_000_000, 10_000)
    assert len(msg.records) == 2
    rec = msg.records[0]
    for key, value in FLOW.items():
        assert rec[key] == value
    assert rec["flowStartMilliseconds"] == 1_700_000_000_000 - 1_000
    assert rec["flowEndMilliseconds"] == 1_700_000_000_000 - 100
    assert (rec.template_id, rec.domain, rec.options) == (256, 7, False)
    (opt,) = msg.options_records
    assert opt.options
    assert opt.to_dict() == {"scopeSystem": 1, "samplingInterval": 100, "samplingAlgorithm": 0}
    assert dec.counters["templates"] == 1
    assert dec.counters["options_templates"] == 1


def test_v9_walks_flowsets_by_length_not_header_count() -> None:
    dec = Decoder()
    # softflowd-like: the header Count disagrees with what the datagram holds.
    for count in (0, 1, 500):
        data = v9(templates=[FLOW_T], data=[(FLOW_T, [FLOW] * 3)], count=count)
        assert len(dec.decode(data, "192.0.2.1").records) == 3


def test_v9_padding_and_reserved_flowsets_are_skipped() -> None:
    dec = Decoder()
    data = v9(templates=[FLOW_T], data=[(FLOW_T, [FLOW])], align=4)
    reserved = struct.pack("!HH", 100, 8) + b"\x00" * 4
    msg = dec.decode(data + reserved + b"\x00\x00", "192.0.2.1")  # + FlowSet 100 + 2 stray padding bytes
    assert len(msg.records) == 1
    assert msg.errors == []
    assert dec.counters["reserved_sets"] == 1


def test_v9_data_before_template_is_held_then_released() -> None:
    dec = Decoder()
    early = dec.decode(v9(data=[(FLOW_T, [FLOW] * 2)], sequence=1), "192.0.2.1:5")
    assert early.records == []
    assert early.held == 1
    assert dec.counters["sets_held"] == 1
    later = dec.decode(v9(templates=[FLOW_T], sequence=2, unix_secs=1_700_000_060), "192.0.2.1:5")
    assert len(later.records) == 2
    # Released records keep their own datagram's clock.
    assert later.records[0]["flowStartMilliseconds"] == 1_700_000_000_000 - 1_000
    assert dec.counters["held_released"] == 1


def test_v9_redefinition_replaces_layout() -> None:
    dec = Decoder()
    dec.decode(v9(templates=[FLOW_T]), "192.0.2.1")
    new = Template(256, (FieldSpec(8, 4), FieldSpec(2, 8)))
    msg = dec.decode(
        v9(templates=[new], data=[(new, [{"sourceIPv4Address": "1.1.1.1", "packetDeltaCount": 5}])]),
        "192.0.2.1",
    )
    assert msg.records[0].to_dict() == {"sourceIPv4Address": "1.1.1.1", "packetDeltaCount": 5}
    assert dec.counters["templates_redefined"] == 1
    assert [t for _, _, t in dec.templates("192.0.2.1")] == [new]


def test_v9_templates_are_scoped_by_source_id_and_exporter() -> None:
    dec = Decoder()
    dec.decode(v9(templates=[FLOW_T]), "192.0.2.1:7000")
    other_domain = v9(data=[(FLOW_T, [FLOW])], source_id=8)
    assert dec.decode(other_domain, "192.0.2.1:7000").held == 1
    assert dec.decode(v9(data=[(FLOW_T, [FLOW])]), "192.0.2.2:7000").held == 1
    # Default scope leaves the port out (nfdump-like): an exporter restarted on a new port still decodes.
    assert len(dec.decode(v9(data=[(FLOW_T, [FLOW])]), "192.0.2.1:7001").records) == 1


def test_v9_bad_template_reported_good_sets_kept() -> None:
    dec = Decoder()
    bad = Template(300, (FieldSpec(8, 3),))  # a 3-byte IPv4 address
    raw = v9(templates=[FLOW_T], data=[(FLOW_T, [FLOW])])
    bad_set = struct.pack("!HHHHHH", 0, 12, bad.template_id, 1, 8, 3)
    msg = dec.decode(raw + bad_set, "192.0.2.1")
    assert len(msg.records) == 1
    (err,) = msg.errors
    assert isinstance(err, MalformedTemplate)
    assert "sourceIPv4Address" in str(err)
    assert "exactly 4 bytes" in str(err)
    assert f"at byte {len(raw)}" in str(err)
    assert dec.counters["malformed_template"] == 1


@pytest.mark.parametrize(
    ("tail", "error", "text"),
    [
        (struct.pack("!HH", 256, 2), MalformedSet, "length 2 is below 4"),
        (struct.pack("!HH", 256, 400) + b"\x00" * 8, Truncated, "runs past the datagram end"),
        (struct.pack("!HHHH", 0, 8, 256, 9), MalformedTemplate, "needs 40 bytes"),
        (struct.pack("!HHHHH", 1, 10, 300, 4, 3) + b"\x00\x00", MalformedTemplate, "not multiples of 4"),
        (struct.pack("!HHHHH", 1, 10, 300, 0, 4) + b"\x00\x00", MalformedTemplate, "no scope field"),
        (
            struct.pack("!HHHH", 0, 8, 12, 1) + struct.pack("!HH", 8, 4),
            MalformedTemplate,
            "with 1 fields needs 8 bytes, its set has 4 left",
        ),
    ],
)
def test_v9_broken_sets_keep_earlier_records(tail: bytes, error: type[Exception], text: str) -> None:
    dec = Decoder()
    raw = v9(templates=[FLOW_T], data=[(FLOW_T, [FLOW])])
    msg = dec.decode(raw + tail, "192.0.2.1")
    assert len(msg.records) == 1
    assert len(msg.errors) == 1
    assert isinstance(msg.errors[0], error)
    assert text in str(msg.errors[0])


def test_v9_template_id_below_256_is_malformed() -> None:
    tail = struct.pack("!HHHHHH", 0, 12, 12, 1, 8, 4)
    msg = Decoder().decode(v9() + tail, "192.0.2.1")
    assert "template id 12 is below 256" in str(msg.errors[0])


def test_v9_encoder_rejects_enterprise_fields() -> None:
    with pytest.raises(ValueError, match="no enterprise fields"):
        v9(templates=[Template(256, (FieldSpec(1, 4, pen=9),))])


def test_v9_repeated_field_gets_numbered_key() -> None:
    t = Template(260, (FieldSpec(70, 3), FieldSpec(70, 3)))  # two MPLS labels
    data = v9(
        templates=[t],
        data=[(t, [{"mplsTopLabelStackSection": "000011", "mplsTopLabelStackSection_2": "000021"}])],
    )
    rec = Decoder().decode(data, "192.0.2.1").records[0]
    assert rec.to_dict() == {"mplsTopLabelStackSection": "000011", "mplsTopLabelStackSection_2": "000021"}


def test_v9_sequence_counts_packets_and_detects_restart() -> None:
    dec = Decoder()
    for seq, uptime in ((10, 1000), (11, 2000), (14, 3000)):
        dec.decode(encode_v9(sequence=seq, sys_uptime_ms=uptime, unix_secs=1), "192.0.2.1")
    restarted = dec.decode(encode_v9(sequence=0, sys_uptime_ms=50, unix_secs=2), "192.0.2.1")
    assert restarted.reset
    assert restarted.lost == 0
    stats = dec.sequence_stats()[("192.0.2.1", 0)]
    assert (stats.received, stats.lost, stats.resets) == (4, 2, 1)
