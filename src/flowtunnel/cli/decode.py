"""``flowtunnel decode``: the NetFlow v5/v9/IPFIX records of a pcap/pcapng capture, as JSON lines or a table.

The analyst's first tool and the codec's acceptance check against tshark: read the capture
(``flowtunnel.capture``), feed every export datagram to one ``Decoder`` in file order (templates carry across
datagrams, as in a collector), print records on stdout and every problem on stderr. JSON output is one
``%`` format per record through a plan compiled once per (version, exporter, record shape), written in chunks,
because captures hold millions of records and this command is benchmarked against tshark (bench/decode.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from flowtunnel.capture import (
    CaptureError,
    CaptureReader,
    CaptureStats,
    UdpDatagram,
    find_netflow,
)
from flowtunnel.netflow import (
    Decoder,
    DecoderConfig,
    ProtocolError,
    Record,
    data_type,
    parse_field_key,
)
from flowtunnel.netflow.record import RecordShape

__all__ = ["DecodeSummary", "decode_capture", "register"]

EXIT_OK = 0
EXIT_BAD_INPUT = 2

_CHUNK = 2000  # records per write(): few syscalls, bounded memory

_DESCRIPTION = """\
Decode the NetFlow v5, v9 and IPFIX export datagrams found in a pcap or pcapng capture.

Export datagrams are recognised by content (version number and header sanity checks) in UDP on any port;
--port narrows the search to datagrams sent to the given destination port(s). v9/IPFIX templates are
learnt in file order and kept per exporter address and observation domain (source id), like nfdump does;
data that arrives before its template is held and printed when the template comes.

Output (stdout):
  json   one JSON object per flow record (default). Keys are IANA Information Element names
         (v5 fields use their IANA names too: sourceIPv4Address, octetDeltaCount, ...), plus
         _version (5, 9, 10), _exporter ("ip:port" of the sender), _domain (observation domain /
         source id; v5: engine_type<<8|engine_id) and _template (template id; null for v5).
         Addresses are text, absolute times are integers since the Unix epoch in the unit their
         name says (flowStartMilliseconds: ms), unknown and enterprise fields ("<pen>.<id>") are hex.
         With --options, options records are printed too, marked "_options": true.
  table  aligned columns for people: start time, duration, protocol, source, destination, packets,
         bytes (SI units), TCP flags, exporter.

Problems (stderr): each undecodable datagram, bad set or data set whose template never arrived gets one
line with the reason; a summary line ends the run. These do not change the exit status.

Exit status: 0 when the capture was read (even if some datagrams were undecodable); 2 when the file is
missing, unreadable, not a pcap/pcapng capture or of an unsupported link type, or on bad arguments.
"""

_EPILOG = """\
examples:
  flowtunnel decode capture.pcap | jq -c 'select(.destinationTransportPort == 53)'
  flowtunnel decode --format table --port 2055 capture.pcapng
