"""Decoded flow records → the store's columns (DESIGN's normalised record), accumulated column by column.

Pure (no I/O): ``FlowColumns`` takes either codec records (``add``) or the codec's undecoded record blocks
(``add_blocks``, from ``Decoder.decode_columns``) and hands DuckDB numpy arrays (masked where a value is
missing) for one columnar ``INSERT ... SELECT``. Blocks of one template are joined across the whole batch and
viewed with one ``np.frombuffer``, so numbers and times are normalised whole arrays at a time; only text
(addresses, ``extra``) is built per value. Both inputs give the same rows. Every field that has no column of
its own is kept in ``extra`` (JSON), so nothing the exporter said is lost.
"""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from flowtunnel.netflow.columns import (
    MODE_TIMED,
    RecordBlock,
    column_values,
    is_plain_number,
    record_dtype,
    resolve_uptime,
    resolve_uptime_since_init,
)
from flowtunnel.netflow.record import Record
from flowtunnel.netflow.templates import Layout
from flowtunnel.store.schema import FLOW_COLUMNS

__all__ = ["FlowColumns"]

# Candidate IANA fields per column, first present wins.
_SRC_ADDR: Final = ("sourceIPv4Address", "sourceIPv6Address")
_DST_ADDR: Final = ("destinationIPv4Address", "destinationIPv6Address")
_NEXT_HOP: Final = ("ipNextHopIPv4Address", "ipNextHopIPv6Address", "bgpNextHopIPv4Address",
                    "bgpNextHopIPv6Address")
_PACKETS: Final = ("packetDeltaCount", "packetTotalCount", "initiatorPackets")
_BYTES: Final = ("octetDeltaCount", "octetTotalCount", "initiatorOctets")
_SAMPLING: Final = ("samplingInterval", "samplerRandomInterval", "samplingPacketInterval")
# Absolute times (the codec gives ints in the unit of the data type) → microseconds.
_START: Final = (("flowStartMilliseconds", 1000), ("flowStartSeconds", 1_000_000),
                 ("flowStartMicroseconds", 1), ("flowStartNanoseconds", -1000))
_END: Final = (("flowEndMilliseconds", 1000), ("flowEndSeconds", 1_000_000),
               ("flowEndMicroseconds", 1), ("flowEndNanoseconds", -1000))
# Uptime-relative times the codec could not resolve (IPFIX has no sysUptime in its header): resolved with the
# exporter's systemInitTimeMilliseconds when an options record announced it.
_START_UPTIME: Final = "flowStartSysUpTime"
_END_UPTIME: Final = "flowEndSysUpTime"

_INT_DTYPES: Final[dict[str, str]] = {
    "version": "uint8", "domain_id": "int64", "src_port": "int64", "dst_port": "int64", "protocol": "int64",
    "tcp_flags": "int64", "packets": "uint64", "bytes": "uint64", "in_if": "int64", "out_if": "int64",
    "src_as": "int64", "dst_as": "int64", "tos": "int64", "sampling_interval": "int64",
}
_TIME_COLUMNS: Final = ("flow_start", "flow_end", "received", "agent_received")
_TEXT_COLUMNS: Final = ("agent", "exporter", "src_addr", "dst_addr", "next_hop", "extra")
_WRAP: Final = 1 << 32
_HALF_WRAP: Final = 1 << 31


_SIMPLE: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    ("src_addr", _SRC_ADDR), ("dst_addr", _DST_ADDR), ("src_port", ("sourceTransportPort",)),
    ("dst_port", ("destinationTransportPort",)), ("protocol", ("protocolIdentifier",)),
    ("tcp_flags", ("tcpControlBits",)), ("packets", _PACKETS), ("bytes", _BYTES),
    ("in_if", ("ingressInterface",)), ("out_if", ("egressInterface",)), ("src_as", ("bgpSourceAsNumber",)),
    ("dst_as", ("bgpDestinationAsNumber",)), ("next_hop", _NEXT_HOP), ("tos", ("ipClassOfService",)),
    ("sampling_interval", _SAMPLING),
)
_MAX_PLANS: Final = 1024


