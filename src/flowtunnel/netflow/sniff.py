"""Cheap recognition of NetFlow/IPFIX in arbitrary UDP payloads: version field plus header sanity checks.

Used to find export datagrams in captures on any port; it never decodes records, so it costs a few
comparisons per datagram and rejects most non-NetFlow traffic (DNS, QUIC, syslog...).
"""

from __future__ import annotations

__all__ = ["sniff"]


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
        return 5 if 1 <= field <= 30 and size == 24 + 48 * field else None
    if version == 9:
        if size < 20 or field > size:  # records take at least a byte each
            return None
        return 9 if _first_set_ok(payload, 20, size, 9) else None
    if version == 10:
        if field != size:
            return None
        return 10 if _first_set_ok(payload, 16, size, 10) else None
    return None
