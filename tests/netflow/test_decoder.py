"""Decoder state: bounds and their counters, held sets, template cache export/restore, re-announcement."""

from __future__ import annotations

import json

import pytest

from flowtunnel.netflow import (
    Decoder,
    DecoderConfig,
    FieldSpec,
    LimitExceeded,
    Template,
    UnknownTemplate,
    encode_ipfix,
    encode_v9,
    exporter_host,
)

T = Template(256, (FieldSpec(8, 4), FieldSpec(2, 4)))
OPT = Template(257, (FieldSpec(149, 4), FieldSpec(34, 4)), scope_count=1)
REC = {"sourceIPv4Address": "192.0.2.9", "packetDeltaCount": 3}


def test_exporter_host() -> None:
    assert exporter_host("192.0.2.1:2055") == "192.0.2.1"
    assert exporter_host("[2001:db8::1]:2055") == "2001:db8::1"
    assert exporter_host("2001:db8::1") == "2001:db8::1"
    assert exporter_host("192.0.2.1") == "192.0.2.1"


def test_config_rejects_impossible_bounds() -> None:
    with pytest.raises(ValueError, match="max_exporters must be >= 1, got 0"):
        DecoderConfig(max_exporters=0)
    with pytest.raises(ValueError, match="max_held_sets must be >= 0"):
        DecoderConfig(max_held_sets=-1)


def test_scope_port_true_separates_exporters_on_one_address() -> None:
    dec = Decoder(DecoderConfig(scope_port=True))
    dec.decode(encode_ipfix(templates=[T]), "192.0.2.1:1000")
    assert dec.decode(encode_ipfix(data=[(T, [REC])]), "192.0.2.1:1001").held == 1
    assert len(dec.decode(encode_ipfix(data=[(T, [REC])]), "192.0.2.1:1000").records) == 1


def test_template_bound_evicts_least_recently_refreshed() -> None:
    dec = Decoder(DecoderConfig(max_templates_per_exporter=2))
    templates = [Template(300 + i, (FieldSpec(8, 4),)) for i in range(3)]
    dec.decode(encode_ipfix(templates=templates[:2]), "192.0.2.1")
    dec.decode(encode_ipfix(templates=[templates[0]]), "192.0.2.1")  # refreshed: 300 is now the most recent
    msg = dec.decode(encode_ipfix(templates=[templates[2]]), "192.0.2.1")
    assert isinstance(msg.errors[0], LimitExceeded)
    assert "max_templates_per_exporter=2" in str(msg.errors[0])
    assert "template 301" in str(msg.errors[0])
    assert [t.template_id for _, _, t in dec.templates("192.0.2.1")] == [300, 302]
    assert dec.counters["templates_evicted"] == 1


def test_exporter_bound_evicts_oldest_exporter() -> None:
    dec = Decoder(DecoderConfig(max_exporters=2))
    for host in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        dec.decode(encode_ipfix(templates=[T]), host)
    assert dec.templates("192.0.2.1") == []
    assert len(dec.templates("192.0.2.3")) == 1
    assert dec.counters["exporters_evicted"] == 1


def test_held_sets_bounded_per_exporter_total_and_bytes() -> None:
    dec = Decoder(DecoderConfig(max_held_sets_per_exporter=2, max_held_sets=3, max_held_bytes=1 << 20))
    data = encode_ipfix(data=[(T, [REC])])
    for _ in range(3):
        msg = dec.decode(data, "192.0.2.1")
    assert msg.held == 1
    assert isinstance(msg.errors[0], LimitExceeded)
    assert dec.counters["held_evicted"] == 1
    for _ in range(2):
        dec.decode(data, "192.0.2.2")  # total 4 > 3: the oldest set (of 192.0.2.1) goes
    assert dec.counters["held_evicted"] == 2
    assert len(dec.decode(encode_ipfix(templates=[T]), "192.0.2.1").records) == 1
    assert len(dec.decode(encode_ipfix(templates=[T]), "192.0.2.2").records) == 2
    small = Decoder(DecoderConfig(max_held_bytes=30))
    for _ in range(4):
        small.decode(data, "192.0.2.1")  # 8-byte set bodies: three fit
    assert small.counters["held_evicted"] == 1
    assert len(small.decode(encode_ipfix(templates=[T]), "192.0.2.1").records) == 3


