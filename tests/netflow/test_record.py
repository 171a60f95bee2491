"""``Record`` and ``RecordShape``: the records the decoder builds (of ``RecordShape.record_type()``) behave
exactly like hand-built ones."""

from __future__ import annotations

import pickle
from collections.abc import Mapping

import pytest

from flowtunnel.netflow import Decoder, Record, encode_v5
from flowtunnel.netflow.record import RecordShape


def _decoded() -> Record:
    flow = {"sourceIPv4Address": "192.0.2.1", "destinationIPv4Address": "198.51.100.7", "octetDeltaCount": 9}
    return Decoder().decode(encode_v5([flow], sys_uptime_ms=1000, unix_secs=1_700_000_000), "h").records[0]


def test_decoded_records_are_records_of_their_shape() -> None:
    rec = _decoded()
    assert isinstance(rec, Record)
    assert isinstance(rec, Mapping)
    assert rec["sourceIPv4Address"] == "192.0.2.1"
    assert rec.shape.record_type() is type(rec)
    assert rec.template_id == 0
    assert not rec.options
    by_hand = Record.from_mapping(rec.to_dict())
    assert rec == by_hand
    assert by_hand == rec
    assert dict(rec) == rec.to_dict()
    assert repr(rec).startswith("Record(template_id=0, domain=0, {")


def test_decoded_records_pickle_as_plain_records() -> None:
    rec = _decoded()
    back = pickle.loads(pickle.dumps(rec))
    assert type(back) is Record
    assert back == rec
    assert back.shape.keys == rec.shape.keys


def test_record_type_is_made_once_and_keeps_the_shape_read_only() -> None:
    shape = RecordShape(("a", "b"), template_id=300, domain=7, options=True)
    cls = shape.record_type()
    assert shape.record_type() is cls
    rec = cls()  # type: ignore[call-arg]  # the subclass takes no arguments (object.__init__)
    rec.row = (1, 2)
    assert rec.shape is shape
    assert (rec.template_id, rec.domain, rec.options) == (300, 7, True)
    assert rec.to_dict() == {"a": 1, "b": 2}
    with pytest.raises(AttributeError):
        rec.shape = RecordShape(("a", "b"), template_id=1, domain=1, options=False)


def test_record_builder_redoes_a_set_after_an_address_memo_miss() -> None:
    from flowtunnel.netflow.fields import _memo_table
    from flowtunnel.netflow.templates import make_row_converter

    memo = _memo_table(lambda v: f"addr{v}", limit=2)  # tiny bound: cleared while the set is redone
    convert = make_row_converter(2, [(0, memo)])
    cls = RecordShape(("a", "b"), template_id=256, domain=0, options=False).record_type()
    earlier = Record.from_mapping({"a": "x", "b": 0})
    out: list[Record] = [earlier]
    rows = [(1, 10), (2, 20), (3, 30), (1, 40)]
    convert(rows, 0, 0, cls, out)
    assert out[0] is earlier  # records already in the list are kept, the partial ones not repeated
    assert [tuple(r.row) for r in out[1:]] == [("addr1", 10), ("addr2", 20), ("addr3", 30), ("addr1", 40)]
    assert len(memo.table) <= 2
    memo.table.update({1: "addr1", 2: "addr2", 3: "addr3"})  # all hits: the fast loop alone
    assert [tuple(r.row) for r in convert(rows, 0, 0, cls, [])] == [tuple(r.row) for r in out[1:]]