@dataclass(frozen=True, slots=True)
class _Plan:
    """Where each column's value sits in the records of one key layout (a template, in practice)."""

    simple: tuple[tuple[str, int | None], ...]
    start: tuple[int, int] | None  # (value index, scale to µs; negative: divide)
    end: tuple[int, int] | None
    start_uptime: int | None
    end_uptime: int | None
    extra_index: tuple[int, ...]
    extra_keys: tuple[str, ...]
    extra_int_format: str  # '{"key":%d,...}' for rows whose extra values are all ints

    @classmethod
    def build(cls, keys: tuple[str, ...]) -> _Plan:
        index = {k: i for i, k in reversed(list(enumerate(keys)))}  # first occurrence of a repeated key

        def first(candidates: tuple[str, ...]) -> int | None:
            return next((index[k] for k in candidates if k in index), None)

        def time(candidates: tuple[tuple[str, int], ...]) -> tuple[int, int] | None:
            return next(((index[k], scale) for k, scale in candidates if k in index), None)

        simple = tuple((name, first(cands)) for name, cands in _SIMPLE)
        start, end = time(_START), time(_END)
        start_uptime, end_uptime = index.get(_START_UPTIME), index.get(_END_UPTIME)
        # Only the fields a column took leave the record; an alternative the column did not take (the IPv6
        # address of a template carrying both families, octetTotalCount beside octetDeltaCount) stays in
        # extra. Uptime times always go: flow_start/flow_end hold them, resolved.
        used = {i for _, i in simple if i is not None}
        used |= {t[0] for t in (start, end) if t is not None}
        used |= {i for i in (start_uptime, end_uptime) if i is not None}
        extra = [(i, k) for i, k in enumerate(keys) if i not in used]
        return cls(
            simple=simple, start=start, end=end, start_uptime=start_uptime, end_uptime=end_uptime,
            extra_index=tuple(i for i, _ in extra), extra_keys=tuple(k for _, k in extra),
            extra_int_format="{" + ",".join(json.dumps(k).replace("%", "%%") + ":%d" for _, k in extra) + "}",
        )


def _runs(
    records: Iterable[Mapping[str, object]],
) -> Iterator[tuple[tuple[str, ...], list[Sequence[object]]]]:
    """Consecutive records with the same keys, as (keys, value tuples).

    The codec's records share one shape per template and keep their values in a tuple: reading those
    directly (no dict per record) is what keeps the store at the codec's pace. Any other mapping works too.
    """
    keys: tuple[str, ...] | None = None
    rows: list[Sequence[object]] = []
    for rec in records:
        if isinstance(rec, Record):
            rec_keys: tuple[str, ...] = rec.shape.keys
            values: Sequence[object] = rec.row
        else:
            rec_keys = tuple(rec)
            values = tuple(rec[k] for k in rec_keys)
        if rec_keys is not keys and rec_keys != keys:
            if rows:
                assert keys is not None
                yield keys, rows
            keys, rows = rec_keys, []
        rows.append(values)
    if rows:
        assert keys is not None
        yield keys, rows


def _uptime_us(init_ms: int, uptime_ms: int, export_ms: int) -> int:
    """``init + uptime`` in µs, the uint32 uptime unwrapped to the 2^32 ms period nearest the export time.

    softflowd, for one, exports uptimes of flows that started before its "init time" as wrapped negatives.
    """
    t = init_ms + uptime_ms
    if export_ms:
        while t > export_ms + _HALF_WRAP:
            t -= _WRAP
        while t < export_ms - _HALF_WRAP:
            t += _WRAP
    return t * 1000


def _json_default(value: object) -> object:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)


_JSON: Final = json.JSONEncoder(separators=(",", ":"), default=_json_default)


@dataclass(slots=True)
class _Group:
    """The rows of one key layout in a batch, with each row's per-datagram values alongside."""

    plan: _Plan
    rows: list[Sequence[object]] = field(default_factory=list)
    agent: list[str] = field(default_factory=list)
    exporter: list[str] = field(default_factory=list)
    version: list[int] = field(default_factory=list)
    domain: list[int | None] = field(default_factory=list)
    received: list[int] = field(default_factory=list)
    agent_received: list[int] = field(default_factory=list)
    export_ms: list[int] = field(default_factory=list)
    init_ms: list[int | None] = field(default_factory=list)


