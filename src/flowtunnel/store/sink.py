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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from flowtunnel.log import LogError
from flowtunnel.netflow import DecoderConfig
from flowtunnel.runtime import OnceLogger, finish_then_cancel
from flowtunnel.store.db import FlowDatabase, StoredState
from flowtunnel.store.decoding import FlowDecoding
from flowtunnel.store.errors import StoreError
from flowtunnel.store.normalize import FlowColumns
from flowtunnel.store.query import StorePaths
from flowtunnel.store.server import QueryServer

if TYPE_CHECKING:
    from flowtunnel.journal import JournalReader, JournalWaiter

__all__ = ["StoreSink"]

log = logging.getLogger("flowtunnel.store")
T = TypeVar("T")

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
        self._decoding = FlowDecoding(self.decoder_config, log=log)
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
            await finish_then_cancel(commit)
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
        return await finish_then_cancel(self._start(fn, *args, executor=executor))


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
        self._decoding.restore(state.decoder_states, state.exporter_stats, state.agent_stats)

    def _prepare(self, journal: JournalReader) -> _Prepared | None:
        """Read and decode one batch past the read cursor (decoder thread); None when nothing is new."""
        cols = FlowColumns()
        cursor = self._read_cursor
        consumed = 0
        touched_agents: set[str] = set()
        touched_exporters: set[tuple[str, str]] = set()
        full = False
        ingest = self._decoding.ingest
        while True:
            entries = journal.read(after=cursor, limit=self.read_limit, max_bytes=self.read_bytes)
            if not entries:
                break
            for entry in entries:
                ingest(entry, cols, touched_agents, touched_exporters)
            cursor = entries[-1].seq
            consumed += len(entries)
            if cols.rows >= self.batch_records:
                full = True
                break
            if len(entries) < self.read_limit:
                break
        if consumed == 0:
            return None
        decoder_states, exporter_stats, agent_stats = self._decoding.snapshot(
            touched_agents, touched_exporters
        )
        self._read_cursor = cursor
        return _Prepared(
            arrays=cols.arrays() if cols.rows else None,
            rows=cols.rows,
            cursor=cursor,
            full=full or consumed >= self.read_limit,
            decoder_states=decoder_states,
            exporter_stats=exporter_stats,
            agent_stats=agent_stats,
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
        decoding = self._decoding.status()
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
            **decoding,
        }
