"""Columnar decoding: fixed-length data sets as raw record blocks numpy reads whole: no object per record.

``Decoder.decode_columns`` returns the data sets of fixed-length flow templates as ``RecordBlock``s (the
set's record bytes, trailing padding cut, plus the template and header clock) instead of ``Record``s. A
consumer that wants columns (the store) joins the blocks of one template across many datagrams and views them
with one ``np.frombuffer``; the dtype is compiled once per template (``record_dtype``): big-endian integers
and floats of 1/2/4/8 bytes as numbers, every other field (addresses, MACs, reduced-size integers, strings,
octet arrays) as raw bytes (``V<n>``). ``column_values`` turns a column into the exact Python values the
``Record`` path gives (same converters), and ``resolve_uptime`` is the vectorised twin of the record
builder's sysUpTime arithmetic, so both paths agree value for value (a property the tests check).
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt

from flowtunnel.netflow.blocks import MODE_INIT, MODE_PLAIN, MODE_TIMED, RecordBlock
from flowtunnel.netflow.templates import NUMERIC_DTYPES, Layout

__all__ = [
    "MODE_INIT",
    "MODE_PLAIN",
    "MODE_TIMED",
    "RecordBlock",
    "block_mode",
    "column_values",
    "is_plain_number",
    "record_dtype",
    "resolve_uptime",
    "resolve_uptime_since_init",
]

_WRAP: Final = 1 << 32
_HALF: Final = 1 << 31

def record_dtype(layout: Layout) -> np.dtype[np.void]:
    """The packed structured dtype of one record of a fixed-length ``layout``; field ``f<i>`` is field i.

    Compiled on first use and kept on the layout. Raises ``ValueError`` for a variable-length layout (those
    have no fixed record size) or one with an empty field (numpy cannot view it).
    """
    if not layout.columnar:
        tid = layout.template.template_id
        raise ValueError(f"template {tid} has variable-length or empty fields: no record dtype")
    if layout.dtype is None:
        parts: list[tuple[str, str]] = []
        for i, c in enumerate(layout.codecs):
            parts.append((f"f{i}", NUMERIC_DTYPES.get(c.code) or f"V{int(c.code[:-1])}"))
        layout.dtype = np.dtype(parts)
    return layout.dtype


def block_mode(layout: Layout, export_ms: int | None, uptime_ms: int | None, init_ms: int | None) -> int:
    """The ``MODE_*`` that ``Layout.decode_records`` would pick for these clocks."""
    if not layout.resolves:
        return MODE_PLAIN
    if export_ms is not None and uptime_ms is not None:
        return MODE_TIMED
    return MODE_PLAIN if init_ms is None else MODE_INIT


def column_values(layout: Layout, array: npt.NDArray[np.void], index: int) -> list[Any]:
    """Field ``index`` of every record in ``array`` as the Python values a ``Record`` holds."""
    column = array[f"f{index}"]
    codec = layout.codecs[index]
    values: list[Any] = column.tolist()  # numbers, or bytes for raw fields
    if codec.conv is not None:
        return list(map(codec.conv, values))
    if codec.code.endswith("s"):  # raw field without a converter (none today): bytes, as struct gives
        return [bytes(v) for v in values]
    return values


def is_plain_number(layout: Layout, index: int) -> bool:
    """Whether field ``index`` reads as a number whose Python value is the number itself (no converter)."""
    codec = layout.codecs[index]
    return codec.conv is None and codec.code in NUMERIC_DTYPES


def resolve_uptime(
    values: npt.NDArray[Any], export_ms: npt.NDArray[np.int64], uptime_ms: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """Absolute ms of sysUpTime-relative ``values`` with the header clock, per record (see
    ``make_row_converter``): ``export_ms - uptime_ms + v``, moved by 2^32 when ``v`` lies more than 2^31 ms
    from the header's uptime."""
    v = values.astype(np.int64)
    out = export_ms - uptime_ms + v
    lo = uptime_ms - _HALF
    hi = uptime_ms + _HALF
    out += np.where(v <= lo, _WRAP, 0)
    out -= np.where(v > hi, _WRAP, 0)
    return out


def resolve_uptime_since_init(
    values: npt.NDArray[Any], init_ms: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """Absolute ms of sysUpTime-relative ``values`` counted from the exporter's boot time (IPFIX)."""
    return init_ms + values.astype(np.int64)