_PLANS: dict[tuple[str, ...], _Plan] = {}


def _plan(keys: tuple[str, ...]) -> _Plan:
    plan = _PLANS.get(keys)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[keys] = _Plan.build(keys)
    return plan


@dataclass(slots=True)
class _BlockGroup:
    """The record blocks of one (template, time mode) in a batch (per-datagram values: ``_Datagrams``)."""

    layout: Layout
    mode: int
    plan: _Plan
    columnar: bool  # False: blocks of this layout go the record way
    blocks: list[RecordBlock] = field(default_factory=list)
    which: list[int] = field(default_factory=list)  # each block's index in _Datagrams


@dataclass(slots=True)
class _Datagrams:
    """Per datagram that brought blocks: the values every one of its rows shares."""

    agent: list[str] = field(default_factory=list)
    exporter: list[str] = field(default_factory=list)
    version: list[int] = field(default_factory=list)
    domain: list[int | None] = field(default_factory=list)
    received: list[int] = field(default_factory=list)
    agent_received: list[int] = field(default_factory=list)
    export_ms: list[int] = field(default_factory=list)  # the sink's (for unresolved uptimes)
    init_ms: list[int | None] = field(default_factory=list)  # the sink's


Chunk = tuple[npt.NDArray[Any], npt.NDArray[np.bool_] | None]  # values, missing (None: nothing missing)


def _columnar(layout: Layout) -> bool:
    """Whether blocks of ``layout`` normalise as arrays; the rest go the record way (same rows, slower).

    The codec's time arithmetic is exact in int64 only for uptimes of up to 4 bytes (all real templates).
    """
    return layout.columnar and all(
        i is None or layout.codecs[i].code in ("B", "H", "I") for i in layout.uptime_idx
    )


