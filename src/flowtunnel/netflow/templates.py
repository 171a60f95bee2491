"""Templates and their compiled layouts: a template is compiled once, then whole data sets decode in one go.

A fixed-length template becomes one precompiled ``struct.Struct`` run with ``iter_unpack`` over the set body,
feeding a record builder generated for that template (``make_row_converter``): one loop that converts only
the fields that need it (addresses to text, NTP times...), adds absolute times and wraps each row in a
``Record``. Templates with variable-length fields (length 65535, RFC 7011 §7) walk record by record, but runs
of fixed fields between them still unpack with one precompiled ``Struct`` each. A fixed-length template also
gets a packed big-endian numpy dtype, for the columnar path (``columns``). Compiled layouts are shared
through a bounded cache, since template refreshes and many exporters repeat the same templates.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from struct import Struct
from typing import TYPE_CHECKING, Any, Final

from flowtunnel.netflow.errors import MalformedSet, MalformedTemplate
from flowtunnel.netflow.fields import (
    V4_INT_MEMO,
    V6_MEMO,
    VARIABLE_LENGTH,
    FieldCodec,
    FieldTypeError,
    MemoTable,
    field_codec,
    field_key,
)
from flowtunnel.netflow.record import Record, RecordShape

if TYPE_CHECKING:  # numpy is imported only by the columnar path (columns), not by plain decoding
    import numpy as np

__all__ = [
    "FieldSpec",
    "Layout",
    "Template",
    "clock_args",
    "compile_cached",
    "compile_template",
    "make_row_converter",
]

# RFC 3954 §6.1: field types of options template scope fields (their numbers collide with IANA ids 1-5).
V9_SCOPE_NAMES = {
    1: "scopeSystem",
    2: "scopeInterface",
    3: "scopeLineCard",
    4: "scopeCache",
    5: "scopeTemplate",
}
FLOW_START_SYSUPTIME = 22
FLOW_END_SYSUPTIME = 21
# struct codes -> big-endian numpy types, for the columnar path's record dtype (other fields stay raw bytes).
NUMERIC_DTYPES: Final = {
    "B": ">u1", "H": ">u2", "I": ">u4", "Q": ">u8",
    "b": ">i1", "h": ">i2", "i": ">i4", "q": ">i8",
    "f": ">f4", "d": ">f8",
}


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of a template: IANA element id, length in bytes (65535 = variable) and enterprise number."""

    ie_id: int
    length: int
    pen: int = 0

    @property
    def variable(self) -> bool:
        return self.length == VARIABLE_LENGTH

    @property
    def key(self) -> str:
        return field_key(self.ie_id, self.pen)


@dataclass(frozen=True, slots=True)
class Template:
    """A (options) template: id >= 256, its fields in order, and how many leading fields are scope fields.

    ``scope_count > 0`` makes it an options template (records describe the exporter, not flows).
    """

    template_id: int
    fields: tuple[FieldSpec, ...]
    scope_count: int = 0

    @property
    def options(self) -> bool:
        return self.scope_count > 0


Row = Sequence[object]


