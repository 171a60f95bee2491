"""Codec 5's field deltas: record fields stored as differences from a previous value (docs/protocol.md 4.1).

Byte columns (codec 3/4) put like bytes together, but a timestamp, a counter or an address still changes
from one record to the next by much less than its range, and flow exporters that report both directions
of a conversation (softflowd, most firewalls) write a record whose source is the previous one's
destination. Codec 5 stores chosen fields of a record group as the difference (modulo 2^(8 x width)) from
the same field of the previous record (op 1), or from a *partner* field of the previous record (op 2: the
pair source/destination address, source/destination port), before the columns go to LZMA2: on softflowd v9
that is ~15 % fewer bytes than codec 4, which is what the DNS rung needs when it drains a backlog.

The plan travels with the group, so the receiver needs no template: any plan reverses exactly, a useless
one costs only compression. The encoder (the agent) is pure Python (big integers do the per-record
arithmetic at C speed; no numpy on the agent's path); the decoder (the gateway) uses numpy.
"""

from __future__ import annotations

import math
import threading
from array import array
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flowtunnel.wire.errors import MalformedRecords
from flowtunnel.wire.records import read_uvarint, write_uvarint

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "MAX_FIELD_WIDTH",
    "MAX_PLAN_FIELDS",
    "MAX_TOTAL_FIELDS",
    "PLAN_REUSE",
    "Field",
    "PlanCache",
    "apply_plan",
    "choose_plan",
    "decode_plan",
    "encode_plan",
    "undo_plan",
]

#: a field is an unsigned big-endian integer of 1..8 bytes (wider template fields are cut into 8-byte parts)
MAX_FIELD_WIDTH = 8
#: transformed fields per record group, and per batch (bounds the receiver's work per plan byte)
MAX_PLAN_FIELDS = 64
MAX_TOTAL_FIELDS = 1024
SAME = 1  # op 1: minus the same field of the previous record
PARTNER = 2  # op 2: minus the partner field of the previous record (pairs only, both ways)
WITHIN = 3  # op 3: minus another field of the same record (an end time minus its start time)
#: records the encoder looks at to choose a plan (the first ones of the group): bounds its CPU per batch
SAMPLE_RECORDS = 4096
#: a transform must save at least this share of the estimated bits to be chosen (the estimate is rough)
_MARGIN = 0.97


@dataclass(frozen=True, slots=True, kw_only=True)
class Field:
    """One transformed field of a group's records: bytes ``offset .. offset + width`` of each record, stored
    minus the previous record's field at ``ref`` (``offset`` itself for op 1)."""

    offset: int
    width: int
    op: int
    ref: int


# -- encoder (pure Python) ----------------------------------------------------------------------------------


def _slots(rows: bytes, n: int, offset: int, width: int, count: int) -> int:
    """The field of ``count`` records as one big integer, record 0 most significant, each value in a slot of
    ``width + 1`` bytes whose top (guard) byte is zero."""
    buf = bytearray(count * (width + 1))
    for j in range(width):
        buf[1 + j :: width + 1] = rows[offset + j : count * n : n]
    return int.from_bytes(buf, "big")


def _masks(width: int, count: int) -> tuple[int, int]:
    guard = int.from_bytes((b"\x01" + bytes(width)) * count, "big")
    low = int.from_bytes((b"\x00" + b"\xff" * width) * count, "big")
    return guard, low


def _minus_previous(values: int, previous: int, width: int, count: int, *, shift: bool = True) -> bytes:
    """Each slot of ``values`` minus the slot before it in ``previous`` (record r - 1; 0 for record 0), or
    with ``shift=False`` the same slot, modulo 2^(8 x width), as ``count`` slots of ``width + 1`` bytes. The
    guard bytes keep borrows within a slot."""
    guard, low = _masks(width, count)
    shifted = previous >> (8 * (width + 1)) if shift else previous
    return (((values | guard) - shifted) & low).to_bytes(count * (width + 1), "big")


#: ``c * log2(c)`` for every count ``_bits`` meets (a column has at most SAMPLE_RECORDS bytes): a lookup
#: instead of a logarithm and a generator step per distinct byte value (issue 14: the bit estimates were ~6 %
#: of the agent's CPU at 1,000 flows/s). The same floats, summed in the same order; 32 KB.
_XLOGX = array("d", [0.0] + [c * math.log2(c) for c in range(1, SAMPLE_RECORDS + 1)])


