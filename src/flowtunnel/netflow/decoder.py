"""The stateful, sans-I/O decoder: bytes + exporter in, ``Message`` out; template cache and counters inside.

Template scope. v9 and IPFIX templates are keyed by (exporter, version, observation domain / source id,
template id). ``DecoderConfig.scope_port`` decides whether "exporter" includes the UDP source port. The
default (False) follows nfdump and pmacct rather than RFC 7011 §8: exporters restart on a new source port
and re-send templates only every few minutes, so keying on the port would leave their data undecodable
meanwhile, while two exporting processes on one address and domain are rare. Set ``scope_port=True`` for
the RFC behaviour when several exporters share an address.

Unknown templates. A data set whose template is not known yet is held (bounded per exporter and in total,
by count and bytes; the oldest is evicted and counted) and decoded, with its own header's clock, in the
``Message`` of the datagram that brings the template. ``discard_held()`` gives up on the rest.

Bad input. A bad header raises a ``ProtocolError``. A bad set is reported in ``Message.errors`` and counted,
and the sets before it are kept; the walk stops there, since a set whose length is wrong hides where the next
one starts. ``counters`` names every event (see ``COUNTER_NAMES``).
"""

from __future__ import annotations

import json
import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

from flowtunnel.netflow import ipfix, v5, v9
from flowtunnel.netflow.blocks import MODE_INIT, MODE_PLAIN, MODE_TIMED, RecordBlock
from flowtunnel.netflow.errors import (
    LimitExceeded,
    MalformedHeader,
    MalformedSet,
    ProtocolError,
    Truncated,
    UnknownTemplate,
)
from flowtunnel.netflow.record import Record, RecordShape
from flowtunnel.netflow.sequence import SequenceStats, SequenceTracker
from flowtunnel.netflow.templates import FieldSpec, Layout, RowConverter, Template, compile_cached

__all__ = ["COUNTER_NAMES", "Decoder", "DecoderConfig", "Message", "exporter_host"]

_SYSTEM_INIT = "systemInitTimeMilliseconds"
unpack_set_header = struct.Struct("!HH").unpack_from
STATE_FORMAT = "flowtunnel.netflow.state"
STATE_VERSION = 1

