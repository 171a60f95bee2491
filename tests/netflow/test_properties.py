"""Property tests: arbitrary and mutated bytes only ever raise ProtocolError subclasses; encode -> decode
round-trips generated templates and records in v5, v9 and IPFIX (variable-length, enterprise fields too)."""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowtunnel.netflow import (
    Decoder,
    DecoderConfig,
    FieldSpec,
    ProtocolError,
    Template,
    encode_ipfix,
    encode_v5,
    encode_v9,
)
from flowtunnel.netflow.templates import compile_template
from flowtunnel.netflow.v5 import KEYS as V5_KEYS

VAR = 65535
NTP_END = 2**32 - 2_208_988_800 - 1  # last Unix second of NTP era 0 (2036-02-07)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
ipv6 = st.binary(min_size=16, max_size=16).map(lambda b: __import__("ipaddress").IPv6Address(b).compressed)
mac = st.binary(min_size=6, max_size=6).map(lambda b: b.hex(":"))
text_chars = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")


@st.composite
def field_and_value(draw: st.DrawFn, version: int) -> tuple[FieldSpec, Any]:
    """One template field with a value of its IANA type (v9: no enterprise or variable-length fields)."""
    kinds = ["uint", "ipv4", "ipv6", "mac", "string", "octets", "unknown", "float", "bool", "time", "signed"]
    if version == 10:
        kinds.append("enterprise")
    kind = draw(st.sampled_from(kinds))
    var_ok = version == 10
    if kind == "uint":
        ie, natural = draw(st.sampled_from([(1, 8), (2, 8), (7, 2), (10, 4), (4, 1), (6, 2), (16, 4)]))
        length = draw(st.sampled_from([n for n in (1, 2, 3, 4, 5, 8) if n <= natural]))
        return FieldSpec(ie, length), draw(st.integers(0, 2 ** (8 * length) - 1))
    if kind == "signed":
        length = draw(st.sampled_from([1, 2, 3, 4]))
        return FieldSpec(434, length), draw(st.integers(-(2 ** (8 * length - 1)), 2 ** (8 * length - 1) - 1))
    if kind == "ipv4":
        return FieldSpec(draw(st.sampled_from([8, 12, 15])), 4), draw(ipv4)
    if kind == "ipv6":
        return FieldSpec(draw(st.sampled_from([27, 28, 62])), 16), draw(ipv6)
    if kind == "mac":
        return FieldSpec(draw(st.sampled_from([56, 80])), 6), draw(mac)
    if kind == "float":
        return FieldSpec(311, 8), draw(st.floats(allow_nan=False))
    if kind == "bool":
        return FieldSpec(276, 1), draw(st.booleans())
    if kind == "time":
        ie, length, top = draw(
            st.sampled_from(
                [
                    (150, 4, 2**32 - 1),
                    (152, 8, 2**63 - 1),
                    (154, 8, NTP_END * 10**6),
                    (156, 8, NTP_END * 10**9),
                ]
            )
        )
        return FieldSpec(ie, length), draw(st.integers(0, top))
    if kind == "string":
        value = draw(st.text(text_chars, max_size=40))
        size = len(value.encode())
        if var_ok and draw(st.booleans()):
            return FieldSpec(82, VAR), value
        return FieldSpec(82, size + draw(st.integers(0, 3)) or 1), value
    raw = draw(st.binary(max_size=300))
    ie, pen = {
        "octets": (313, 0),
        "unknown": (draw(st.integers(500, 32767).filter(lambda i: i > 491)), 0),
        "enterprise": (draw(st.integers(1, 32767)), draw(st.integers(1, 2**32 - 1))),
    }[kind]
    if var_ok and draw(st.booleans()):
        return FieldSpec(ie, VAR, pen), raw.hex()
    raw = raw or b"\x00"
    return FieldSpec(ie, len(raw), pen), raw.hex()