@dataclass(slots=True)
class Layout:
    """A template compiled for decoding and encoding (one per template, shared by every data set using it)."""

    template: Template
    version: int
    keys: tuple[str, ...]
    codecs: tuple[FieldCodec, ...]
    min_size: int
    fixed: bool
    struct: Struct | None  # fixed templates: one record (IPv4 addresses as uint32, see compile_template)
    convs: tuple[tuple[int, Callable[[Any], object] | dict[Any, Any] | MemoTable], ...]  # of ``struct``'s
    # Variable templates: segments of (Struct, n fields) for fixed runs, or (None, 1) for a variable field.
    segments: tuple[tuple[Struct | None, int], ...] = ()
    raw_convs: tuple[tuple[int, Callable[[bytes], object]], ...] = ()
    uptime_idx: tuple[int | None, int | None] = (None, None)
    out_keys: tuple[str, ...] = field(default=())
    # Record builders (see make_row_converter): without sysUpTime resolution, with the header clock, with
    # the exporter's boot time.
    convert_plain: RowConverter = field(default=lambda *_: [])
    convert_timed: RowConverter = field(default=lambda *_: [])
    convert_init: RowConverter = field(default=lambda *_: [])
    shapes: dict[tuple[int, bool], RecordShape] = field(default_factory=dict)  # see shape()
    options: bool = False  # template.options, read on the hot path
    # Fixed templates whose fields all have a size: numpy can view their records (see ``columns``), which
    # compiles ``dtype`` on first use so that plain decoding never imports numpy.
    columnar: bool = False
    dtype: np.dtype[np.void] | None = None

    resolves: bool = False  # has sysUpTime fields to make absolute (uptime_idx), read on the hot path

    def __post_init__(self) -> None:
        self.options = self.template.options
        self.resolves = self.uptime_idx != (None, None)

    def shape(self, domain: int, timed: bool) -> RecordShape:
        """The shape of this template's records in ``domain`` (``timed``: with absolute times added)."""
        shape = self.shapes.get((domain, timed))
        if shape is None:
            if len(self.shapes) >= 64:  # one layout serves one domain in a decoder; bound it anyway
                self.shapes.clear()
            shape = self.shapes[(domain, timed)] = RecordShape(
                self.out_keys if timed else self.keys,
                template_id=self.template.template_id,
                domain=domain,
                options=self.template.options,
            )
        return shape

    @property
    def resolves_uptime(self) -> bool:
        return self.uptime_idx != (None, None)

    def decode_records(
        self,
        data: bytes,
        start: int,
        end: int,
        domain: int,
        export_ms: int | None,
        uptime_ms: int | None,
        init_ms: int | None = None,
    ) -> tuple[list[Record], MalformedSet | None]:
        """Decode the records in ``data[start:end]`` (a set body; trailing padding ignored).

        sysUpTime-relative times (ids 22/21) become absolute flowStart/EndMilliseconds with the header clock
        (``export_ms`` at ``uptime_ms``, v5/v9) or, failing that, with the exporter's boot time ``init_ms``
        (IPFIX systemInitTimeMilliseconds); without either they are left out rather than guessed. Returns
        the records and the error that stopped the walk, if any (records before a malformed one are kept).
        """
        error: MalformedSet | None = None
        source: bytes | list[Row]
        if self.fixed:
            count = (end - start) // self.min_size
            if count == 0:
                return [], None
            source = data[start : start + count * self.min_size]
        else:
            source, error = self._walk(data, start, end)
            if not source:
                return [], error
        if not self.resolves:
            return self.convert_plain(source, 0, 0, self.record_type(domain, False), []), error
        if export_ms is not None and uptime_ms is not None:
            base, hi = clock_args(export_ms, uptime_ms)
            return self.convert_timed(source, base, hi, self.record_type(domain, True), []), error
        if init_ms is not None:
            return self.convert_init(source, init_ms, 0, self.record_type(domain, True), []), error
        return self.convert_plain(source, 0, 0, self.record_type(domain, False), []), error

    def record_type(self, domain: int, timed: bool) -> type[Record]:
        """``shape(domain, timed).record_type()``: the class the record builders instantiate."""
        return self.shape(domain, timed).record_type()

    def _walk(self, data: bytes, start: int, end: int) -> tuple[list[Row], MalformedSet | None]:
        rows: list[Row] = []
        pos = start
        segments = self.segments
        while end - pos >= self.min_size:
            row: list[object] = []
            rec_start = pos
            for seg, _ in segments:
                if seg is not None:
                    if pos + seg.size > end:
                        return rows, MalformedSet(
                            f"record of template {self.template.template_id} runs past its set end {end}",
                            offset=rec_start,
                        )
                    row.extend(seg.unpack_from(data, pos))
                    pos += seg.size
                    continue
                if pos >= end:
                    return rows, MalformedSet(
                        f"variable-length field of template {self.template.template_id} has no length byte",
                        offset=pos,
                    )
                length = data[pos]
                pos += 1
                if length == 255:
                    if pos + 2 > end:
                        return rows, MalformedSet(
                            "variable-length field: 3-byte length cut short", offset=pos
                        )
                    length = (data[pos] << 8) | data[pos + 1]
                    pos += 2
                if pos + length > end:
                    return rows, MalformedSet(
                        f"variable-length field of {length} bytes runs past its set end {end}", offset=pos
                    )
                row.append(data[pos : pos + length])
                pos += length
            rows.append(row)
        return rows, None


RowConverter = Callable[..., list[Record]]

_HALF_WRAP: Final = 0x80000000