def test_holding_disabled_reports_unknown_template() -> None:
    dec = Decoder(DecoderConfig(max_held_sets=0))
    msg = dec.decode(encode_v9(data=[(T, [REC])], source_id=4), "192.0.2.1")
    (err,) = msg.errors
    assert isinstance(err, UnknownTemplate)
    assert "unknown template 256" in str(err)
    assert "v9 domain 4" in str(err)
    assert dec.counters["unknown_template"] == 1


def test_discard_held_gives_one_error_per_set() -> None:
    dec = Decoder()
    dec.decode(encode_ipfix(data=[(T, [REC]), (OPT, [{}])], domain=3), "192.0.2.1:9")
    errors = dec.discard_held()
    assert len(errors) == 2
    assert all(isinstance(e, UnknownTemplate) for e in errors)
    assert "exporter 192.0.2.1 domain 3: no template 256 (v10)" in str(errors[0])
    assert dec.discard_held() == []
    assert dec.counters["held_discarded"] == 2
    assert dec.decode(encode_ipfix(templates=[T], domain=3), "192.0.2.1:9").records == []


def test_state_round_trip_keeps_templates_and_headers() -> None:
    dec = Decoder()
    dec.decode(
        encode_v9(templates=[T, OPT], sequence=41, sys_uptime_ms=5000, unix_secs=1_700_000_000, source_id=2),
        "192.0.2.1:99",
    )
    dec.decode(
        encode_ipfix(templates=[T], domain=5, sequence=10, export_time=1_700_000_100), "[2001:db8::5]:4739"
    )
    state = dec.export_state()
    doc = json.loads(state)
    assert doc["format"] == "flowtunnel.netflow.state"
    assert doc["version"] == 1
    restored = Decoder.from_state(state)
    assert restored.templates("192.0.2.1") == dec.templates("192.0.2.1")
    # Restored templates decode data right away.
    msg = restored.decode(encode_v9(data=[(T, [REC])], sequence=42, source_id=2), "192.0.2.1:100")
    assert msg.records[0].to_dict() == REC
    assert len(restored.decode(encode_ipfix(data=[(T, [REC])], domain=5), "2001:db8::5").records) == 1
    # Scope keys follow the new config.
    with_port = Decoder.from_state(state, DecoderConfig(scope_port=True))
    assert len(with_port.templates("192.0.2.1:99")) == 2
    assert with_port.templates("192.0.2.1:100") == []


@pytest.mark.parametrize(
    ("state", "text"),
    [
        (b"not json", "malformed netflow state"),
        (b"[]", "not a flowtunnel netflow state"),
        (b'{"format": "flowtunnel.netflow.state", "version": 99, "exporters": []}', "state version 99"),
        (
            b'{"format": "flowtunnel.netflow.state", "version": 1, "exporters": [{}]}',
            "malformed netflow state",
        ),
        (
            b'{"format": "flowtunnel.netflow.state", "version": 1, "exporters": [{"exporter": "h",'
            b' "domains": [], "templates": [{"version": 10, "domain": 0, "id": 5, "scope": 0,'
            b' "fields": [[8, 4, 0]]}]}]}',
            "invalid template",
        ),
    ],
)
def test_from_state_rejects_bad_documents(state: bytes, text: str) -> None:
    with pytest.raises(ValueError, match=text):
        Decoder.from_state(state)


