"""NetFlow v9 (RFC 3954): header and (options) template FlowSet parsing.

The header's Count is only informative: softflowd and others get it wrong on datagrams that carry templates,
so the decoder walks FlowSets by their length and never loops on Count.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

from flowtunnel.netflow.errors import MalformedHeader, MalformedTemplate, Truncated
from flowtunnel.netflow.templates import FieldSpec, Template

__all__ = ["HEADER", "V9Header", "parse_options_template_set", "parse_template_set", "parse_v9_header"]

HEADER = struct.Struct("!HHIIII")
_PAIR = struct.Struct("!HH")
_TRIPLE = struct.Struct("!HHH")


class V9Header(NamedTuple):
    n_records: int
    sys_uptime_ms: int
    unix_secs: int
    sequence: int
    source_id: int


def parse_v9_header(data: bytes) -> V9Header:
    if len(data) < HEADER.size:
        raise Truncated(f"v9 header needs {HEADER.size} bytes, datagram has {len(data)}", offset=0)
    version, count, uptime, secs, seq, source_id = HEADER.unpack_from(data)
    if version != 9:
        raise MalformedHeader(f"version {version} is not 9", offset=0)
    return V9Header(count, uptime, secs, seq, source_id)


_MEMO: dict[tuple[bool, bytes], tuple[Template, ...]] = {}
_MEMO_MAX = 1024


def _memoised(
    parse: Callable[[bytes, int, int], tuple[list[Template], MalformedTemplate | None]], options: bool
) -> Callable[[bytes, int, int], tuple[list[Template], MalformedTemplate | None]]:
    """Exporters repeat the same template sets every few packets (softflowd: every 16): parse each distinct
    set body once. Only clean parses are kept (an error names an offset that depends on the datagram)."""

    def parse_set(data: bytes, start: int, end: int) -> tuple[list[Template], MalformedTemplate | None]:
        key = (options, data[start:end])
        hit = _MEMO.get(key)
        if hit is not None:
            return list(hit), None
        templates, err = parse(data, start, end)
        if err is None:
            if len(_MEMO) >= _MEMO_MAX:
                _MEMO.clear()
            _MEMO[key] = tuple(templates)
        return templates, err

    parse_set.__doc__ = parse.__doc__
    return parse_set


def _parse_template_set(data: bytes, start: int, end: int) -> tuple[list[Template], MalformedTemplate | None]:
    """Template records of a FlowSet with id 0 (``data[start:end]`` is the body). Trailing padding ignored."""
    templates: list[Template] = []
    pos = start
    while end - pos >= 4:
        tid, count = _PAIR.unpack_from(data, pos)
        if tid == 0 and count == 0:
            break  # zero padding
        fields_end = pos + 4 + 4 * count
        if fields_end > end:
            return templates, MalformedTemplate(
                f"template {tid} with {count} fields needs {4 + 4 * count} bytes, "
                f"its set has {end - pos} left",
                offset=pos,
            )
        if count == 0:
            return templates, MalformedTemplate(f"v9 template {tid} has 0 fields", offset=pos)
        specs = tuple(FieldSpec(t, n) for t, n in _PAIR.iter_unpack(data[pos + 4 : fields_end]))
        templates.append(Template(tid, specs))
        pos = fields_end
    return templates, None


def _parse_options_template_set(
    data: bytes, start: int, end: int
) -> tuple[list[Template], MalformedTemplate | None]:
    """Options template records of a FlowSet with id 1: scope fields first, then option fields."""
    templates: list[Template] = []
    pos = start
    while end - pos >= 6:
        tid, scope_len, option_len = _TRIPLE.unpack_from(data, pos)
        if tid == 0 and scope_len == 0 and option_len == 0:
            break
        if scope_len % 4 or option_len % 4:
            return templates, MalformedTemplate(
                f"options template {tid}: scope length {scope_len} / option length {option_len} "
                "are not multiples of 4",
                offset=pos,
            )
        if scope_len == 0:
            return templates, MalformedTemplate(f"options template {tid} has no scope field", offset=pos)
        fields_end = pos + 6 + scope_len + option_len
        if fields_end > end:
            return templates, MalformedTemplate(
                f"options template {tid} needs {fields_end - pos} bytes, its set has {end - pos} left",
                offset=pos,
            )
        specs = tuple(FieldSpec(t, n) for t, n in _PAIR.iter_unpack(data[pos + 6 : fields_end]))
        templates.append(Template(tid, specs, scope_len // 4))
        pos = fields_end
    return templates, None


parse_template_set = _memoised(_parse_template_set, False)
parse_options_template_set = _memoised(_parse_options_template_set, True)
