"""The columnar path (``Decoder.decode_columns``): record blocks hold exactly the records ``decode`` gives, on
the vendor corpus, softflowd's v9/IPFIX exports and generated templates with every kind of fixed field."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from flowtunnel.netflow import Decoder, FieldSpec, Record, Template, encode_ipfix, encode_v9
from flowtunnel.netflow.columns import (
    MODE_INIT,
    MODE_PLAIN,
    MODE_TIMED,
    block_mode,
    column_values,
    record_dtype,
)
from flowtunnel.netflow.templates import compile_template
from tests.netflow.test_vendor_corpus import CORPUS, EXPECTED, export_datagrams
from tests.peers import capture_softflowd, have_tool, make_trace


def _same_records(datagrams: Sequence[tuple[bytes, str]]) -> int:
    """Decode every datagram both ways with two decoders; assert equal messages; return the blocks seen."""
    plain, columnar = Decoder(), Decoder()
    blocks = 0
    for data, sender in datagrams:
        a = plain.decode(data, sender)
        b = columnar.decode_columns(data, sender)
        got: list[Record] = list(b.records)
        for block in b.blocks:
            got += block.records()
            # The numpy view reads the same fields as the record builder.
            array = block.array()
            assert len(array) == block.count
            assert block.mode == block_mode(block.layout, block.export_ms, block.uptime_ms, block.init_ms)
            for i, key in enumerate(block.layout.keys):
                assert column_values(block.layout, array, i) == [r[key] for r in block.records()]
        blocks += len(b.blocks)
        assert sorted(map(repr, got)) == sorted(map(repr, a.records))
        assert b.record_count == len(a.records)
        assert b.options_records == a.options_records
        assert (b.lost, b.reset, b.held, b.templates, b.withdrawn) == (a.lost, a.reset, a.held, a.templates,
                                                                        a.withdrawn)
        assert [str(e) for e in b.errors] == [str(e) for e in a.errors]
    assert plain.counters == columnar.counters
    assert plain.sequence_stats() == columnar.sequence_stats()
    return blocks


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_vendor_corpus_columnar_equals_records(name: str) -> None:
    _same_records(export_datagrams(CORPUS / name))


@pytest.mark.skipif(not have_tool("softflowd"), reason="softflowd not installed")
@pytest.mark.parametrize("version", [9, 10])
def test_softflowd_columnar_equals_records(tmp_path: Path, version: int) -> None:
    trace = make_trace(tmp_path / "trace.pcap", flows=600, seed=7)
    export = capture_softflowd(trace.path, version)
    datagrams = [(payload, f"{host}:{port}") for payload, (host, port) in export.datagrams]
    assert _same_records(datagrams) > 0


_ODD = Template(
    400,
    (
        FieldSpec(8, 4), FieldSpec(27, 16), FieldSpec(56, 6), FieldSpec(1, 3),  # reduced-size octets
        FieldSpec(2, 8), FieldSpec(7, 2), FieldSpec(22, 4), FieldSpec(21, 4), FieldSpec(152, 8),
        FieldSpec(82, 8), FieldSpec(100, 2, pen=9), FieldSpec(4, 1), FieldSpec(136, 1),
    ),
)


def _odd_rows(n: int) -> list[dict[str, object]]:
    return [
        {
            "sourceIPv4Address": f"10.0.{i // 250}.{i % 250}", "sourceIPv6Address": f"2001:db8::{i:x}",
            "sourceMacAddress": f"00:11:22:33:44:{i % 256:02x}", "octetDeltaCount": i * 1000,
            "packetDeltaCount": (1 << 64) - 1 - i, "sourceTransportPort": i,
            "flowStartSysUpTime": (1 << 32) - 5 if i % 2 else 100, "flowEndSysUpTime": 3_000_000_000 + i,
            "flowStartMilliseconds": 1_790_000_000_000 + i, "interfaceName": "eth0", "9.100": "0a0b",
            "protocolIdentifier": 6, "flowEndReason": i % 3,
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("version", [9, 10])
def test_generated_fields_of_every_kind_agree(version: int) -> None:
    rows = _odd_rows(40)
    template = _ODD
    if version == 9:  # v9 has no enterprise fields
        template = Template(400, tuple(f for f in _ODD.fields if not f.pen))
        for row in rows:
            del row["9.100"]
        payloads = [
            encode_v9(templates=[template], data=[(template, rows[:20])], sys_uptime_ms=1_000,
                      unix_secs=1_790_000_000),
            encode_v9(templates=[], data=[(template, rows[20:])], sys_uptime_ms=4_000_000_000,
                      unix_secs=1_790_000_100, sequence=1),
        ]
    else:
        payloads = [encode_ipfix(templates=[template], data=[(template, rows)], export_time=1_790_000_000)]
    assert _same_records([(p, "192.0.2.1:2055") for p in payloads]) == len(payloads)
    block = Decoder().decode_columns(payloads[0], "192.0.2.1:2055").blocks[0]
    assert block.mode == (MODE_TIMED if version == 9 else MODE_PLAIN)
    assert record_dtype(block.layout).itemsize == block.layout.min_size


def test_ipfix_uptimes_resolve_with_the_options_boot_time_in_both_paths() -> None:
    opts = Template(500, (FieldSpec(144, 4), FieldSpec(160, 8)), scope_count=1)
    flows = Template(501, (FieldSpec(8, 4), FieldSpec(22, 4), FieldSpec(21, 4)))
    init = 1_790_000_000_000
    payload = encode_ipfix(
        templates=[opts, flows],
        data=[(opts, [{"exportingProcessId": 1, "systemInitTimeMilliseconds": init}]),
              (flows, [{"sourceIPv4Address": "10.0.0.1", "flowStartSysUpTime": 5, "flowEndSysUpTime": 9}])],
        export_time=1_790_000_060,
    )
    _same_records([(payload, "192.0.2.1:4739")])
    msg = Decoder().decode_columns(payload, "192.0.2.1:4739")
    (block,) = msg.blocks
    assert block.mode == MODE_INIT
    assert block.records()[0]["flowStartMilliseconds"] == init + 5


def test_variable_length_templates_still_come_as_records() -> None:
    template = Template(600, (FieldSpec(8, 4), FieldSpec(82, 65535)))
    payload = encode_ipfix(
        templates=[template], data=[(template, [{"sourceIPv4Address": "10.0.0.1", "interfaceName": "eth0"}])],
        export_time=1,
    )
    msg = Decoder().decode_columns(payload, "192.0.2.1")
    assert msg.blocks == []
    assert [dict(r) for r in msg.records] == [{"sourceIPv4Address": "10.0.0.1", "interfaceName": "eth0"}]
    layout = compile_template(template, 10)
    with pytest.raises(ValueError, match="variable-length"):
        record_dtype(layout)


def test_held_sets_release_as_records_in_columnar_mode() -> None:
    template = Template(700, (FieldSpec(8, 4), FieldSpec(1, 4)))
    row = {"sourceIPv4Address": "10.0.0.1", "octetDeltaCount": 5}
    data = encode_ipfix(templates=[], data=[(template, [row])], export_time=1)
    tmpl = encode_ipfix(templates=[template], export_time=1, sequence=1)
    dec = Decoder()
    assert dec.decode_columns(data, "192.0.2.1").held == 1
    released = dec.decode_columns(tmpl, "192.0.2.1")
    assert [dict(r) for r in released.records] == [{"sourceIPv4Address": "10.0.0.1", "octetDeltaCount": 5}]
    assert released.record_count == 1
