"""IPFIX (RFC 7011): enterprise fields, variable length (both forms), reduced size, typed values, padding,
withdrawal (single and all), options templates with sysUpTime-relative times."""

from __future__ import annotations

import struct

import pytest

from flowtunnel.netflow import (
    Decoder,
    FieldSpec,
    MalformedHeader,
    MalformedSet,
    MalformedTemplate,
    Template,
    Truncated,
    encode_ipfix,
)

VAR = 65535
RICH_T = Template(
    300,
    (
        FieldSpec(27, 16),  # sourceIPv6Address
        FieldSpec(1, 2),  # octetDeltaCount reduced to 2 bytes
        FieldSpec(82, VAR),  # interfaceName, string
        FieldSpec(12235, VAR, pen=9),  # Cisco enterprise element, kept as hex
        FieldSpec(999, 4),  # unassigned IANA id, kept as hex
        FieldSpec(154, 8),  # flowStartMicroseconds, NTP format
        FieldSpec(156, 8),  # flowStartNanoseconds, NTP format
        FieldSpec(150, 4),  # flowStartSeconds
        FieldSpec(152, 8),  # flowStartMilliseconds
        FieldSpec(276, 1),  # dataRecordsReliability, boolean
        FieldSpec(311, 8),  # samplingProbability, float64
        FieldSpec(434, 4),  # mibObjectValueInteger, signed32
        FieldSpec(313, VAR),  # ipHeaderPacketSection, octetArray
    ),
)
RICH = {
    "sourceIPv6Address": "2001:db8::1",
    "octetDeltaCount": 65535,
    "interfaceName": "Gi0/0/1 ünïcode",
    "9.12235": "0a0b0c",
    "unknown_999": "deadbeef",
    "flowStartMicroseconds": 1_700_000_000_123_456,
    "flowStartNanoseconds": 1_700_000_000_123_456_789,
    "flowStartSeconds": 1_700_000_000,
    "flowStartMilliseconds": 1_700_000_000_123,
    "dataRecordsReliability": True,
    "samplingProbability": 0.25,
    "mibObjectValueInteger": -5,
    "ipHeaderPacketSection": "45" * 300,  # 300 bytes: the 3-byte length form
}


def test_ipfix_rich_types_round_trip() -> None:
    dec = Decoder()
    data = encode_ipfix(templates=[RICH_T], data=[(RICH_T, [RICH, dict(RICH, interfaceName="")])], domain=9)
    msg = dec.decode(data, "[2001:db8::9]:4739")
    assert (msg.version, msg.domain, msg.sys_uptime_ms) == (10, 9, None)
    assert msg.records[0].to_dict() == RICH
    assert msg.records[1]["interfaceName"] == ""
    assert msg.errors == []


def test_ipfix_variable_length_both_forms_on_the_wire() -> None:
    t = Template(301, (FieldSpec(82, VAR),))
    short = encode_ipfix(data=[(t, [{"interfaceName": "a" * 254}])])
    long = encode_ipfix(data=[(t, [{"interfaceName": "a" * 255}])])
    assert short[20] == 254
    assert long[20:23] == b"\xff\x00\xff"
    dec = Decoder()
    dec.decode(encode_ipfix(templates=[t]), "192.0.2.1")
    assert dec.decode(short, "192.0.2.1").records[0]["interfaceName"] == "a" * 254
    assert dec.decode(long, "192.0.2.1").records[0]["interfaceName"] == "a" * 255


def test_ipfix_strings_replace_bad_utf8_and_drop_nul_padding() -> None:
    t = Template(302, (FieldSpec(82, 8),))
    dec = Decoder()
    dec.decode(encode_ipfix(templates=[t]), "192.0.2.1")
    body = b"ab\xffc\x00\x00\x00\x00"
    data = encode_ipfix(data=[(t, [{}])])
    data = data[:-8] + body
    assert dec.decode(data, "192.0.2.1").records[0]["interfaceName"] == "ab\ufffdc"


