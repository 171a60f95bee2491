"""``ParquetSink``: decoded flows as immutable Parquet files named by the journal range they hold; exactly
once.

A flow store that many machines can write and any number of readers query (``flowtunnel query --parquet
DIR``): each sink process (a *writer*, named after its position) decodes journal entries into the same rows
as the DuckDB store (``FlowDecoding``, ``FlowColumns``) and writes them with DuckDB's own Parquet writer to

    DIR/day=YYYY-MM-DD/hour=HH/flows-<first>-<last>-<writer>.parquet

where ``first..last`` is the range of journal positions (stream sequences on JetStream) the file covers and
day/hour are those of the gateway's receive time (``received``, UTC): a file never spans two hours (a batch is
cut where the hour changes). A file is written under a hidden temporary name, fsynced, renamed into place
and its directory fsynced; only then is the writer's state (template caches, counters, the position) written
to ``DIR/_flowtunnel/<writer>.json``, and only then is the position committed to the journal.

Recovery (start): the position is the largest ``last`` of the writer's files, or the state's position if
that is larger (a range that held no rows leaves no file). A crash between a file's rename and the state
write leaves the state behind the files: the entries in between are decoded again to rebuild the template
caches and counters, and their rows are dropped (the file holds them). A crash before the rename leaves a
temporary file, removed at start. So whatever the moment of a ``kill -9``, every row is in exactly one file.

Several writers: each has its own name (``--name``: its durable consumer and the tag in its file names) and
its share of the agents (``shard`` (I, N): the agents whose CRC-32 modulo N is I - 1), so their files are
disjoint and together hold every flow once. Every writer reads the whole stream and drops the others' part.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import datetime as dt
import json
import logging
import os
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import duckdb

from flowtunnel.errors import ConfigError
from flowtunnel.netflow import DecoderConfig
from flowtunnel.runtime import finish_then_cancel
from flowtunnel.statusfile import write_json_atomic
from flowtunnel.store.decoding import FlowDecoding
from flowtunnel.store.errors import StoreError
from flowtunnel.store.export import fsync_dir
from flowtunnel.store.normalize import FlowColumns
from flowtunnel.store.schema import FLOW_COLUMNS

if TYPE_CHECKING:
    from flowtunnel.journal import JournalReader, JournalWaiter
    from flowtunnel.log import Entry

__all__ = [
    "STATE_DIR",
    "ParquetFile",
    "ParquetSink",
    "file_name",
    "parse_file_name",
    "partition",
    "scan_files",
]

log = logging.getLogger("flowtunnel.parquet")
T = TypeVar("T")

#: Where each writer keeps its state (template caches, counters, position), beside the partitions.
STATE_DIR: Final = "_flowtunnel"
_WRITER_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")
_FILE_RE: Final = re.compile(r"^flows-(\d+)-(\d+)-([A-Za-z0-9_][A-Za-z0-9_-]*)\.parquet$")
_TMP_PREFIX: Final = ".tmp-"
_STATE_VERSION: Final = 1
_TIME_FIELDS: Final = ("first_seen", "last_seen")
# DuckDB's Parquet writer: the columns cast to the store's types (the same schema as table ``flows``).
_SELECT: Final = ", ".join(f"CAST({n} AS {t.replace(' NOT NULL', '')}) AS {n}" for n, t in FLOW_COLUMNS)


@dataclass(frozen=True, slots=True, kw_only=True)
class ParquetFile:
    """One writer's file: the journal range it covers and where it is."""

    first: int
    last: int
    writer: str
    path: Path


def file_name(first: int, last: int, writer: str) -> str:
    """The name of the file covering journal positions ``first..last`` written by ``writer``."""
    if not 0 < first <= last:
        raise ValueError(f"journal range {first}..{last} is empty or not positive")
    return f"flows-{first}-{last}-{writer}.parquet"


def parse_file_name(name: str) -> tuple[int, int, str] | None:
    """``(first, last, writer)`` of a file name of ``file_name``'s form, else None."""
    m = _FILE_RE.match(name)
    if m is None:
        return None
    first, last = int(m.group(1)), int(m.group(2))
    if not 0 < first <= last:
        return None
    return first, last, m.group(3)


