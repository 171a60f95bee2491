"""Codec 5 (columnar + field deltas + LZMA2): the agent's pure-Python differences and the gateway's numpy
undo agree for any plan, any datagrams come back byte for byte whatever field widths the sealer was told,
softflowd's export shrinks against codec 4, and a hostile plan is refused before any work."""

from __future__ import annotations

import contextlib
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowtunnel.wire import (
    Codec,
    MalformedRecords,
    TemplateLengths,
    WireError,
    open_batch,
    peek_header,
    seal_batch,
)
from flowtunnel.wire.columnar import payload_decoder, payload_encoder, template_fields
from flowtunnel.wire.deltas import (
    MAX_PLAN_FIELDS,
    PARTNER,
    SAME,
    WITHIN,
    Field,
    PlanCache,
    apply_plan,
    choose_plan,
    decode_plan,
    encode_plan,
    undo_plan,
)
from flowtunnel.wire.records import decode_block, encode_block, write_uvarint
from tests.conftest import require
from tests.peers import TraceSummary, capture_softflowd
from tests.wire.test_columnar import KEY, _section_block, as_datagrams, payloads_st

DELTA = Codec.DELTA_LZMA


def seal5(datagrams: list, **kw: object) -> bytes:  # type: ignore[type-arg]
    return seal_batch(agent_id="a", key=KEY, first_seq=1, datagrams=datagrams, nonce=bytes(12), codec=DELTA,
                      **kw)  # type: ignore[arg-type]


# -- the transform itself --------------------------------------------------------------------------------


@st.composite
def plans(draw: st.DrawFn) -> tuple[int, list[Field]]:
    """A record length and a valid plan for it: disjoint fields, op 2 in pairs, op 3 reading no op 3 field."""
    n = draw(st.integers(1, 40))
    fields: list[tuple[int, int]] = []
    offset = 0
    while offset < n:
        width = draw(st.integers(1, min(8, n - offset)))
        if draw(st.booleans()):
            fields.append((offset, width))
        offset += width
    plan: dict[int, Field] = {}
    free = list(fields)
    while free:
        fo, fw = free.pop(0)
        op = draw(st.sampled_from([SAME, PARTNER, WITHIN]))
        mate = next(((o, w) for o, w in free if w == fw), None)
        if op == PARTNER and mate is not None:
            free.remove(mate)
            plan[fo] = Field(offset=fo, width=fw, op=PARTNER, ref=mate[0])
            plan[mate[0]] = Field(offset=mate[0], width=fw, op=PARTNER, ref=fo)
        elif op == WITHIN:
            ref = draw(st.integers(0, n - fw))
            plan[fo] = Field(offset=fo, width=fw, op=WITHIN, ref=ref)
        else:
            plan[fo] = Field(offset=fo, width=fw, op=SAME, ref=fo)
    # op 3 must not read an op 3 field's bytes: turn offenders into op 1
    within = [f for f in plan.values() if f.op == WITHIN]
    for f in within:
        if any(f.ref < g.offset + g.width and g.offset < f.ref + f.width for g in within):
            plan[f.offset] = Field(offset=f.offset, width=f.width, op=SAME, ref=f.offset)
    return n, list(plan.values())


def _checked(plan: list[Field], n: int) -> list[Field]:
    out = bytearray()
    encode_plan(plan, out)
    decoded, pos = decode_plan(memoryview(bytes(out)), 0, n, 0, 1024)
    assert pos == len(out)
    return decoded