def test_ipfix_set_padding_is_ignored() -> None:
    t = Template(303, (FieldSpec(8, 4), FieldSpec(4, 1)))  # 5-byte records, sets padded to 4 bytes
    dec = Decoder()
    data = encode_ipfix(
        templates=[t], data=[(t, [{"sourceIPv4Address": "192.0.2.5", "protocolIdentifier": 6}])], align=4
    )
    msg = dec.decode(data, "192.0.2.1")
    assert [r.to_dict() for r in msg.records] == [{"sourceIPv4Address": "192.0.2.5", "protocolIdentifier": 6}]
    assert msg.errors == []


def test_ipfix_withdrawal_of_one_and_of_all_templates() -> None:
    a = Template(400, (FieldSpec(8, 4),))
    b = Template(401, (FieldSpec(12, 4),))
    opt = Template(402, (FieldSpec(149, 4), FieldSpec(160, 8)), scope_count=1)
    dec = Decoder()
    dec.decode(encode_ipfix(templates=[a, b, opt], domain=1), "192.0.2.1")
    msg = dec.decode(encode_ipfix(withdrawals=[(400, False)], domain=1), "192.0.2.1")
    assert msg.withdrawn == [400]
    assert dec.decode(encode_ipfix(data=[(a, [{}])], domain=1), "192.0.2.1").held == 1
    assert len(dec.decode(encode_ipfix(data=[(b, [{}])], domain=1), "192.0.2.1").records) == 1
    # All-templates withdrawal (template id 2 in a template set) leaves the options templates alone.
    msg = dec.decode(encode_ipfix(withdrawals=[(2, False)], domain=1), "192.0.2.1")
    assert msg.withdrawn == [401]
    assert [t.template_id for _, _, t in dec.templates("192.0.2.1")] == [402]
    msg = dec.decode(encode_ipfix(withdrawals=[(3, True)], domain=1), "192.0.2.1")
    assert msg.withdrawn == [402]
    assert dec.templates("192.0.2.1") == []
    assert dec.counters["templates_withdrawn"] == 3


def test_ipfix_uptime_times_resolved_with_system_init_time() -> None:
    """softflowd's IPFIX: flowStart/EndSysUpTime, and an options record with systemInitTimeMilliseconds."""
    opt = Template(256, (FieldSpec(149, 4), FieldSpec(160, 8)), scope_count=1)
    flow = Template(1024, (FieldSpec(8, 4), FieldSpec(22, 4), FieldSpec(21, 4)))
    dec = Decoder()
    before = dec.decode(
        encode_ipfix(templates=[flow], data=[(flow, [{"flowStartSysUpTime": 5}])]), "127.0.0.1"
    )
    assert "flowStartMilliseconds" not in before.records[0]  # boot time unknown yet: not guessed
    msg = dec.decode(
        encode_ipfix(
            templates=[opt],
            data=[
                (opt, [{"observationDomainId": 0, "systemInitTimeMilliseconds": 1_700_000_000_000}]),
                (flow, [{"flowStartSysUpTime": 1000, "flowEndSysUpTime": 3_000_000_000}]),
            ],
        ),
        "127.0.0.1",
    )
    rec = msg.records[0]
    assert rec["flowStartMilliseconds"] == 1_700_000_001_000
    assert rec["flowEndMilliseconds"] == 1_703_000_000_000
    assert msg.options_records[0]["systemInitTimeMilliseconds"] == 1_700_000_000_000


def test_ipfix_sequence_counts_data_records_and_learns_softflowd_convention() -> None:
    t = Template(500, (FieldSpec(8, 4),))
    rfc = Decoder()
    rfc.decode(encode_ipfix(templates=[t]), "192.0.2.1")
    seq = 0
    for n in (3, 5, 2):
        assert rfc.decode(encode_ipfix(data=[(t, [{}] * n)], sequence=seq), "192.0.2.1").lost == 0
        seq += n
    assert rfc.decode(encode_ipfix(data=[(t, [{}])], sequence=seq + 4), "192.0.2.1").lost == 4
    # softflowd numbers a message with the count *after* it; that is learnt, not reported as loss.
    soft = Decoder()
    soft.decode(encode_ipfix(templates=[t]), "192.0.2.2")
    seq = 0
    for n in (3, 5, 2, 7, 1):
        seq += n
        assert soft.decode(encode_ipfix(data=[(t, [{}] * n)], sequence=seq), "192.0.2.2").lost == 0
    assert soft.sequence_stats()[("192.0.2.2", 0)].lost == 0