def make_row_converter(
    width: int,
    convs: Sequence[tuple[int, Callable[[Any], object] | dict[Any, Any] | MemoTable]],
    time_idx: Sequence[int] = (),
    n_extra: int = 0,
    *,
    since_init: bool = False,
    unpack: Callable[[bytes], Iterable[Row]] | None = None,
    u32_times: bool = False,
) -> RowConverter:
    """Compile ``convert(source, clock_a, clock_b, record_type, out, *extras) -> out`` for rows of ``width``
    values: it appends the records to the list ``out`` (a data set's records go straight into the message's
    list) and returns it. The clock (see ``clock_args``) is ``export_ms - uptime_ms, uptime_ms + 2^31`` of the
    header (computed once per datagram, not per set), ``init_ms, 0`` with ``since_init``, unused without
    ``time_idx``.

    ``source`` is an iterable of rows, or with ``unpack`` (a ``Struct.iter_unpack``) the bytes of whole
    records. One loop unpacks each row, applies ``convs`` by position (a ``MemoTable``'s plain dict, or a
    dict, is subscripted in place: address hits then cost no Python call; any other callable is called),
    appends the absolute time of each sysUpTime-relative column in ``time_idx`` and then the ``extras``, and
    makes a record of
    ``record_type`` (``RecordShape.record_type()``) holding the values. Generating it once per template makes
    the hot loop one pass without a Python call per value; the generated text holds only indices, never data
    from the wire.

    Absolute time: ``export_ms - uptime_ms + v``, with ``v`` moved by 2^32 when it lies more than 2^31 ms from
    the header's uptime (the signed distance modulo 2^32), so uptime wrap-around (every 49.7 days) and times
    slightly after the header clock both come out right. While the uptime is below 2^31 ms (24.8 days, the
    common case) no unsigned ``v`` lies 2^31 below it, so that loop tests only the upper bound; from 2^31 on,
    ``u32_times`` (every ``time_idx`` column is a field of at most 4 bytes, so ``v`` < 2^32 <= the upper
    bound) lets it test only the lower one. The moved sums start from ``base -/+ 2^32`` computed once per
    call: one comparison and one addition a time. With ``since_init`` the times are offsets from the boot
    time passed as ``clock_a`` (IPFIX).
    """
    names = [f"v{i}" for i in range(width)]
    conv_of = dict(convs)
    namespace: dict[str, object] = {"W": 0x100000000, "unpack": unpack}
    fast_parts: list[str] = []  # memo tables subscripted: a miss raises KeyError
    safe_parts: list[str] = []  # memo tables through their fill function
    for i, name in enumerate(names):
        conv = conv_of.get(i)
        if conv is None:
            fast_parts.append(name)
            safe_parts.append(name)
        elif isinstance(conv, MemoTable):
            namespace[f"c{i}"], namespace[f"f{i}"] = conv.table, conv.fill
            fast_parts.append(f"c{i}[{name}]")
            safe_parts.append(f"f{i}({name})")
        else:
            table = _subscriptable(conv)
            namespace[f"c{i}"] = conv if table is None else table
            part = f"c{i}({name})" if table is None else f"c{i}[{name}]"
            fast_parts.append(part)
            safe_parts.append(part)
    memo = fast_parts != safe_parts
    extras = [f"e{i}" for i in range(n_extra)]
    params = ", ".join(["source", "clock_a", "clock_b", "cls", "out", *extras])
    if conv_of or time_idx or n_extra:
        target = "(" + ", ".join(names) + ("," if width == 1 else "") + ")"
    else:
        target = "row"  # nothing to convert: the unpacked tuple is the record's values
    rows = "unpack(source)" if unpack is not None else "source"

    def loop(indent: str, parts: list[str], time_form: str) -> str:
        if target == "row":
            values = "row"
        else:
            times = [time_form.format(v=f"v{i}") for i in time_idx]
            values = "(" + ", ".join([*parts, *times, *extras]) + ",)"
        return (
            f"{indent}for {target} in {rows}:\n"
            f"{indent}    rec = cls()\n"
            f"{indent}    rec.row = {values}\n"
            f"{indent}    out.append(rec)\n"  # specialised in place by the interpreter, unlike a bound append
        )

    def loops(indent: str, parts: list[str]) -> str:
        if not time_idx:
            return loop(indent, parts, "")
        if since_init:
            return loop(indent, parts, "base + {v}")
        wide = "(base + {v} if lo < {v} <= hi else base + {v} + (W if {v} <= lo else -W))"
        return (
            f"{indent}if hi < W:\n"
            + f"{indent}    below = base - W\n"
            + loop(indent + "    ", parts, "(base + {v} if {v} <= hi else below + {v})")
            + f"{indent}else:\n"
            + f"{indent}    lo = hi - W\n"
            + f"{indent}    above = base + W\n"
            + loop(indent + "    ", parts, "(base + {v} if {v} > lo else above + {v})" if u32_times else wide)
        )

    body = "    base = clock_a\n    hi = clock_b\n"
    if memo:
        # A memo miss (a new address) drops this call's records and redoes them filling the memo.
        body += (
            "    first = len(out)\n"
            "    try:\n"
            + loops("        ", fast_parts)
            + "    except KeyError:\n"
            "        del out[first:]\n"
            + loops("        ", safe_parts)
        )
    else:
        body += loops("    ", fast_parts)
    source = f"def convert({params}):\n{body}    return out\n"
    exec(compile(source, "<netflow record builder>", "exec"), namespace)
    convert: RowConverter = namespace["convert"]  # type: ignore[assignment]
    return convert