def test_template_datagrams_reannounce_every_domain() -> None:
    dec = Decoder()
    many = [Template(300 + i, tuple(FieldSpec(8, 4) for _ in range(20))) for i in range(30)]
    dec.decode(encode_ipfix(templates=many, domain=1, sequence=7, export_time=1_700_000_000), "192.0.2.1:1")
    dec.decode(encode_ipfix(data=[(many[0], [{}] * 3)], domain=1, sequence=7), "192.0.2.1:1")
    dec.decode(
        encode_v9(templates=[T, OPT], source_id=2, sequence=5, sys_uptime_ms=9, unix_secs=3), "192.0.2.1:1"
    )
    datagrams = dec.template_datagrams("192.0.2.1:555")
    assert len(datagrams) >= 3
    assert all(len(d) <= 1400 for d in datagrams)
    fresh = Decoder()
    messages = [fresh.decode(d, "192.0.2.1") for d in datagrams]
    assert all(m.errors == [] for m in messages)
    got = sorted((m.version, m.domain, t.template_id) for m in messages for t in m.templates)
    assert got == sorted([(10, 1, t.template_id) for t in many] + [(9, 2, 256), (9, 2, 257)])
    ipfix_seq = {m.sequence for m in messages if m.version == 10}
    assert ipfix_seq == {10}  # the next expected data record number
    assert {(m.sequence, m.sys_uptime_ms, m.export_time) for m in messages if m.version == 9} == {(5, 9, 3)}
    assert dec.template_datagrams("198.51.100.1") == []


def test_counters_count_datagrams_and_records() -> None:
    dec = Decoder()
    dec.decode(encode_ipfix(templates=[T, OPT], data=[(T, [REC] * 4), (OPT, [{}])]), "192.0.2.1")
    assert dec.counters["datagrams"] == 1
    assert dec.counters["records"] == 4
    assert dec.counters["options_records"] == 1
    assert dec.counters["templates"] == 1
    assert dec.counters["options_templates"] == 1


def test_message_fast_constructor_matches_the_dataclass() -> None:
    from flowtunnel.netflow.decoder import Message, _message

    fast = _message(9, "192.0.2.1:2055", 3, 44, 1_700_000_000, 5000)
    slow = Message(
        version=9,
        exporter="192.0.2.1:2055",
        domain=3,
        sequence=44,
        export_time=1_700_000_000,
        sys_uptime_ms=5000,
    )
    assert fast == slow
    assert fast.records is not _message(9, "x", 0, 0, 0, None).records  # fresh lists each time


@pytest.mark.parametrize("version", [9, 10])
def test_a_template_id_reused_for_another_kind_decodes_by_its_new_template(version: int) -> None:
    # The decoder remembers per set id which data sets take its fast path; redefining the id as an options
    # template, a variable-length template and back must each take effect on the next data set.
    encode = encode_v9 if version == 9 else encode_ipfix
    flow = Template(300, T.fields)
    opts = Template(300, OPT.fields, scope_count=1)
    var = Template(300, (FieldSpec(8, 4), FieldSpec(82, 65535)))
    scope = "scope_149" if version == 9 else "observationDomainId"
    opt_rec: dict[str, object] = {scope: 5, "samplingInterval": 7}
    dec = Decoder()
    steps: list[tuple[Template, dict[str, object], str]] = [
        (flow, REC, "records"),
        (opts, opt_rec, "options_records"),
        (var, {"sourceIPv4Address": "192.0.2.9", "interfaceName": "eth0"}, "records"),
        (flow, REC, "records"),
    ]
    for seq, (template, record, kind) in enumerate(steps):
        first = encode(templates=[template], sequence=seq)
        data = encode(data=[(template, [record, record])], sequence=seq + 1)
        dec.decode(first, "192.0.2.1:2055")
        for _ in range(2):  # the second data set of a template comes from the remembered entry
            msg = dec.decode(data, "192.0.2.1:2055")
            assert [dict(r) for r in getattr(msg, kind)] == [record, record], (template, kind)
            other = "options_records" if kind == "records" else "records"
            assert getattr(msg, other) == []
