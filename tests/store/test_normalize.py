"""Records → store columns: which field fills which column, time units, and nothing dropped (``extra``)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flowtunnel.netflow import Decoder, FieldSpec, Template, encode_ipfix
from flowtunnel.store.normalize import FlowColumns
from tests.peers import capture_softflowd, have_tool, make_trace


def _one(record: dict[str, object], **kw: int | None) -> dict[str, object]:
    cols = FlowColumns()
    args: dict[str, int | None] = {"domain": 0, "received_us": 5, **kw}
    assert cols.add([record], agent="a", exporter="192.0.2.1", version=10, **args) == 1  # type: ignore[arg-type]
    return {name: values[0] for name, values in cols.columns().items()}


def test_columns_take_their_fields_and_the_rest_goes_to_extra() -> None:
    row = _one({
        "sourceIPv4Address": "10.0.0.1", "sourceIPv6Address": "2001:db8::1",
        "destinationIPv4Address": "10.0.0.2",
        "octetDeltaCount": 1500, "octetTotalCount": 99999, "packetDeltaCount": 3, "protocolIdentifier": 17,
        "flowStartSeconds": 1_790_000_000, "flowEndMilliseconds": 1_790_000_001_500,
        "interfaceName": "eth0", "9.12235": "0a0b",
    })
    assert row["src_addr"] == "10.0.0.1"
    assert row["bytes"] == 1500
    assert row["flow_start"] == 1_790_000_000_000_000
    assert row["flow_end"] == 1_790_000_001_500_000
    assert row["src_port"] is None
    # Nothing is lost: the alternatives a column did not take stay in extra, as do unknown fields.
    assert json.loads(str(row["extra"])) == {
        "sourceIPv6Address": "2001:db8::1", "octetTotalCount": 99999, "interfaceName": "eth0",
        "9.12235": "0a0b",
    }


def test_time_units_become_microseconds() -> None:
    assert _one({"flowStartMicroseconds": 7, "flowEndNanoseconds": 9_999})["flow_start"] == 7
    assert _one({"flowStartMicroseconds": 7, "flowEndNanoseconds": 9_999})["flow_end"] == 9


def test_ipfix_uptime_times_resolve_with_the_exporters_init_time_across_the_wrap() -> None:
    init = 1_790_000_000_000
    # Started 1 s before the exporter's init time: exported as a wrapped unsigned uptime.
    row = _one({"flowStartSysUpTime": (1 << 32) - 1000, "flowEndSysUpTime": 500},
               init_ms=init, export_ms=init + 60_000)
    assert row["flow_start"] == (init - 1000) * 1000
    assert row["flow_end"] == (init + 500) * 1000
    assert row["extra"] is None
    # Without an init time there is nothing to resolve against: NULL rather than a wrong time.
    assert _one({"flowStartSysUpTime": 5})["flow_start"] is None


def test_values_that_do_not_fit_a_column_become_null_not_an_error() -> None:
    cols = FlowColumns()
    cols.add([{"sourceTransportPort": 80}, {"sourceTransportPort": "http"}, {"sourceTransportPort": 1 << 70}],
             agent="a", exporter="e", version=9, domain=1, received_us=1)
    port = cols.arrays()["src_port"]
    assert isinstance(port, np.ma.MaskedArray)
    assert port.tolist() == [80, None, None]


def test_codec_records_and_plain_mappings_give_the_same_rows() -> None:
    template = Template(300, (FieldSpec(8, 4), FieldSpec(12, 4), FieldSpec(1, 8), FieldSpec(136, 1)))
    rows = [{"sourceIPv4Address": f"10.0.0.{i}", "destinationIPv4Address": "10.9.9.9", "octetDeltaCount": i,
             "flowEndReason": 3} for i in range(5)]
    payload = encode_ipfix(templates=[template], data=[(template, rows)], export_time=1)
    msg = Decoder().decode(payload, "192.0.2.1")
    fast, slow = FlowColumns(), FlowColumns()
    for cols, records in ((fast, msg.records), (slow, [dict(r) for r in msg.records])):
        cols.add(records, agent="a", exporter="192.0.2.1", version=10, domain=0, received_us=1)
    assert fast.columns() == slow.columns()
    assert fast.columns()["extra"][0] == '{"flowEndReason":3}'


def _rows(columns: dict[str, list[object]]) -> Counter[tuple[object, ...]]:
    return Counter(zip(*columns.values(), strict=True))


def _both_ways(payloads: list[bytes], *, init_ms: int | None = None) -> tuple[FlowColumns, FlowColumns]:
    """The same datagrams into one FlowColumns as records and into another as record blocks."""
    records, blocks = FlowColumns(), FlowColumns()
    plain, columnar = Decoder(), Decoder()
    for i, payload in enumerate(payloads):
        a = plain.decode(payload, "192.0.2.1:2055")
        b = columnar.decode_columns(payload, "192.0.2.1:2055")
        kw: dict[str, Any] = {"agent": "a", "exporter": "192.0.2.1", "version": a.version, "domain": a.domain,
                              "received_us": 1_790_000_000_000_000 + i, "export_ms": a.export_time * 1000,
                              "init_ms": init_ms}
        assert records.add(a.records, **kw) == blocks.add(b.records, **kw) + blocks.add_blocks(b.blocks, **kw)
    assert records.rows == blocks.rows
    return records, blocks


def _assert_same(records: FlowColumns, blocks: FlowColumns, *, raw: bool = True) -> None:
    if raw:  # block rows hold values already fitted to their columns; records keep what did not fit
        assert _rows(records.columns()) == _rows(blocks.columns())
    fast, slow = blocks.arrays(), records.arrays()
    assert {k: v.dtype for k, v in fast.items()} == {k: v.dtype for k, v in slow.items()}
    assert Counter(zip(*(v.tolist() for v in fast.values()), strict=True)) == Counter(
        zip(*(v.tolist() for v in slow.values()), strict=True)
    )


@pytest.mark.skipif(not have_tool("softflowd"), reason="softflowd not installed")
@pytest.mark.parametrize("version", [9, 10])
def test_record_blocks_give_the_same_rows_as_records_on_softflowd(tmp_path: Path, version: int) -> None:
    trace = make_trace(tmp_path / "trace.pcap", flows=600, seed=11)
    export = capture_softflowd(trace.path, version)
    records, blocks = _both_ways(export.payloads)
    assert blocks._blocks  # the columnar path was taken
    _assert_same(records, blocks)


def test_record_blocks_give_the_same_rows_for_odd_fields_and_unresolved_uptimes() -> None:
    template = Template(
        400,
        (FieldSpec(8, 4), FieldSpec(28, 16), FieldSpec(1, 3), FieldSpec(2, 8), FieldSpec(7, 2),
         FieldSpec(22, 4), FieldSpec(21, 4), FieldSpec(56, 6), FieldSpec(136, 1), FieldSpec(10, 8)),
    )
    rows = [
        {"sourceIPv4Address": f"10.0.0.{i}", "destinationIPv6Address": f"2001:db8::{i}", "octetDeltaCount": i,
         "packetDeltaCount": (1 << 64) - 1 if i == 3 else i, "sourceTransportPort": i,
         "flowStartSysUpTime": (1 << 32) - 1000 if i % 2 else i, "flowEndSysUpTime": 500 + i,
         "sourceMacAddress": "00:11:22:33:44:55", "flowEndReason": i % 2, "ingressInterface": (1 << 63) + i}
        for i in range(6)
    ]
    payload = encode_ipfix(templates=[template], data=[(template, rows)], export_time=1_790_000_060)
    init = 1_790_000_000_000
    for init_ms in (init, None):  # IPFIX uptimes: resolved by the sink's init time, or left NULL
        records, blocks = _both_ways([payload], init_ms=init_ms)
        _assert_same(records, blocks, raw=False)
    assert blocks.columns()["flow_start"] == [None] * 6
    records, blocks = _both_ways([payload], init_ms=init)
    assert blocks.columns()["flow_start"][1] == (init - 1000) * 1000
    assert blocks.arrays()["packets"].tolist()[3] == (1 << 64) - 1
    assert blocks.arrays()["in_if"].tolist()[0] is None  # does not fit BIGINT: NULL, as on the record path


def test_blocks_records_and_record_fallbacks_mix_in_one_batch() -> None:
    fixed = Template(800, (FieldSpec(8, 4), FieldSpec(12, 4), FieldSpec(1, 4), FieldSpec(136, 1)))
    variable = Template(801, (FieldSpec(8, 4), FieldSpec(1, 4), FieldSpec(82, 65535)))
    # An 8-byte uptime: blocks of this template take the record path inside FlowColumns.
    wide_uptime = Template(802, (FieldSpec(8, 4), FieldSpec(1, 4), FieldSpec(22, 8)))
    payload = encode_ipfix(
        templates=[fixed, variable, wide_uptime],
        data=[
            (fixed, [{"sourceIPv4Address": "10.0.0.1", "destinationIPv4Address": "10.0.0.2",
                      "octetDeltaCount": 7, "flowEndReason": 2}]),
            (variable, [{"sourceIPv4Address": "10.0.0.3", "octetDeltaCount": 8, "interfaceName": "eth1"}]),
            (wide_uptime, [{"sourceIPv4Address": "10.0.0.4", "octetDeltaCount": 9, "flowStartSysUpTime": 5}]),
        ],
        export_time=1_790_000_000,
    )
    records, blocks = _both_ways([payload, payload], init_ms=1_789_999_000_000)
    assert len(blocks._blocks) == 2  # the fixed template's group and the fallback's
    assert blocks._groups  # records: the variable-length template's and the fallback's
    _assert_same(records, blocks)
    assert sorted(blocks.columns()["bytes"]) == [7, 7, 8, 8, 9, 9]
