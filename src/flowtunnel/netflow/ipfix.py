"""IPFIX (RFC 7011): message header and (options) template set parsing, including withdrawals.

A template record with field count 0 withdraws that template; template id 2 (in a template set) or 3 (in an
options template set) with field count 0 withdraws all templates of that kind in the observation domain
(RFC 7011 §8.1). Field specifiers with the enterprise bit carry a 4-byte Private Enterprise Number.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from flowtunnel.netflow.errors import MalformedHeader, MalformedTemplate, Truncated
from flowtunnel.netflow.templates import FieldSpec, Template

__all__ = ["ALL_TEMPLATES", "HEADER", "IpfixHeader", "Withdrawal", "parse_ipfix_header", "parse_template_set"]

HEADER = struct.Struct("!HHIII")
_PAIR = struct.Struct("!HH")
_TRIPLE = struct.Struct("!HHH")
_PEN = struct.Struct("!I")
TEMPLATE_SET = 2
OPTIONS_TEMPLATE_SET = 3
ALL_TEMPLATES = -1  # Withdrawal.template_id meaning "every template of this kind"


class IpfixHeader(NamedTuple):
    length: int
    export_time: int
    sequence: int
    domain: int


@dataclass(frozen=True, slots=True)
class Withdrawal:
    template_id: int  # ALL_TEMPLATES for an all-templates withdrawal
    options: bool


def parse_ipfix_header(data: bytes) -> IpfixHeader:
    if len(data) < HEADER.size:
        raise Truncated(f"IPFIX header needs {HEADER.size} bytes, datagram has {len(data)}", offset=0)
    version, length, export_time, seq, domain = HEADER.unpack_from(data)
    if version != 10:
        raise MalformedHeader(f"version {version} is not 10", offset=0)
    if length < HEADER.size:
        raise MalformedHeader(
            f"IPFIX message length {length} is below the header size {HEADER.size}", offset=2
        )
    if length > len(data):
        raise Truncated(f"IPFIX message length {length} exceeds the {len(data)} bytes received", offset=2)
    return IpfixHeader(length, export_time, seq, domain)


_MEMO: dict[tuple[bool, bytes], tuple[Template | Withdrawal, ...]] = {}
_MEMO_MAX = 1024


def parse_template_set(
    data: bytes, start: int, end: int, options: bool
) -> tuple[list[Template | Withdrawal], MalformedTemplate | None]:
    """Records of a template set (id 2) or options template set (id 3); trailing padding ignored.

    Exporters repeat the same template sets every few messages: each distinct clean set body is parsed once
    (bounded memo; an error names an offset that depends on the message, so those are not kept).
    """
    key = (options, data[start:end])
    hit = _MEMO.get(key)
    if hit is not None:
        return list(hit), None
    out, err = _parse_template_set(data, start, end, options)
    if err is None:
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        _MEMO[key] = tuple(out)
    return out, err


def _parse_template_set(
    data: bytes, start: int, end: int, options: bool
) -> tuple[list[Template | Withdrawal], MalformedTemplate | None]:
    out: list[Template | Withdrawal] = []
    pos = start
    while end - pos >= 4:
        tid, count = _PAIR.unpack_from(data, pos)
        if count == 0:
            if tid == 0:
                break  # zero padding
            if tid == (OPTIONS_TEMPLATE_SET if options else TEMPLATE_SET):
                out.append(Withdrawal(ALL_TEMPLATES, options))
            elif tid < 256:
                return out, MalformedTemplate(f"withdrawal of template id {tid} below 256", offset=pos)
            else:
                out.append(Withdrawal(tid, options))
            pos += 4
            continue
        rec_start = pos
        scope = 0
        if options:
            if end - pos < 6:
                return out, MalformedTemplate(f"options template {tid} header cut short", offset=pos)
            scope = _TRIPLE.unpack_from(data, pos)[2]
            if scope == 0 or scope > count:
                return out, MalformedTemplate(
                    f"options template {tid}: scope field count {scope} not in 1..{count}", offset=pos + 4
                )
            pos += 6
        else:
            pos += 4
        specs: list[FieldSpec] = []
        for _ in range(count):
            if end - pos < 4:
                return out, MalformedTemplate(
                    f"template {tid} announces {count} fields, its set ends after {len(specs)}", offset=pos
                )
            ie, length = _PAIR.unpack_from(data, pos)
            pos += 4
            pen = 0
            if ie & 0x8000:
                if end - pos < 4:
                    return out, MalformedTemplate(f"template {tid}: enterprise number cut short", offset=pos)
                pen = _PEN.unpack_from(data, pos)[0]
                pos += 4
                ie &= 0x7FFF
            specs.append(FieldSpec(ie, length, pen))
        if tid < 256:
            return out, MalformedTemplate(f"template id {tid} is below 256", offset=rec_start)
        out.append(Template(tid, tuple(specs), scope))
    return out, None