"""


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "decode",
        help="print the NetFlow/IPFIX records of a pcap/pcapng capture (JSON lines or a table)",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "file", type=Path, metavar="FILE", help="pcap or pcapng capture to read ('-': standard input)"
    )
    parser.add_argument(
        "--format", choices=("json", "table"), default="json",
        help="json: one object per record (default); table: aligned columns for people",
    )
    parser.add_argument(
        "--port", type=_port, action="append", default=None, metavar="N",
        help="only datagrams sent to UDP port N (repeatable; default: any port)",
    )
    parser.add_argument(
        "--options", action="store_true",
        help="also print options records (exporter metadata such as sampling), marked _options: true",
    )
    parser.set_defaults(func=run)


def _port(text: str) -> int:
    """``cli._common.port_arg``, imported when used: ``_common`` pulls in asyncio (through ``runtime``),
    which ``decode`` never needs otherwise and whose import was a tenth of the run on a benchmark capture."""
    from flowtunnel.cli._common import port_arg

    return port_arg(text)


def run(args: argparse.Namespace) -> int:
    out = sys.stdout
    try:
        summary = decode_capture(
            args.file, out, fmt=args.format, ports=args.port, include_options=args.options, err=sys.stderr
        )
    except CaptureError as exc:
        print(f"flowtunnel decode: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, and keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        return EXIT_OK
    print(summary.line(args.file), file=sys.stderr)
    return EXIT_OK


@dataclass(slots=True)
class DecodeSummary:
    """What one ``decode_capture`` run found; ``line()`` is the closing stderr line."""

    capture: CaptureStats
    datagrams: Counter[int] = field(default_factory=Counter)  # NetFlow datagrams by version
    records: int = 0
    options_records: int = 0
    undecodable: int = 0  # datagrams whose header could not be decoded
    set_errors: int = 0  # bad sets inside otherwise decodable datagrams
    no_template: int = 0  # data sets whose template never arrived
    not_netflow: int = 0  # UDP datagrams that are not NetFlow/IPFIX (or not on --port)
    sequence_lost: int = 0  # export units lost upstream, by the exporters' sequence numbers

    def line(self, path: Path) -> str:
        versions = ", ".join(
            f"{'IPFIX' if v == 10 else f'v{v}'}: {n}" for v, n in sorted(self.datagrams.items())
        )
        total = sum(self.datagrams.values())
        parts = [
            f"flowtunnel decode: {path}: {self.records} flow records",
            f"{self.options_records} options records" if self.options_records else "",
            f"from {total} export datagrams" + (f" ({versions})" if versions else ""),
        ]
        problems = [
            f"{self.undecodable} undecodable datagrams" if self.undecodable else "",
            f"{self.set_errors} bad sets" if self.set_errors else "",
            f"{self.no_template} data sets without template" if self.no_template else "",
            f"{self.sequence_lost} lost upstream (sequence gaps)" if self.sequence_lost else "",
        ]
        cap = self.capture
        skipped = [
            f"{self.not_netflow} other UDP datagrams" if self.not_netflow else "",
            f"{cap.fragments} IP fragments" if cap.fragments else "",
            f"{cap.truncated} truncated frames" if cap.truncated else "",
            "file cut short" if cap.truncated_file else "",
        ]
        text = ", ".join(p for p in parts if p)
        text += "; " + (", ".join(p for p in problems if p) or "no errors")
        skipped_text = ", ".join(p for p in skipped if p)
        if skipped_text:
            text += f"; skipped {skipped_text}"
        return text


def decode_capture(
    path: Path | str,
    out: TextIO,
    *,
    fmt: str = "json",
    ports: Sequence[int] | None = None,
    include_options: bool = False,
    err: TextIO | None = None,
    config: DecoderConfig | None = None,
) -> DecodeSummary:
    """Decode every NetFlow/IPFIX datagram of the capture at ``path`` and write its records to ``out``.

    Problems go to ``err`` (one line each) when given. Raises ``CaptureError`` for a file that cannot be read
    as a capture; never raises for bad NetFlow content.
    """
    reader = CaptureReader(path)
    summary = DecodeSummary(capture=reader.stats)
    decoder = Decoder(config)
    writer: _Writer = _JsonWriter(out) if fmt == "json" else _TableWriter(out)

    def report(line: str) -> None:
        if err is not None:
            err.write(line + "\n")

    def where(dgram: UdpDatagram) -> str:
        # The frame number is what Wireshark shows, so a reader can go and look at the bytes.
        return f"frame {reader.stats.packets} from {dgram.exporter} at {_when(dgram.time)}"

    with reader:
        for found in find_netflow(reader, ports=ports):
            dgram = found.datagram
            exporter = dgram.exporter
            summary.datagrams[found.version] += 1
            try:
                msg = decoder.decode(dgram.payload, exporter)
            except ProtocolError as exc:
                summary.undecodable += 1
                report(f"flowtunnel decode: {where(dgram)}: undecodable: {exc}")
                continue
            for problem in msg.errors:
                summary.set_errors += 1
                report(f"flowtunnel decode: {where(dgram)}: {problem}")
            if msg.records:
                summary.records += len(msg.records)
                writer.records(msg.version, exporter, msg.records)
            if msg.options_records:
                summary.options_records += len(msg.options_records)
                if include_options:
                    writer.records(msg.version, exporter, msg.options_records)
    summary.not_netflow = reader.stats.udp - sum(summary.datagrams.values())
    for problem in decoder.discard_held():
        summary.no_template += 1
        report(f"flowtunnel decode: {problem}")
    summary.sequence_lost = sum(s.lost for s in decoder.sequence_stats().values())
    writer.close()
    return summary


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _Writer:
    def records(self, version: int, exporter: str, records: list[Record]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _JsonWriter(_Writer):
    """JSON lines through a compiled plan per (version, exporter, record shape): one ``%`` format string
    holding the constant head (``{"_version":..,"_template":..,``) and the keys, so a record costs one string
    format of its value tuple; values needing JSON work (text, booleans, floats) are converted one by one.

    Records are read through ``Record``'s slots (``shape``, ``row``) rather than ``to_dict()``: building
    a dict per record was most of this command's run time. Every record of one shape comes from the same
    field codecs, so the value types the plan was made from hold for all of them; a redefined template gets
    a new layout and so a new shape and plan."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._buf: list[str] = []
        self._plans: dict[tuple[int, str, RecordShape], _JsonPlan] = {}

    def records(self, version: int, exporter: str, records: list[Record]) -> None:
        buf = self._buf
        append = buf.append
        plans = self._plans
        last_shape: RecordShape | None = None
        fmt = ""
        convert: tuple[tuple[int, Callable[[Any], str]], ...] = ()
        for rec in records:
            shape = rec.shape
            if shape is not last_shape:
                key = (version, exporter, shape)
                plan = plans.get(key)
                if plan is None:
                    if len(plans) >= _MAX_PLANS:  # templates churn (a flapping exporter): stay bounded
                        plans.clear()
                    plan = plans[key] = _JsonPlan(version, exporter, rec)
                last_shape, fmt, convert = shape, plan.fmt, plan.convert
            values = rec.row
            if convert:
                items = list(values)
                for i, conv in convert:
                    items[i] = conv(items[i])
                append(fmt % tuple(items))
            else:
                append(fmt % (values if type(values) is tuple else tuple(values)))
        if len(buf) >= _CHUNK:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self._buf.append("")
            self._out.write("\n".join(self._buf))
            self._buf.clear()

    def close(self) -> None:
        self.flush()
        self._out.flush()


_MAX_PLANS = 4096


# Data types whose text form never needs JSON escaping (addresses, hex): placed between quotes as they are.
_PLAIN_TEXT_TYPES = frozenset(
    ("ipv4Address", "ipv6Address", "macAddress", "octetArray", "basicList", "subTemplateList",
     "subTemplateMultiList")
)
_encode_value = json.JSONEncoder(ensure_ascii=False, check_circular=False, default=lambda v: str(v)).encode


def _plain_text(key: str) -> bool:
    try:
        ie_id, pen = parse_field_key(key)
    except ValueError:
        return False
    return data_type(ie_id, pen) in _PLAIN_TEXT_TYPES


class _JsonPlan:
    __slots__ = ("convert", "fmt")

    def __init__(self, version: int, exporter: str, rec: Record) -> None:
        head: dict[str, object] = {
            "_version": version,
            "_exporter": exporter,
            "_domain": rec.domain,
            "_template": rec.template_id if version != 5 else None,
        }
        if rec.options:
            head["_options"] = True
        parts = [f"{json.dumps(k)}:{_encode_value(v)}".replace("%", "%%") for k, v in head.items()]
        convert: list[tuple[int, Callable[[Any], str]]] = []
        # Positions in the plan are positions in ``rec.row`` (a layout's keys are unique).
        for i, (key, value) in enumerate(zip(rec.shape.keys, rec.row, strict=True)):
            name = json.dumps(key, ensure_ascii=False).replace("%", "%%")
            if type(value) is int:
                parts.append(f"{name}:%d")
            elif type(value) is str and _plain_text(key) and _is_plain(value):
                parts.append(f'{name}:"%s"')
            else:
                parts.append(f"{name}:%s")
                convert.append((i, _encode_value))
        self.fmt = "{" + ",".join(parts) + "}"
        self.convert = tuple(convert)


def _is_plain(text: str) -> bool:
    return '"' not in text and "\\" not in text and text.isprintable()


# --- table ------------------------------------------------------------------------------------------

_PROTOCOLS = {1: "icmp", 2: "igmp", 6: "tcp", 17: "udp", 47: "gre", 50: "esp", 58: "icmp6", 132: "sctp"}
_TCP_FLAGS = "CEUAPRSF"  # bit 7 (CWR) .. bit 0 (FIN), as nfdump prints them
_START_KEYS = (
    ("flowStartMilliseconds", 1_000),
    ("flowStartSeconds", 1),
    ("flowStartMicroseconds", 1_000_000),
    ("flowStartNanoseconds", 1_000_000_000),
)
_END_KEYS = (
    ("flowEndMilliseconds", 1_000),
    ("flowEndSeconds", 1),
    ("flowEndMicroseconds", 1_000_000),
    ("flowEndNanoseconds", 1_000_000_000),
)
_COLUMNS = (
    "START (UTC)", "DURATION", "PROTO", "SOURCE", "DESTINATION", "PACKETS", "BYTES", "FLAGS", "EXPORTER"
)
_RIGHT = frozenset(("DURATION", "PACKETS", "BYTES"))


class _TableWriter(_Writer):
    """Aligned columns. Widths come from the first chunk of rows and only grow afterwards, so output
    streams instead of waiting for the whole capture."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._rows: list[tuple[str, ...]] = []
        self._widths = [len(c) for c in _COLUMNS]
        self._header_done = False

    def records(self, version: int, exporter: str, records: list[Record]) -> None:
        for rec in records:
            self._rows.append(_table_row(rec, exporter))
        if len(self._rows) >= _CHUNK:
            self.flush()

    def flush(self) -> None:
        widths = self._widths
        for row in self._rows:
            for i, cell in enumerate(row):
                if len(cell) > widths[i]:
                    widths[i] = len(cell)
        lines: list[str] = []
        if not self._header_done:
            lines.append(self._format(_COLUMNS))
            self._header_done = True
        lines.extend(self._format(row) for row in self._rows)
        self._rows.clear()
        if lines:
            lines.append("")
            self._out.write("\n".join(lines))

    def _format(self, row: Sequence[str]) -> str:
        cells = [
            cell.rjust(w) if name in _RIGHT else cell.ljust(w)
            for cell, w, name in zip(row, self._widths, _COLUMNS, strict=True)
        ]
        return "  ".join(cells).rstrip()

    def close(self) -> None:
        if self._rows or not self._header_done:
            self.flush()
        self._out.flush()


def _table_row(rec: Record, exporter: str) -> tuple[str, ...]:
    start = _time_of(rec, _START_KEYS)
    end = _time_of(rec, _END_KEYS)
    proto = rec.get("protocolIdentifier")
    src = rec.get("sourceIPv4Address") or rec.get("sourceIPv6Address") or "-"
    dst = rec.get("destinationIPv4Address") or rec.get("destinationIPv6Address") or "-"
    flags = rec.get("tcpControlBits")
    return (
        _start_text(start),
        f"{end - start:.3f} s" if start is not None and end is not None else "-",
        _PROTOCOLS.get(proto, str(proto)) if isinstance(proto, int) else "-",
        _endpoint(str(src), rec.get("sourceTransportPort"), proto),
        _endpoint(str(dst), rec.get("destinationTransportPort"), proto),
        _count(rec.get("packetDeltaCount", rec.get("packetTotalCount"))),
        _bytes(rec.get("octetDeltaCount", rec.get("octetTotalCount"))),
        _flags(flags) if proto == 6 and isinstance(flags, int) else "",
        exporter,
    )


def _start_text(start: float | None) -> str:
    if start is None:
        return "-"
    return datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _time_of(rec: Record, keys: tuple[tuple[str, int], ...]) -> float | None:
    for key, divisor in keys:
        value = rec.get(key)
        if isinstance(value, int):
            return value / divisor
    return None


def _endpoint(addr: str, port: object, proto: object) -> str:
    if proto not in (6, 17, 132) or not isinstance(port, int):
        return addr
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _count(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else "-"


def _bytes(value: object) -> str:
    """SI units, as network people count: 999 B, 1.2 kB, 3.4 MB."""
    if not isinstance(value, int):
        return "-"
    if value < 1000:
        return f"{value} B"
    size = float(value)
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        size /= 1000
        if size < 999.95:
            return f"{size:.1f} {unit}"
    return f"{size:.1f} PB"


def _flags(bits: int) -> str:
    return "".join(ch if bits & (0x80 >> i) else "." for i, ch in enumerate(_TCP_FLAGS))
