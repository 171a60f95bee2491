"""Generated record builders: sysUpTime-relative times made absolute the same way on every code path."""

from __future__ import annotations

import struct

import pytest

from flowtunnel.netflow.record import RecordShape
from flowtunnel.netflow.templates import (
    FieldSpec,
    Template,
    clock_args,
    compile_template,
    make_row_converter,
)

W = 1 << 32
HALF = 1 << 31


def reference(export_ms: int, uptime_ms: int, v: int) -> int:
    """``export_ms - uptime_ms + v``, ``v`` moved by 2^32 once when it lies outside (-2^31, 2^31] of the
    uptime (the signed distance modulo 2^32; wider values move once only)."""
    d = v - uptime_ms
    if d > HALF:
        d -= W
    elif d <= -HALF:
        d += W
    return export_ms + d


UPTIMES = [0, 1, 5_000, HALF - 1, HALF, HALF + 1, W - 5_000, W - 1]
VALUES = [0, 1, 4_999, 5_000, 5_001, HALF - 1, HALF, HALF + 1, HALF + 5_000, W - 5_001, W - 1]


@pytest.mark.parametrize("u32_times", [False, True])
@pytest.mark.parametrize("uptime", UPTIMES)
def test_timed_builder_matches_signed_distance_modulo_2_32(uptime: int, u32_times: bool) -> None:
    row = struct.Struct("!I")
    convert = make_row_converter(1, [], (0,), unpack=row.iter_unpack, u32_times=u32_times)
    cls = RecordShape(("v", "t"), template_id=256, domain=0, options=False).record_type()
    export_ms = 1_794_489_460_000
    source = b"".join(row.pack(v) for v in VALUES)
    records = convert(source, *clock_args(export_ms, uptime), cls, [])
    assert [r.row for r in records] == [(v, reference(export_ms, uptime, v)) for v in VALUES]


@pytest.mark.parametrize("uptime", UPTIMES)
def test_eight_byte_uptime_fields_keep_the_general_rule(uptime: int) -> None:
    # Only fields of up to 4 bytes take the one-comparison form; an 8-byte value may exceed 2^32.
    template = Template(256, (FieldSpec(22, 8), FieldSpec(21, 4)))
    layout = compile_template(template, 9)
    values = [*VALUES, W, W + 7, 3 * W]
    data = b"".join(struct.pack("!QI", v, v % W) for v in values)
    export_ms = 1_794_489_460_000
    records, err = layout.decode_records(data, 0, len(data), 0, export_ms, uptime)
    assert err is None
    hi = uptime + HALF
    lo = hi - W

    def general(v: int) -> int:  # the rule as stated in make_row_converter, for any width
        base = export_ms - uptime
        return base + v if lo < v <= hi else base + v + (W if v <= lo else -W)

    assert [r["flowStartMilliseconds"] for r in records] == [general(v) for v in values]
    ends = [reference(export_ms, uptime, v % W) for v in values]
    assert [r["flowEndMilliseconds"] for r in records] == ends