def partition(received_ns: int) -> str:
    """The hive partition (``day=YYYY-MM-DD/hour=HH``) of a receive time, in UTC."""
    # Whole seconds, as integers: a float rounds 21:59:59.9999999 up to 22:00 (the row says 21:59:59.999999).
    t = dt.datetime.fromtimestamp(received_ns // 10**9, dt.UTC)
    return f"day={t:%Y-%m-%d}/hour={t:%H}"


def scan_files(out: Path, writer: str) -> list[ParquetFile]:
    """``writer``'s files under ``out`` (``day=*/hour=*/``), by first position."""
    found: list[ParquetFile] = []
    for path in out.glob("day=*/hour=*/flows-*.parquet"):
        parsed = parse_file_name(path.name)
        if parsed is not None and parsed[2] == writer:
            found.append(ParquetFile(first=parsed[0], last=parsed[1], writer=writer, path=path))
    return sorted(found, key=lambda f: (f.first, f.last))


def in_shard(agent: str, shard: tuple[int, int]) -> bool:
    """Whether ``agent`` belongs to shard (I, N): CRC-32 of its id modulo N is I - 1."""
    index, count = shard
    return count == 1 or zlib.crc32(agent.encode()) % count == index - 1


@dataclass(slots=True)
class _Batch:
    """Entries decoded since the last write: the rows, their hour, the range they cover."""

    first: int  # the first journal position the batch covers (the position before it + 1)
    last: int = 0  # the last position consumed into it
    hour: str | None = None
    replay: bool = False  # entries a file already holds: decoded for the state only, rows dropped
    started: float = field(default_factory=time.monotonic)
    cols: FlowColumns = field(default_factory=FlowColumns)
    touched_agents: set[str] = field(default_factory=set)
    touched_exporters: set[tuple[str, str]] = field(default_factory=set)
    entries: int = 0


class ParquetSink:
    """The ``parquet`` sink; see the module docstring and docs/scale-out.md ("Parquet").

    ``out``: the directory of the partitions (created); ``writer``: the name in this sink's files and its
    position's name; ``shard``: (I, N), the share of the agents it takes. A file is written when the batch
    holds ``flush_records`` rows, is ``flush_interval`` seconds old, or the hour of the receive time changes.

    Error handling: undecodable datagrams are counted and logged once per cause (as in the DuckDB store); a
    failed write (disk full) is logged, the sink drops the batch, reloads its state from disk and retries
    after ``retry_delay``, so nothing is lost or doubled.

    Resource handling: ``run`` owns an in-memory DuckDB instance (the Parquet writer) on one worker thread;
    cancelling ``run`` lets the write in flight finish, then closes it. The batch not yet written is dropped
    (its entries are not committed, so they are read again).
    """

    def __init__(
        self,
        *,
        out: Path,
        writer: str = "parquet",
        shard: tuple[int, int] = (1, 1),
        flush_records: int = 100_000,
        flush_interval: float = 10.0,
        read_limit: int = 500,
        read_bytes: int = 4 << 20,
        decoder_config: DecoderConfig | None = None,
        memory_limit: str = "256MiB",
        retry_delay: float = 5.0,
    ) -> None:
        if not _WRITER_RE.match(writer):
            raise ConfigError(f"parquet writer name {writer!r} must be 1-64 letters, digits, '_' or '-' "
                              "(not starting with '-')")
        index, count = shard
        if not 1 <= index <= count:
            raise ConfigError(f"parquet shard {index}/{count} must be I/N with 1 <= I <= N")
        if flush_records < 1:
            raise ValueError(f"parquet flush_records {flush_records} must be >= 1")
        self.name = writer
        self.writer = writer
        self.out = Path(out)
        self.shard = shard
        self.flush_records = flush_records
        self.flush_interval = flush_interval
        self.read_limit = read_limit
        self.read_bytes = read_bytes
        self.memory_limit = memory_limit
        self.retry_delay = retry_delay
        self._decoding = FlowDecoding(decoder_config or DecoderConfig(), log=log, what="parquet")
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._conn: duckdb.DuckDBPyConnection | None = None
        self.cursor = 0  # committed: every entry up to here is in a file (or held no rows of this shard)
        self._read_cursor = 0  # consumed into the batch up to here
        self._replay_upto = 0  # files hold entries up to here, beyond the state: decode them for state only
        self._carry: list[Entry] = []  # read but not yet consumed (the batch was cut at an hour)
        self._batch: _Batch | None = None
        self.last_seq = 0
        self.files = 0
        self.rows_added = 0
        self.skipped = 0  # entries of other shards
        self.replayed = 0  # entries decoded again for the state only (a file already held their rows)
        self.commit_failures = 0
        # The first failed write since the last one that succeeded (None: writes succeed), and its error.
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self.last_write: float | None = None
        self.running = False

    @property
    def state_path(self) -> Path:
        return self.out / STATE_DIR / f"{self.writer}.json"

    # --- the asyncio layer ------------------------------------------------------------------------------

    async def run(self, journal: JournalReader, notify: JournalWaiter) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="parquet-writer")
        opened = False
        try:
            await self._work(self._open)
            opened = True
            floor = journal.cursor(self.name)
            if floor > self.cursor:
                # The state is behind the journal's position of this name: lost, or another directory. What
                # the journal no longer holds cannot be written again; template caches start empty.
                log.warning("parquet sink %s: its state in %s is at journal seq %d, its journal position "
                            "at %d (state lost, or a new --out for an old name?): resuming after %d",
                            self.writer, self.out, self.cursor, floor, floor)
                self.cursor = self._read_cursor = floor
                self._replay_upto = max(self._replay_upto, floor)
            journal.commit_cursor(self.name, self.cursor)  # what the state holds is what may be trimmed
            self.running = True
            log.info("parquet sink %s: %s, shard %d/%d, resuming after journal seq %d%s", self.writer,
                     self.out, *self.shard, self.cursor,
                     f" (entries up to {self._replay_upto} are in files already: decoded again for the "
                     "template caches only)" if self._replay_upto > self.cursor else "")
            while True:
                self.last_seq = notify.last_seq
                try:
                    written = await self._work(self._step, journal)
                except StoreError as exc:
                    self.commit_failures += 1
                    self.last_error = str(exc)
                    if self.failing_since is None:
                        self.failing_since = time.time()
                    log.error("%s; reloading the state, retrying in %g s", exc, self.retry_delay)
                    await self._work(self._load)
                    await asyncio.sleep(self.retry_delay)
                    continue
                if written:
                    self.failing_since = None
                    journal.commit_cursor(self.name, self.cursor)
                    continue
                # Nothing due: wait for entries, bounded so that a batch is written when it is old enough.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._wait_time()):
                        await notify.wait(self._read_cursor)
        finally:
            self.running = False
            if opened:
                with contextlib.suppress(Exception):
                    journal.commit_cursor(self.name, self.cursor)
            await self._work(self._close)
            self._executor.shutdown(wait=True)
            self._executor = None

    def _wait_time(self) -> float:
        batch = self._batch
        if batch is None or batch.entries == 0:
            return max(self.flush_interval, 0.05)
        return max(0.05, self.flush_interval - (time.monotonic() - batch.started))

    async def _work(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the worker thread; if cancelled meanwhile, let it finish first."""
        assert self._executor is not None
        return await finish_then_cancel(asyncio.get_running_loop().run_in_executor(self._executor, fn, *args))

    # --- the worker thread ------------------------------------------------------------------------------

    def _open(self) -> None:
        try:
            (self.out / STATE_DIR).mkdir(parents=True, exist_ok=True)
            for tmp in self.out.glob(f"day=*/hour=*/{_TMP_PREFIX}*-{self.writer}.parquet"):
                log.info("parquet sink %s: removing %s (a write interrupted before its rename)", self.writer,
                         tmp)
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"parquet directory {self.out}: {exc.strerror or exc}") from None
        self._conn = duckdb.connect(":memory:", config={
            "memory_limit": self.memory_limit, "threads": 1, "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
        })
        self._conn.execute("SET TimeZone = 'UTC'")
        self._load()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _load(self) -> None:
        """Position and state from disk: the state file, then the files' names (see the module docstring)."""
        state = self._read_state()
        seq = int(state.get("seq", 0))
        decoders = {a: base64.b64decode(s) for a, s in state.get("decoders", {}).items()}
        exporters: dict[tuple[str, str], dict[str, Any]] = {}
        for rec in state.get("exporters", []):
            rec = dict(rec)
            for key in _TIME_FIELDS:
                if rec.get(key):
                    rec[key] = dt.datetime.fromisoformat(rec[key])
            exporters[(rec["agent"], rec["exporter"])] = rec
        agents = {rec["agent"]: rec for rec in state.get("agents", [])}
        self._decoding.restore(decoders, exporters, agents)
        files = scan_files(self.out, self.writer)
        in_files = max((f.last for f in files), default=0)
        self.cursor = self._read_cursor = seq
        self._replay_upto = max(in_files, seq)
        self._carry = []
        self._batch = None
        self.files = len(files)

    def _read_state(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StoreError(f"parquet state {self.state_path} is unreadable: {exc}") from None
        if isinstance(doc, dict) and (doc.get("version"), doc.get("writer")) == (_STATE_VERSION, self.writer):
            return dict(doc)
        raise StoreError(f"parquet state {self.state_path} is not a version {_STATE_VERSION} state of writer "
                         f"{self.writer}")

    def _step(self, journal: JournalReader) -> bool:
        """Fill the batch; write it when due. True when something was committed (the cursor moved)."""
        if self._fill(journal):
            self._write()
            return True
        return False

    def _fill(self, journal: JournalReader) -> bool:
        """Consume entries into the batch; True when it is due (full, old, an hour or replay boundary)."""
        while True:
            entries = self._carry or journal.read(
                after=self._read_cursor, limit=self.read_limit, max_bytes=self.read_bytes
            )
            self._carry = []
            if not entries:
                batch = self._batch
                return batch is not None and batch.entries > 0 and (
                    time.monotonic() - batch.started >= self.flush_interval or batch.replay
                )
            for i, entry in enumerate(entries):
                if self._cut_before(entry):
                    self._carry = entries[i:]
                    return True
                self._consume(entry)
            batch = self._batch
            assert batch is not None
            if batch.cols.rows >= self.flush_records or (batch.replay and batch.last >= self._replay_upto):
                return True
            if len(entries) < self.read_limit:
                return time.monotonic() - batch.started >= self.flush_interval

    def _cut_before(self, entry: Entry) -> bool:
        """Whether the batch must be written before ``entry`` (never inside one journal position)."""
        batch = self._batch
        if batch is None or batch.entries == 0 or entry.seq == batch.last:
            return False
        if batch.replay != (entry.seq <= self._replay_upto):
            return True
        if not in_shard(entry.stream, self.shard):
            return False
        return batch.hour is not None and _hour_of(entry) != batch.hour

    def _consume(self, entry: Entry) -> None:
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch(first=self._read_cursor + 1, replay=entry.seq <= self._replay_upto)
        batch.entries += 1
        batch.last = self._read_cursor = entry.seq
        if not in_shard(entry.stream, self.shard):
            self.skipped += 1
            return
        if batch.replay:
            self.replayed += 1
        elif batch.hour is None:
            batch.hour = _hour_of(entry)
        self._decoding.ingest(entry, batch.cols, batch.touched_agents, batch.touched_exporters)

    def _write(self) -> None:
        """Write the batch's file (if it has rows and no file holds them yet), then the state."""
        batch = self._batch
        assert batch is not None
        self._decoding.snapshot(batch.touched_agents, batch.touched_exporters)  # counts sequence figures
        if batch.cols.rows and not batch.replay:
            assert batch.hour is not None
            self._write_file(batch)
        self._write_state(batch.last)
        self.cursor = batch.last
        self._batch = None

    def _write_file(self, batch: _Batch) -> None:
        assert self._conn is not None
        directory = self.out / batch.hour  # type: ignore[operator]
        name = file_name(batch.first, batch.last, self.writer)
        tmp = directory / f"{_TMP_PREFIX}{batch.first}-{batch.last}-{self.writer}.parquet"
        arrays = batch.cols.arrays()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._conn.register("_flow_batch", arrays)
            try:
                quoted = str(tmp).replace("'", "''")
                self._conn.execute(f"COPY (SELECT {_SELECT} FROM _flow_batch) TO '{quoted}' "
                                   "(FORMAT parquet, COMPRESSION zstd)")
            finally:
                self._conn.unregister("_flow_batch")
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, directory / name)
            fsync_dir(directory)
        except (OSError, duckdb.Error) as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StoreError(f"parquet sink {self.writer}: writing {directory / name} failed: {exc}") \
                from None
        self.files += 1
        self.rows_added += batch.cols.rows
        self.last_write = time.time()

    def _write_state(self, seq: int) -> None:
        d = self._decoding
        doc = {
            "version": _STATE_VERSION,
            "writer": self.writer,
            "seq": seq,
            "shard": list(self.shard),
            "decoders": {a: base64.b64encode(ad.decoder.export_state()).decode()
                         for a, ad in sorted(d.decoders.items())},
            "exporters": [
                {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in c.row().items()}
                for c in d.exporters.values()
            ],
            "agents": [a.row() for a in d.agents.values()],
        }
        try:
            write_json_atomic(self.state_path, doc)
            fsync_dir(self.state_path.parent)
        except OSError as exc:
            raise StoreError(f"parquet sink {self.writer}: writing {self.state_path} failed: "
                             f"{exc.strerror or exc}") from None

    # --- reporting --------------------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        return {
            "out": str(self.out),
            "writer": self.writer,
            "shard": f"{self.shard[0]}/{self.shard[1]}",
            "running": self.running,
            "cursor": self.cursor,
            "lag": max(0, self.last_seq - self.cursor),
            "files": self.files,
            "rows_added": self.rows_added,
            "skipped_other_shards": self.skipped,
            "replayed": self.replayed,
            "commit_failures": self.commit_failures,
            "failing_since": self.failing_since,
            "last_error": self.last_error,
            "last_write": self.last_write,
            **self._decoding.status(),
        }


def _hour_of(entry: Entry) -> str:
    received = entry.datagram.received_ns if entry.appended_ns is None else entry.appended_ns
    return partition(received)