@given(plans(), st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_plan_is_undone_exactly_by_the_gateway(
    spec: tuple[int, list[Field]], data: st.DataObject
) -> None:
    n, plan = spec
    count = data.draw(st.integers(0, 30))
    rows = data.draw(st.binary(min_size=n * count, max_size=n * count))
    stored = apply_plan(rows, n, plan)
    cols = np.frombuffer(bytearray(stored), dtype=np.uint8).reshape(n, count)
    undo_plan(cols, _checked(plan, n))
    assert cols.T.tobytes() == rows


def test_a_pair_of_swapped_fields_and_a_running_counter_become_small_numbers() -> None:
    # records alternate (a, b) / (b, a), as both directions of a conversation; the third field counts up
    rows = b"".join(struct.pack(">IIQ", *((a, b) if r % 2 == 0 else (b, a)), 1000 + 3 * r)
                    for r in range(64) for a, b in [(0x0A000000 + r // 2 * 77, 0xC6336400 + r // 2 * 13)])
    plan = choose_plan(rows, 16, (4, 4, 8))
    assert {(f.offset, f.op, f.ref) for f in plan} >= {(0, PARTNER, 4), (4, PARTNER, 0), (8, SAME, 8)}
    stored = apply_plan(rows, 16, plan)
    # every reverse record's addresses are now 0, and the counter's low byte is 3 after the first record
    assert all(stored[j * 64 + r] == 0 for j in range(8) for r in range(1, 64, 2))
    assert stored[15 * 64 + 1 : 16 * 64] == bytes([3]) * 63


@given(st.binary(min_size=2, max_size=3000), st.integers(1, 8))
@settings(max_examples=200, deadline=None)
def test_the_bit_estimate_is_the_entropy_formula_to_the_last_bit(slots: bytes, width: int) -> None:
    """issue 14: ``_bits`` looks ``c * log2(c)`` up in a table instead of computing it for every count: the
    same floats summed in the same order, so every plan is chosen as before (the bytes on the wire too)."""
    import math
    from collections import Counter

    from flowtunnel.wire.deltas import _bits

    slots = slots[: len(slots) // (width + 1) * (width + 1)] or bytes(width + 1)
    want = 0.0
    for j in range(width):
        col = slots[1 + j :: width + 1]
        n = len(col)
        want += n * math.log2(n) - sum(c * math.log2(c) for c in Counter(col).values())
    assert _bits(slots, width) == want


def test_unknown_or_inconsistent_widths_give_no_plan() -> None:
    rows = bytes(range(64)) * 4
    assert choose_plan(rows, 16, None) == []
    assert choose_plan(rows, 16, (4, 4)) == []  # adds up to 8, not 16
    assert choose_plan(rows[:16], 16, (4, 4, 8)) == []  # one record: nothing to difference


# -- through the sealed batch ----------------------------------------------------------------------------


@given(payloads_st, st.one_of(st.none(), st.lists(st.integers(0, 20), max_size=12)))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_datagrams_come_back_whatever_widths_the_sealer_is_told(payloads: list[bytes],
                                                                     widths: list[int] | None) -> None:
    datagrams = as_datagrams(payloads)
    told = None if widths is None else (lambda _p, _s: tuple(widths))
    body = seal5(datagrams, record_length=None if widths is None else (lambda _p, _s: sum(widths) or None),
                 field_widths=told)
    assert peek_header(body).codec is DELTA
    assert open_batch(body, key=KEY).datagrams == tuple(datagrams)


def test_template_fields_name_every_field_width() -> None:
    template = struct.pack(">HH", 256, 3) + struct.pack(">HHHHHH", 8, 4, 12, 4, 7, 2)
    v9 = struct.pack(">HHIIII", 9, 1, 0, 0, 0, 5) + struct.pack(">HH", 0, 4 + len(template)) + template
    assert template_fields(v9) == {(9, 5, 256): (4, 4, 2)}
    cache = TemplateLengths()
    cache.learn(v9)
    assert cache.field_widths(v9, 256) == (4, 4, 2)
    assert cache.record_length(v9, 256) == 10


@pytest.mark.parametrize("version", [5, 9, 10])
def test_softflowd_export_round_trips_and_beats_codec_4(trace: TraceSummary, version: int) -> None:
    require("softflowd")
    datagrams = as_datagrams(capture_softflowd(trace.path, version).payloads)
    lengths = TemplateLengths()
    for d in datagrams:
        lengths.learn(d.payload)
    body5 = seal5(datagrams, record_length=lengths.record_length, field_widths=lengths.field_widths)
    body4 = seal_batch(agent_id="a", key=KEY, first_seq=1, datagrams=datagrams, nonce=bytes(12),
                       codec=Codec.COLUMNAR_LZMA, record_length=lengths.record_length)
    assert open_batch(body5, key=KEY).datagrams == tuple(datagrams)
    assert len(body5) < 0.95 * len(body4), (len(body5), len(body4))
    # without the agent's template cache, the templates in the batch name the fields
    assert open_batch(seal5(datagrams), key=KEY).datagrams == tuple(datagrams)


def _pairs(records: int, start: int = 0) -> bytes:
    """Records of two swapped addresses and a counter, as both directions of conversations (16 bytes)."""
    return b"".join(struct.pack(">IIQ", *((a, b) if r % 2 == 0 else (b, a)), 1000 + 3 * r)
                    for r in range(start, start + records)
                    for a, b in [(0x0A000000 + r // 2 * 77, 0xC6336400 + r // 2 * 13)])


def test_a_plan_cache_chooses_once_per_layout_and_reuses_it_for_later_batches() -> None:
    cache = PlanCache(reuse=3)
    first = cache.plan(_pairs(64), 16, (4, 4, 8))
    assert first == choose_plan(_pairs(64), 16, (4, 4, 8))
    assert cache.chosen == 1
    # the next batches of the layout take the cached plan (their own records are not examined) ...
    assert cache.plan(_pairs(64, 64), 16, (4, 4, 8)) == first
    assert cache.plan(bytes(16 * 64), 16, (4, 4, 8)) == first
    assert cache.chosen == 1
    # ... until it served `reuse` batches: then it is chosen again, on the records at hand
    assert cache.plan(bytes(16 * 64), 16, (4, 4, 8)) == choose_plan(bytes(16 * 64), 16, (4, 4, 8))
    assert cache.chosen == 2
    # another layout has its own plan; no or inconsistent widths: no plan, nothing cached
    cache.plan(_pairs(64), 16, (8, 8))
    assert cache.chosen == 3
    assert len(cache) == 2
    assert cache.plan(_pairs(64), 16, None) == []
    assert cache.plan(_pairs(64), 16, (4, 4)) == []
    assert len(cache) == 2


def test_a_plan_chosen_on_a_few_records_is_chosen_again_for_a_group_of_many_more() -> None:
    cache = PlanCache()
    assert cache.plan(_pairs(1), 16, (4, 4, 8)) == []  # one record: nothing to difference
    assert cache.plan(_pairs(2), 16, (4, 4, 8)) == []  # twice the records: still the cached plan
    assert cache.chosen == 1
    assert cache.plan(_pairs(3), 16, (4, 4, 8)) == choose_plan(_pairs(3), 16, (4, 4, 8)) != []
    assert cache.chosen == 2
    cache.plan(_pairs(6), 16, (4, 4, 8))
    assert cache.chosen == 2
    assert cache.plan(_pairs(64), 16, (4, 4, 8)) == choose_plan(_pairs(64), 16, (4, 4, 8))
    assert cache.chosen == 3


def test_a_plan_cache_is_bounded_dropping_the_least_recently_used_layout() -> None:
    cache = PlanCache(max_entries=2)
    for widths in ((4, 4, 8), (8, 8), (4, 4, 8), (4, 4, 4, 4)):
        cache.plan(_pairs(8), 16, widths)
    assert len(cache) == 2
    assert cache.chosen == 3
    cache.plan(_pairs(8), 16, (4, 4, 8))  # kept: used more recently than (8, 8)
    assert cache.chosen == 3
    cache.plan(_pairs(8), 16, (8, 8))  # dropped: chosen again
    assert cache.chosen == 4
    with pytest.raises(ValueError, match="reuse 0"):
        PlanCache(reuse=0)


@pytest.mark.parametrize("version", [5, 9, 10])
def test_batches_sealed_with_a_plan_cache_round_trip_choosing_plans_only_once(
    trace: TraceSummary, version: int
) -> None:
    """Codec 5 with a ``PlanCache`` across batches (the agent's way since issue 14's fast-link rows): every
    batch opens to its datagrams, plans are chosen for the first batch only, and the bodies are within 2 %
    of choosing a plan for every batch."""
    require("softflowd")
    datagrams = as_datagrams(capture_softflowd(trace.path, version).payloads)
    lengths = TemplateLengths()
    for d in datagrams:
        lengths.learn(d.payload)
    cache = PlanCache()
    batches = [datagrams[i : i + 20] for i in range(0, min(len(datagrams), 200), 20)]
    cached = fresh = 0
    for i, batch in enumerate(batches):
        body = seal5(batch, record_length=lengths.record_length, field_widths=lengths.field_widths,
                     plans=cache)
        assert open_batch(body, key=KEY).datagrams == tuple(batch)
        if i == 0:
            chosen = cache.chosen
        cached += len(body)
        fresh += len(seal5(batch, record_length=lengths.record_length, field_widths=lengths.field_widths))
    assert len(batches) > 2
    assert cache.chosen == chosen
    assert cached <= 1.02 * fresh, (cached, fresh)


# -- hostile plans ---------------------------------------------------------------------------------------


def _block_with_plan(plan: bytes, record_length: int = 8, records: int = 2) -> bytes:
    """A codec 5 record block: one datagram made of ``records`` records of one group, its plan ``plan``."""
    layout = bytes([0, 1, records, 0, 0])
    section = bytearray([1, record_length]) + plan
    write_uvarint(len(layout), section)
    section += layout + bytes([0]) + bytes(record_length * records)
    return _section_block(bytes(section), [record_length * records])


def _decode(block: bytes) -> None:
    decode_block(block, 1, max_datagram=65535, max_exporters=4, payload_decoder=payload_decoder(1 << 20,
                                                                                                deltas=True))


def _plan(*fields: tuple[int, int, int, int | None]) -> bytes:
    out = bytearray()
    write_uvarint(len(fields), out)
    for offset, width, op, ref in fields:
        write_uvarint(offset, out)
        out += bytes([width, op])
        if ref is not None:
            write_uvarint(ref, out)
    return bytes(out)


@pytest.mark.parametrize(("plan", "error"), [
    (_plan((0, 4, 1, None), (2, 4, 1, None)), "overlap at byte 2"),
    (_plan((0, 9, 1, None)), "width 9 does not fit"),
    (_plan((0, 0, 1, None)), "width 0 does not fit"),
    (_plan((6, 4, 1, None)), "does not fit its 8-byte records"),
    (_plan((0, 4, 7, None)), "has op 7"),
    (_plan((0, 4, 2, 4)), "not an op 2 field of the same width naming it back"),
    (_plan((0, 4, 2, 4), (4, 4, 1, None)), "not an op 2 field"),
    (_plan((0, 4, 2, 0)), "naming it back"),
    (_plan((0, 2, 2, 4), (4, 4, 2, 0)), "naming it back"),
    (_plan((0, 4, 3, 2), (4, 4, 3, 0)), "overlap the op 3 field at 0"),
    (_plan((0, 4, 3, 0)), "overlap the op 3 field at 0"),
    (_plan((0, 4, 3, 6)), "does not fit"),
    (bytes([MAX_PLAN_FIELDS + 1]), f"limit is {MAX_PLAN_FIELDS}"),
])
def test_a_hostile_plan_is_refused_by_name(plan: bytes, error: str) -> None:
    with pytest.raises(MalformedRecords, match=error):
        _decode(_block_with_plan(plan))


def test_a_valid_plan_in_a_hand_made_block_decodes() -> None:
    _decode(_block_with_plan(_plan((0, 4, 2, 4), (4, 4, 2, 0))))
    _decode(_block_with_plan(_plan((0, 4, 3, 4), (4, 4, 1, None))))


def test_plans_are_bounded_per_batch() -> None:
    # 20 groups of 64 one-byte op 1 fields each: 1,280 fields, over the batch's 1,024
    n = 64
    plan = _plan(*((i, 1, 1, None) for i in range(n)))
    section = bytearray([20]) + bytes([n]) * 20 + plan * 20
    layout = bytes([0, 0])
    write_uvarint(len(layout), section)
    section += layout + bytes([1]) + b"x"
    with pytest.raises(MalformedRecords, match="limit is 0"):
        _decode(_section_block(bytes(section), [1]))


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_mutated_codec_5_blocks_raise_only_wire_errors(data: st.DataObject) -> None:
    rows = b"".join(struct.pack(">IIHH", 0x0A000001 + r, 0xC0000201 - r, 1000 + r, 53) for r in range(8))
    payloads = [struct.pack(">HHIIII", 9, 1, 0, 0, 0, 0) + struct.pack(">HH", 256, 4 + len(rows)) + rows] * 3
    encoder = payload_encoder(lambda _p, _s: 12, field_widths=lambda _p, _s: (4, 4, 2, 2), deltas=True)
    block = bytearray(encode_block(as_datagrams(payloads), None, encoder))
    for _ in range(data.draw(st.integers(1, 4))):
        block[data.draw(st.integers(0, len(block) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(WireError):
        decode_block(bytes(block), 3, max_datagram=65535, max_exporters=4,
                     payload_decoder=payload_decoder(1 << 20, deltas=True))
