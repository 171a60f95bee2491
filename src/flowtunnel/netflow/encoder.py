"""The encoder: templates and records (Python values keyed like decoded records) -> export datagrams.

Used by tests, ``replay`` and the demo. Values are converted by each field's IANA type (addresses as text,
ints, hex text or bytes for octet arrays, ...); a key missing from a record encodes as zeros (or empty, for a
variable-length field). Keys a template does not hold are ignored, so decoded records re-encode as they are.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from socket import inet_aton

from flowtunnel.netflow import ipfix, v5, v9
from flowtunnel.netflow.templates import Layout, Template, compile_cached

__all__ = ["DataSet", "encode_ipfix", "encode_v5", "encode_v9"]

DataSet = tuple[Template, Sequence[Mapping[str, object]]]
"""One data set: the template and its records, in order."""

_PAIR = struct.Struct("!HH")
_TRIPLE = struct.Struct("!HHH")
_SET_HEADER = struct.Struct("!HH")


def encode_v5(
    records: Sequence[Mapping[str, object]],
    *,
    sys_uptime_ms: int,
    unix_secs: int,
    unix_nsecs: int = 0,
    sequence: int = 0,
    engine_type: int = 0,
    engine_id: int = 0,
    sampling_interval: int = 0,
) -> bytes:
    """A v5 datagram (1-30 records). Times: ``flowStartSysUpTime``/``flowEndSysUpTime``, or else absolute
    ``flowStartMilliseconds``/``flowEndMilliseconds`` converted with the header clock."""
    if not 1 <= len(records) <= v5.MAX_COUNT:
        raise ValueError(f"v5 datagram holds 1..{v5.MAX_COUNT} records, got {len(records)}")
    export_ms = unix_secs * 1000 + unix_nsecs // 1_000_000
    out = [
        v5.HEADER.pack(
            5,
            len(records),
            sys_uptime_ms,
            unix_secs,
            unix_nsecs,
            sequence,
            engine_type,
            engine_id,
            sampling_interval,
        )
    ]

    def uptime_of(rec: Mapping[str, object], rel: str, absolute: str) -> int:
        value = rec.get(rel)
        if isinstance(value, int):
            return value
        value = rec.get(absolute)
        if isinstance(value, int):
            return (sys_uptime_ms - (export_ms - value)) & 0xFFFFFFFF
        return sys_uptime_ms

    for rec in records:
        try:
            out.append(
                v5.RECORD.pack(
                    _addr(rec, "sourceIPv4Address"),
                    _addr(rec, "destinationIPv4Address"),
                    _addr(rec, "ipNextHopIPv4Address"),
                    _num(rec, "ingressInterface"),
                    _num(rec, "egressInterface"),
                    _num(rec, "packetDeltaCount"),
                    _num(rec, "octetDeltaCount"),
                    uptime_of(rec, "flowStartSysUpTime", "flowStartMilliseconds"),
                    uptime_of(rec, "flowEndSysUpTime", "flowEndMilliseconds"),
                    _num(rec, "sourceTransportPort"),
                    _num(rec, "destinationTransportPort"),
                    _num(rec, "tcpControlBits"),
                    _num(rec, "protocolIdentifier"),
                    _num(rec, "ipClassOfService"),
                    _num(rec, "bgpSourceAsNumber"),
                    _num(rec, "bgpDestinationAsNumber"),
                    _num(rec, "sourceIPv4PrefixLength"),
                    _num(rec, "destinationIPv4PrefixLength"),
                )
            )
        except struct.error as exc:
            raise ValueError(f"v5 record value out of range: {exc}") from None
    return b"".join(out)


def _num(rec: Mapping[str, object], key: str) -> int:
    value = rec.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"v5 field {key} wants an int, got {type(value).__name__}")
    return value


def _addr(rec: Mapping[str, object], key: str) -> bytes:
    value = rec.get(key, "0.0.0.0")
    if not isinstance(value, str):
        raise TypeError(f"v5 field {key} wants IPv4 text, got {type(value).__name__}")
    try:
        return inet_aton(value)
    except OSError:
        raise ValueError(f"v5 field {key}: {value!r} is not an IPv4 address") from None


def encode_v9(
    *,
    templates: Sequence[Template] = (),
    data: Sequence[DataSet] = (),
    sys_uptime_ms: int = 0,
    unix_secs: int = 0,
    sequence: int = 0,
    source_id: int = 0,
    count: int | None = None,
    align: int = 1,
) -> bytes:
    """A v9 datagram: a template FlowSet, an options template FlowSet (when given), then one FlowSet per
    ``data`` entry. ``count`` overrides the header Count (default: the true record count); ``align`` pads
    every FlowSet to a multiple of that many bytes, as RFC 3954 allows."""
    sets: list[bytes] = []
    plain = [t for t in templates if not t.options]
    opts = [t for t in templates if t.options]
    if plain:
        body = b"".join(_v9_template(t) for t in plain)
        sets.append(_set(0, body, align))
    if opts:
        body = b"".join(_v9_options_template(t) for t in opts)
        sets.append(_set(1, body, align))
    n_records = len(templates)
    for template, records in data:
        layout = compile_cached(template, 9)
        sets.append(_set(template.template_id, b"".join(_record(layout, r) for r in records), align))
        n_records += len(records)
    header = v9.HEADER.pack(
        9, n_records if count is None else count, sys_uptime_ms, unix_secs, sequence, source_id
    )
    return header + b"".join(sets)


def encode_ipfix(
    *,
    templates: Sequence[Template] = (),
    data: Sequence[DataSet] = (),
    withdrawals: Sequence[tuple[int, bool]] = (),
    export_time: int = 0,
    sequence: int = 0,
    domain: int = 0,
    align: int = 1,
) -> bytes:
    """An IPFIX message: template set, options template set, withdrawals, then one set per ``data`` entry.

    ``withdrawals`` are ``(template_id, options)`` pairs; template id 2 (options False) or 3 (options True)
    withdraws all templates of that kind. ``align`` pads every set to a multiple of that many bytes.
    """
    sets: list[bytes] = []
    plain = [t for t in templates if not t.options]
    opts = [t for t in templates if t.options]
    if plain:
        sets.append(_set(ipfix.TEMPLATE_SET, b"".join(_ipfix_template(t) for t in plain), align))
    if opts:
        sets.append(_set(ipfix.OPTIONS_TEMPLATE_SET, b"".join(_ipfix_template(t) for t in opts), align))
    for options in (False, True):
        ids = [tid for tid, opt in withdrawals if opt == options]
        if ids:
            set_id = ipfix.OPTIONS_TEMPLATE_SET if options else ipfix.TEMPLATE_SET
            sets.append(_set(set_id, b"".join(_PAIR.pack(tid, 0) for tid in ids), align))
    for template, records in data:
        layout = compile_cached(template, 10)
        sets.append(_set(template.template_id, b"".join(_record(layout, r) for r in records), align))
    body = b"".join(sets)
    length = ipfix.HEADER.size + len(body)
    if length > 0xFFFF:
        raise ValueError(f"IPFIX message of {length} bytes exceeds the 65535-byte limit")
    return ipfix.HEADER.pack(10, length, export_time, sequence, domain) + body


def _set(set_id: int, body: bytes, align: int) -> bytes:
    length = 4 + len(body)
    pad = (-length) % align if align > 1 else 0
    if length + pad > 0xFFFF:
        raise ValueError(f"set {set_id} of {length + pad} bytes exceeds the 65535-byte limit")
    return _SET_HEADER.pack(set_id, length + pad) + body + b"\x00" * pad


def _v9_template(template: Template) -> bytes:
    for spec in template.fields:
        if spec.pen:
            raise ValueError(f"v9 has no enterprise fields: template {template.template_id} field {spec.key}")
    return _PAIR.pack(template.template_id, len(template.fields)) + b"".join(
        _PAIR.pack(f.ie_id, f.length) for f in template.fields
    )


def _v9_options_template(template: Template) -> bytes:
    for spec in template.fields:
        if spec.pen:
            raise ValueError(f"v9 has no enterprise fields: template {template.template_id} field {spec.key}")
    scope = template.scope_count
    return _TRIPLE.pack(template.template_id, 4 * scope, 4 * (len(template.fields) - scope)) + b"".join(
        _PAIR.pack(f.ie_id, f.length) for f in template.fields
    )


def _ipfix_template(template: Template) -> bytes:
    if template.options:
        head = _TRIPLE.pack(template.template_id, len(template.fields), template.scope_count)
    else:
        head = _PAIR.pack(template.template_id, len(template.fields))
    parts = [head]
    for spec in template.fields:
        if spec.ie_id > 0x7FFF:
            raise ValueError(
                f"IPFIX element id {spec.ie_id} does not fit 15 bits (template {template.template_id})"
            )
        if spec.pen:
            parts.append(_PAIR.pack(spec.ie_id | 0x8000, spec.length) + spec.pen.to_bytes(4, "big"))
        else:
            parts.append(_PAIR.pack(spec.ie_id, spec.length))
    return b"".join(parts)


def _record(layout: Layout, record: Mapping[str, object]) -> bytes:
    parts: list[bytes] = []
    for spec, key, codec in zip(layout.template.fields, layout.keys, layout.codecs, strict=True):
        value = record.get(key)
        if spec.variable:
            raw = b"" if value is None else codec.to_bytes(value, None)
            if len(raw) < 255:
                parts.append(bytes((len(raw),)))
            elif len(raw) <= 0xFFFF:
                parts.append(b"\xff" + len(raw).to_bytes(2, "big"))
            else:
                raise ValueError(f"field {key}: {len(raw)} bytes exceed the 65535-byte variable length limit")
            parts.append(raw)
        else:
            parts.append(b"\x00" * spec.length if value is None else codec.to_bytes(value, spec.length))
    return b"".join(parts)