def _bits(slots: bytes, width: int) -> float:
    """Order-0 entropy estimate, in bits, of the byte columns of ``slots`` (slot layout of ``_slots``)."""
    xlogx = _XLOGX.__getitem__
    total = 0.0
    for j in range(width):
        col = slots[1 + j :: width + 1]
        n = len(col)
        if n < len(_XLOGX):
            total += n * math.log2(n) - sum(map(xlogx, Counter(col).values()))
        else:  # a longer column than choose_plan samples
            total += n * math.log2(n) - sum(c * math.log2(c) for c in Counter(col).values())
    return total


def _fields(widths: Sequence[int]) -> list[tuple[int, int]]:
    """(offset, width) of each field, template fields wider than 8 bytes cut into 8-byte parts."""
    out: list[tuple[int, int]] = []
    offset = 0
    for w in widths:
        left = w
        while left > 0:
            part = min(left, MAX_FIELD_WIDTH)
            out.append((offset, part))
            offset += part
            left -= part
    return out


def choose_plan(rows: bytes, n: int, widths: Sequence[int] | None) -> list[Field]:
    """The transforms worth making on a group of ``n``-byte records (``rows``, back to back), judged on its
    first ``SAMPLE_RECORDS`` records: per field, op 1 if it lowers the estimated bits; then pairs of equal
    width whose op 2 both ways beats their best alone, the best pairs first. Empty when ``widths`` (the
    record's field widths) is unknown or does not add up to ``n``."""
    count = min(len(rows) // n, SAMPLE_RECORDS)
    if widths is None or sum(widths) != n or count < 2:
        return []
    fields = _fields(widths)[: 4 * MAX_PLAN_FIELDS]
    values: dict[int, int] = {}
    best: dict[int, tuple[float, Field | None]] = {}
    for offset, width in fields:
        v = values[offset] = _slots(rows, n, offset, width, count)
        plain = _bits(v.to_bytes(count * (width + 1), "big"), width)
        same = _bits(_minus_previous(v, v, width, count), width)
        best[offset] = ((same, Field(offset=offset, width=width, op=SAME, ref=offset))
                        if same < plain * _MARGIN else (plain, None))
    pairs: list[tuple[float, int, int, int]] = []
    for i, (fo, fw) in enumerate(fields):
        for go, gw in fields[i + 1 :]:
            if gw != fw:
                continue
            cost = (_bits(_minus_previous(values[fo], values[go], fw, count), fw)
                    + _bits(_minus_previous(values[go], values[fo], fw, count), fw))
            alone = best[fo][0] + best[go][0]
            if cost < alone * _MARGIN:
                pairs.append((cost - alone, fo, go, fw))
    chosen: dict[int, Field] = {o: f for o, (_, f) in best.items() if f is not None}
    paired: set[int] = set()
    for _, fo, go, width in sorted(pairs):
        if fo in paired or go in paired:
            continue
        paired.update((fo, go))
        chosen[fo] = Field(offset=fo, width=width, op=PARTNER, ref=go)
        chosen[go] = Field(offset=go, width=width, op=PARTNER, ref=fo)
    # Op 3: a field minus another of the same record (end minus start), never a field that is itself op 3.
    within: list[tuple[float, int, int, int]] = []
    for fo, fw in fields:
        if fo in paired:
            continue
        for go, gw in fields:
            if go != fo and gw == fw:
                cost = _bits(_minus_previous(values[fo], values[go], fw, count, shift=False), fw)
                if cost < best[fo][0] * _MARGIN:
                    within.append((cost - best[fo][0], fo, go, fw))
    ops3: set[int] = set()
    refs: set[int] = set()
    for _, fo, go, width in sorted(within):
        if fo in ops3 or fo in refs or go in ops3:
            continue
        ops3.add(fo)
        refs.add(go)
        chosen[fo] = Field(offset=fo, width=width, op=WITHIN, ref=go)
    plan = sorted(chosen.values(), key=lambda f: f.offset)
    # A plan is bounded in fields: keep the pairs whole (drop single fields first, then whole pairs).
    while len(plan) > MAX_PLAN_FIELDS:
        single = [f for f in plan if f.op == SAME]
        drop = {single[-1].offset} if single else {plan[-1].offset, plan[-1].ref}
        plan = [f for f in plan if f.offset not in drop]
    return plan


#: batches a cached plan serves before ``PlanCache`` chooses it again on fresh records
PLAN_REUSE = 64


class PlanCache:
    """Plans chosen once and reused across batches, by record layout (record length and field widths).

    ``choose_plan`` is most of codec 5's sealing CPU (its bit estimates: ~200 ms per raw MB of softflowd v9,
    where the rest of the record block and LZMA2 preset 1 take ~40), while the plan worth making on a
    template's records changes little from one batch to the next of the same exporter. So the sealer keeps
    one of these (the agent: for its lifetime) and ``plan(rows, n, widths)`` chooses a plan only for a layout
    it has not seen, every ``reuse`` batches of that layout, or when the group has more than twice the
    records (up to ``SAMPLE_RECORDS``) the cached plan was chosen on (a plan from a batch of two datagrams
    is not kept for batches of hundreds). Any plan reverses exactly (it travels with the group), so a stale
    one costs bytes, never correctness. At most ``max_entries`` layouts, the least recently used dropped.
    Thread-safe (a lock around the table; two sealers may both choose a plan, the later kept).
    """

    def __init__(self, *, reuse: int = PLAN_REUSE, max_entries: int = 256) -> None:
        if reuse < 1 or max_entries < 1:
            raise ValueError(f"reuse {reuse} and max_entries {max_entries} must be >= 1")
        self._reuse = reuse
        self._max = max_entries
        # (record length, field widths) -> (plan, records it was chosen on, batches served since)
        self._plans: OrderedDict[tuple[int, tuple[int, ...]], tuple[list[Field], int, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.chosen = 0  # plans chosen (``choose_plan`` calls), for tests and status

    def plan(self, rows: bytes, n: int, widths: Sequence[int] | None) -> list[Field]:
        """``choose_plan(rows, n, widths)``, or the plan cached for this layout while it is still fresh."""
        if widths is None or sum(widths) != n:
            return []
        key = (n, tuple(widths))
        sample = min(len(rows) // n, SAMPLE_RECORDS)
        with self._lock:
            hit = self._plans.get(key)
            if hit is not None and hit[2] < self._reuse and sample <= 2 * hit[1]:
                self._plans[key] = (hit[0], hit[1], hit[2] + 1)
                self._plans.move_to_end(key)
                return list(hit[0])
        plan = choose_plan(rows, n, widths)
        with self._lock:
            self.chosen += 1
            self._plans[key] = (plan, sample, 1)
            self._plans.move_to_end(key)
            while len(self._plans) > self._max:
                self._plans.popitem(last=False)
        return list(plan)

    def __len__(self) -> int:
        return len(self._plans)


def apply_plan(rows: bytes, n: int, plan: Sequence[Field]) -> bytes:
    """The group's column block (byte ``j`` of record ``r`` at ``j * count + r``) with ``plan``'s fields
    stored as differences."""
    count = len(rows) // n
    columns = [rows[j::n] for j in range(n)]
    values: dict[tuple[int, int], int] = {}
    for f in plan:
        for at in (f.offset, f.ref):
            if (at, f.width) not in values:
                values[(at, f.width)] = _slots(rows, n, at, f.width, count)
    for f in plan:
        slots = _minus_previous(values[(f.offset, f.width)], values[(f.ref, f.width)], f.width, count,
                                shift=f.op != WITHIN)
        for j in range(f.width):
            columns[f.offset + j] = slots[1 + j :: f.width + 1]
    return b"".join(columns)


def encode_plan(plan: Sequence[Field], out: bytearray) -> None:
    """Append ``plan`` in its wire form (field count, then offset, width, op and, for op 2, the partner)."""
    write_uvarint(len(plan), out)
    for f in plan:
        write_uvarint(f.offset, out)
        out.append(f.width)
        out.append(f.op)
        if f.op in (PARTNER, WITHIN):
            write_uvarint(f.ref, out)


# -- decoder (numpy) ----------------------------------------------------------------------------------------


def decode_plan(block: memoryview, pos: int, record_length: int, group: int,
                budget: int) -> tuple[list[Field], int]:
    """Read and check one group's plan at ``pos``; ``budget``: fields the batch may still declare.

    Checks: at most ``MAX_PLAN_FIELDS`` fields (and ``budget``), each within the record, widths 1..8, no two
    overlapping, op 1 or 2, and every op 2 field's partner an op 2 field of the same width naming it back.
    """
    what = f"columnar group {group}"
    count, pos = read_uvarint(block, pos, f"field count of {what}")
    if count > min(MAX_PLAN_FIELDS, budget):
        raise MalformedRecords(f"{what} declares {count} delta fields, the limit is "
                               f"{min(MAX_PLAN_FIELDS, budget)} ({MAX_TOTAL_FIELDS} per batch)")
    plan: list[Field] = []
    for _ in range(count):
        offset, pos = read_uvarint(block, pos, f"field offset of {what}")
        if pos + 2 > len(block):
            raise MalformedRecords(f"delta plan of {what} ends inside a field")
        width, op = block[pos], block[pos + 1]
        pos += 2
        ref = offset
        if op in (PARTNER, WITHIN):
            ref, pos = read_uvarint(block, pos, f"reference field of {what}")
        elif op != SAME:
            raise MalformedRecords(f"{what} field at {offset} has op {op}, not {SAME}, {PARTNER} or {WITHIN}")
        if not 1 <= width <= MAX_FIELD_WIDTH or max(offset, ref) + width > record_length:
            raise MalformedRecords(f"{what} field at {offset} of width {width} does not fit its "
                                   f"{record_length}-byte records (widths 1..{MAX_FIELD_WIDTH})")
        plan.append(Field(offset=offset, width=width, op=op, ref=ref))
    by_offset = {f.offset: f for f in plan}
    end = 0
    for f in sorted(plan, key=lambda f: f.offset):
        if f.offset < end:
            raise MalformedRecords(f"{what} delta fields overlap at byte {f.offset}")
        end = f.offset + f.width
        if f.op == PARTNER:
            partner = by_offset.get(f.ref)
            if (partner is None or partner is f or partner.op != PARTNER or partner.ref != f.offset
                    or partner.width != f.width):
                raise MalformedRecords(f"{what} field at {f.offset} names partner {f.ref}, which is not an "
                                       "op 2 field of the same width naming it back")
    # Op 3 adds a field of the same record, undone after ops 1 and 2: it must not read an op 3 field's bytes
    # (the result would depend on the order), its own included.
    within = [f for f in plan if f.op == WITHIN]
    for f in within:
        for g in within:
            if f.ref < g.offset + g.width and g.offset < f.ref + f.width:
                raise MalformedRecords(f"{what} field at {f.offset} adds bytes {f.ref}.."
                                       f"{f.ref + f.width - 1}, which overlap the op 3 field at {g.offset}")
    return plan, pos


def _read(cols: npt.NDArray[np.uint8], f: Field) -> npt.NDArray[np.uint64]:
    import numpy as np

    v = np.zeros(cols.shape[1], dtype=np.uint64)
    for j in range(f.width):
        v = (v << np.uint64(8)) | cols[f.offset + j].astype(np.uint64)
    return v


def _write(cols: npt.NDArray[np.uint8], f: Field, v: npt.NDArray[np.uint64]) -> None:
    import numpy as np

    for j in range(f.width):
        cols[f.offset + j] = (v >> np.uint64(8 * (f.width - 1 - j))).astype(np.uint8)


def undo_plan(cols: npt.NDArray[np.uint8], plan: Sequence[Field]) -> None:
    """Turn the differences of ``plan``'s fields back into values, in place (``cols``: record length x count,
    byte ``j`` of record ``r`` at ``cols[j, r]``). Vectorised: op 1 is a running sum; an op 2 pair (a, b)
    with ``a[r] = da[r] + b[r-1]`` and ``b[r] = db[r] + a[r-1]`` is two running sums, one over even and one
    over odd records, of ``da[r] + db[r-1]``. Unsigned arithmetic wraps modulo 2^64, then the field's mask."""
    import numpy as np

    if cols.shape[1] == 0:
        return
    for f in sorted(plan, key=lambda f: f.op == WITHIN):  # op 3 last: it adds decoded values
        mask = np.uint64((1 << (8 * f.width)) - 1)
        if f.op == SAME:
            _write(cols, f, np.cumsum(_read(cols, f), dtype=np.uint64) & mask)
        elif f.op == WITHIN:
            ref = Field(offset=f.ref, width=f.width, op=0, ref=f.ref)
            _write(cols, f, (_read(cols, f) + _read(cols, ref)) & mask)
        elif f.offset < f.ref:  # each pair once, from its first field
            g = Field(offset=f.ref, width=f.width, op=PARTNER, ref=f.offset)
            da, db = _read(cols, f), _read(cols, g)
            s = da.copy()
            s[1:] += db[:-1]
            a = np.empty_like(s)
            a[0::2] = np.cumsum(s[0::2], dtype=np.uint64)
            a[1::2] = np.cumsum(s[1::2], dtype=np.uint64)
            a &= mask
            b = db.copy()
            b[1:] += a[:-1]
            b &= mask
            _write(cols, f, a)
            _write(cols, g, b)
