"""The jsonl sink: decoded flow records as JSON lines, for SIEM shippers (Filebeat, Vector, Fluent Bit).

One line per data record: IANA element names as keys (addresses as text, unknown fields as hex), plus
``_agent``, ``_exporter``, ``_version``, ``_domain``, ``_template``, ``_received`` (the gateway's receive
time, ISO 8601 UTC), ``_agent_received`` (the agent's, by its own clock) and ``_seq`` (the journal sequence
number, so a consumer can drop the repeats a crash may cause: delivery is at-least-once, at most one batch
repeated). Appends to a file, fsync once per batch; or stdout.
A ``Decoder`` per agent keeps templates, persisted in ``DATA/jsonl-templates.json`` across restarts.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

from flowtunnel.gateway.sinks.base import CursorSink
from flowtunnel.runtime import OnceLogger
from flowtunnel.statusfile import write_json_atomic

if TYPE_CHECKING:
    from flowtunnel.journal import JournalReader
    from flowtunnel.log import Entry
    from flowtunnel.netflow import Decoder

__all__ = ["JsonlSink", "json_value", "record_line"]

log = logging.getLogger("flowtunnel.gateway.jsonl")


def _exporter_text(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def json_value(value: object) -> object:
    """A decoded field value as JSON: addresses as text, bytes as hex, times as ISO 8601."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        return json_value(item())
    return str(value)


def record_line(record: Mapping[str, object], meta: Mapping[str, object]) -> str:
    doc = {k: json_value(v) for k, v in record.items()}
    doc.update(meta)
    return json.dumps(doc, separators=(",", ":"), sort_keys=False)


class JsonlSink(CursorSink):
    """Writes decoded records of every journaled datagram to ``path`` (``"-"`` for stdout)."""

    name = "jsonl"
    TEMPLATES_FILE = "jsonl-templates.json"

    def __init__(self, *, data_dir: Path, path: str) -> None:
        super().__init__()
        self._data_dir = data_dir
        self._path = path
        self._fh: IO[str] | None = None
        self._decoders: dict[str, Decoder] = {}
        self._once = OnceLogger(log)
        self.records = 0
        self.errors: dict[str, int] = {}

    async def start(self, journal: JournalReader) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        if self._path == "-":
            self._fh = sys.stdout
        else:
            target = Path(self._path)
            target.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(target, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the sink
        tpl = self._data_dir / self.TEMPLATES_FILE
        if tpl.exists():
            from flowtunnel.netflow import Decoder, DecoderConfig

            try:
                doc = json.loads(tpl.read_text(encoding="utf-8"))
                for agent, state in doc.get("agents", {}).items():
                    self._decoders[agent] = Decoder.from_state(base64.b64decode(state), DecoderConfig())
            except (OSError, ValueError, TypeError) as exc:
                log.warning("template cache %s is unreadable, starting without it: %s", tpl, exc)

    async def stop(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None and fh is not sys.stdout:
            fh.close()

    def _decoder(self, agent: str) -> Decoder:
        dec = self._decoders.get(agent)
        if dec is None:
            from flowtunnel.netflow import Decoder, DecoderConfig

            dec = self._decoders[agent] = Decoder(DecoderConfig())
        return dec

    def _write(self, entries: Sequence[Entry]) -> None:
        from flowtunnel.netflow import ProtocolError

        assert self._fh is not None
        lines: list[str] = []
        templates_changed = False
        for entry in entries:
            d = entry.datagram
            exporter = _exporter_text(d.exporter, d.exporter_port)
            try:
                msg = self._decoder(entry.stream).decode(d.payload, exporter=exporter)
            except ProtocolError as exc:
                cause = f"undecodable:{type(exc).__name__}"
                self.errors[cause] = self.errors.get(cause, 0) + 1
                self._once.warning(cause, "datagram %d from %s/%s not decoded: %s", entry.seq, entry.stream,
                                   exporter, exc)
                continue
            if msg.templates or msg.withdrawn:
                templates_changed = True
            # _received: the gateway's receive time (journaled with the entry); _agent_received: the agent's.
            agent_received = dt.datetime.fromtimestamp(d.received_ns / 1e9, tz=dt.UTC).isoformat()
            received = agent_received if entry.appended_ns is None else dt.datetime.fromtimestamp(
                entry.appended_ns / 1e9, tz=dt.UTC).isoformat()
            for record in msg.records:
                meta = {
                    "_agent": entry.stream, "_exporter": d.exporter, "_version": msg.version,
                    "_domain": msg.domain, "_template": getattr(record, "template_id", None),
                    "_received": received, "_agent_received": agent_received, "_seq": entry.seq,
                }
                lines.append(record_line(record, meta))
        if lines:
            self._fh.write("\n".join(lines) + "\n")
            self._fh.flush()
            if self._fh is not sys.stdout:
                os.fsync(self._fh.fileno())
        self.records += len(lines)
        if templates_changed:
            write_json_atomic(
                self._data_dir / self.TEMPLATES_FILE,
                {"version": 1, "agents": {a: base64.b64encode(dec.export_state()).decode()
                                          for a, dec in sorted(self._decoders.items())}},
            )

    async def handle(self, entries: Sequence[Entry]) -> None:
        await asyncio.to_thread(self._write, entries)

    def status(self) -> dict[str, object]:
        st = super().status()
        st.update({"path": self._path, "records": self.records, "errors": dict(self.errors)})
        return st