def clock_args(export_ms: int, uptime_ms: int) -> tuple[int, int]:
    """The (clock_a, clock_b) of a timed record builder for a header's export time and uptime."""
    return export_ms - uptime_ms, uptime_ms + _HALF_WRAP


def _subscriptable(conv: object) -> dict[Any, Any] | None:
    """The dict behind ``conv`` when it is one (or its bound ``__getitem__``, as ``fields.ipv4_text``)."""
    if isinstance(conv, dict):
        return conv
    owner = getattr(conv, "__self__", None)
    if isinstance(owner, dict) and getattr(conv, "__name__", "") == "__getitem__":
        return owner
    return None


def _v9_scope_codec(spec: FieldSpec) -> FieldCodec:
    name = V9_SCOPE_NAMES.get(spec.ie_id, f"scope_{spec.ie_id}")
    if spec.length in (1, 2, 4, 8):
        return replace(
            field_codec(2, spec.length), key=name, data_type="unsigned64"
        )  # packetDeltaCount: uint
    return replace(field_codec(0, spec.length), key=name)  # id 0 is unassigned: hex


def compile_template(template: Template, version: int, *, offset: int = 0) -> Layout:
    """Compile ``template`` for ``version`` (9 or 10). Raises ``MalformedTemplate`` naming the bad field."""
    tid = template.template_id
    if not 256 <= tid <= 65535:
        raise MalformedTemplate(
            f"template id {tid} is below 256 (ids 0-255 name sets, not templates)", offset=offset
        )
    if template.scope_count > len(template.fields):
        raise MalformedTemplate(
            f"template {tid}: scope field count {template.scope_count} exceeds "
            f"field count {len(template.fields)}",
            offset=offset,
        )
    codecs: list[FieldCodec] = []
    for i, spec in enumerate(template.fields):
        if version == 9 and i < template.scope_count:
            codecs.append(_v9_scope_codec(spec))
            continue
        try:
            codecs.append(field_codec(spec.ie_id, spec.length, spec.pen))
        except FieldTypeError as exc:
            raise MalformedTemplate(f"template {tid}: {exc}", offset=offset) from None
    keys = _unique_keys([c.key for c in codecs])
    variable = any(spec.variable for spec in template.fields)
    min_size = sum(1 if spec.variable else spec.length for spec in template.fields)
    if min_size == 0:
        raise MalformedTemplate(f"template {tid} describes records of 0 bytes", offset=offset)
    uptime_idx: tuple[int | None, int | None] = (None, None)
    extra_keys: list[str] = []
    start_idx = _index_of(template, FLOW_START_SYSUPTIME)
    end_idx = _index_of(template, FLOW_END_SYSUPTIME)
    if start_idx is not None and "flowStartMilliseconds" not in keys:
        extra_keys.append("flowStartMilliseconds")
    else:
        start_idx = None
    if end_idx is not None and "flowEndMilliseconds" not in keys:
        extra_keys.append("flowEndMilliseconds")
    else:
        end_idx = None
    uptime_idx = (start_idx, end_idx)
    time_cols = [i for i in uptime_idx if i is not None]
    narrow = all(template.fields[i].length <= 4 for i in time_cols)  # sysUpTime values below 2^32
    if not variable:
        # The row struct reads IPv4 addresses as uint32 for the int-keyed address cache; the codecs keep
        # their byte form for the columnar path and the encoder.
        row_codes: list[str] = []
        convs: list[tuple[int, Callable[[Any], object] | dict[Any, Any] | MemoTable]] = []
        for i, c in enumerate(codecs):
            if c.data_type == "ipv4Address":
                row_codes.append("I")
                convs.append((i, V4_INT_MEMO))
            elif c.data_type == "ipv6Address":
                row_codes.append(c.code)
                convs.append((i, V6_MEMO))
            else:
                row_codes.append(c.code)
                if c.conv is not None:
                    convs.append((i, c.conv))
        row_struct = struct.Struct("!" + "".join(row_codes))
        unpack = row_struct.iter_unpack
        width = len(codecs)
        return Layout(
            template,
            version,
            keys,
            tuple(codecs),
            min_size,
            True,
            row_struct,
            tuple(convs),
            uptime_idx=uptime_idx,
            out_keys=keys + tuple(extra_keys),
            convert_plain=make_row_converter(width, convs, unpack=unpack),
            convert_timed=make_row_converter(width, convs, time_cols, unpack=unpack, u32_times=narrow),
            convert_init=make_row_converter(width, convs, time_cols, since_init=True, unpack=unpack),
            columnar=all(c.code[:-1] != "0" for c in codecs),
        )
    segments: list[tuple[struct.Struct | None, int]] = []
    run: list[str] = []
    raw_convs: list[tuple[int, Callable[[bytes], object]]] = []
    for i, (spec, codec) in enumerate(zip(template.fields, codecs, strict=True)):
        if spec.variable:
            if run:
                segments.append((struct.Struct("!" + "".join(run)), len(run)))
                run = []
            segments.append((None, 1))
            raw_convs.append((i, codec.from_bytes))
        else:
            run.append(codec.code)
            if codec.conv is not None:
                raw_convs.append((i, codec.conv))
    if run:
        segments.append((struct.Struct("!" + "".join(run)), len(run)))
    return Layout(
        template,
        version,
        keys,
        tuple(codecs),
        min_size,
        False,
        None,
        (),
        segments=tuple(segments),
        raw_convs=tuple(raw_convs),
        uptime_idx=uptime_idx,
        out_keys=keys + tuple(extra_keys),
        convert_plain=make_row_converter(len(codecs), raw_convs),
        convert_timed=make_row_converter(len(codecs), raw_convs, time_cols, u32_times=narrow),
        convert_init=make_row_converter(len(codecs), raw_convs, time_cols, since_init=True),
    )