@st.composite
def datasets(draw: st.DrawFn, version: int) -> list[tuple[Template, list[dict[str, Any]]]]:
    """Up to 3 templates (options templates among them), one record each with values of the fields' types."""
    out: list[tuple[Template, list[dict[str, Any]]]] = []
    ids = draw(st.lists(st.integers(256, 65535), min_size=1, max_size=3, unique=True))
    for tid in ids:
        first = [draw(field_and_value(version)) for _ in range(draw(st.integers(1, 8)))]
        if version == 9:
            # v9 scope fields are of their own kind (RFC 3954 §6.1: System, Interface, Line Card...).
            scope = draw(st.integers(0, 2))
            first = [
                (FieldSpec(draw(st.integers(1, 5)), 4), draw(st.integers(0, 2**32 - 1))) for _ in range(scope)
            ]
            first += [draw(field_and_value(version)) for _ in range(draw(st.integers(1, 8)))]
        else:
            scope = draw(st.integers(0, len(first)))
        specs = tuple(f for f, _ in first)
        template = Template(tid, specs, scope)
        keys = compile_template(template, version).keys
        records = [dict(zip(keys, [v for _, v in first], strict=True))]
        out.append((template, records))
    return out


def _check_round_trip(msgs: list[Any], sets: list[tuple[Template, list[dict[str, Any]]]]) -> None:
    records = [r for m in msgs for r in m.records]
    options = [r for m in msgs for r in m.options_records]
    assert all(not m.errors for m in msgs)
    want = [rec for t, recs in sets if not t.options for rec in recs]
    want_opt = [rec for t, recs in sets if t.options for rec in recs]
    assert len(records) == len(want)
    assert len(options) == len(want_opt)
    for got, exp in zip(records + options, want + want_opt, strict=True):
        assert {k: got[k] for k in exp} == exp


@SETTINGS
@given(sets=datasets(10), domain=st.integers(0, 2**32 - 1), align=st.sampled_from([1, 4]))
def test_ipfix_round_trip(sets: list[tuple[Template, list[dict[str, Any]]]], domain: int, align: int) -> None:
    dec = Decoder()
    templates = [t for t, _ in sets]
    data = encode_ipfix(templates=templates, data=sets, domain=domain, export_time=1_700_000_000, align=1)
    msg = dec.decode(data, "[2001:db8::1]:4739")
    assert sorted(msg.templates, key=lambda t: t.template_id) == sorted(
        templates, key=lambda t: t.template_id
    )
    _check_round_trip([msg], sets)
    # Data sent before its templates is held and released. Padding must stay below the smallest record.
    if any(compile_template(t, 10).min_size < align for t in templates):
        align = 1
    later = Decoder()
    held = later.decode(encode_ipfix(data=sets, domain=domain, align=align), "192.0.2.1")
    assert held.held == len(sets)
    _check_round_trip([later.decode(encode_ipfix(templates=templates, domain=domain), "192.0.2.1")], sets)


@SETTINGS
@given(sets=datasets(9), source_id=st.integers(0, 2**32 - 1))
def test_v9_round_trip(sets: list[tuple[Template, list[dict[str, Any]]]], source_id: int) -> None:
    dec = Decoder()
    templates = [t for t, _ in sets]
    data = encode_v9(templates=templates, data=sets, source_id=source_id, sys_uptime_ms=5, unix_secs=7)
    msg = dec.decode(data, "192.0.2.1:2055")
    assert sorted(msg.templates, key=lambda t: t.template_id) == sorted(
        templates, key=lambda t: t.template_id
    )
    _check_round_trip([msg], sets)


v5_values = st.fixed_dictionaries(
    {
        "sourceIPv4Address": ipv4,
        "destinationIPv4Address": ipv4,
        "ipNextHopIPv4Address": ipv4,
        "ingressInterface": st.integers(0, 65535),
        "egressInterface": st.integers(0, 65535),
        "packetDeltaCount": st.integers(0, 2**32 - 1),
        "octetDeltaCount": st.integers(0, 2**32 - 1),
        "flowStartSysUpTime": st.integers(0, 2**32 - 1),
        "flowEndSysUpTime": st.integers(0, 2**32 - 1),
        "sourceTransportPort": st.integers(0, 65535),
        "destinationTransportPort": st.integers(0, 65535),
        "tcpControlBits": st.integers(0, 255),
        "protocolIdentifier": st.integers(0, 255),
        "ipClassOfService": st.integers(0, 255),
        "bgpSourceAsNumber": st.integers(0, 65535),
        "bgpDestinationAsNumber": st.integers(0, 65535),
        "sourceIPv4PrefixLength": st.integers(0, 32),
        "destinationIPv4PrefixLength": st.integers(0, 32),
    }
)


