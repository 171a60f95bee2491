"""NetFlow v5: IANA names, absolute times from the header clock, domain from engine type/id, header checks."""

from __future__ import annotations

import pytest

from flowtunnel.netflow import Decoder, MalformedHeader, Truncated, encode_v5, sniff
from flowtunnel.netflow.v5 import KEYS

FLOW = {
    "sourceIPv4Address": "192.0.2.10",
    "destinationIPv4Address": "198.51.100.7",
    "ipNextHopIPv4Address": "192.0.2.1",
    "ingressInterface": 3,
    "egressInterface": 4,
    "packetDeltaCount": 12,
    "octetDeltaCount": 3_000_000_000,
    "flowStartSysUpTime": 90_000,
    "flowEndSysUpTime": 99_500,
    "sourceTransportPort": 51515,
    "destinationTransportPort": 443,
    "tcpControlBits": 0x1B,
    "protocolIdentifier": 6,
    "ipClassOfService": 0x20,
    "bgpSourceAsNumber": 64500,
    "bgpDestinationAsNumber": 64501,
    "sourceIPv4PrefixLength": 24,
    "destinationIPv4PrefixLength": 16,
}


def test_v5_round_trip_with_iana_names_and_absolute_times() -> None:
    data = encode_v5(
        [FLOW] * 3, sys_uptime_ms=100_000, unix_secs=1_700_000_000, unix_nsecs=250_000_000, sequence=42,
        engine_type=1, engine_id=2, sampling_interval=(1 << 14) | 100,
    )  # fmt: skip
    assert len(data) == 24 + 3 * 48
    assert sniff(data) == 5
    msg = Decoder().decode(data, "192.0.2.1:2055")
    assert (msg.version, msg.sequence, msg.export_time, msg.sys_uptime_ms, msg.domain) == (
        5, 42, 1_700_000_000, 100_000, 0x0102
    )  # fmt: skip
    assert len(msg.records) == 3
    rec = msg.records[0]
    assert tuple(rec) == KEYS
    for key, value in FLOW.items():
        assert rec[key] == value
    # export clock 1_700_000_000.250 s at uptime 100 s: start 10 s earlier, end 0.5 s earlier.
    assert rec["flowStartMilliseconds"] == 1_700_000_000_250 - 10_000
    assert rec["flowEndMilliseconds"] == 1_700_000_000_250 - 500
    assert (rec["samplingInterval"], rec["samplingAlgorithm"]) == (100, 1)
    assert (rec.template_id, rec.domain, rec.options) == (0, 0x0102, False)
    assert rec.to_dict()["octetDeltaCount"] == 3_000_000_000


def test_v5_times_survive_uptime_wrap_around() -> None:
    # The exporter's uptime wrapped (2^32 ms) between the flow start and the export.
    flow = dict(FLOW, flowStartSysUpTime=0xFFFF_F000, flowEndSysUpTime=0x0000_0100)
    msg = Decoder().decode(encode_v5([flow], sys_uptime_ms=0x1000, unix_secs=1_700_000_000), "192.0.2.1")
    rec = msg.records[0]
    assert rec["flowStartMilliseconds"] == 1_700_000_000_000 - 0x1000 - 0x1000
    assert rec["flowEndMilliseconds"] == 1_700_000_000_000 - (0x1000 - 0x100)


@pytest.mark.parametrize(
    ("uptime", "first", "expected_offset"),
    [
        # Uptime past 2^31 ms (the record builders' second loop): a time before the header clock...
        (0xF000_0000, 0xEFFF_F000, -0x1000),
        # ...and one that wrapped to a small value after it (the signed distance modulo 2^32).
        (0xF000_0000, 0x0000_0100, 0x1000_0100),
        # Uptime below 2^31: a value more than 2^31 ms above it was taken before the wrap.
        (0x0000_1000, 0xFFFF_F000, -0x2000),
        (0x7FFF_FFFF, 0x0000_0000, -0x7FFF_FFFF),
    ],
)
def test_v5_times_resolve_on_both_sides_of_half_the_uptime_range(
    uptime: int, first: int, expected_offset: int
) -> None:
    flow = dict(FLOW, flowStartSysUpTime=first, flowEndSysUpTime=first)
    msg = Decoder().decode(encode_v5([flow], sys_uptime_ms=uptime, unix_secs=1_700_000_000), "192.0.2.1")
    rec = msg.records[0]
    assert rec["flowStartMilliseconds"] == 1_700_000_000_000 + expected_offset
    assert rec["flowEndMilliseconds"] == 1_700_000_000_000 + expected_offset


def test_v5_encoder_accepts_absolute_times() -> None:
    flow = {
        "flowStartMilliseconds": 1_700_000_000_000 - 4000,
        "flowEndMilliseconds": 1_700_000_000_000 - 1000,
    }
    rec = Decoder().decode(encode_v5([flow], sys_uptime_ms=50_000, unix_secs=1_700_000_000), "h").records[0]
    assert rec["flowStartSysUpTime"] == 46_000
    assert rec["flowStartMilliseconds"] == 1_700_000_000_000 - 4000
    assert rec["sourceIPv4Address"] == "0.0.0.0"


@pytest.mark.parametrize(
    ("mutate", "error", "text"),
    [
        (lambda d: d[:20], Truncated, "v5 header needs 24 bytes"),
        (lambda d: d[:-1], Truncated, "needs 72 bytes"),
        (lambda d: d[:2] + b"\x00\x00" + d[4:], MalformedHeader, "count 0 outside 1..30"),
        (lambda d: d[:2] + b"\x00\x1f" + d[4:], MalformedHeader, "count 31"),
    ],
)
def test_v5_bad_headers_raise_protocol_errors(mutate: object, error: type[Exception], text: str) -> None:
    data = encode_v5([FLOW], sys_uptime_ms=1, unix_secs=1)
    dec = Decoder()
    with pytest.raises(error, match=text):
        dec.decode(mutate(data), "192.0.2.1")  # type: ignore[operator]
    assert dec.counters[error.cause] == 1  # type: ignore[attr-defined]
    assert dec.counters["datagrams"] == 0


def test_v5_encoder_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"1\.\.30 records"):
        encode_v5([], sys_uptime_ms=0, unix_secs=0)
    with pytest.raises(ValueError, match="not an IPv4 address"):
        encode_v5([{"sourceIPv4Address": "300.1.1.1"}], sys_uptime_ms=0, unix_secs=0)
    with pytest.raises(TypeError, match="wants an int"):
        encode_v5([{"packetDeltaCount": "7"}], sys_uptime_ms=0, unix_secs=0)
    with pytest.raises(ValueError, match="out of range"):
        encode_v5([{"sourceTransportPort": 70000}], sys_uptime_ms=0, unix_secs=0)


def test_v5_sequence_counts_flows() -> None:
    dec = Decoder()
    seq = 0
    for count in (5, 7, 30):
        dec.decode(
            encode_v5([FLOW] * count, sys_uptime_ms=1000 + seq, unix_secs=1, sequence=seq), "192.0.2.1"
        )
        seq += count
    # 10 flows missing, then the stream continues.
    msg = dec.decode(encode_v5([FLOW], sys_uptime_ms=5000, unix_secs=1, sequence=seq + 10), "192.0.2.1")
    assert msg.lost == 10
    stats = dec.sequence_stats()[("192.0.2.1", 0)]
    assert (stats.received, stats.lost, stats.expected, stats.resets) == (43, 10, 53, 0)