_COMPILED: OrderedDict[tuple[Template, int], Layout] = OrderedDict()
_COMPILED_MAX = 1024
_COMPILED_LOCK = threading.Lock()


def compile_cached(template: Template, version: int, *, offset: int = 0) -> Layout:
    """``compile_template`` through a bounded LRU cache: many exporters (e.g. every agent's softflowd) send
    the same templates, and compiling generates code. The shared ``Layout`` holds no per-exporter state."""
    key = (template, version)
    with _COMPILED_LOCK:  # decoders may run in several threads (asyncio.to_thread)
        layout = _COMPILED.get(key)
        if layout is not None:
            _COMPILED.move_to_end(key)
            return layout
    layout = compile_template(template, version, offset=offset)
    with _COMPILED_LOCK:
        _COMPILED[key] = layout
        if len(_COMPILED) > _COMPILED_MAX:
            _COMPILED.popitem(last=False)
    return layout


def _index_of(template: Template, ie_id: int) -> int | None:
    for i, spec in enumerate(template.fields):
        if spec.ie_id == ie_id and spec.pen == 0 and spec.length in (1, 2, 4, 8):
            return i
    return None


def _unique_keys(keys: list[str]) -> tuple[str, ...]:
    """A template may repeat an element (e.g. two labels of one id): later copies get ``_2``, ``_3``..."""
    seen: dict[str, int] = {}
    out: list[str] = []
    for key in keys:
        n = seen.get(key, 0) + 1
        seen[key] = n
        out.append(key if n == 1 else f"{key}_{n}")
    return tuple(out)