@SETTINGS
@given(records=st.lists(v5_values, min_size=1, max_size=30), uptime=st.integers(0, 2**32 - 1))
def test_v5_round_trip(records: list[dict[str, Any]], uptime: int) -> None:
    msg = Decoder().decode(encode_v5(records, sys_uptime_ms=uptime, unix_secs=1_700_000_000), "192.0.2.1")
    assert len(msg.records) == len(records)
    for got, want in zip(msg.records, records, strict=True):
        assert tuple(got) == V5_KEYS
        assert {k: got[k] for k in want} == want


def _primed_decoder() -> tuple[Decoder, list[bytes]]:
    """A decoder that knows a few templates, and valid datagrams that use them."""
    var = Template(300, (FieldSpec(8, 4), FieldSpec(82, VAR), FieldSpec(5, VAR, pen=9), FieldSpec(1, 3)))
    fixed = Template(301, (FieldSpec(27, 16), FieldSpec(56, 6), FieldSpec(154, 8), FieldSpec(22, 4)))
    opt = Template(302, (FieldSpec(149, 4), FieldSpec(160, 8), FieldSpec(276, 1)), scope_count=1)
    rec_var = {
        "sourceIPv4Address": "1.2.3.4",
        "interfaceName": "x" * 300,
        "9.5": "abcd",
        "octetDeltaCount": 5,
    }
    sets: list[tuple[Template, list[dict[str, object]]]] = [
        (var, [rec_var, rec_var]),
        (fixed, [{}]),
        (opt, [{"dataRecordsReliability": True}]),
    ]
    dec = Decoder(DecoderConfig(max_held_sets=8, max_templates_per_exporter=8))
    ipfix = encode_ipfix(templates=[var, fixed, opt], data=sets, domain=1, align=4)
    v9t = [Template(300, (FieldSpec(8, 4), FieldSpec(1, 3), FieldSpec(22, 4))), fixed, opt]
    v9 = encode_v9(templates=v9t, data=[(v9t[0], [{}] * 3), (fixed, [{}]), (opt, [{}])], source_id=1)
    v5 = encode_v5([{}] * 3, sys_uptime_ms=1, unix_secs=2)
    for data in (ipfix, v9):
        dec.decode(data, "192.0.2.1")
    return dec, [ipfix, v9, v5]


DEC, VALID = _primed_decoder()


def _decode_only_protocol_errors(dec: Decoder, data: bytes) -> None:
    try:
        msg = dec.decode(data, "192.0.2.1")
    except ProtocolError:
        return  # the only exception allowed: anything else fails the test
    assert all(isinstance(e, ProtocolError) and e.peer_fault for e in msg.errors)


@SETTINGS
@given(data=st.one_of(
    st.binary(max_size=200),
    st.tuples(st.sampled_from([b"\0\x05", b"\0\x09", b"\0\x0a"]), st.binary(max_size=400)).map(b"".join),
    st.binary(max_size=400).map(lambda b: struct.pack("!HH", 10, len(b) + 4) + b),  # IPFIX, length right
))  # fmt: skip
def test_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    _decode_only_protocol_errors(DEC, data)
    _decode_only_protocol_errors(Decoder(), data)


@SETTINGS
@given(
    which=st.integers(0, len(VALID) - 1),
    flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 2000)),
)
def test_mutated_datagrams_raise_only_protocol_errors(
    which: int, flips: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(VALID[which])
    for pos, value in flips:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    _decode_only_protocol_errors(DEC, bytes(data))
    _decode_only_protocol_errors(Decoder(), bytes(data))