class FlowColumns:
    """The rows of one batch, grouped by key layout; ``arrays()`` turns them into what DuckDB scans.

    Rows are kept as the codec's value tuples (or undecoded blocks) and transposed once per layout per batch,
    which costs far less than touching every field of every record in Python. Row order across layouts is
    not kept (a table has none); within a layout it is.
    """

    def __init__(self) -> None:
        self.rows = 0
        self._groups: dict[tuple[str, ...], _Group] = {}
        self._blocks: dict[tuple[int, int], _BlockGroup] = {}
        self._datagrams = _Datagrams()

    def add(
        self,
        records: Iterable[Mapping[str, object]],
        *,
        agent: str,
        exporter: str,
        version: int,
        domain: int | None,
        received_us: int,
        export_ms: int = 0,
        init_ms: int | None = None,
        agent_received_us: int | None = None,
    ) -> int:
        """Add one row per record; returns how many.

        ``received_us`` is the gateway's receive time (``received``), ``agent_received_us`` the agent's
        (``agent_received``; default: the same). ``export_ms`` is the datagram header's export time,
        ``init_ms`` the exporter's systemInitTime (from an options record), used to resolve uptime-relative
        times the codec left unresolved.
        """
        agent_us = received_us if agent_received_us is None else agent_received_us
        n = 0
        for keys, rows in _runs(records):
            group = self._groups.get(keys)
            if group is None:
                group = self._groups[keys] = _Group(_plan(keys))
            m = len(rows)
            group.rows.extend(rows)
            group.agent.extend([agent] * m)
            group.exporter.extend([exporter] * m)
            group.version.extend([version] * m)
            group.domain.extend([domain] * m)
            group.received.extend([received_us] * m)
            group.agent_received.extend([agent_us] * m)
            group.export_ms.extend([export_ms] * m)
            group.init_ms.extend([init_ms] * m)
            n += m
        self.rows += n
        return n

    def add_blocks(
        self,
        blocks: Iterable[RecordBlock],
        *,
        agent: str,
        exporter: str,
        version: int,
        domain: int | None,
        received_us: int,
        export_ms: int = 0,
        init_ms: int | None = None,
        agent_received_us: int | None = None,
    ) -> int:
        """One row per record of each block (``Message.blocks``): the rows ``add`` gives for their records."""
        agent_us = received_us if agent_received_us is None else agent_received_us
        n = 0
        dg = self._datagrams
        index = -1
        groups = self._blocks
        for block in blocks:
            layout = block.layout
            mode = block.mode
            key = (id(layout), mode)  # the group holds the layout, so its id stays unique meanwhile
            group = groups.get(key)
            if group is None:
                group = groups[key] = _BlockGroup(layout, mode, _plan(block.keys), _columnar(layout))
            if not group.columnar:
                n += self.add(block.records(), agent=agent, exporter=exporter, version=version, domain=domain,
                              received_us=received_us, export_ms=export_ms, init_ms=init_ms,
                              agent_received_us=agent_us)
                continue
            if index < 0:
                index = len(dg.agent)
                dg.agent.append(agent)
                dg.exporter.append(exporter)
                dg.version.append(version)
                dg.domain.append(domain)
                dg.received.append(received_us)
                dg.agent_received.append(agent_us)
                dg.export_ms.append(export_ms)
                dg.init_ms.append(init_ms)
            group.blocks.append(block)
            group.which.append(index)
            n += block.count
            self.rows += block.count
        return n

    def columns(self) -> dict[str, list[Any]]:
        """One list per table column, every group's rows concatenated: record values as they came, block
        values as ``arrays()`` holds them (a value that does not fit its column already None)."""
        out = self._record_columns()
        for group in self._blocks.values():
            if not group.blocks:
                continue
            for name, (values, missing) in _block_chunks(group, self._datagrams).items():
                listed = values.tolist()
                if missing is not None:
                    listed = [None if m else v for v, m in zip(listed, missing.tolist(), strict=True)]
                out[name].extend(listed)
        return out

    def _record_columns(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {name: [] for name, _ in FLOW_COLUMNS}
        for group in self._groups.values():
            _transpose(group, out)
        return out

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        """One numpy array per column (masked arrays where values are missing), in table column order."""
        chunks: dict[str, list[Chunk]] = {name: [] for name, _ in FLOW_COLUMNS}
        if self._groups:
            for name, values in self._record_columns().items():
                if name in _TEXT_COLUMNS:
                    chunks[name].append((np.array(values, dtype=object), None))
                else:
                    dtype = "int64" if name in _TIME_COLUMNS else _INT_DTYPES[name]
                    chunks[name].append(_ints(values, dtype))
        for group in self._blocks.values():
            if not group.blocks:
                continue
            for name, chunk in _block_chunks(group, self._datagrams).items():
                chunks[name].append(chunk)
        out: dict[str, npt.NDArray[Any]] = {}
        for name, parts in chunks.items():
            if name in _TEXT_COLUMNS:
                out[name] = _concat([v for v, _ in parts], object)
                continue
            dtype = "int64" if name in _TIME_COLUMNS else _INT_DTYPES[name]
            joined = _concat([v for v, _ in parts], dtype)
            masks = [m for _, m in parts]
            mask = None
            if any(m is not None for m in masks):
                mask = np.concatenate(
                    [np.zeros(len(v), bool) if m is None else m for v, m in parts]
                )
            if name in _TIME_COLUMNS:
                times = joined.astype("datetime64[us]")
                if mask is not None:
                    times[mask] = np.datetime64("NaT")
                out[name] = times
            elif mask is not None and mask.any():
                out[name] = np.ma.masked_array(joined, mask=mask)
            else:
                out[name] = joined
        return out


def _concat(parts: list[npt.NDArray[Any]], dtype: Any) -> npt.NDArray[Any]:
    if len(parts) == 1:
        return parts[0].astype(dtype, copy=False)
    if not parts:
        return np.zeros(0, dtype=dtype)
    return np.concatenate([p.astype(dtype, copy=False) for p in parts])


_INT64_MAX: Final = (1 << 63) - 1
_UNSIGNED_BITS: Final = {"B": 8, "H": 16, "I": 32, "Q": 64}


@functools.cache
def _iinfo(dtype: Any) -> np.iinfo[Any]:
    return np.iinfo(dtype)  # numpy builds a new one per call: ~20 µs, 15 times per block group


def _fit_ints(values: npt.NDArray[Any], dtype: str) -> Chunk:
    """Integer ``values`` as ``dtype``; those outside its range missing (as ``_ints`` does for lists)."""
    info = _iinfo(dtype)
    src = _iinfo(values.dtype)
    bad: npt.NDArray[np.bool_] | None = None
    if src.max > info.max:
        bad = values > info.max
    if src.min < info.min:
        low = values < info.min
        bad = low if bad is None else bad | low
    if bad is not None and bad.any():
        return np.where(bad, 0, values).astype(dtype), bad
    return values.astype(dtype), None


def _block_chunks(group: _BlockGroup, dg: _Datagrams) -> dict[str, Chunk]:
    """The table columns of one block group: numbers and times as whole arrays, text per value."""
    layout, plan = group.layout, group.plan
    blocks = group.blocks
    # softflowd sends ~3 records per block (a set per template per datagram): per-block work stays in C loops.
    counts = np.fromiter(map(_COUNT, blocks), dtype=np.int64, count=len(blocks))
    n = int(counts.sum())
    array = np.frombuffer(b"".join(map(_DATA, blocks)), dtype=record_dtype(layout), count=n)
    n_fields = len(layout.keys)
    # out_keys[n_fields + k] is the absolute time of field time_cols[k]
    time_cols = [i for i in layout.uptime_idx if i is not None]
    rec_dg = np.repeat(np.array(group.which, dtype=np.intp), counts)  # each record's index in _Datagrams
    clocks: dict[str, npt.NDArray[np.int64]] = {}

    def per_record(attr: str) -> npt.NDArray[np.int64]:
        """A block clock (``export_ms``...; None as 0) → one value per record."""
        values = clocks.get(attr)
        if values is None:
            got = list(map(_CLOCKS[attr], blocks))
            if None in got:  # their mode says they are set; a None counts as 0, as it always did
                got = [v or 0 for v in got]
            values = clocks[attr] = np.repeat(np.array(got, dtype=np.int64), counts)
        return values

    def of_datagram(values: Sequence[Any], dtype: Any = np.int64) -> npt.NDArray[Any]:
        """One value per datagram → one per record."""
        return np.asarray(values, dtype=dtype)[rec_dg]

    def resolved(k: int) -> npt.NDArray[np.int64]:
        raw = array[f"f{time_cols[k]}"]
        if group.mode == MODE_TIMED:
            return resolve_uptime(raw, per_record("export_ms"), per_record("uptime_ms"))
        return resolve_uptime_since_init(raw, per_record("init_ms"))

    def python(i: int) -> list[Any]:
        if i >= n_fields:
            times: list[Any] = resolved(i - n_fields).tolist()
            return times
        return column_values(layout, array, i)

    def numeric(i: int) -> npt.NDArray[Any] | None:
        """Field ``i`` as an integer array when its record value is that integer, else None."""
        if i >= n_fields:
            return resolved(i - n_fields)
        if is_plain_number(layout, i):
            column = array[f"f{i}"]
            if column.dtype.kind in "ui":
                return column.astype(column.dtype.newbyteorder("="))
        return None

    out: dict[str, Chunk] = {}
    missing_all = np.ones(n, dtype=bool)
    for name, idx in plan.simple:
        if name in _TEXT_COLUMNS:
            if idx is None:
                out[name] = (np.full(n, None, dtype=object), None)
            else:
                out[name] = (_object_array(python(idx)), None)
            continue
        dtype = _INT_DTYPES[name]
        if idx is None:
            out[name] = (np.zeros(n, dtype=dtype), missing_all)
            continue
        ints = numeric(idx)
        out[name] = _fit_ints(ints, dtype) if ints is not None else _ints(python(idx), dtype)
    for name, absolute, uptime in (("flow_start", plan.start, plan.start_uptime),
                                   ("flow_end", plan.end, plan.end_uptime)):
        if absolute is not None:
            idx, scale = absolute
            ints = numeric(idx)
            if ints is None:
                values = python(idx)
                out[name] = _ints(
                    [(v * scale if scale > 0 else v // -scale) if type(v) is int else None for v in values],
                    "int64",
                )
            else:
                out[name] = _scaled(ints, scale)
        elif uptime is not None:
            ints = numeric(uptime)
            if ints is None or ints.dtype.itemsize > 4:
                values = python(uptime)
                inits = of_datagram(dg.init_ms, object).tolist()
                exports = of_datagram(dg.export_ms).tolist()
                out[name] = _ints([
                    _uptime_us(init, v, exp) if type(v) is int and init is not None else None
                    for v, init, exp in zip(values, inits, exports, strict=True)
                ], "int64")
            else:
                known = of_datagram([i is not None for i in dg.init_ms], bool)
                inits = of_datagram([i or 0 for i in dg.init_ms])
                out[name] = _uptime_us_array(ints.astype(np.int64), inits, known, of_datagram(dg.export_ms))
        else:
            out[name] = (np.zeros(n, dtype=np.int64), missing_all)
    out["extra"] = (_extra(plan, layout, array, python, n), None)
    out["agent"] = (of_datagram(dg.agent, object), None)
    out["exporter"] = (of_datagram(dg.exporter, object), None)
    out["version"] = (of_datagram(dg.version, np.uint8), None)
    if any(d is None for d in dg.domain):
        out["domain_id"] = _ints(of_datagram(dg.domain, object).tolist(), "int64")
    else:
        out["domain_id"] = (of_datagram(dg.domain), None)
    out["received"] = (of_datagram(dg.received), None)
    out["agent_received"] = (of_datagram(dg.agent_received), None)
    return out


_COUNT: Final = operator.attrgetter("count")
_DATA: Final = operator.attrgetter("data")
_CLOCKS: Final = {name: operator.attrgetter(name) for name in ("export_ms", "uptime_ms", "init_ms")}


def _object_array(values: list[Any]) -> npt.NDArray[Any]:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _scaled(ints: npt.NDArray[Any], scale: int) -> Chunk:
    """Absolute times in their unit → µs (``scale``: multiply, or divide when negative); overflow missing."""
    if scale < 0:
        return (ints // -scale).astype(np.int64), None
    hi = _INT64_MAX // scale
    lo = -((1 << 63) // scale)
    bad = ints > hi
    if ints.dtype.kind == "i":
        bad |= ints < lo
    if bad.any():
        return np.where(bad, 0, ints).astype(np.int64) * scale, bad
    return ints.astype(np.int64) * scale, None


def _uptime_us_array(
    values: npt.NDArray[np.int64], init_ms: npt.NDArray[np.int64], known: npt.NDArray[np.bool_],
    export_ms: npt.NDArray[np.int64],
) -> Chunk:
    """``_uptime_us`` for whole arrays: rows without an init time (``known`` False) are missing."""
    t = init_ms + values
    d = t - export_ms
    down = np.where(d > _HALF_WRAP, (d - _HALF_WRAP + _WRAP - 1) // _WRAP, 0)
    up = np.where(d < -_HALF_WRAP, (-_HALF_WRAP - d + _WRAP - 1) // _WRAP, 0)
    t = np.where(export_ms != 0, t - down * _WRAP + up * _WRAP, t) * 1000
    return (t, None) if known.all() else (t, ~known)


def _extra(
    plan: _Plan, layout: Layout, array: npt.NDArray[np.void], python: Callable[[int], list[Any]], n: int
) -> npt.NDArray[Any]:
    """The ``extra`` JSON of every row; when every extra field is a plain integer (softflowd's direction,
    end reason, IP version...) each distinct combination is formatted once."""
    if not plan.extra_index:
        return np.full(n, None, dtype=object)
    n_fields = len(layout.keys)
    fmt = plan.extra_int_format
    ints = [layout.codecs[j].code for j in plan.extra_index if j < n_fields and is_plain_number(layout, j)]
    if (
        len(ints) == len(plan.extra_index)
        and all(c in _UNSIGNED_BITS for c in ints)
        and sum(_UNSIGNED_BITS[c] for c in ints) <= 64
    ):
        # Small unsigned fields: one uint64 key per row, each distinct row formatted once.
        key = np.zeros(n, dtype=np.uint64)
        shift = 0
        for j in plan.extra_index:
            key |= array[f"f{j}"].astype(np.uint64) << np.uint64(shift)
            shift += _UNSIGNED_BITS[layout.codecs[j].code]
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        rows = zip(*(array[f"f{j}"][first].tolist() for j in plan.extra_index), strict=True)
        texts = _object_array([fmt % values for values in rows])
        return texts[inverse.reshape(-1)]
    columns = [python(j) for j in plan.extra_index]
    if all(type(v) is int for col in columns for v in col):
        return _object_array([fmt % values for values in zip(*columns, strict=True)])
    keys = plan.extra_keys
    dumps = _JSON.encode
    records = zip(*columns, strict=True)
    return _object_array([dumps(dict(zip(keys, values, strict=True))) for values in records])


def _transpose(group: _Group, out: dict[str, list[Any]]) -> None:
    plan = group.plan
    m = len(group.rows)
    cols = list(zip(*group.rows, strict=True))
    none: list[None] = [None] * m
    for name, idx in plan.simple:
        out[name].extend(none if idx is None else cols[idx])
    for name, absolute, uptime in (("flow_start", plan.start, plan.start_uptime),
                                   ("flow_end", plan.end, plan.end_uptime)):
        if absolute is not None:
            idx, scale = absolute
            if scale > 0:
                out[name].extend([v * scale if type(v) is int else None for v in cols[idx]])
            else:
                out[name].extend([v // -scale if type(v) is int else None for v in cols[idx]])
        elif uptime is not None:
            out[name].extend([
                _uptime_us(init, v, exp) if type(v) is int and init is not None else None
                for v, init, exp in zip(cols[uptime], group.init_ms, group.export_ms, strict=True)
            ])
        else:
            out[name].extend(none)
    if plan.extra_index:
        sub = [cols[j] for j in plan.extra_index]
        if all(type(v) is int for col in sub for v in col):
            # The common case (flow end reason, direction, ...): integers only, so printf-style formatting
            # gives the same JSON as the encoder at a fraction of the cost.
            fmt = plan.extra_int_format
            out["extra"].extend(fmt % values for values in zip(*sub, strict=True))
        else:
            keys = plan.extra_keys
            dumps = _JSON.encode
            out["extra"].extend(
                dumps(dict(zip(keys, values, strict=True))) for values in zip(*sub, strict=True)
            )
    else:
        out["extra"].extend(none)
    out["agent"].extend(group.agent)
    out["exporter"].extend(group.exporter)
    out["version"].extend(group.version)
    out["domain_id"].extend(group.domain)
    out["received"].extend(group.received)
    out["agent_received"].extend(group.agent_received)


def _ints(values: list[Any], dtype: str) -> tuple[npt.NDArray[Any], npt.NDArray[np.bool_]]:
    """Values and a mask of the missing ones; a value that is no int or does not fit ``dtype`` is missing."""
    n = len(values)
    missing = values.count(None)
    try:
        if missing == 0:
            return np.array(values, dtype=dtype), np.zeros(n, dtype=bool)
        if missing == n:
            return np.zeros(n, dtype=dtype), np.ones(n, dtype=bool)
        mask = np.fromiter((v is None for v in values), dtype=bool, count=n)
        return np.fromiter((0 if v is None else v for v in values), dtype=dtype, count=n), mask
    except (OverflowError, TypeError, ValueError):
        info = np.iinfo(dtype)
        clean = [v if type(v) is int and info.min <= v <= info.max else None for v in values]
        mask = np.fromiter((v is None for v in clean), dtype=bool, count=n)
        return np.fromiter((0 if v is None else v for v in clean), dtype=dtype, count=n), mask
