"""``StoreSink``: the gateway sink that decodes journaled datagrams into the DuckDB flow store, exactly once.

Each step reads journal entries past the sink's cursor, decodes them (one ``Decoder`` per agent, so templates
are scoped by (agent, exporter)), accumulates rows column by column, and commits in ONE DuckDB transaction:
the rows, the new cursor, every touched decoder's template cache and the per-exporter counters. After a crash
the sink restarts from that transaction's cursor with that transaction's decoders, so each record is stored
exactly once. The journal cursor the gateway sees (for trimming) is copied from DuckDB after each commit and
at start; DuckDB's is the truth.

Two worker threads make a pipeline: the decoder thread reads and decodes batch N+1 while the writer thread has
DuckDB insert and commit batch N (DuckDB releases the GIL while it works, so the two use both cores). Every
DuckDB call runs on the writer thread; the event loop only waits. Commits stay in journal order, and each
carries the cursor, template caches and counters snapshotted when its batch was decoded; if a commit fails,
the batch decoded meanwhile is dropped and both threads restart from DuckDB's last committed state.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from flowtunnel.log import LogError
from flowtunnel.netflow import Decoder, DecoderConfig, ProtocolError
from flowtunnel.netflow.decoder import exporter_host
from flowtunnel.netflow.errors import LimitExceeded, UnknownTemplate
from flowtunnel.runtime import OnceLogger
from flowtunnel.store.db import FlowDatabase, StoredState
from flowtunnel.store.errors import StoreError
from flowtunnel.store.normalize import FlowColumns
from flowtunnel.store.query import StorePaths
from flowtunnel.store.server import QueryServer

if TYPE_CHECKING:
    from flowtunnel.journal import JournalReader, JournalWaiter
    from flowtunnel.log import Entry

__all__ = ["StoreSink"]

log = logging.getLogger("flowtunnel.store")
T = TypeVar("T")

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


@dataclass(slots=True, kw_only=True)
class _Prepared:
    """One decoded batch waiting for its commit: rows and a snapshot of the state they bring the store to."""

    arrays: dict[str, Any] | None
    rows: int
    cursor: int
    full: bool
    decoder_states: dict[str, bytes]
    exporter_stats: list[dict[str, Any]]
    agent_stats: list[dict[str, Any]]


class StoreSink:
    """The ``store`` sink; see the module docstring and docs/architecture.md ("Store").

    ``retain_seconds`` (the gateway's ``retain``) drops flows received longer ago than that, checked every
    ``retention_interval`` seconds (default: a tenth of the retention, between 10 s and 1 h). A commit holds
    at most ``batch_records`` rows; when ingest is slow, commits are at least ``batch_interval`` apart.

    Error handling: undecodable datagrams and bad sets are counted per exporter and logged once per cause;
    a failed DuckDB commit (disk full) is logged, the sink reloads its last committed state and retries
    after a pause, so nothing is lost or doubled.

    Resource handling: ``run`` owns the database (and the query server on ``DATA/store/query.sock``) from
    start to end; cancelling ``run`` waits for the commit in flight, then closes both.
    """

    def __init__(
        self,
        *,
        data_dir: Path,
        retain_seconds: float | None = None,
        name: str = "store",
        batch_records: int = 20_000,
        batch_interval: float = 0.5,
        read_limit: int = 500,
        read_bytes: int = 4 << 20,
        query_socket: bool = True,
        decoder_config: DecoderConfig | None = None,
        memory_limit: str | None = None,
        threads: int | None = None,
        retention_interval: float | None = None,
        retry_delay: float = 5.0,
    ) -> None:
        if retain_seconds is not None and retain_seconds <= 0:
            raise ValueError(f"store retain_seconds {retain_seconds} must be > 0 (None keeps everything)")
        if batch_records < 1:
            raise ValueError(f"store batch_records {batch_records} must be >= 1")
        self.name = name
        self.paths = StorePaths(data_dir=Path(data_dir))
        self.retain_seconds = retain_seconds
        self.batch_records = batch_records
        self.batch_interval = batch_interval
        self.read_limit = read_limit
        self.read_bytes = read_bytes
        self.query_socket = query_socket
        self.decoder_config = decoder_config or DecoderConfig()
        self.memory_limit = memory_limit
        self.threads = threads
        if retention_interval is None and retain_seconds is not None:
            retention_interval = min(3600.0, max(10.0, retain_seconds / 10))
        self.retention_interval = retention_interval
        self.retry_delay = retry_delay  # after a failed commit (disk full): pause, then retry
        self._once = OnceLogger(log)
        self._db: FlowDatabase | None = None
        self._server: QueryServer | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None  # DuckDB: the writer thread
        self._decoder_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._decoders: dict[str, _AgentDecoder] = {}
        self._exporters: dict[tuple[str, str], _ExporterCounters] = {}
        self._agents: dict[str, _AgentCounters] = {}
        self.cursor = 0  # committed in DuckDB
        self._read_cursor = 0  # decoded up to (runs ahead of ``cursor`` by the batch being committed)
        self.last_seq = 0
        self.rows = 0
        self.rows_added = 0
        self.commits = 0
        self.commit_failures = 0
        self.last_commit: float | None = None
        # The first failed commit since the last one that succeeded (None: commits succeed), and its error.
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self.retention_dropped = 0
        self.retention_last: float | None = None
        self.running = False

    # --- the asyncio layer ------------------------------------------------------------------------------

    async def run(self, journal: JournalReader, notify: JournalWaiter) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        self._decoder_executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store-decoder")
        commit: asyncio.Future[None] | None = None
        opened = False
        try:
            await self._work(self._open)
            opened = True
            journal.commit_cursor(self.name, self.cursor)  # what DuckDB holds is what the gateway may trim
            if self.query_socket:
                assert self._db is not None
                db = self._db
                self._server = QueryServer(
                    self.paths.socket, db.reader, limits=db.limits, staging=db.export_staging
                )
                try:
                    await self._server.start()
                except (OSError, StoreError) as exc:
                    log.error("store query server not started (queries need the gateway stopped): %s", exc)
                    self._server = None
            self.running = True
            log.info("store sink: %s, %d rows, resuming after journal seq %d", self.paths.database, self.rows,
                     self.cursor)
            next_retention = time.monotonic()
            while True:
                self.last_seq = notify.last_seq
                if self.retention_interval is not None and time.monotonic() >= next_retention:
                    if commit is not None:
                        pending, commit = commit, None
                        if not await self._committed(pending, journal):
                            continue
                    await self._work(self._retain)
                    next_retention = time.monotonic() + self.retention_interval
                started = time.monotonic()
                prepared = await self._work(self._prepare, journal, executor=self._decoder_executor)
                if commit is not None:
                    pending, commit = commit, None
                    if not await self._committed(pending, journal):
                        continue  # ``prepared`` was decoded past a failed commit: dropped, state reloaded
                if prepared is None:
                    # Bounded so retention still runs when nothing arrives.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.retention_interval):
                            await notify.wait(self.cursor)
                    continue
                commit = self._start(self._commit, prepared)
                if not prepared.full:
                    # Trickling in: let rows accumulate rather than commit per datagram.
                    await asyncio.sleep(max(0.0, self.batch_interval - (time.monotonic() - started)))
        finally:
            self.running = False
            if commit is not None:
                await asyncio.wait([commit])
            if opened:
                # Whatever committed last (also a commit waited for when the cancel came) is what the
                # gateway may trim up to.
                self._after_commit(journal)
            if self._server is not None:
                await self._server.close()
                self._server = None
            await self._work(self._close)
            self._executor.shutdown(wait=True)
            self._executor = None
            self._decoder_executor.shutdown(wait=True)
            self._decoder_executor = None

    async def _committed(self, commit: asyncio.Future[None], journal: JournalReader) -> bool:
        """Wait for a commit; on failure reload the committed state (the batch decoded since is dropped)."""
        try:
            await self._shielded(commit)
        except StoreError as exc:
            self.commit_failures += 1
            self.last_error = str(exc)
            if self.failing_since is None:
                self.failing_since = time.time()
            # Queries share the instance's memory: one at the cap makes commits fail. Ingest comes first.
            interrupted = self._server.interrupt_all() if self._server is not None else 0
            log.error("%s; reloading the last committed state, retrying in %g s%s", exc, self.retry_delay,
                      f" ({interrupted} running queries interrupted)" if interrupted else "")
            await self._work(self._load)
            await asyncio.sleep(self.retry_delay)
            return False
        if self.failing_since is not None:
            log.info("store: commits succeed again after %d failures since %s", self.commit_failures,
                     dt.datetime.fromtimestamp(self.failing_since, dt.UTC).isoformat(timespec="seconds"))
            self.failing_since = self.last_error = None
        self._after_commit(journal)
        return True

    def _after_commit(self, journal: JournalReader) -> None:
        try:
            journal.commit_cursor(self.name, self.cursor)
        except LogError as exc:
            # Advisory (DuckDB holds the truth): the gateway trims a little later, nothing is lost.
            self._once.warning(
                "journal-cursor", "store: cannot copy cursor %d to the journal: %s", self.cursor, exc
            )

    def _start(
        self, fn: Callable[..., T], *args: Any, executor: concurrent.futures.Executor | None = None
    ) -> asyncio.Future[T]:
        """Start ``fn`` on the writer thread (or ``executor``)."""
        pool = executor or self._executor
        assert pool is not None
        return asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def _work(
        self, fn: Callable[..., T], *args: Any, executor: concurrent.futures.Executor | None = None
    ) -> T:
        """Run ``fn`` on the writer thread (or ``executor``); if cancelled meanwhile, let it finish first."""
        return await self._shielded(self._start(fn, *args, executor=executor))

    @staticmethod
    async def _shielded(fut: asyncio.Future[T]) -> T:
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            await asyncio.wait([fut])
            raise

    # --- the writer thread ------------------------------------------------------------------------------

    def _open(self) -> None:
        self._db = FlowDatabase(self.paths.database, memory_limit=self.memory_limit, threads=self.threads)
        self._load()
        self.rows = self._db.count()

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _load(self) -> None:
        assert self._db is not None
        state = self._db.load()
        self._restore(state)

    def _restore(self, state: StoredState) -> None:
        self.cursor = self._read_cursor = state.cursor
        self._decoders = {}
        for agent, blob in state.decoder_states.items():
            try:
                decoder = Decoder.from_state(blob, self.decoder_config)
            except ValueError as exc:
                log.warning("store: template cache of agent %s not restored (%s); starting empty", agent, exc)
                decoder = Decoder(self.decoder_config)
            self._decoders[agent] = _AgentDecoder(decoder)
        self._exporters = {}
        for key, rec in state.exporter_stats.items():
            counters = _ExporterCounters(agent=key[0], exporter=key[1])
            for name, value in rec.items():
                setattr(counters, name, value)
            self._exporters[key] = counters
        self._agents = {}
        for agent, rec in state.agent_stats.items():
            self._agents[agent] = _AgentCounters(
                agent=agent, last_stream_seq=rec["last_stream_seq"], datagrams=rec["datagrams"],
                transit_lost=rec["transit_lost"],
            )

    def _prepare(self, journal: JournalReader) -> _Prepared | None:
        """Read and decode one batch past the read cursor (decoder thread); None when nothing is new."""
        cols = FlowColumns()
        cursor = self._read_cursor
        consumed = 0
        touched_agents: set[str] = set()
        touched_exporters: set[tuple[str, str]] = set()
        full = False
        while True:
            entries = journal.read(after=cursor, limit=self.read_limit, max_bytes=self.read_bytes)
            if not entries:
                break
            for entry in entries:
                self._ingest(entry, cols, touched_agents, touched_exporters)
            cursor = entries[-1].seq
            consumed += len(entries)
            if cols.rows >= self.batch_records:
                full = True
                break
            if len(entries) < self.read_limit:
                break
        if consumed == 0:
            return None
        decoder_states: dict[str, bytes] = {}
        for agent in touched_agents:
            agent_decoder = self._decoders[agent]
            self._account_sequences(agent, agent_decoder, touched_exporters)
            decoder_states[agent] = agent_decoder.decoder.export_state()
        self._read_cursor = cursor
        return _Prepared(
            arrays=cols.arrays() if cols.rows else None,
            rows=cols.rows,
            cursor=cursor,
            full=full or consumed >= self.read_limit,
            decoder_states=decoder_states,
            exporter_stats=[self._exporters[k].row() for k in touched_exporters],
            agent_stats=[self._agents[a].row() for a in touched_agents],
        )

    def _commit(self, batch: _Prepared) -> None:
        """Commit one decoded batch (writer thread): rows, cursor, decoder states and counters together."""
        db = self._db
        assert db is not None
        db.commit(
            arrays=batch.arrays,
            cursor=batch.cursor,
            decoder_states=batch.decoder_states,
            exporter_stats=batch.exporter_stats,
            agent_stats=batch.agent_stats,
        )
        self.cursor = batch.cursor
        self.rows += batch.rows
        self.rows_added += batch.rows
        self.commits += 1
        self.last_commit = time.time()

    def _ingest(
        self,
        entry: Entry,
        cols: FlowColumns,
        touched_agents: set[str],
        touched_exporters: set[tuple[str, str]],
    ) -> None:
        agent = entry.stream
        d = entry.datagram
        touched_agents.add(agent)
        agent_counters = self._agents.get(agent)
        if agent_counters is None:
            agent_counters = self._agents[agent] = _AgentCounters(agent=agent)
        agent_counters.datagrams += 1
        if entry.stream_seq is not None:
            last = agent_counters.last_stream_seq
            if last is not None and entry.stream_seq > last + 1:
                gap = entry.stream_seq - last - 1
                agent_counters.transit_lost += gap
                self._once.warning(
                    f"transit:{agent}",
                    "store: agent %s sequence jumps from %d to %d: %d datagrams never reached the gateway "
                    "(dropped by the agent's spool quota?)",
                    agent, last, entry.stream_seq, gap,
                )
            if last is None or entry.stream_seq > last:
                agent_counters.last_stream_seq = entry.stream_seq
        agent_decoder = self._decoders.get(agent)
        if agent_decoder is None:
            agent_decoder = self._decoders[agent] = _AgentDecoder(Decoder(self.decoder_config))
        host = d.exporter
        key = (agent, host)
        touched_exporters.add(key)
        counters = self._exporters.get(key)
        # The gateway's receive time (journaled with the entry); entries journaled before it was, the agent's.
        received_ns = d.received_ns if entry.appended_ns is None else entry.appended_ns
        received = dt.datetime.fromtimestamp(received_ns / 1e9, dt.UTC)
        if counters is None:
            counters = _ExporterCounters(agent=agent, exporter=host, first_seen=received)
            self._exporters[key] = counters
        counters.datagrams += 1
        counters.last_seen = received
        exporter = f"[{host}]:{d.exporter_port}" if ":" in host else f"{host}:{d.exporter_port}"
        try:
            msg = agent_decoder.decoder.decode_columns(d.payload, exporter)
        except ProtocolError as exc:
            counters.undecodable += 1
            self._once.warning(
                f"undecodable:{agent}:{host}:{type(exc).__name__}",
                "store: undecodable datagram from agent %s exporter %s (%d bytes): %s",
                agent, host, len(d.payload), exc,
            )
            return
        except Exception as exc:
            # A codec bug must not wedge the store on one datagram forever: count it like bad input.
            counters.undecodable += 1
            self._once.warning(
                f"codec:{type(exc).__name__}",
                "store: the decoder failed on a datagram from agent %s exporter %s (%d bytes): %r",
                agent, host, len(d.payload), exc,
            )
            return
        counters.last_version = msg.version
        counters.no_template_sets += msg.held
        for err in msg.errors:
            counters.set_errors += 1
            kind = "held" if isinstance(err, UnknownTemplate | LimitExceeded) else type(err).__name__
            self._once.warning(
                f"set:{agent}:{host}:{kind}", "store: agent %s exporter %s: %s", agent, host, err
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

    def _account_sequences(
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
            counters = self._exporters.get((agent, host))
            if counters is None:
                continue
            counters.seq_expected += delta[0]
            counters.seq_received += delta[1]
            counters.seq_lost += delta[2]
            counters.seq_resets += delta[3]
            touched.add((agent, host))

    def _retain(self) -> None:
        assert self._db is not None
        assert self.retain_seconds is not None
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=self.retain_seconds)
        deleted, oldest = self._db.drop_received_before(cutoff)
        self.retention_last = time.time()
        if deleted:
            self.rows -= deleted
            self.retention_dropped += deleted
            log.info(
                "store retention: dropped %d flows received before %s (retain %g s); oldest kept: %s",
                deleted, cutoff.isoformat(timespec="seconds"), self.retain_seconds,
                oldest.isoformat(timespec="seconds") if oldest else "none",
            )
        else:
            log.debug("store retention: nothing received before %s", cutoff.isoformat(timespec="seconds"))

    # --- reporting --------------------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        exporters = []
        for c in list(self._exporters.values()):
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
            for a in list(self._agents.values())
        ]
        decoder: dict[str, int] = {}
        for agent_decoder in list(self._decoders.values()):
            for k, v in agent_decoder.decoder.counters.items():
                decoder[k] = decoder.get(k, 0) + v
        server = self._server
        return {
            "database": str(self.paths.database),
            "running": self.running,
            "cursor": self.cursor,
            "lag": max(0, self.last_seq - self.cursor),
            "rows": self.rows,
            "rows_added": self.rows_added,
            "commits": self.commits,
            "commit_failures": self.commit_failures,
            "failing_since": self.failing_since,
            "last_error": self.last_error,
            "last_commit": self.last_commit,
            "retain_seconds": self.retain_seconds,
            "retention_dropped": self.retention_dropped,
            "query_socket": str(server.path) if server is not None else None,
            "queries": server.queries if server is not None else 0,
            "exporters": exporters,
            "agents": agents,
            "decoder": decoder,
        }
