"""Codec 3 "columnar": an exactly reversible transposition of fixed-size records before zstd.

Export datagrams are mostly arrays of fixed-size records (v5: 48 bytes; v9/IPFIX data sets: the template's
record length). Byte ``j`` of every record of one template is the same field — a port, a counter's high
byte, a timestamp — so laying the batch out column by column (byte 0 of every record, then byte 1, ...)
gives zstd long runs of similar bytes, which row order hides behind the record stride.

The transform is self-describing: the gateway rebuilds every datagram byte for byte without knowing any
template. A record length only has to be *useful*, never right — any length reverses exactly — so the
sealer may guess it from templates seen in the same batch, or from the agent's template cache through the
``record_length(datagram, set_id)`` callback. Layout of the payload section: docs/protocol.md, section 4.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from flowtunnel.wire import deltas as _deltas
from flowtunnel.wire.errors import LimitExceeded, MalformedRecords

if TYPE_CHECKING:  # numpy only for decoding (the gateway): the agent's encoder needs none (issue 14)
    import numpy as np
    import numpy.typing as npt
from flowtunnel.wire.records import (
    PayloadDecoder,
    PayloadEncoder,
    read_uvarint,
    split_payloads,
    uvarint_values,
    write_uvarint,
)

__all__ = [
    "FAST_MIN_DATAGRAMS",
    "MAX_GROUPS",
    "SUPPORTED",
    "TemplateLengths",
    "max_steps",
    "observation_domain",
    "payload_decoder",
    "payload_encoder",
    "template_layouts",
    "template_lengths",
]

SUPPORTED = True

RecordLengthFn = Callable[[bytes, int], int | None]
FieldWidthsFn = Callable[[bytes, int], "tuple[int, ...] | None"]

_U16 = struct.Struct(">H")
_U16X2 = struct.Struct(">HH")
_U32 = struct.Struct(">I")
_WIDTH = operator.itemgetter(1)  # of a template field's (element id, width)
_MAX_RECORD = 65535
#: record groups per batch (both sides enforce it; an honest batch has a handful per template)
MAX_GROUPS = 4096
#: batches of fewer datagrams are decoded step by step: numpy's fixed cost per call outweighs its speed there
FAST_MIN_DATAGRAMS = 48

# group keys the encoder uses (the decoder sees only indexes and lengths)
_V5_HEADER = ("v5h", 24)
_V5_RECORD = ("v5r", 48)
_V9_HEADER = ("v9h", 20)
_IPFIX_HEADER = ("ipfixh", 16)
_SET_HEADER = ("seth", 4)
#: the field widths of the fixed layouts (codec 5 may store any of them as differences)
_FIXED_FIELDS: dict[tuple[object, ...], tuple[int, ...]] = {
    _V5_HEADER: (2, 2, 4, 4, 4, 4, 1, 1, 2),
    _V5_RECORD: (4, 4, 4, 2, 2, 4, 4, 4, 4, 2, 2, 1, 1, 1, 1, 2, 2, 1, 1, 2),
    _V9_HEADER: (2, 2, 4, 4, 4, 4),
    _IPFIX_HEADER: (2, 2, 4, 4, 4),
    _SET_HEADER: (2, 2),
}


def max_steps(length: int) -> int:
    """Most layout steps a datagram of ``length`` bytes may take (both sides enforce it): a hostile layout of
    many tiny steps must not cost the receiver much more than an honest one of the same size."""
    return 8 + length // 32


def observation_domain(payload: bytes, version: int) -> int:
    """The observation domain of a v9 (source id) or IPFIX datagram of at least 16/20 bytes: template ids are
    scoped by it."""
    off = 16 if version == 9 else 12
    return int(_U32.unpack_from(payload, off)[0])


def template_lengths(payload: bytes) -> dict[tuple[int, int, int], int]:
    """Record lengths defined by the (options) templates of one v9/IPFIX datagram, keyed by (version,
    domain, template id). Variable-length IPFIX templates are left out. Malformed input yields what parsed."""
    return {key: sum(widths) for key, widths in template_fields(payload).items()}


def template_fields(payload: bytes) -> dict[tuple[int, int, int], tuple[int, ...]]:
    """The field widths of the (options) templates of one v9/IPFIX datagram, keyed as ``template_lengths``
    (codec 5 stores chosen fields as differences, ``wire.deltas``)."""
    return {key: tuple(map(_WIDTH, fields)) for key, fields in template_layouts(payload).items()}


def template_layouts(payload: bytes) -> dict[tuple[int, int, int], tuple[tuple[int, int], ...]]:
    """The fields of the fixed-length (options) templates of one v9/IPFIX datagram as (information element
    id, width) pairs, keyed as ``template_lengths``; an enterprise-specific IPFIX element keeps its id with
    the enterprise bit (0x8000) set. Malformed input yields what parsed."""
    out: dict[tuple[int, int, int], tuple[tuple[int, int], ...]] = {}
    if len(payload) < 20 or payload[0] != 0:
        return out
    version = payload[1]
    if version not in (9, 10):
        return out
    hdr = 20 if version == 9 else 16
    domain = observation_domain(payload, version)
    pos = hdr
    end = len(payload)
    while pos + 4 <= end:
        set_id, slen = _U16X2.unpack_from(payload, pos)
        if slen < 4 or pos + slen > end:
            break
        body_end = pos + slen
        p = pos + 4
        if (version, set_id) in ((9, 0), (10, 2)):
            while p + 4 <= body_end:
                tid, nfields = _U16X2.unpack_from(payload, p)
                p += 4
                fields, p, ok = _template_record(payload, p, body_end, nfields, version)
                if ok and tid >= 256 and nfields and fields:
                    out[(version, domain, tid)] = fields
                if not ok:
                    break
        elif version == 9 and set_id == 1:
            while p + 6 <= body_end:
                tid, scope_len, opt_len = struct.unpack_from(">HHH", payload, p)
                p += 6
                nfields = (scope_len + opt_len) // 4
                fields, p, ok = _template_record(payload, p, body_end, nfields, version)
                if ok and tid >= 256 and fields:
                    out[(version, domain, tid)] = fields
                if not ok:
                    break
        elif version == 10 and set_id == 3:
            while p + 6 <= body_end:
                tid, nfields, _scope = struct.unpack_from(">HHH", payload, p)
                p += 6
                fields, p, ok = _template_record(payload, p, body_end, nfields, version)
                if ok and tid >= 256 and fields:
                    out[(version, domain, tid)] = fields
                if not ok:
                    break
        pos = body_end
    return out


def _template_record(
    buf: bytes, p: int, end: int, nfields: int, version: int
) -> tuple[tuple[tuple[int, int], ...], int, bool]:
    """The fields of one template record at ``p``: ((element id, length) pairs, empty if any length is
    variable or they add up to 0; next position; parsed completely)."""
    fields: list[tuple[int, int]] = []
    total = 0
    variable = False
    for _ in range(nfields):
        if p + 4 > end:
            return (), p, False
        field = ie, flen = _U16X2.unpack_from(buf, p)
        p += 4
        if version == 10 and ie & 0x8000:
            p += 4  # enterprise number
            if p > end:
                return (), p, False
        if flen == 65535:  # variable length: records of this template have no fixed size
            variable = True
        fields.append(field)
        total += flen
    return ((), p, True) if variable or not total else (tuple(fields), p, True)


class TemplateLengths:
    """A bounded cache of template record lengths the agent can keep across batches and pass as the
    ``record_length`` callback: ``learn(payload)`` every datagram, ``record_length(payload, set_id)``."""

    def __init__(self, *, max_entries: int = 4096) -> None:

        self._fields: dict[tuple[int, int, int], tuple[int, ...]] = {}
        self._max = max_entries

    def learn(self, payload: bytes) -> None:
        # template_layouts, not template_fields: every datagram sealed comes here, most with no template
        for key, fields in template_layouts(payload).items():
            if key not in self._fields and len(self._fields) >= self._max:
                self._fields.pop(next(iter(self._fields)))
            self._fields[key] = tuple(map(_WIDTH, fields))

    def record_length(self, payload: bytes, set_id: int) -> int | None:
        widths = self.field_widths(payload, set_id)
        return None if widths is None else sum(widths)

    def field_widths(self, payload: bytes, set_id: int) -> tuple[int, ...] | None:
        """The field widths of template ``set_id`` (codec 5's ``field_widths`` callback)."""
        if len(payload) < 20:
            return None
        version = payload[1]
        return self._fields.get((version, observation_domain(payload, version), set_id))

    def __len__(self) -> int:
        return len(self._fields)


class _Encoder:
    def __init__(self, record_length: RecordLengthFn | None, payloads: Sequence[bytes], *,
                 field_widths: FieldWidthsFn | None = None, deltas: bool = False,
                 plans: _deltas.PlanCache | None = None) -> None:

        self.plans = plans
        self.groups: dict[tuple[object, ...], int] = {}
        self.lengths: list[int] = []
        self.widths: list[tuple[int, ...] | None] = []  # codec 5: each group's field widths, if known
        self.deltas = deltas
        self.field_widths = field_widths
        self.chunks: list[list[bytes]] = []
        self.ops = bytearray()
        self.resid: list[bytes] = []
        self.record_length = record_length
        self.batch_templates: dict[tuple[int, int, int], int] = {}
        self.batch_fields: dict[tuple[int, int, int], tuple[int, ...]] = {}
        if record_length is None or (deltas and field_widths is None):
            for p in payloads:
                self.batch_fields.update(template_fields(p))
            self.batch_templates = {key: sum(widths) for key, widths in self.batch_fields.items()}

    def _widths_for(self, payload: bytes, key: tuple[object, ...]) -> tuple[int, ...] | None:
        """Field widths of a new group's records (for codec 5's plan), from the datagram that opens it."""
        if key[0] != "data":
            return _FIXED_FIELDS.get(key)
        version, set_id = key[1], key[2]
        assert isinstance(version, int)  # ("data", version, set id, length)
        assert isinstance(set_id, int)
        if self.field_widths is not None:
            return self.field_widths(payload, set_id)
        return self.batch_fields.get((version, observation_domain(payload, version), set_id))

    def _length_for(self, payload: bytes, version: int, set_id: int) -> int | None:
        if self.record_length is not None:
            n = self.record_length(payload, set_id)
        else:
            n = self.batch_templates.get((version, observation_domain(payload, version), set_id))
        return n if n is not None and 1 <= n <= _MAX_RECORD else None

    def _plan(self, payload: bytes) -> list[tuple[int, tuple[object, ...], int, int]]:
        """Record runs of ``payload``: (offset, group key, record length, count), in order."""
        size = len(payload)
        version = (payload[0] << 8) | payload[1] if size >= 2 else -1
        runs: list[tuple[int, tuple[object, ...], int, int]] = []
        if version == 5 and size >= 24:
            count = _U16.unpack_from(payload, 2)[0]
            if size == 24 + 48 * count:
                runs.append((0, _V5_HEADER, 24, 1))
                if count:
                    runs.append((24, _V5_RECORD, 48, count))
        elif version in (9, 10) and size >= (20 if version == 9 else 16):
            hlen = 20 if version == 9 else 16
            runs.append((0, _V9_HEADER if version == 9 else _IPFIX_HEADER, hlen, 1))
            unpack = _U16X2.unpack_from
            # A datagram holds several sets of one template (softflowd v9: ~5 in ~11): its record length
            # (and group key) is looked up once per datagram, not once per set (issue 14: this loop runs for
            # every set of every datagram sealed).
            groups: dict[int, tuple[tuple[object, ...], int] | None] = {}
            p = hlen
            while p + 4 <= size:
                set_id, slen = unpack(payload, p)
                if slen < 4 or p + slen > size:
                    break
                runs.append((p, _SET_HEADER, 4, 1))
                if set_id >= 256:
                    if set_id in groups:
                        group = groups[set_id]
                    else:
                        n = self._length_for(payload, version, set_id)
                        group = groups[set_id] = None if n is None else (("data", version, set_id, n), n)
                    if group is not None and slen - 4 >= group[1]:
                        n = group[1]
                        runs.append((p + 4, group[0], n, (slen - 4) // n))
                p += slen
        if len(runs) + 1 > max_steps(size):
            return []  # a datagram of many tiny sets: cheaper verbatim than as records
        return runs

    def add(self, payload: bytes) -> None:
        # Most layout values are below 0x80: appended as the one byte their varint is, without a call.
        ops = self.ops
        groups = self.groups
        pos = 0  # bytes before pos are emitted (verbatim or as records)
        for start, key, length, k in self._plan(payload):
            skip = start - pos
            if 0 <= skip < 0x80:
                ops.append(skip)
            else:
                write_uvarint(skip, ops)
            if start > pos:
                self.resid.append(payload[pos:start])
            g = groups.get(key)
            if g is None:
                if len(self.lengths) >= MAX_GROUPS:
                    continue  # these records go out verbatim with the bytes that follow
                g = groups[key] = len(self.lengths)
                self.lengths.append(length)
                self.chunks.append([])
                self.widths.append(self._widths_for(payload, key) if self.deltas else None)
            if g < 0x7F and k < 0x80:
                ops.append(g + 1)
                ops.append(k)
            else:
                write_uvarint(g + 1, ops)
                write_uvarint(k, ops)
            pos = start + k * length
            self.chunks[g].append(payload[start:pos])
        write_uvarint(len(payload) - pos, ops)
        if len(payload) > pos:
            self.resid.append(payload[pos:])
        ops.append(0)

    def section(self) -> bytes:
        out = bytearray()
        write_uvarint(len(self.lengths), out)
        for n in self.lengths:
            write_uvarint(n, out)
        plans: list[list[_deltas.Field]] = []
        if self.deltas:
            budget = _deltas.MAX_TOTAL_FIELDS
            for n, chunks, widths in zip(self.lengths, self.chunks, self.widths, strict=True):
                choose = self.plans.plan if self.plans is not None else _deltas.choose_plan
                plan = choose(b"".join(chunks), n, widths) if budget >= _deltas.MAX_PLAN_FIELDS else []
                budget -= len(plan)
                plans.append(plan)
                _deltas.encode_plan(plan, out)
        write_uvarint(len(self.ops), out)
        out += self.ops
        resid = b"".join(self.resid)
        write_uvarint(len(resid), out)
        out += resid
        for g, (n, chunks) in enumerate(zip(self.lengths, self.chunks, strict=True)):
            if plans and plans[g]:
                out += _deltas.apply_plan(b"".join(chunks), n, plans[g])
            else:
                out += self.columns(b"".join(chunks), n)
        return bytes(out)

    def columns(self, rows: bytes, n: int) -> bytes:
        """One record group (``n``-byte records back to back) as stored: transposed, byte column after byte
        column (byte ``i`` of every record is ``rows[i::n]``: a strided copy in C, no numpy)."""
        return b"".join(rows[i::n] for i in range(n))


def payload_encoder(record_length: RecordLengthFn | None, *, field_widths: FieldWidthsFn | None = None,
                    deltas: bool = False, plans: _deltas.PlanCache | None = None) -> PayloadEncoder:
    """The payload-section encoder for codec 3 and 4 (``record_length`` as documented in ``seal_batch``);
    with ``deltas``, codec 5's (a field plan per group, ``wire.deltas``; ``field_widths(datagram, set_id)``
    gives a template's field widths, else the templates in the batch do; ``plans``: plans chosen in earlier
    batches are reused from that cache instead of chosen again for every batch)."""

    def encode(payloads: Sequence[bytes]) -> bytes:
        enc = _Encoder(record_length, payloads, field_widths=field_widths, deltas=deltas, plans=plans)
        for p in payloads:
            enc.add(p)
        return enc.section()

    return encode


def _uvarint_array(buf: memoryview, budget: int) -> npt.NDArray[np.uint64]:
    """Every LEB128 varint of ``buf`` (which must end at a varint's last byte), at most ``budget`` of them."""
    import numpy as np

    arr = np.frombuffer(buf, dtype=np.uint8)
    ends = np.flatnonzero(arr < 0x80)
    if len(ends) > budget:
        raise MalformedRecords(f"columnar layout holds {len(ends)} values, more than the {budget} its "
                               "datagrams can use")
    if len(arr) and (not len(ends) or ends[-1] != len(arr) - 1):
        raise MalformedRecords("columnar layout ends inside a varint")
    values = uvarint_values(arr, ends)
    if values is None:
        # 9 varint bytes carry 63 bits: every honest count and length fits with room to spare
        raise MalformedRecords("columnar layout has a varint longer than 9 bytes")
    return values


def _uvarints(buf: memoryview, budget: int) -> list[int]:
    """``_uvarint_array`` as Python ints."""
    values: list[int] = _uvarint_array(buf, budget).tolist()
    return values


def payload_decoder(max_raw: int, *, deltas: bool = False) -> PayloadDecoder:
    """The payload-section decoder for codecs 3 and 4, or with ``deltas`` codec 5 (a field plan per group).
    Everything it builds is carved out of the (already bounded) record block, and every count is checked
    against the bytes that remain before use."""

    def decode(block: memoryview, pos: int, lengths: Sequence[int]) -> tuple[list[bytes], int]:
        import numpy as np

        end = len(block)
        n_groups, pos = read_uvarint(block, pos, "columnar group count")
        if n_groups > MAX_GROUPS:
            raise MalformedRecords(f"columnar section declares {n_groups} groups, the limit is {MAX_GROUPS}")
        glen: list[int] = []
        for g in range(n_groups):
            n, pos = read_uvarint(block, pos, f"record length of columnar group {g}")
            if not 1 <= n <= _MAX_RECORD:
                raise MalformedRecords(f"columnar group {g} has record length {n}, outside 1..{_MAX_RECORD}")
            glen.append(n)
        plans: list[list[_deltas.Field]] = []
        if deltas:
            budget = _deltas.MAX_TOTAL_FIELDS
            for g, n in enumerate(glen):
                plan, pos = _deltas.decode_plan(block, pos, n, g, budget)
                budget -= len(plan)
                plans.append(plan)
        ops_len, pos = read_uvarint(block, pos, "columnar layout length")
        if ops_len > end - pos:
            raise MalformedRecords(f"columnar layout of {ops_len} bytes overruns the block")
        ops = block[pos : pos + ops_len]
        pos += ops_len
        resid_len, pos = read_uvarint(block, pos, "columnar verbatim length")
        if resid_len > end - pos:
            raise MalformedRecords(f"columnar verbatim bytes ({resid_len}) overrun the block")
        resid = block[pos : pos + resid_len]
        pos += resid_len
        # The layout is all varints: decode them at once (vectorised), after bounding how many there may be,
        # so a hostile layout costs no more than an honest one of the same size.
        fast = len(lengths) >= FAST_MIN_DATAGRAMS
        lens = np.asarray(lengths if fast else (), dtype=np.int64)
        if fast:
            budget = 3 * (8 * len(lengths) + int((lens // 32).sum()))  # sum of 3 * max_steps(length)
        else:
            budget = sum(3 * max_steps(n) for n in lengths)
        tokens = _uvarint_array(ops, budget)
        if fast:
            layout = _Layout.parse(tokens, lens, glen, resid_len, end - pos, max_raw)
            if layout is not None:
                if any(plans):
                    block = _undo_plans(block, pos, layout.need, glen, plans)
                return layout.rebuild(block, pos, bytes(resid)), pos + layout.col_bytes
            # the vectorised checks refused something: the step-by-step checks below name it (and raise)
        tl: list[int] = tokens.tolist()
        need = _check_layout(tl, lengths, glen, resid_len, end - pos, max_raw)
        if any(plans):
            block = _undo_plans(block, pos, need, glen, plans)
        return _rebuild_steps(tl, lengths, glen, need, block, pos, bytes(resid))

    return decode


def _undo_plans(
    block: memoryview, pos: int, need: list[int], glen: list[int], plans: list[list[_deltas.Field]]
) -> memoryview:
    """A copy of ``block`` whose column blocks (from ``pos``, already checked to fit) hold values again
    instead of codec 5's differences."""
    import numpy as np

    out = np.frombuffer(bytearray(block), dtype=np.uint8)
    for k, n, plan in zip(need, glen, plans, strict=True):
        if plan:
            _deltas.undo_plan(out[pos : pos + k * n].reshape(n, k), plan)
        pos += k * n
    return memoryview(out.data).cast("B")


class _Layout:
    """A columnar layout, parsed and checked with numpy: one Python step per layout step (to find where each
    step starts, which depends on the previous one), everything else vectorised over the steps."""

    def __init__(
        self, *, need: list[int], glen: list[int], col_bytes: int, row_at: npt.NDArray[np.int32],
        verbatim: list[tuple[int, int, int]], lengths: npt.NDArray[np.int64],
    ) -> None:

        self.need = need  # records per group
        self.glen = glen  # record length per group
        self.col_bytes = col_bytes
        self.row_at = row_at  # output offset of every record, group after group
        self.verbatim = verbatim  # (output offset, verbatim offset, length) of each verbatim piece
        self.lengths = lengths

    @classmethod
    def parse(
        cls, tokens: npt.NDArray[np.uint64], lengths: npt.NDArray[np.int64], glen: list[int], resid_len: int,
        left: int, max_raw: int,
    ) -> _Layout | None:
        """The layout, or None if anything in it is wrong (the step-by-step checks then say what) or it is not
        worth vectorising (records of under 4 bytes on average; an output of 2 GiB or more)."""
        import numpy as np

        # A step is (verbatim length, group + 1, records) or, ending a datagram, (verbatim length, 0): where
        # one starts depends on the previous one, so this walk is the one loop over steps. It records each
        # step's size (2 or 3 values) in a bytearray, which numpy reads without converting anything.
        nonzero = (tokens != 0).tobytes()
        n_tok = len(nonzero)
        sizes = bytearray()
        add = sizes.append
        t = 0
        try:
            while t < n_tok:
                size = 3 if nonzero[t + 1] else 2
                add(size)
                t += size
        except IndexError:
            return None
        if t != n_tok:
            return None
        tok = tokens.astype(np.int64)  # values are below 2**63 (at most 9 varint bytes)
        step_size = np.frombuffer(sizes, dtype=np.uint8).astype(np.int64)
        st = np.cumsum(step_size) - step_size  # where each step starts
        count = len(lengths)
        if not len(st):
            if count:
                return None
            return cls(need=[0] * len(glen), glen=glen, col_bytes=0, row_at=np.zeros(0, dtype=np.int32),
                       verbatim=[], lengths=lengths)
        vlen = tok[st]
        gref = tok[st + 1]
        has = gref != 0
        k = np.zeros(len(st), dtype=np.int64)
        k[has] = tok[st[has] + 2]
        ends = np.flatnonzero(~has)
        if len(ends) != count or ends[-1] != len(st) - 1:
            return None
        n_steps = np.diff(ends, prepend=-1)
        if (n_steps > 8 + lengths // 32).any():  # max_steps
            return None
        if int(gref.max()) > len(glen) or (has & (k == 0)).any():
            return None
        dlen = np.repeat(lengths, n_steps)  # each step's datagram length
        if (vlen > dlen).any() or (k > dlen).any():
            return None  # (and so no product or sum below can overflow)
        gl = np.asarray([0, *glen], dtype=np.int64)
        gbytes = k * gl[gref]
        step_bytes = vlen + gbytes
        step_end = np.cumsum(step_bytes)  # where each step's bytes end in the output
        covered = step_end[ends]
        covered[1:] -= step_end[ends[:-1]]
        if not np.array_equal(covered, lengths):
            return None
        vend = np.cumsum(vlen)
        if int(vend[-1]) != resid_len:
            return None
        col_bytes = int(gbytes.sum())
        if col_bytes > left or col_bytes > max_raw:
            return None
        if 4 * int(k.sum()) > col_bytes or int(step_end[-1]) >= 1 << 31:
            # Records of under 4 bytes on average (no exporter's) would make the table of record offsets
            # below larger than the records themselves: the step-by-step path takes such layouts.
            return None
        # (exact in float64: the total is bounded by the block's size, checked just above)
        per_group = np.bincount(gref, weights=gbytes, minlength=len(gl))[1:].astype(np.int64)
        need = (per_group // gl[1:]).tolist()
        # Where each step's bytes go in the output: its verbatim bytes, then its records.
        out_at = step_end - step_bytes
        # Every record's place: a group's steps take its records in layout order, so the steps of each group
        # in a stable sort by group (a radix sort: group numbers fit 16 bits), one entry per record, list
        # every group's records in order. Record r of the sorted list, in step s, is at
        # out_at[s] + vlen[s] + length[s] * (r - first record of s).
        order = np.flatnonzero(has)
        order = order[np.argsort(gref[order].astype(np.uint16), kind="stable")]
        ks = k[order]
        rec_len = gl[gref[order]]
        base = out_at[order] + vlen[order] - rec_len * (np.cumsum(ks) - ks)
        row_at = np.repeat(base, ks) + np.repeat(rec_len, ks) * np.arange(int(ks.sum()), dtype=np.int64)
        pieces = np.flatnonzero(vlen)  # verbatim pieces are rare (bytes outside any record): one by one
        verbatim = list(zip(out_at[pieces].tolist(), (vend - vlen)[pieces].tolist(), vlen[pieces].tolist(),
                            strict=True))
        return cls(need=need, glen=glen, col_bytes=col_bytes, row_at=row_at.astype(np.int32),
                   verbatim=verbatim, lengths=lengths)

    def rebuild(self, block: memoryview, pos: int, resid: bytes) -> list[bytes]:
        """Scatter each group's records (stored column after column) and the verbatim bytes into place."""
        import numpy as np
        from numpy.lib.stride_tricks import sliding_window_view

        out = np.empty(int(self.lengths.sum()), dtype=np.uint8)
        first = 0
        for k, n in zip(self.need, self.glen, strict=True):
            if not k:
                continue
            cols = np.frombuffer(block, dtype=np.uint8, count=k * n, offset=pos).reshape(n, k)
            # Transpose to contiguous records first, then write each record whole: scattering byte column
            # after byte column would sweep the whole output once per column (cache misses on big batches).
            rows = np.ascontiguousarray(cols.T)
            windows = sliding_window_view(out, n, writeable=True)  # windows[i] is out[i : i + n]
            windows[self.row_at[first : first + k]] = rows
            first += k
            pos += k * n
        if self.verbatim:
            src = np.frombuffer(resid, dtype=np.uint8)
            for at, start, n in self.verbatim:
                out[at : at + n] = src[start : start + n]
        return split_payloads(out.tobytes(), self.lengths)


def _rebuild_steps(
    tokens: list[int], lengths: Sequence[int], glen: list[int], need: list[int], block: memoryview, pos: int,
    resid: bytes,
) -> tuple[list[bytes], int]:
    """Rebuild the datagrams of a checked layout one step at a time (cheaper than numpy for a few)."""
    import numpy as np

    rows: list[bytes] = []
    for k, n in zip(need, glen, strict=True):
        col = np.frombuffer(block, dtype=np.uint8, count=k * n, offset=pos)
        rows.append(col.reshape(n, k).T.tobytes())
        pos += k * n
    cursor = [0] * len(glen)
    out: list[bytes] = []
    t = rp = 0
    for _ in lengths:
        parts: list[bytes] = []
        while True:
            vlen = tokens[t]
            gref = tokens[t + 1]
            t += 2
            if vlen:
                parts.append(resid[rp : rp + vlen])
                rp += vlen
            if not gref:
                break
            g = gref - 1
            a = cursor[g]
            b = cursor[g] = a + tokens[t] * glen[g]
            t += 1
            parts.append(rows[g][a:b])
        out.append(parts[0] if len(parts) == 1 else b"".join(parts))
    return out, pos


def _check_layout(
    tokens: list[int], lengths: Sequence[int], glen: list[int], resid_len: int, left: int, max_raw: int
) -> list[int]:
    """The step-by-step checks of a columnar layout, raising the precise error for the first problem; the
    number of records of each group."""
    n_groups = len(glen)
    need = [0] * n_groups
    t = 0
    n_tok = len(tokens)
    rp = 0
    for i, total in enumerate(lengths):
        got = 0
        steps = 0
        limit = max_steps(total)
        while True:
            steps += 1
            if steps > limit:
                raise MalformedRecords(f"datagram {i} of {total} bytes takes over {limit} layout steps")
            if t + 2 > n_tok:
                raise MalformedRecords(f"columnar layout ends inside datagram {i}")
            vlen = tokens[t]
            gref = tokens[t + 1]
            t += 2
            got += vlen
            rp += vlen
            if gref:
                if gref > n_groups:
                    raise MalformedRecords(f"datagram {i} refers to columnar group {gref - 1} of {n_groups}")
                if t >= n_tok:
                    raise MalformedRecords(f"columnar layout ends inside datagram {i}")
                k = tokens[t]
                t += 1
                if not k:
                    raise MalformedRecords(f"datagram {i} has a layout step of 0 records")
                need[gref - 1] += k
                got += k * glen[gref - 1]
            if got > total:
                raise MalformedRecords(f"datagram {i} layout exceeds its length {total}")
            if not gref:
                break
        if got != total:
            raise MalformedRecords(f"datagram {i} layout covers {got} bytes, its length is {total}")
    if t != n_tok:
        raise MalformedRecords(f"columnar layout has {n_tok - t} values past the last datagram")
    if rp != resid_len:
        raise MalformedRecords(f"columnar layout uses {rp} verbatim bytes, the section has {resid_len}")
    col_bytes = sum(k * n for k, n in zip(need, glen, strict=True))
    if col_bytes > left or col_bytes > max_raw:
        raise LimitExceeded(f"columnar groups need {col_bytes} bytes, the block has {left} left")
    return need
