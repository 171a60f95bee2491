"""Cheap NetFlow/IPFIX header checks, the one home of header parsing outside the decoder.

``sniff`` finds export datagrams in captures on any port; ``check_datagram`` classifies what the agent
receives; ``export_sequence`` reads the export sequence fields; ``has_templates`` walks set headers. None
decodes records: each costs a few comparisons per datagram.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = [
    "IPFIX_HEADER",
    "V5_HEADER",
    "V5_RECORD",
    "V9_HEADER",
    "ExportSequence",
    "check_datagram",
    "export_sequence",
    "has_templates",
    "sniff",
]

#: fixed header bytes of each version, and the fixed v5 record length
V5_HEADER, V5_RECORD, V9_HEADER, IPFIX_HEADER = 24, 48, 20, 16
_HH = struct.Struct("!HH")
_U32 = struct.Struct("!I")
_II = struct.Struct("!II")


class ExportSequence(NamedTuple):
    """The export sequence fields of a v5 or v9 header: ``units`` is what the sequence counts per datagram
    (flows for v5, one datagram for v9); ``domain`` is v5's engine type and id, v9's source id."""

    version: int
    units: int
    sequence: int
    domain: int
    uptime_ms: int


def check_datagram(payload: bytes) -> str | None:
    """``None`` if ``payload`` looks like a NetFlow v5/v9 or IPFIX datagram, else the malformation cause.

    A header check only, cheap enough for every datagram; malformed datagrams are still carried (the
    collector may understand them), only counted.
    """
    if len(payload) < 4:
        return "short"
    version, field = _HH.unpack_from(payload)
    if version == 5:
        if len(payload) < V5_HEADER or len(payload) != V5_HEADER + field * V5_RECORD:
            return "v5_length"
        return None
    if version == 9:
        return None if len(payload) >= V9_HEADER else "v9_length"
    if version == 10:
        return None if len(payload) >= IPFIX_HEADER and field == len(payload) else "ipfix_length"
    return "not_netflow"


def export_sequence(payload: bytes) -> ExportSequence | None:
    """The sequence fields of a v5 or v9 datagram that passed ``check_datagram``; ``None`` for IPFIX."""
    version, field = _HH.unpack_from(payload)
    (uptime,) = _U32.unpack_from(payload, 4)
    if version == 5:
        (sequence,) = _U32.unpack_from(payload, 16)
        return ExportSequence(version, field, sequence, (payload[20] << 8) | payload[21], uptime)
    if version == 9:
        sequence, source_id = _II.unpack_from(payload, 12)
        return ExportSequence(version, 1, sequence, source_id, uptime)
    return None


def has_templates(payload: bytes) -> bool:
    """True if a v9 or IPFIX datagram holds a template or options-template set (cheap walk of set headers)."""
    if len(payload) < 4:
        return False
    version = (payload[0] << 8) | payload[1]
    if version == 9:
        pos, tpl = V9_HEADER, (0, 1)
    elif version == 10:
        pos, tpl = IPFIX_HEADER, (2, 3)
    else:
        return False
    end = len(payload)
    while pos + 4 <= end:
        set_id, length = _HH.unpack_from(payload, pos)
        if set_id in tpl:
            return True
        if length < 4:
            return False
        pos += length
    return False


def _first_set_ok(payload: bytes, start: int, end: int, version: int) -> bool:
    if end - start < 4:
        return end == start  # a header alone is a (useless but valid) datagram
    set_id = (payload[start] << 8) | payload[start + 1]
    set_len = (payload[start + 2] << 8) | payload[start + 3]
    template_ids = (0, 1) if version == 9 else (2, 3)
    if set_id not in template_ids and set_id < 256:
        return False
    return 4 <= set_len <= end - start


def sniff(payload: bytes) -> int | None:
    """5, 9 or 10 if ``payload`` looks like a NetFlow v5, v9 or IPFIX export datagram, else ``None``.

    v5: count 1..30 and length exactly 24 + 48 * count. v9: count not above what the length could hold, and
    a plausible first FlowSet. IPFIX: the header's length equals the payload length, and a plausible first
    set.
    """
    size = len(payload)
    if size < 16:
        return None
    version = (payload[0] << 8) | payload[1]
    field = (payload[2] << 8) | payload[3]
    if version == 5:
        return 5 if 1 <= field <= 30 and size == V5_HEADER + V5_RECORD * field else None
    if version == 9:
        if size < V9_HEADER or field > size:  # records take at least a byte each
            return None
        return 9 if _first_set_ok(payload, V9_HEADER, size, 9) else None
    if version == 10:
        if field != size:
            return None
        return 10 if _first_set_ok(payload, IPFIX_HEADER, size, 10) else None
    return None