@pytest.mark.parametrize(
    ("data", "error", "text"),
    [
        (b"\x00\x0a\x00\x10" + bytes(8), Truncated, "IPFIX header needs 16 bytes"),
        (b"\x00\x0a\x00\x08" + bytes(12), MalformedHeader, "length 8 is below the header size"),
        (b"\x00\x0a\x00\x20" + bytes(12), Truncated, "length 32 exceeds the 16 bytes"),
        (b"\x00\x07" + bytes(14), MalformedHeader, "version 7"),
        (b"\x00", Truncated, "no version field"),
    ],
)
def test_ipfix_bad_headers(data: bytes, error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        Decoder().decode(data, "192.0.2.1")


def test_ipfix_bad_sets_and_templates_are_reported_not_raised() -> None:
    dec = Decoder()
    t = Template(600, (FieldSpec(8, 4),))
    good = encode_ipfix(templates=[t], data=[(t, [{"sourceIPv4Address": "192.0.2.77"}])])

    def with_tail(tail: bytes) -> bytes:
        return good[:2] + struct.pack("!H", len(good) + len(tail)) + good[4:] + tail

    cases = [
        (struct.pack("!HHHH", 3, 8, 700, 1), MalformedTemplate, "options template 700 header cut short"),
        (struct.pack("!HHHHH", 3, 10, 700, 1, 0) + b"\x00\x00", MalformedTemplate, "scope field count 0"),
        (struct.pack("!HHHH", 2, 8, 700, 2), MalformedTemplate, "announces 2 fields"),
        (struct.pack("!HHHHHH", 2, 12, 700, 1, 0x8001, 4), MalformedTemplate, "enterprise number cut short"),
        (struct.pack("!HHHH", 2, 8, 20, 0), MalformedTemplate, "withdrawal of template id 20"),
        (struct.pack("!HHHHHH", 2, 12, 700, 1, 8, 0), MalformedTemplate, "exactly 4 bytes"),
        (struct.pack("!HH", 600, 3), MalformedSet, "length 3 is below 4"),
        (struct.pack("!H", 600), MalformedSet, "2 stray bytes"),
    ]
    for tail, error, text in cases:
        msg = dec.decode(with_tail(tail), "192.0.2.1")
        assert len(msg.records) == 1, text
        assert len(msg.errors) == 1, text
        assert isinstance(msg.errors[0], error), text
        assert text in str(msg.errors[0])


def test_ipfix_variable_length_overrun_keeps_earlier_records() -> None:
    t = Template(601, (FieldSpec(82, VAR),))
    dec = Decoder()
    dec.decode(encode_ipfix(templates=[t]), "192.0.2.1")
    data = encode_ipfix(data=[(t, [{"interfaceName": "ok"}])])
    bad = (
        data[:2]
        + struct.pack("!H", len(data) + 4)
        + data[4:18]
        + struct.pack("!H", 4 + 3 + 4)
        + data[20:]
        + b"\x09abc"
    )
    msg = dec.decode(bad, "192.0.2.1")
    assert [r["interfaceName"] for r in msg.records] == ["ok"]
    assert "variable-length field of 9 bytes runs past" in str(msg.errors[0])
    with_255 = (
        data[:2]
        + struct.pack("!H", len(data) + 2)
        + data[4:18]
        + struct.pack("!H", 4 + 3 + 2)
        + data[20:]
        + b"\xff\x01"
    )
    msg = dec.decode(with_255, "192.0.2.1")
    assert "3-byte length cut short" in str(msg.errors[0])


def test_ipfix_encoder_validates_values() -> None:
    t = Template(700, (FieldSpec(8, 4), FieldSpec(56, 6), FieldSpec(1, 1)))
    with pytest.raises(ValueError, match="not an ipv4Address"):
        encode_ipfix(data=[(t, [{"sourceIPv4Address": "::1"}])])
    with pytest.raises(ValueError, match="not a MAC address"):
        encode_ipfix(data=[(t, [{"sourceMacAddress": "00:11"}])])
    with pytest.raises(ValueError, match="does not fit in 1 bytes"):
        encode_ipfix(data=[(t, [{"octetDeltaCount": 256}])])
    with pytest.raises(ValueError, match="does not fit 15 bits"):
        encode_ipfix(templates=[Template(701, (FieldSpec(40000, 4),))])