COUNTER_NAMES = (
    "datagrams",  # decode() calls whose header parsed
    "records",  # flow data records returned (including released held ones)
    "options_records",
    "templates",  # template records received (refreshes count each time)
    "options_templates",
    "templates_redefined",  # a template id got a different layout
    "templates_withdrawn",
    "templates_evicted",  # max_templates_per_exporter hit
    "exporters_evicted",  # max_exporters hit
    "domains_evicted",  # max_domains_per_exporter hit (sequence state dropped)
    "sets_held",  # data sets held for an unknown template
    "held_released",  # held sets decoded once their template arrived
    "held_evicted",  # held sets dropped by a bound
    "held_discarded",  # held sets given up by discard_held()
    "unknown_template",  # data sets dropped because holding is disabled
    "reserved_sets",  # sets with a reserved id (v9 2-255, IPFIX 0,1,4-255), skipped
    "sequence_lost",  # units lost upstream, by exporter sequence numbers
    "sequence_resets",
    "truncated",
    "malformed_header",
    "malformed_set",
    "malformed_template",
    "limit_exceeded",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class DecoderConfig:
    """Bounds and scope rules of a ``Decoder``; every bound has a counter that says when it was hit."""

    scope_port: bool = False
    max_exporters: int = 1024
    max_templates_per_exporter: int = 512
    max_domains_per_exporter: int = 64
    max_held_sets: int = 1024  # in total
    max_held_sets_per_exporter: int = 128
    max_held_bytes: int = 8 << 20  # in total
    sequence_reorder_window: int = 4096  # a backward jump up to this many units is reordering, not a reset
    sequence_max_gap: int = 1 << 30  # a forward jump beyond this many units is a restart, not loss

    def __post_init__(self) -> None:
        for name in ("max_exporters", "max_templates_per_exporter", "max_domains_per_exporter"):
            if getattr(self, name) < 1:
                raise ValueError(f"DecoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "max_held_sets",
            "max_held_sets_per_exporter",
            "max_held_bytes",
            "sequence_reorder_window",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"DecoderConfig.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(slots=True, kw_only=True)
class Message:
    """One decoded export datagram.

    ``export_time`` is the header's Unix seconds; ``sys_uptime_ms`` the v5/v9 exporter uptime (None for
    IPFIX). ``records``/``options_records`` include held sets this datagram's templates released (those keep
    their own datagram's domain in ``Record.domain``). ``templates`` are the (options) templates it defined,
    ``withdrawn`` the template ids it withdrew, ``held`` how many of its data sets wait for a template,
    ``errors`` the non-fatal problems. ``lost``/``reset``: the sequence gap found right before this datagram.
    ``blocks`` (``Decoder.decode_columns`` only): the fixed-length flow data sets, undecoded, in place of
    their records; ``record_count`` counts the flow records of both.
    """

    version: int
    exporter: str
    domain: int
    sequence: int
    export_time: int
    sys_uptime_ms: int | None
    records: list[Record] = field(default_factory=list)
    options_records: list[Record] = field(default_factory=list)
    blocks: list[RecordBlock] = field(default_factory=list)
    templates: list[Template] = field(default_factory=list)
    withdrawn: list[int] = field(default_factory=list)
    held: int = 0
    errors: list[ProtocolError] = field(default_factory=list)
    lost: int = 0
    reset: bool = False

    @property
    def record_count(self) -> int:
        """Flow records in ``records`` and ``blocks``."""
        return len(self.records) + sum(b.count for b in self.blocks)


_new = object.__new__


def _message(
    version: int, exporter: str, domain: int, sequence: int, export_time: int, sys_uptime_ms: int | None
) -> Message:
    """``Message(version=.., ...)`` with every other field at its default, minus the dataclass
    ``__init__``'s keyword handling and default factories: at 30 records a datagram (v5) that showed."""
    msg: Message = _new(Message)
    msg.version = version
    msg.exporter = exporter
    msg.domain = domain
    msg.sequence = sequence
    msg.export_time = export_time
    msg.sys_uptime_ms = sys_uptime_ms
    msg.records = []
    msg.options_records = []
    msg.blocks = []
    msg.templates = []
    msg.withdrawn = []
    msg.held = 0
    msg.errors = []
    msg.lost = 0
    msg.reset = False
    return msg


@dataclass(slots=True)
class _Held:
    serial: int
    version: int
    domain: int
    template_id: int
    body: bytes
    export_ms: int
    uptime_ms: int | None


@dataclass(slots=True)
class _DomainInfo:
    """Last header seen in one (version, domain): used to re-announce templates with plausible headers."""

    version: int
    domain: int
    sequence: int
    export_time: int
    sys_uptime_ms: int | None
    tracker: SequenceTracker
    init_ms: int | None = None  # IPFIX systemInitTimeMilliseconds from an options record
    sets: dict[int, _FastSet | None] = field(default_factory=dict)  # set id -> Decoder._fast_set(...)


@dataclass(slots=True)
class _FastSet:
    """What decoding a data set of one fixed-length flow template needs, looked up once per set."""

    size: int  # record size
    convert: RowConverter  # called as (record bytes, clock a, clock b, record_type, out)
    record_type: type[Record]
    layout: Layout
    mode: int  # MODE_* of its blocks (decode_columns)
    columnar: bool


TemplateKey = tuple[int, int, int]  # (version, domain, template id)


@dataclass(slots=True)
class _Exporter:
    name: str  # the exporter string last seen (with port), kept for state export
    templates: OrderedDict[TemplateKey, Layout] = field(default_factory=OrderedDict)
    domains: OrderedDict[tuple[int, int], _DomainInfo] = field(default_factory=OrderedDict)
    held: OrderedDict[int, _Held] = field(default_factory=OrderedDict)
    held_bytes: int = 0
    v5_types: dict[int, type[Record]] = field(default_factory=dict)  # domain -> RecordShape.record_type()

    def templates_changed(self) -> None:
        """Forget the hot-path entries: a template was defined anew, withdrawn or evicted."""
        for info in self.domains.values():
            info.sets.clear()


def exporter_host(exporter: str) -> str:
    """``"192.0.2.1:2055"`` -> ``"192.0.2.1"``, ``"[2001:db8::1]:2055"`` -> ``"2001:db8::1"``; else as is."""
    if exporter.startswith("["):
        end = exporter.find("]")
        return exporter[1:end] if end > 0 else exporter
    if exporter.count(":") == 1:
        return exporter.partition(":")[0]
    return exporter


class Decoder:
    """Decodes NetFlow v5, v9 and IPFIX datagrams from any number of exporters.

    Resource handling: exporters, templates per exporter, domains per exporter and held sets are bounded by
    ``DecoderConfig``; the least recently seen exporter or domain, the least recently defined or refreshed
    template, the oldest held set is evicted and counted.
    """

    def __init__(self, config: DecoderConfig | None = None) -> None:
        self.config = config or DecoderConfig()
        self.counters: Counter[str] = Counter()
        self._exporters: OrderedDict[str, _Exporter] = OrderedDict()
        self._held_order: OrderedDict[int, str] = OrderedDict()  # serial -> exporter key, oldest first
        self._held_bytes = 0
        self._serial = 0
        self._host_cache: dict[str, str] = {}
        self._scope_port = self.config.scope_port

    # --- public API -----------------------------------------------------------------------------------

    def decode(self, payload: bytes, exporter: str) -> Message:
        """Decode one datagram from ``exporter`` ("ip:port", "[v6]:port" or bare "ip").

        Raises a ``ProtocolError`` subclass when the header is unusable; problems in sets go to
        ``Message.errors``.
        """
        return self._decode(payload, exporter, False)

    def decode_columns(self, payload: bytes, exporter: str) -> Message:
        """Like ``decode``, but the data sets of fixed-length flow templates come as ``Message.blocks``
        (``RecordBlock``: the set's record bytes for numpy, see ``columns``) instead of ``Message.records``.

        Templates, held sets, sequence tracking, options records and counters behave exactly as in
        ``decode``; v5 records, variable-length templates and released held sets still come as records.
        """
        return self._decode(payload, exporter, True)

    def _decode(self, payload: bytes, exporter: str, columnar: bool) -> Message:
        data = bytes(payload)
        try:
            if len(data) < 2:
                raise Truncated(f"datagram of {len(data)} bytes has no version field", offset=0)
            version = (data[0] << 8) | data[1]
            if version == 5:
                msg = self._decode_v5(data, exporter)
            elif version == 9:
                msg = self._decode_v9(data, exporter, columnar)
            elif version == 10:
                msg = self._decode_ipfix(data, exporter, columnar)
            else:
                raise MalformedHeader(f"version {version} is not NetFlow 5, 9 or IPFIX 10", offset=0)
        except ProtocolError as exc:
            self.counters[exc.cause] += 1
            raise
        counters = self.counters
        counters["datagrams"] += 1
        counters["records"] += msg.record_count if columnar else len(msg.records)
        counters["options_records"] += len(msg.options_records)
        if msg.errors:
            for err in msg.errors:
                counters[err.cause] += 1
        if msg.lost:
            counters["sequence_lost"] += msg.lost
        if msg.reset:
            counters["sequence_resets"] += 1
        return msg

    def sequence_stats(self) -> dict[tuple[str, int], SequenceStats]:
        """Per (exporter, domain): expected, received, lost and resets since tracking began.

        ``exporter`` is the scope key: the bare address, or "ip:port" with ``scope_port``.
        """
        return {
            (key, domain): info.tracker.stats()
            for key, exp in self._exporters.items()
            for (_, domain), info in exp.domains.items()
        }

    def templates(self, exporter: str) -> list[tuple[int, int, Template]]:
        """The cached templates of ``exporter`` as (version, domain, template), oldest first."""
        exp = self._exporters.get(self._key(exporter))
        if exp is None:
            return []
        return [(ver, dom, layout.template) for (ver, dom, _), layout in exp.templates.items()]

    def discard_held(self) -> list[UnknownTemplate]:
        """Give up on every held data set (e.g. at the end of a capture): one ``UnknownTemplate`` each."""
        out: list[UnknownTemplate] = []
        for key, exp in self._exporters.items():
            for held in exp.held.values():
                out.append(
                    UnknownTemplate(
                        f"exporter {key} domain {held.domain}: no template {held.template_id} "
                        f"(v{held.version}) arrived for a held set of {len(held.body)} bytes"
                    )
                )
            exp.held.clear()
            exp.held_bytes = 0
        self.counters["held_discarded"] += len(out)
        self._held_order.clear()
        self._held_bytes = 0
        return out

    def export_state(self) -> bytes:
        """The template cache and last headers as versioned JSON (held sets and sequence counts excluded)."""
        exporters: list[dict[str, Any]] = []
        for exp in self._exporters.values():
            exporters.append(
                {
                    "exporter": exp.name,
                    "domains": [
                        {
                            "version": ver,
                            "domain": dom,
                            "sequence": info.sequence,
                            "export_time": info.export_time,
                            "sys_uptime_ms": info.sys_uptime_ms,
                            "init_ms": info.init_ms,
                        }
                        for (ver, dom), info in exp.domains.items()
                    ],
                    "templates": [
                        {
                            "version": ver,
                            "domain": dom,
                            "id": layout.template.template_id,
                            "scope": layout.template.scope_count,
                            "fields": [[f.ie_id, f.length, f.pen] for f in layout.template.fields],
                        }
                        for (ver, dom, _), layout in exp.templates.items()
                    ],
                }
            )
        doc = {"format": STATE_FORMAT, "version": STATE_VERSION, "exporters": exporters}
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_state(cls, data: bytes, config: DecoderConfig | None = None) -> Decoder:
        """A decoder whose template cache is restored from ``export_state()`` output.

        Raises ``ValueError`` when ``data`` is not a state this version understands. Scope keys are recomputed
        with ``config.scope_port``; bounds of ``config`` apply while loading.
        """
        dec = cls(config)
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
                raise ValueError("not a flowtunnel netflow state document")
            if doc.get("version") != STATE_VERSION:
                raise ValueError(f"state version {doc.get('version')!r}, this decoder reads {STATE_VERSION}")
            for entry in doc["exporters"]:
                exp = dec._exporter(str(entry["exporter"]))
                for d in entry["domains"]:
                    info = dec._domain(
                        exp,
                        int(d["version"]),
                        int(d["domain"]),
                        int(d["sequence"]),
                        int(d["export_time"]),
                        None if d["sys_uptime_ms"] is None else int(d["sys_uptime_ms"]),
                    )
                    init = d.get("init_ms")
                    info.init_ms = None if init is None else int(init)
                for t in entry["templates"]:
                    template = Template(
                        int(t["id"]),
                        tuple(FieldSpec(int(i), int(n), int(p)) for i, n, p in t["fields"]),
                        int(t["scope"]),
                    )
                    layout = compile_cached(template, int(t["version"]))
                    dec._store_template(
                        exp, (int(t["version"]), int(t["domain"]), template.template_id), layout
                    )
        except ProtocolError as exc:
            raise ValueError(f"state holds an invalid template: {exc}") from None
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"malformed netflow state: {exc!r}") from None
        dec.counters.clear()
        return dec

    def template_datagrams(self, exporter: str, *, max_size: int = 1400) -> list[bytes]:
        """v9/IPFIX datagrams that re-announce every cached (options) template of ``exporter``, all domains.

        Headers reuse the last values seen in each domain (v9: the last sequence number, since collectors
        count v9 packets; IPFIX: the next expected sequence, as template-only messages carry no data records).
        Each datagram stays within ``max_size`` bytes unless a single template is bigger.
        """
        from flowtunnel.netflow.encoder import encode_ipfix, encode_v9

        exp = self._exporters.get(self._key(exporter))
        if exp is None:
            return []
        by_domain: dict[tuple[int, int], list[Template]] = {}
        for (ver, dom, _), layout in exp.templates.items():
            by_domain.setdefault((ver, dom), []).append(layout.template)
        out: list[bytes] = []
        for (ver, dom), templates in by_domain.items():
            info = exp.domains.get((ver, dom))
            for chunk in _chunks(templates, max_size - (20 if ver == 9 else 16)):
                if ver == 9:
                    out.append(
                        encode_v9(
                            templates=chunk,
                            sys_uptime_ms=(info.sys_uptime_ms or 0) if info else 0,
                            unix_secs=info.export_time if info else 0,
                            sequence=info.sequence if info else 0,
                            source_id=dom,
                        )
                    )
                else:
                    out.append(
                        encode_ipfix(
                            templates=chunk,
                            export_time=info.export_time if info else 0,
                            sequence=info.tracker.next_expected if info else 0,
                            domain=dom,
                        )
                    )
        return out

    # --- versions -------------------------------------------------------------------------------------

    def _decode_v5(self, data: bytes, exporter: str) -> Message:
        # The header parsed inline (a NamedTuple per datagram shows at 30 records a datagram);
        # parse_v5_header only to raise its error.
        if len(data) < 24:
            v5.parse_v5_header(data)
        _, count, uptime, secs, nsecs, seq, etype, eid, sampling = v5.HEADER.unpack_from(data)
        if not 1 <= count <= v5.MAX_COUNT or len(data) < 24 + 48 * count:
            v5.parse_v5_header(data)
        domain = (etype << 8) | eid
        msg = _message(5, exporter, domain, seq, secs, uptime)
        exp, info = self._stream(exporter, 5, domain, seq, secs, uptime)
        msg.lost, msg.reset = info.tracker.update_same(seq, count, uptime)
        cls = exp.v5_types.get(domain)
        if cls is None:
            if len(exp.v5_types) >= self.config.max_domains_per_exporter:
                exp.v5_types.clear()
            shape = RecordShape(v5.KEYS, template_id=0, domain=domain, options=False)
            cls = exp.v5_types[domain] = shape.record_type()
        v5.CONVERT(
            data[24 : 24 + 48 * count],
            secs * 1000 + nsecs // 1_000_000 - uptime,
            uptime + 0x80000000,  # templates.clock_args inlined
            cls,
            msg.records,
            sampling & 0x3FFF,
            sampling >> 14,
        )
        return msg

    def _fast_set(self, exp: _Exporter, info: _DomainInfo, set_id: int) -> _FastSet | None:
        """The hot-path entry of a fixed-length flow template (None for others: they take the general path).

        Kept in ``info.sets`` (None too, for a known template of another kind) until a template change or
        a new IPFIX boot time clears it (``_Exporter.templates_changed``), so that a data set costs one
        int-keyed lookup, not a tuple key, a shape lookup and the mode decisions of
        ``Layout.decode_records``.
        """
        layout = exp.templates.get((info.version, info.domain, set_id))
        if layout is None:
            return None  # not kept: set ids without a template must not grow ``info.sets``
        if layout.options or not layout.fixed:
            info.sets[set_id] = None
            return None
        if not layout.resolves:
            mode, convert, timed = MODE_PLAIN, layout.convert_plain, False
        elif info.version == 9:
            mode, convert, timed = MODE_TIMED, layout.convert_timed, True
        elif info.init_ms is not None:
            mode, convert, timed = MODE_INIT, layout.convert_init, True
        else:
            mode, convert, timed = MODE_PLAIN, layout.convert_plain, False
        entry = _FastSet(
            layout.min_size, convert, layout.record_type(info.domain, timed), layout, mode, layout.columnar
        )
        info.sets[set_id] = entry
        return entry

    def _decode_v9(self, data: bytes, exporter: str, columnar: bool = False) -> Message:
        if len(data) < 20:
            v9.parse_v9_header(data)  # raises its error (the header is parsed inline, as for v5)
        version, _, uptime_ms, secs, sequence, domain = v9.HEADER.unpack_from(data)
        if version != 9:
            v9.parse_v9_header(data)
        msg = _message(9, exporter, domain, sequence, secs, uptime_ms)
        exp, info = self._stream(exporter, 9, domain, sequence, secs, uptime_ms)
        msg.lost, msg.reset = info.tracker.update_same(sequence, 1, uptime_ms)
        export_ms = secs * 1000
        base, hi = export_ms - uptime_ms, uptime_ms + 0x80000000  # templates.clock_args inlined
        sets = info.sets
        records = msg.records
        pos = 20  # v9.HEADER.size
        end = len(data)
        while end - pos >= 4:
            set_id, set_len = unpack_set_header(data, pos)
            body_end = pos + set_len
            if set_id >= 256 and set_len >= 4 and body_end <= end:
                try:
                    fast = sets[set_id]
                except KeyError:  # first data set of this template since a change (or an unknown one)
                    fast = self._fast_set(exp, info, set_id)
                if fast is not None:  # the hot path: a fixed-length flow template
                    size = fast.size
                    count = (set_len - 4) // size
                    if not count:
                        pass
                    elif columnar and fast.columnar:
                        msg.blocks.append(
                            RecordBlock(
                                fast.layout, domain, data[pos + 4 : pos + 4 + count * size], count,
                                fast.mode, export_ms, uptime_ms, None,
                            )
                        )
                    else:
                        fast.convert(
                            data[pos + 4 : pos + 4 + count * size], base, hi, fast.record_type, records
                        )
                    pos = body_end
                    continue
            if set_len < 4:
                msg.errors.append(MalformedSet(f"FlowSet {set_id} length {set_len} is below 4", offset=pos))
                break
            if body_end > end:
                msg.errors.append(
                    Truncated(
                        f"FlowSet {set_id} of {set_len} bytes runs past the datagram end {end}", offset=pos
                    )
                )
                break
            body = pos + 4
            if set_id >= 256:
                self._data_set(exp, msg, info, set_id, data, body, body_end, export_ms, uptime_ms)
            elif set_id == 0 or set_id == 1:
                if set_id == 0:
                    templates, err = v9.parse_template_set(data, body, body_end)
                else:
                    templates, err = v9.parse_options_template_set(data, body, body_end)
                for template in templates:
                    self._define(exp, msg, 9, domain, template, pos)
                if err is not None:
                    msg.errors.append(err)
            else:
                self.counters["reserved_sets"] += 1
            pos = body_end
        return msg

    def _decode_ipfix(self, data: bytes, exporter: str, columnar: bool = False) -> Message:
        if len(data) < 16:
            ipfix.parse_ipfix_header(data)  # raises its error (the header is parsed inline, as for v5)
        version, end, export_time, sequence, domain = ipfix.HEADER.unpack_from(data)
        if version != 10 or not 16 <= end <= len(data):
            ipfix.parse_ipfix_header(data)
        msg = _message(10, exporter, domain, sequence, export_time, None)
        exp, info = self._stream(exporter, 10, domain, sequence, export_time, None)
        export_ms = export_time * 1000
        pos = 16  # ipfix.HEADER.size
        own_records = 0
        own_flows = 0
        sets = info.sets
        records = msg.records
        while end - pos >= 4:
            set_id, set_len = unpack_set_header(data, pos)
            body_end = pos + set_len
            if set_id >= 256 and set_len >= 4 and body_end <= end:
                try:
                    fast = sets[set_id]
                except KeyError:  # first data set of this template since a change (or an unknown one)
                    fast = self._fast_set(exp, info, set_id)
                if fast is not None:  # the hot path: a fixed-length flow template
                    size = fast.size
                    count = (set_len - 4) // size
                    if not count:
                        pass
                    elif columnar and fast.columnar:
                        msg.blocks.append(
                            RecordBlock(
                                fast.layout, domain, data[pos + 4 : pos + 4 + count * size], count,
                                fast.mode, export_ms, None, info.init_ms,
                            )
                        )
                    else:
                        # convert_init counts from the boot time; convert_plain ignores the clock.
                        fast.convert(
                            data[pos + 4 : pos + 4 + count * size], info.init_ms, 0, fast.record_type, records
                        )
                    own_records += count
                    own_flows += count
                    pos = body_end
                    continue
            if set_len < 4:
                msg.errors.append(MalformedSet(f"set {set_id} length {set_len} is below 4", offset=pos))
                break
            if body_end > end:
                msg.errors.append(
                    Truncated(f"set {set_id} of {set_len} bytes runs past the message end {end}", offset=pos)
                )
                break
            body = pos + 4
            if set_id >= 256:
                n = self._data_set(exp, msg, info, set_id, data, body, body_end, export_ms, None)
                own_records += abs(n)
                own_flows += max(n, 0)
            elif set_id == ipfix.TEMPLATE_SET or set_id == ipfix.OPTIONS_TEMPLATE_SET:
                items, err = ipfix.parse_template_set(
                    data, body, body_end, set_id == ipfix.OPTIONS_TEMPLATE_SET
                )
                for item in items:
                    if isinstance(item, ipfix.Withdrawal):
                        self._withdraw(exp, msg, domain, item)
                    else:
                        self._define(exp, msg, 10, domain, item, pos)
                if err is not None:
                    msg.errors.append(err)
            else:
                self.counters["reserved_sets"] += 1
            pos = body_end
        if pos < end and end - pos < 4 and any(data[pos:end]):
            msg.errors.append(MalformedSet(f"{end - pos} stray bytes after the last set", offset=pos))
        msg.lost, msg.reset = info.tracker.update(
            sequence, None if msg.held else own_records, None, None if msg.held else own_flows
        )
        return msg

    # --- sets -----------------------------------------------------------------------------------------

    def _data_set(
        self,
        exp: _Exporter,
        msg: Message,
        info: _DomainInfo,
        set_id: int,
        data: bytes,
        start: int,
        end: int,
        export_ms: int,
        uptime_ms: int | None,
    ) -> int:
        """Decode (or hold) one data set; returns the number of records decoded, negative for options."""
        key = (info.version, info.domain, set_id)
        layout = exp.templates.get(key)
        if layout is None:
            held = _Held(0, info.version, info.domain, set_id, data[start:end], export_ms, uptime_ms)
            self._hold(exp, msg, held)
            return 0
        # Recency for the template bound counts definitions and refreshes, not every data set (hot path).
        records, err = layout.decode_records(
            data, start, end, info.domain, export_ms, uptime_ms, info.init_ms
        )
        if err is not None:
            msg.errors.append(err)
        if layout.options:
            self._options(msg, layout, info, records)
            return -len(records)
        msg.records += records
        return len(records)

    @staticmethod
    def _options(msg: Message, layout: Layout, info: _DomainInfo, records: list[Record]) -> None:
        msg.options_records += records
        if records and _SYSTEM_INIT in layout.keys:
            # IPFIX sysUpTime-relative times (softflowd) count from the boot time an options record announces.
            value = records[-1].get(_SYSTEM_INIT)
            if isinstance(value, int) and value != info.init_ms:
                info.init_ms = value
                info.sets.clear()  # the hot-path entries chose their clock by init_ms

    def _define(
        self, exp: _Exporter, msg: Message, version: int, domain: int, template: Template, pos: int
    ) -> None:
        key = (version, domain, template.template_id)
        old = exp.templates.get(key)
        if old is not None and old.template == template:
            layout = old  # a refresh (exporters repeat templates every few packets): nothing to compile
        else:
            try:
                layout = compile_cached(template, version, offset=pos)
            except ProtocolError as exc:
                msg.errors.append(exc)
                return
            if old is not None:
                self.counters["templates_redefined"] += 1
        self.counters["options_templates" if template.options else "templates"] += 1
        self._store_template(exp, key, layout, msg)
        msg.templates.append(template)
        if exp.held:
            self._release(exp, msg, key, layout)

    def _store_template(
        self, exp: _Exporter, key: TemplateKey, layout: Layout, msg: Message | None = None
    ) -> None:
        if exp.templates.get(key) is not layout:
            exp.templates_changed()
        exp.templates[key] = layout
        exp.templates.move_to_end(key)
        while len(exp.templates) > self.config.max_templates_per_exporter:
            (ver, dom, tid), _ = exp.templates.popitem(last=False)
            exp.templates_changed()
            self.counters["templates_evicted"] += 1
            if msg is not None:
                msg.errors.append(
                    LimitExceeded(
                        f"exporter {exp.name}: more than max_templates_per_exporter="
                        f"{self.config.max_templates_per_exporter} templates; evicted v{ver} domain {dom} "
                        f"template {tid}"
                    )
                )

    def _withdraw(self, exp: _Exporter, msg: Message, domain: int, item: ipfix.Withdrawal) -> None:
        exp.templates_changed()
        if item.template_id != ipfix.ALL_TEMPLATES:
            if exp.templates.pop((10, domain, item.template_id), None) is not None:
                self.counters["templates_withdrawn"] += 1
            msg.withdrawn.append(item.template_id)
            return
        for key in [
            k
            for k, lay in exp.templates.items()
            if k[:2] == (10, domain) and lay.template.options == item.options
        ]:
            del exp.templates[key]
            self.counters["templates_withdrawn"] += 1
            msg.withdrawn.append(key[2])

    def _hold(self, exp: _Exporter, msg: Message, held: _Held) -> None:
        cfg = self.config
        if (
            cfg.max_held_sets == 0
            or cfg.max_held_sets_per_exporter == 0
            or len(held.body) > cfg.max_held_bytes
        ):
            msg.errors.append(
                UnknownTemplate(
                    f"data set for unknown template {held.template_id} "
                    f"(v{held.version} domain {held.domain}) "
                    "dropped: holding is disabled or the set exceeds max_held_bytes"
                )
            )
            return
        self._serial += 1
        held.serial = self._serial
        key = self._key(exp.name)
        exp.held[held.serial] = held
        exp.held_bytes += len(held.body)
        self._held_order[held.serial] = key
        self._held_bytes += len(held.body)
        msg.held += 1
        self.counters["sets_held"] += 1
        evicted = 0
        while len(exp.held) > cfg.max_held_sets_per_exporter:
            serial, gone = exp.held.popitem(last=False)
            self._held_order.pop(serial, None)
            exp.held_bytes -= len(gone.body)
            self._held_bytes -= len(gone.body)
            evicted += 1
        while len(self._held_order) > cfg.max_held_sets or self._held_bytes > cfg.max_held_bytes:
            serial, owner = self._held_order.popitem(last=False)
            other = self._exporters[owner]
            gone = other.held.pop(serial)
            other.held_bytes -= len(gone.body)
            self._held_bytes -= len(gone.body)
            evicted += 1
        if evicted:
            self.counters["held_evicted"] += evicted
            msg.errors.append(
                LimitExceeded(
                    f"held sets over max_held_sets_per_exporter={cfg.max_held_sets_per_exporter}, "
                    f"max_held_sets={cfg.max_held_sets} or max_held_bytes={cfg.max_held_bytes}: "
                    f"evicted the {evicted} oldest"
                )
            )

    def _release(self, exp: _Exporter, msg: Message, key: TemplateKey, layout: Layout) -> None:
        domain = key[1]
        ready = [h for h in exp.held.values() if (h.version, h.domain, h.template_id) == key]
        for held in ready:
            del exp.held[held.serial]
            self._held_order.pop(held.serial, None)
            exp.held_bytes -= len(held.body)
            self._held_bytes -= len(held.body)
            info = exp.domains.get((held.version, domain))
            init_ms = info.init_ms if info is not None else None
            records, err = layout.decode_records(
                held.body, 0, len(held.body), domain, held.export_ms, held.uptime_ms, init_ms
            )
            if err is not None:
                msg.errors.append(err)
            if not layout.options:
                msg.records += records
            elif info is not None:
                self._options(msg, layout, info, records)
            else:
                msg.options_records += records
            self.counters["held_released"] += 1

    # --- state ----------------------------------------------------------------------------------------

    def _key(self, exporter: str) -> str:
        if self.config.scope_port:
            return exporter
        key = self._host_cache.get(exporter)
        if key is None:
            if len(self._host_cache) >= 4 * self.config.max_exporters:
                self._host_cache.clear()
            key = self._host_cache[exporter] = exporter_host(exporter)
        return key

    def _stream(
        self, exporter: str, version: int, domain: int, sequence: int, export_time: int, uptime: int | None
    ) -> tuple[_Exporter, _DomainInfo]:
        """``_exporter`` then ``_domain``, their common case (both known) inlined: once a datagram."""
        key = exporter if self._scope_port else self._host_cache.get(exporter)
        exp = None if key is None else self._exporters.get(key)
        if exp is None:
            exp = self._exporter(exporter)
        else:
            self._exporters.move_to_end(key)  # type: ignore[arg-type]  # key is not None here
            exp.name = exporter
        dkey = (version, domain)
        info = exp.domains.get(dkey)
        if info is None:
            return exp, self._domain(exp, version, domain, sequence, export_time, uptime)
        exp.domains.move_to_end(dkey)
        info.sequence = sequence
        info.export_time = export_time
        info.sys_uptime_ms = uptime
        return exp, info

    def _exporter(self, exporter: str) -> _Exporter:
        key = self._key(exporter)
        exp = self._exporters.get(key)
        if exp is not None:
            self._exporters.move_to_end(key)
            exp.name = exporter
            return exp
        exp = self._exporters[key] = _Exporter(exporter)
        while len(self._exporters) > self.config.max_exporters:
            _, gone = self._exporters.popitem(last=False)
            for serial, held in gone.held.items():
                self._held_order.pop(serial, None)
                self._held_bytes -= len(held.body)
            self.counters["exporters_evicted"] += 1
        return exp

    def _domain(
        self, exp: _Exporter, version: int, domain: int, sequence: int, export_time: int, uptime: int | None
    ) -> _DomainInfo:
        key = (version, domain)
        info = exp.domains.get(key)
        if info is None:
            info = exp.domains[key] = _DomainInfo(
                version,
                domain,
                sequence,
                export_time,
                uptime,
                SequenceTracker(
                    reorder_window=self.config.sequence_reorder_window, max_gap=self.config.sequence_max_gap
                ),
            )
            while len(exp.domains) > self.config.max_domains_per_exporter:
                exp.domains.popitem(last=False)
                self.counters["domains_evicted"] += 1
        else:
            exp.domains.move_to_end(key)
            info.sequence, info.export_time, info.sys_uptime_ms = sequence, export_time, uptime
        return info


def _chunks(templates: list[Template], budget: int) -> list[list[Template]]:
    """Split templates into groups whose encoded size (set headers included) fits ``budget`` bytes."""
    out: list[list[Template]] = []
    current: list[Template] = []
    used = 8  # up to two set headers (templates + options templates)
    for template in templates:
        size = 6 + sum(8 if f.pen else 4 for f in template.fields)
        if current and used + size > budget:
            out.append(current)
            current, used = [], 8
        current.append(template)
        used += size
    if current:
        out.append(current)
    return out
