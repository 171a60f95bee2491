"""Field names, value types and the Record mapping."""

from __future__ import annotations

import json
import pickle

import pytest

from flowtunnel.netflow import (
    Record,
    data_type,
    field_key,
    format_timestamp,
    is_timestamp,
    parse_field_key,
    units,
)
from flowtunnel.netflow.fields import FieldTypeError, field_codec


def test_keys_for_iana_unknown_and_enterprise_elements() -> None:
    assert field_key(8) == "sourceIPv4Address"
    assert field_key(999) == "unknown_999"
    assert field_key(12235, 9) == "9.12235"
    for key in ("sourceIPv4Address", "unknown_999", "9.12235"):
        ie_id, pen = parse_field_key(key)
        assert field_key(ie_id, pen) == key
    with pytest.raises(ValueError, match="neither an IANA name"):
        parse_field_key("nonsense")
    assert data_type(8) == "ipv4Address"
    assert data_type(12235, 9) == "octetArray"
    assert units("octetDeltaCount") == "octets"
    assert units("nope") == ""


def test_timestamps_format_as_iso_utc() -> None:
    assert is_timestamp("flowStartMilliseconds")
    assert not is_timestamp("octetDeltaCount")
    assert format_timestamp("flowStartSeconds", 1_700_000_000) == "2023-11-14T22:13:20Z"
    assert format_timestamp("flowStartMilliseconds", 1_700_000_000_123) == "2023-11-14T22:13:20.123Z"
    assert format_timestamp("flowStartMicroseconds", 1_700_000_000_000_001) == "2023-11-14T22:13:20.000001Z"
    assert (
        format_timestamp("flowStartNanoseconds", 1_700_000_000_000_000_001)
        == "2023-11-14T22:13:20.000000001Z"
    )
    assert format_timestamp("flowStartSeconds", 10**20) == str(10**20)  # out of datetime's range: as is
    with pytest.raises(ValueError, match="not an absolute time"):
        format_timestamp("octetDeltaCount", 1)


@pytest.mark.parametrize(
    ("ie_id", "length", "text"),
    [
        (8, 3, "addresses take exactly 4 bytes"),
        (27, 4, "exactly 16 bytes"),
        (56, 8, "MAC addresses take 6 bytes"),
        (276, 2, "booleans take 1 byte"),
        (311, 2, "floats take 4 or 8 bytes"),
        (154, 4, "NTP timestamps take 8 bytes"),
    ],
)
def test_field_lengths_that_cannot_hold_the_type(ie_id: int, length: int, text: str) -> None:
    with pytest.raises(FieldTypeError, match=text):
        field_codec(ie_id, length)


def test_reduced_size_integers_of_any_length() -> None:
    codec = field_codec(1, 3)  # octetDeltaCount in 3 bytes
    assert codec.code == "3s"
    raw = codec.to_bytes(0x010203, 3)
    assert raw == b"\x01\x02\x03"
    assert codec.conv is not None
    assert codec.conv(raw) == 0x010203
    signed = field_codec(434, 2)  # signed32 reduced to 2 bytes
    assert signed.code == "h"
    assert signed.from_bytes(b"\xff\xfe") == -2


def test_record_is_a_read_only_mapping() -> None:
    rec = Record.from_mapping({"a": 1, "b": "x"}, template_id=300, domain=4, options=True)
    assert rec["a"] == 1
    assert rec.get("zz", 5) == 5
    assert "b" in rec
    assert "zz" not in rec
    assert list(rec) == ["a", "b"]
    assert len(rec) == 2
    assert dict(rec) == {"a": 1, "b": "x"}
    assert list(rec.items()) == [("a", 1), ("b", "x")]
    assert rec == {"a": 1, "b": "x"}
    assert rec != {"a": 2, "b": "x"}
    assert (rec.template_id, rec.domain, rec.options) == (300, 4, True)
    assert json.dumps(rec.to_dict()) == '{"a": 1, "b": "x"}'
    copy = pickle.loads(pickle.dumps(rec))
    assert copy == rec
    assert copy.template_id == 300
    assert "template_id=300" in repr(rec)
    with pytest.raises(KeyError):
        rec["zz"]
    with pytest.raises(TypeError):
        hash(rec)
