"""bench/bounds.py's field-class estimate: it must count every byte of the batches it estimates (a split that
dropped records would make the estimate look better than any codec could be), and its XOR with the partner
field must be a transform a decoder can undo."""

from __future__ import annotations

import bounds
from _common import vendor_streams
from flowtunnel.wire.batch import HEADER, TAG_BYTES
from wire import _batches, _datagrams


def _cisco() -> list[bytes]:
    return next(s for s in vendor_streams() if s.version == "IPFIX").payloads[:200]


def test_the_split_keeps_every_byte_of_every_datagram() -> None:
    known: bounds.Templates = {}
    split = 0
    for p in _cisco():
        bounds.learn_templates(p, known)
        records: dict[tuple[int, int, int], list[bytes]] = {}
        rest = bounds._split(p, known, records)
        split += len(rest) + sum(len(r) for rows in records.values() for r in rows)
        parts = [data for key, rows in records.items() for _, data in bounds._class_parts(known[key], rows)]
        assert sum(map(len, parts)) == sum(len(r) for rows in records.values() for r in rows)
    assert known, "no template learned from the Cisco captures"
    assert split == sum(len(p) for p in _cisco())


def test_the_partner_xor_is_undone_record_by_record() -> None:
    fields = ((8, 4), (12, 4), (7, 2), (11, 2), (4, 1))
    rows = [bytes([10, 0, 0, 1, 10, 0, 0, 2, 0, 80, 200, 1, 6]),
            bytes([10, 0, 0, 2, 10, 0, 0, 1, 200, 1, 0, 80, 6]),
            bytes([192, 168, 1, 1, 8, 8, 8, 8, 0, 53, 0, 53, 17])]
    parts = bounds._class_parts(fields, rows)
    assert [c for c, _ in parts] == ["address", "address", "port", "port", "byte"]
    assert parts[0][1][4:8] == bytes(4)  # the reply's source is the request's destination: all zero
    assert parts[1][1][4:8] == bytes(4)
    src, dst = parts[0][1], parts[1][1]
    got_src, got_dst, prev_src, prev_dst = [], [], bytes(4), bytes(4)
    for i in range(3):
        s = bytes(a ^ b for a, b in zip(src[4 * i:4 * i + 4], prev_dst, strict=True))
        d = bytes(a ^ b for a, b in zip(dst[4 * i:4 * i + 4], prev_src, strict=True))
        got_src.append(s)
        got_dst.append(d)
        prev_src, prev_dst = s, d
    assert got_src == [r[0:4] for r in rows]
    assert got_dst == [r[4:8] for r in rows]


def test_the_estimate_counts_a_seal_per_batch() -> None:
    items = _datagrams(_cisco(), 10.0)
    single, classes = bounds.field_classes(_batches(items, 50))
    raw = sum(len(p) for p in _cisco())
    assert single > 4 * (HEADER.size + TAG_BYTES)  # four batches, each sealed
    assert 0.01 * raw < classes < raw
    assert 0.01 * raw < single < raw
