"""Journal entries decoded into flow rows: the per-agent decoders and the counters the flow stores keep.

Shared by the DuckDB store sink and the Parquet sink, so both make the same rows of the same datagrams: one
``Decoder`` per agent (templates scoped by (agent, exporter)), the receive times, the options records that
resolve IPFIX uptime times, and per-exporter and per-agent counters whose state each sink commits with its
rows (``snapshot``) and restores after a restart (``restore``).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from flowtunnel.netflow import Decoder, DecoderConfig, ProtocolError
from flowtunnel.netflow.decoder import exporter_host
from flowtunnel.netflow.errors import LimitExceeded, UnknownTemplate
from flowtunnel.runtime import OnceLogger
from flowtunnel.store.normalize import FlowColumns

if TYPE_CHECKING:
    from flowtunnel.log import Entry

__all__ = ["FlowDecoding"]

_SEQ_FIELDS = ("expected", "received", "lost", "resets")
_INIT_TIME = "systemInitTimeMilliseconds"


@dataclass(slots=True)
class _ExporterCounters:
    agent: str
    exporter: str
    datagrams: int = 0
    records: int = 0
    options_records: int = 0
    undecodable: int = 0
    set_errors: int = 0
    no_template_sets: int = 0
    seq_expected: int = 0
    seq_received: int = 0
    seq_lost: int = 0
    seq_resets: int = 0
    last_version: int | None = None
    first_seen: dt.datetime | None = None
    last_seen: dt.datetime | None = None

    def row(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(slots=True)
class _AgentCounters:
    agent: str
    last_stream_seq: int | None = None
    datagrams: int = 0
    transit_lost: int = 0

    def row(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(slots=True)
class _AgentDecoder:
    decoder: Decoder
    # Last sequence_stats() seen per (exporter, domain): counters in DuckDB grow by the difference, so they
    # survive restarts although a restored decoder's trackers start from zero.
    seq_seen: dict[tuple[str, int], tuple[int, int, int, int]] = field(default_factory=dict)
    # systemInitTimeMilliseconds per (exporter, domain), from options records: resolves IPFIX uptime times.
    init_ms: dict[tuple[str, int], int] = field(default_factory=dict)


class FlowDecoding:
    """Decoders and counters of a flow store: ``ingest`` adds one journal entry's flows to ``FlowColumns``.

    ``what`` names the store in log lines ("store", "parquet"). Not thread-safe: one thread at a time.
    """

    def __init__(self, config: DecoderConfig, *, log: logging.Logger, what: str = "store") -> None:
        self.decoder_config = config
        self.what = what
        self._once = OnceLogger(log)
        self._log = log
        self.decoders: dict[str, _AgentDecoder] = {}
        self.exporters: dict[tuple[str, str], _ExporterCounters] = {}
        self.agents: dict[str, _AgentCounters] = {}

    def restore(
        self,
        decoder_states: dict[str, bytes],
        exporter_stats: dict[tuple[str, str], dict[str, Any]],
        agent_stats: dict[str, dict[str, Any]],
    ) -> None:
        """Start over from a committed state (template caches and counters)."""
        self.decoders = {}
        for agent, blob in decoder_states.items():
            try:
                decoder = Decoder.from_state(blob, self.decoder_config)
            except ValueError as exc:
                self._log.warning("%s: template cache of agent %s not restored (%s); starting empty",
                                  self.what, agent, exc)
                decoder = Decoder(self.decoder_config)
            self.decoders[agent] = _AgentDecoder(decoder)
        self.exporters = {}
        for key, rec in exporter_stats.items():
            counters = _ExporterCounters(agent=key[0], exporter=key[1])
            for name, value in rec.items():
                setattr(counters, name, value)
            self.exporters[key] = counters
        self.agents = {}
        for agent, rec in agent_stats.items():
            self.agents[agent] = _AgentCounters(
                agent=agent, last_stream_seq=rec["last_stream_seq"], datagrams=rec["datagrams"],
                transit_lost=rec["transit_lost"],
            )

    def snapshot(
        self, touched_agents: set[str], touched_exporters: set[tuple[str, str]]
    ) -> tuple[dict[str, bytes], list[dict[str, Any]], list[dict[str, Any]]]:
        """What a commit of the entries ingested since the last one carries: the template caches of the
        touched agents (after their sequence figures are counted), their exporters' and their own counters."""
        decoder_states: dict[str, bytes] = {}
        for agent in touched_agents:
            agent_decoder = self.decoders[agent]
            self.account_sequences(agent, agent_decoder, touched_exporters)
            decoder_states[agent] = agent_decoder.decoder.export_state()
        return (
            decoder_states,
            [self.exporters[k].row() for k in touched_exporters],
            [self.agents[a].row() for a in touched_agents],
        )

    def ingest(
        self,
        entry: Entry,
        cols: FlowColumns,
        touched_agents: set[str],
        touched_exporters: set[tuple[str, str]],
    ) -> None:
        agent = entry.stream
        d = entry.datagram
        touched_agents.add(agent)
        agent_counters = self.agents.get(agent)
        if agent_counters is None:
            agent_counters = self.agents[agent] = _AgentCounters(agent=agent)
        agent_counters.datagrams += 1
        if entry.stream_seq is not None:
            last = agent_counters.last_stream_seq
            if last is not None and entry.stream_seq > last + 1:
                gap = entry.stream_seq - last - 1
                agent_counters.transit_lost += gap
                self._once.warning(
                    f"transit:{agent}",
                    "%s: agent %s sequence jumps from %d to %d: %d datagrams never reached the gateway "
                    "(dropped by the agent's spool quota?)",
                    self.what, agent, last, entry.stream_seq, gap,
                )
            if last is None or entry.stream_seq > last:
                agent_counters.last_stream_seq = entry.stream_seq
        agent_decoder = self.decoders.get(agent)
        if agent_decoder is None:
            agent_decoder = self.decoders[agent] = _AgentDecoder(Decoder(self.decoder_config))
        host = d.exporter
        key = (agent, host)
        touched_exporters.add(key)
        counters = self.exporters.get(key)
        # The gateway's receive time (journaled with the entry); entries journaled before it was, the agent's.
        received_ns = d.received_ns if entry.appended_ns is None else entry.appended_ns
        received = dt.datetime.fromtimestamp(received_ns / 1e9, dt.UTC)
        if counters is None:
            counters = _ExporterCounters(agent=agent, exporter=host, first_seen=received)
            self.exporters[key] = counters
        counters.datagrams += 1
        counters.last_seen = received
        exporter = f"[{host}]:{d.exporter_port}" if ":" in host else f"{host}:{d.exporter_port}"
        try:
            msg = agent_decoder.decoder.decode_columns(d.payload, exporter)
        except ProtocolError as exc:
            counters.undecodable += 1
            self._once.warning(
                f"undecodable:{agent}:{host}:{type(exc).__name__}",
                "%s: undecodable datagram from agent %s exporter %s (%d bytes): %s",
                self.what, agent, host, len(d.payload), exc,
            )
            return
        except Exception as exc:
            # A codec bug must not wedge the store on one datagram forever: count it like bad input.
            counters.undecodable += 1
            self._once.warning(
                f"codec:{type(exc).__name__}",
                "%s: the decoder failed on a datagram from agent %s exporter %s (%d bytes): %r",
                self.what, agent, host, len(d.payload), exc,
            )
            return
        counters.last_version = msg.version
        counters.no_template_sets += msg.held
        for err in msg.errors:
            counters.set_errors += 1
            kind = "held" if isinstance(err, UnknownTemplate | LimitExceeded) else type(err).__name__
            self._once.warning(
                f"set:{agent}:{host}:{kind}", "%s: agent %s exporter %s: %s", self.what, agent, host, err
            )
        for opt in msg.options_records:
            init = opt.get(_INIT_TIME)
            if isinstance(init, int):
                agent_decoder.init_ms[(host, opt.domain)] = init
        counters.options_records += len(msg.options_records)
        if msg.records:
            init_ms = agent_decoder.init_ms.get((host, msg.domain))
            counters.records += cols.add(
                msg.records, agent=agent, exporter=host, version=msg.version, domain=msg.domain,
                received_us=received_ns // 1000, export_ms=msg.export_time * 1000, init_ms=init_ms,
                agent_received_us=d.received_ns // 1000,
            )
        if msg.blocks:  # fixed-length data sets, normalised as arrays per batch
            init_ms = agent_decoder.init_ms.get((host, msg.domain))
            counters.records += cols.add_blocks(
                msg.blocks, agent=agent, exporter=host, version=msg.version, domain=msg.domain,
                received_us=received_ns // 1000, export_ms=msg.export_time * 1000, init_ms=init_ms,
                agent_received_us=d.received_ns // 1000,
            )

    def account_sequences(
        self, agent: str, agent_decoder: _AgentDecoder, touched: set[tuple[str, str]]
    ) -> None:
        for (scope, domain), stats in agent_decoder.decoder.sequence_stats().items():
            now = (stats.expected, stats.received, stats.lost, stats.resets)
            before = agent_decoder.seq_seen.get((scope, domain), (0, 0, 0, 0))
            if now == before:
                continue
            # A tracker that went backwards was replaced (domain evicted): count it from zero.
            delta = now if any(n < b for n, b in zip(now, before, strict=True)) else tuple(
                n - b for n, b in zip(now, before, strict=True)
            )
            agent_decoder.seq_seen[(scope, domain)] = now
            host = exporter_host(scope)
            counters = self.exporters.get((agent, host))
            if counters is None:
                continue
            counters.seq_expected += delta[0]
            counters.seq_received += delta[1]
            counters.seq_lost += delta[2]
            counters.seq_resets += delta[3]
            touched.add((agent, host))

    def status(self) -> dict[str, object]:
        """The per-exporter and per-agent counters and the decoders' totals, for a sink's status."""
        exporters = []
        for c in list(self.exporters.values()):
            exporters.append({
                "agent": c.agent, "exporter": c.exporter, "version": c.last_version,
                "datagrams": c.datagrams, "records": c.records, "options_records": c.options_records,
                "undecodable": c.undecodable, "set_errors": c.set_errors,
                "no_template_sets": c.no_template_sets,
                "sequence_expected": c.seq_expected, "sequence_lost": c.seq_lost,
                "sequence_resets": c.seq_resets,
                "last_seen": c.last_seen.isoformat() if c.last_seen else None,
            })
        agents = [
            {"agent": a.agent, "datagrams": a.datagrams, "transit_lost": a.transit_lost,
             "last_stream_seq": a.last_stream_seq}
            for a in list(self.agents.values())
        ]
        decoder: dict[str, int] = {}
        for agent_decoder in list(self.decoders.values()):
            for k, v in agent_decoder.decoder.counters.items():
                decoder[k] = decoder.get(k, 0) + v
        return {"exporters": exporters, "agents": agents, "decoder": decoder}
