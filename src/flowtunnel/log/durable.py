"""DurableLog: an append-only, seq-numbered log of datagrams in one SQLite file (WAL mode).

The agent's spool and the gateway's journal are the same thing: datagrams appended in order under sequence
numbers that are never reused, read from consumer cursors, trimmed once every consumer is past them, and
bounded by a disk quota with an explicit policy when full. SQLite gives atomic, durable commits that survive
``kill -9`` and power loss (``synchronous=FULL``), so this module only has to keep its own bookkeeping (next
sequence number, tracked size, drop counters) inside the same transactions as the data.
"""

from __future__ import annotations

import enum
import errno
import functools
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter
from pathlib import Path
from typing import TypeVar

from flowtunnel.datagram import Datagram, make_datagram
from flowtunnel.log.checkpointer import Checkpointer
from flowtunnel.log.errors import LogCorrupt, LogError, LogFull, LogLocked
from flowtunnel.log.wal import inspect_wal

__all__ = [
    "ENTRY_OVERHEAD",
    "MIN_DISK_QUOTA",
    "AppendResult",
    "DurableLog",
    "Entry",
    "FullPolicy",
    "GroupPart",
    "LogConfig",
    "LogStats",
    "QuotaFull",
    "entry_costs",
]

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Estimated bytes of SQLite storage per entry beyond payload, exporter and stream text (row header, seq,
#: integers, b-tree cell and page slack). Used for the quota, which is tracked incrementally.
ENTRY_OVERHEAD = 48

_SCHEMA_VERSION = 2  # 2: entries.appended_ns (1 is migrated on open)
#: The smallest ``disk_quota_bytes``: the pages of an empty log, the reserve, a WAL and its index need this.
MIN_DISK_QUOTA = 512 << 10
_SHM_BYTES = 32768  # the WAL index (-shm) grows by this per 4062 WAL frames
_SHM_FRAMES = 4062
_PRIOR_RATIO = 1.0  # disk bytes per tracked byte until the log holds enough to measure it
_SQLITE_FULL = 13
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    stream TEXT NOT NULL,
    stream_seq INTEGER,
    received_ns INTEGER NOT NULL,
    exporter TEXT NOT NULL,
    exporter_port INTEGER NOT NULL,
    local_port INTEGER NOT NULL,
    payload BLOB NOT NULL,
    appended_ns INTEGER
);
CREATE TABLE IF NOT EXISTS cursors (name TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
"""
_COST_SQL = (
    f"length(payload) + length(CAST(exporter AS BLOB)) + length(CAST(stream AS BLOB)) + {ENTRY_OVERHEAD}"
)
_INSERT = (
    "INSERT INTO entries (seq, stream, stream_seq, received_ns, exporter, exporter_port, local_port, "
    "payload, appended_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT = "INSERT INTO {} VALUES (?, ?) ON CONFLICT({}) DO UPDATE SET {} = excluded.{}"
_UPSERT_META = _UPSERT.format("meta (key, value)", "key", "value", "value")
#: the counters an append changes, in one statement (as many pairs as there are counters to write)
_UPSERT_META_N = (
    "INSERT INTO meta (key, value) VALUES {} ON CONFLICT(key) DO UPDATE SET value = excluded.value"
)
_UPSERT_STATE = _UPSERT.format("state (key, value)", "key", "value", "value")


def _commit_counters(db: sqlite3.Connection, meta: list[object], state: Mapping[str, int] | None) -> None:
    """End an append's transaction: the counters that changed (``meta``: name, value, name, value, ...) in
    one statement, the caller's state, then COMMIT (a single append and a group commit end alike)."""
    db.execute(_UPSERT_META_N.format(", ".join(["(?, ?)"] * (len(meta) // 2))), meta)
    if state:
        db.executemany(_UPSERT_STATE, [(k, int(v)) for k, v in state.items()])
    db.execute("COMMIT")
_DELETE_STATE = "DELETE FROM state WHERE key = ?"
_UPSERT_CURSOR = _UPSERT.format("cursors (name, seq)", "name", "seq", "seq")
_SELECT = (
    "SELECT seq, stream, stream_seq, received_ns, exporter, exporter_port, local_port, payload, appended_ns "
    "FROM entries WHERE seq > ? ORDER BY seq LIMIT ?"
)


def entry_costs(datagrams: Sequence[Datagram], stream: str) -> list[int]:
    """What each datagram counts against the quota when appended to ``stream``: payload, exporter and
    stream bytes, plus ``ENTRY_OVERHEAD``."""
    stream_bytes = len(stream.encode())
    exporter_bytes: dict[str, int] = {}  # a batch has a handful of exporters: encode each once
    return [
        len(d.payload) + (exporter_bytes.get(d.exporter)
                          or exporter_bytes.setdefault(d.exporter, len(d.exporter.encode())))
        + stream_bytes + ENTRY_OVERHEAD
        for d in datagrams
    ]


class FullPolicy(enum.Enum):
    """What ``append`` does when the quota is reached."""

    DROP_OLDEST = "drop-oldest"  # delete the oldest entries to make room (counted in dropped_oldest)
    REFUSE_NEW = "refuse-new"  # keep what is stored, refuse the new entries (counted in refused)


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    """Where the log lives and how it is bounded.

    ``quota_bytes`` bounds payload + exporter + stream bytes + ``ENTRY_OVERHEAD`` per entry (0 = unbounded);
    the file follows it within SQLite's page slack plus the WAL (capped at ``wal_limit_bytes`` after each
    checkpoint). ``synchronous`` is ``"full"`` (a commit survives power loss) or ``"normal"`` (survives a
    process crash; the last commits may be lost on power loss, at far fewer fsyncs). ``check_on_open`` runs
    ``PRAGMA quick_check``, which reads the whole file: cheap for a spool, consider turning it off for a
    multi-gigabyte journal on slow storage. ``reserve_bytes`` are held in ``<path>.reserve`` and released
    when the disk is full so that ``trim`` and cursor commits can still run (deleting needs WAL space).
    ``checkpoint_pages`` is SQLite's ``wal_autocheckpoint`` (pages of 4 KiB the WAL may hold before they are
    folded into the file). On a small filesystem the reserve is capped at 1/16 of it, the checkpoint
    interval at 1/16 and ``wal_limit_bytes`` at 1/8, so the log still works on a disk of 1 MiB.
    ``page_size`` is SQLite's page size for a new file (an existing file keeps its own): 16 KiB pages hold
    eleven 1.4 KB datagrams where 4 KiB pages hold two, so a large commit writes fewer, fuller WAL frames
    (measured: 40 % less commit CPU per datagram, 20 % less disk; small commits cost the same). On a
    filesystem of fewer than 4096 such pages it is lowered, down to 4 KiB.

    ``disk_quota_bytes`` (0 = none) bounds the disk the log's files take, all of them: the database (pages
    in use and free), the WAL, its index (``-shm``) and the reserve file. With it, the reserve, the
    checkpoint interval, the WAL limit and the page size are scaled down to it as to a filesystem of that
    size; what is left for the database is enforced by converting it to tracked bytes at the ratio of pages
    to tracked bytes measured after each commit; and an append that is neither ``atomic`` nor carries
    ``state`` is committed in pieces of at most half a checkpoint interval, so the WAL stays within its
    limit. An atomic append is one commit whatever its size: the WAL may exceed its share by that commit's
    size until the checkpoint that follows it. At least ``MIN_DISK_QUOTA``. It applies on top of
    ``quota_bytes``.

    ``background_checkpoint`` folds the WAL back from a second connection in a thread of its own (a PASSIVE
    checkpoint, which takes no writer lock: commits go on meanwhile; ``flowtunnel.log.checkpointer``) after
    every ``checkpoint_pages`` of appended bytes or a second after a commit, instead of inside the commit
    that crosses ``checkpoint_pages`` (SQLite's ``wal_autocheckpoint``, turned off then). The WAL stays
    bounded by ``wal_limit_bytes``: a commit that finds it larger folds it back and truncates it itself (as
    with a disk quota). The free space kept beyond an append (see ``DurableLog``) then counts the WAL limit
    instead of one checkpoint interval: that much may be waiting to be folded into the database file. The
    gateway's journal uses it; the spool does not (one thread and connection less on the agent).

    ``cache_kib`` is SQLite's page cache for the log's connection (``PRAGMA cache_size = -cache_kib``):
    2000 KiB is SQLite's own default, kept for the gateway's journal. The cache holds up to that much of the
    pages written or read, so a log that grows (a spool backing up while the gateway is unreachable) fills
    it whatever it reads again; the agent's spool, read only when its in-memory tail falls short, caps it
    lower (``SPOOL_CACHE_KIB`` in ``flowtunnel.agent.service``).
    """

    path: Path
    quota_bytes: int = 1 << 30
    full_policy: FullPolicy = FullPolicy.DROP_OLDEST
    synchronous: str = "full"
    check_on_open: bool = True
    busy_timeout: float = 5.0
    vacuum_threshold_pages: int = 4096
    wal_limit_bytes: int = 16 << 20
    reserve_bytes: int = 1 << 20
    checkpoint_pages: int = 1000
    page_size: int = 16384
    disk_quota_bytes: int = 0
    background_checkpoint: bool = False
    cache_kib: int = 2000

    def __post_init__(self) -> None:
        if self.quota_bytes < 0:
            raise ValueError(f"log quota_bytes {self.quota_bytes} must be >= 0 (0 = unbounded)")
        if self.disk_quota_bytes and self.disk_quota_bytes < MIN_DISK_QUOTA:
            raise ValueError(
                f"log disk_quota_bytes {self.disk_quota_bytes} is below the minimum of {MIN_DISK_QUOTA} (the "
                "pages of an empty log, its reserve file, WAL and WAL index need that much; 0 = none)"
            )
        if self.synchronous not in ("full", "normal"):
            raise ValueError(f"log synchronous {self.synchronous!r} must be 'full' or 'normal'")
        if self.busy_timeout < 0:
            raise ValueError(f"log busy_timeout {self.busy_timeout} must be >= 0 seconds")
        if self.reserve_bytes < 0:
            raise ValueError(f"log reserve_bytes {self.reserve_bytes} must be >= 0 (0 = no reserve file)")
        if self.checkpoint_pages < 1:
            raise ValueError(f"log checkpoint_pages {self.checkpoint_pages} must be >= 1")
        if not (512 <= self.page_size <= 65536 and self.page_size & (self.page_size - 1) == 0):
            raise ValueError(f"log page_size {self.page_size} must be a power of two in 512..65536")
        if self.cache_kib < 16:
            raise ValueError(f"log cache_kib {self.cache_kib} must be >= 16")
        if self.vacuum_threshold_pages < 1:
            raise ValueError(f"log vacuum_threshold_pages {self.vacuum_threshold_pages} must be >= 1")


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored datagram: its log ``seq``, and the ``stream``/``stream_seq`` it was appended under.

    ``appended_ns`` is the appender's wall clock (Unix ns) when it appended the entry, if it gave one: the
    gateway's receive time in its journal, where ``datagram.received_ns`` is the agent's clock.
    """

    seq: int
    stream: str
    stream_seq: int | None
    datagram: Datagram
    appended_ns: int | None = None


# ``read`` builds entries by setting the slots of this frozen dataclass through their descriptors, as
# ``make_datagram`` does for their datagrams (what __init__ does through object.__setattr__, in under half the
# time): equal objects, built faster.
_new = object.__new__
_GET_TIME, _GET_EXPORTER, _GET_EXPORTER_PORT, _GET_LOCAL_PORT, _GET_PAYLOAD = (
    attrgetter(name) for name in ("received_ns", "exporter", "exporter_port", "local_port", "payload")
)
_SET_SEQ, _SET_STREAM, _SET_STREAM_SEQ, _SET_DATAGRAM, _SET_APPENDED = (
    getattr(Entry, name).__set__ for name in ("seq", "stream", "stream_seq", "datagram", "appended_ns")
)


@dataclass(frozen=True, slots=True, kw_only=True)
class AppendResult:
    """What one ``append`` did.

    The datagrams that got sequence numbers are ``first_seq .. last_seq`` (empty when ``last_seq <
    first_seq``), in the order given; ``appended`` of them are stored, the others were dropped at once because
    the batch alone exceeds the quota. ``dropped`` counts every entry deleted by DROP_OLDEST in this call
    (older ones and those of this batch); ``refused`` counts datagrams refused by REFUSE_NEW (the tail of the
    batch; they got no sequence number).
    """

    first_seq: int
    last_seq: int
    appended: int
    dropped: int
    refused: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LogStats:
    """Counters of the log. ``first_seq`` is the oldest stored seq, or ``last_seq + 1`` when empty."""

    first_seq: int
    last_seq: int
    entries: int
    bytes: int
    dropped_oldest: int
    refused: int
    quota_bytes: int
    file_bytes: int
    #: Times the log was opened with a torn write-ahead log tail (a lost last transaction), ever.
    torn_tails: int = 0
    #: Whether the filesystem is (nearly) full right now: appends are held below the free-space floor.
    disk_full: bool = False
    #: Every file of the log on disk (database, WAL, WAL index, reserve), and what bounds them (0: nothing).
    disk_bytes: int = 0
    disk_quota_bytes: int = 0
    #: Append transactions committed since the log was opened (``append_group`` commits many parts in one);
    #: not compared (a reopened log has the same content and a new count).
    commits: int = field(default=0, compare=False)


class QuotaFull(LogFull):
    """``append(..., atomic=True)`` under REFUSE_NEW: the whole group does not fit in the quota."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupPart:
    """One part of ``DurableLog.append_group``: what one ``append(..., atomic=True)`` call takes."""

    datagrams: Sequence[Datagram]
    stream: str = ""
    stream_seqs: Sequence[int] | None = None
    state: Mapping[str, int] | None = None
    appended_ns: int | None = None


class DurableLog:
    """The durable log; see the module docstring and docs/architecture.md ("The durable log").

    Every method is synchronous. One object may be shared by threads (calls are serialised by a lock), so
    asyncio callers can run bulk calls in ``asyncio.to_thread``.

    Error handling: appends treat the filesystem as full before SQLite would hit ENOSPC, keeping the
    reserve file plus a checkpoint's worth of pages (with ``background_checkpoint``, the WAL limit) free:
    DROP_OLDEST then drops the oldest entries (counted in ``dropped_oldest``), REFUSE_NEW raises ``LogFull``
    (nothing written). So ``trim``, ``commit_cursor``
    and ``set_state`` always find room; if the disk fills anyway (another process), they release the
    reserve, and ``trim`` deletes in small steps. Each disk-full episode is logged once when it starts and
    once when it clears (``LogStats.disk_full``). A torn WAL tail found on open is logged once and counted
    in ``LogStats.torn_tails``. A damaged file raises
    ``LogCorrupt`` naming the path, on open or when SQLite detects it later; a database held by another
    connection beyond ``busy_timeout`` raises ``LogLocked``. Caller misuse raises
    ``ValueError``.

    Resource handling: holds one SQLite connection until ``close()`` (or the end of a ``with`` block); with
    ``background_checkpoint``, a second one and its thread too.
    """

    def __init__(self, config: LogConfig) -> None:
        self.config = config
        self.path = Path(config.path)
        self._reserve_path = self.path.with_name(self.path.name + ".reserve")
        self._lock = threading.Lock()
        self._ckpt_lock = threading.Lock()  # one checkpoint at a time: this connection's or the thread's
        self._checkpointer: Checkpointer | None = None
        self._closed = False
        self._disk_full = False  # inside a disk-full episode (logged once when it starts, once when it ends)
        self._commits = 0  # append transactions committed since open (LogStats.commits)
        self._torn_tails = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._size_to_filesystem()
        # Before SQLite touches the WAL: its recovery drops a torn tail without a word.
        try:
            torn = inspect_wal(Path(f"{self.path}-wal"))
        except OSError as exc:
            logger.debug("log %s: cannot inspect the write-ahead log: %s", self.path, exc)
            torn = None
        if torn is not None:
            logger.warning(
                "log %s: torn write-ahead log tail in %s (%s): SQLite discards its last %d of %d bytes "
                "(%d frames); the last transaction before the crash is lost",
                self.path, torn.wal_path, torn.reason, torn.discarded_bytes, torn.wal_bytes,
                torn.discarded_frames,
            )
        try:
            self._db = sqlite3.connect(
                self.path, timeout=config.busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise LogError(f"cannot open log {self.path}: {exc}", path=str(self.path)) from None
        try:
            try:
                with self._translate("open"):
                    self._setup(torn=torn is not None)
            except LogFull:
                # even opening writes a little (the -shm index, WAL header): the reserve pays for it
                if not self._release_reserve():
                    raise
                logger.warning("log %s: disk full, released the reserve file to open", self.path)
                with self._translate("open"):
                    self._setup(torn=torn is not None)
            if config.background_checkpoint:
                try:
                    self._checkpointer = Checkpointer(
                        self.path, lock=self._ckpt_lock, threshold=self._checkpoint_pages * 4096,
                        synchronous=config.synchronous, busy_timeout=config.busy_timeout,
                    )
                except sqlite3.Error as exc:
                    raise LogError(f"cannot open log {self.path} for checkpoints: {exc}",
                                   path=str(self.path)) from None
        except BaseException:
            self._db.close()
            self._closed = True
            raise

    # -- lifecycle -------------------------------------------------------------------------------------------

    def _size_to_filesystem(self) -> None:
        """Scale the reserve, the WAL checkpoint interval and the WAL size limit down to a small filesystem.

        On a filesystem of a few MiB the defaults (1 MiB reserve, 4 MiB between checkpoints) cannot work: the
        WAL alone would fill the disk before SQLite folds it back. Each is capped at a fraction of the
        filesystem instead, so the log fills the disk with data and can still delete some of it when full.
        """
        cfg = self.config
        try:
            st = os.statvfs(self.path.parent)
            fs_bytes = st.f_blocks * st.f_frsize
        except OSError:
            fs_bytes = 0
        page = 4096
        if fs_bytes <= 0:
            fs_bytes = 1 << 62
        if cfg.disk_quota_bytes:
            # The log's own share of a disk is sized like a filesystem of that size.
            fs_bytes = min(fs_bytes, cfg.disk_quota_bytes)
        self._reserve_size = min(cfg.reserve_bytes, max(16 * page, fs_bytes // 16 // page * page))
        self._checkpoint_pages = max(16, min(cfg.checkpoint_pages, fs_bytes // page // 16))
        self._wal_limit = max(16 * page, min(cfg.wal_limit_bytes, fs_bytes // 8))
        # Appends keep this much free beyond what they write (room for the reserve if it is missing, and for
        # a trim's WAL frames), so acknowledged entries can always be deleted and cursors committed.
        # A checkpoint grows the file by up to what the WAL holds: one interval, or (folded back in the
        # background) up to the WAL's limit.
        pending = self._wal_limit if cfg.background_checkpoint else self._checkpoint_pages * page
        self._slack = 8 * page + pending
        self._floor = self._reserve_size + self._slack
        # A new file's page size: large pages on a small filesystem would make every floor above coarse.
        new_page = cfg.page_size
        while new_page > page and fs_bytes < 4096 * new_page:
            new_page //= 2
        self._new_page_size = new_page
        # With a disk quota: appends that may be split go in pieces of this many tracked bytes (half a
        # checkpoint interval), and the WAL's share of the quota is its size limit or a checkpoint interval
        # plus one such piece, whichever is larger.
        self._piece_bytes = self._checkpoint_pages * page // 2
        self._wal_share = max(self._wal_limit, self._checkpoint_pages * page + 2 * self._piece_bytes)
        self._disk_ratio = _PRIOR_RATIO  # database bytes per tracked byte, measured after commits

    def _setup(self, *, torn: bool = False) -> None:
        db = self._db
        # page_size and auto_vacuum must be chosen before the first table exists (page_size first: auto_vacuum
        # fixes the layout); on an existing file both are no-ops.
        db.execute(f"PRAGMA page_size = {int(self._new_page_size)}")
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            raise LogError(f"log {self.path}: cannot switch to WAL mode (got {mode!r})", path=str(self.path))
        db.execute(f"PRAGMA synchronous = {self.config.synchronous.upper()}")
        # Debian builds SQLite with SECURE_DELETE, which zeroes every freed page through the WAL: deleting a
        # few 64 KiB datagrams then needs hundreds of KiB of free disk, which a full disk does not have. FAST
        # only clears what is rewritten anyway (deleted datagrams stay in free pages until reused).
        db.execute("PRAGMA secure_delete = FAST")
        db.execute(f"PRAGMA journal_size_limit = {int(self._wal_limit)}")
        db.execute(f"PRAGMA cache_size = {-int(self.config.cache_kib)}")  # negative: KiB, not pages
        # checkpoint_pages counts 4 KiB pages; SQLite counts pages of the file's own size
        page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        pages = 0 if self.config.background_checkpoint else max(1, self._checkpoint_pages * 4096 // page_size)
        db.execute(f"PRAGMA wal_autocheckpoint = {pages}")
        if self.config.check_on_open:
            rows = db.execute("PRAGMA quick_check").fetchall()
            if [tuple(r) for r in rows] != [("ok",)]:
                detail = "; ".join(str(r[0]) for r in rows[:3])
                raise LogCorrupt(f"log {self.path} failed its integrity check: {detail}", path=str(self.path))
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and "meta" not in tables:
            raise LogCorrupt(
                f"{self.path} is a SQLite database but not a flowtunnel log "
                f"(tables: {', '.join(sorted(tables))})",
                path=str(self.path),
            )
        db.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            version = meta.get("schema_version")
            if version is None:
                if db.execute("SELECT 1 FROM entries LIMIT 1").fetchone() is not None:
                    raise LogCorrupt(f"log {self.path} has entries but no bookkeeping", path=str(self.path))
                meta = {"schema_version": _SCHEMA_VERSION, "next_seq": 1, "bytes": 0, "entries": 0,
                        "dropped_oldest": 0, "refused": 0}
                db.executemany(_UPSERT_META, list(meta.items()))
            elif version == 1:
                # 1 → 2: the appender's clock per entry; entries of a version 1 log have none (NULL).
                columns = {r[1] for r in db.execute("PRAGMA table_info(entries)")}
                if "appended_ns" not in columns:
                    db.execute("ALTER TABLE entries ADD COLUMN appended_ns INTEGER")
                db.execute(_UPSERT_META, ("schema_version", _SCHEMA_VERSION))
            elif version != _SCHEMA_VERSION:
                raise LogError(
                    f"log {self.path} has schema version {version}, this flowtunnel reads {_SCHEMA_VERSION}",
                    path=str(self.path),
                )
            if torn:
                db.execute(_UPSERT_META, ("torn_tails", int(meta.get("torn_tails", 0)) + 1))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._load_meta()
        self._page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        self._make_reserve()
        if self.config.disk_quota_bytes:
            self._size_to_disk_quota()

    def _size_to_disk_quota(self) -> None:
        """What the database file may take of the disk quota, once the reserve, the WAL and its index have
        their share, and the pages an empty log needs (one per b-tree, plus the header)."""
        page = self._page_size
        frames = self._wal_share // page + 1
        shm = _SHM_BYTES * -(-frames // _SHM_FRAMES)
        self._db_budget = self.config.disk_quota_bytes - self._reserve_size - self._wal_share - shm - 2 * page
        roots = int(self._db.execute("SELECT count(*) FROM sqlite_master WHERE rootpage > 0").fetchone()[0])
        self._fixed_pages = roots + 1
        if self._db_budget < (self._fixed_pages + 16) * page:
            raise LogError(
                f"log {self.path}: disk quota of {self.config.disk_quota_bytes} bytes leaves "
                f"{self._db_budget} for the database after the reserve ({self._reserve_size}), WAL "
                f"({self._wal_share}) and WAL index ({shm}); it needs {(self._fixed_pages + 16) * page}",
                path=str(self.path),
            )
        self._measure_disk_ratio()

    def _measure_disk_ratio(self) -> None:
        """Database bytes per tracked byte as the pages in use say (a few PRAGMAs: cheap next to a commit)."""
        page = self._page_size
        count = int(self._db.execute("PRAGMA page_count").fetchone()[0])
        free = int(self._db.execute("PRAGMA freelist_count").fetchone()[0])
        used = (count - free - self._fixed_pages) * page
        if self._bytes >= 16 * page and used > 0:
            # A little over what was measured: the next commit may add pages of a new interior level. It only
            # rises (until the log is emptied): the room it leaves must not grow by itself, or REFUSE_NEW
            # would store datagrams after refusing earlier ones, with no trim in between.
            self._disk_ratio = max(self._disk_ratio, min(8.0, max(0.5, used / self._bytes * 1.02)))
        elif not self._entries:
            self._disk_ratio = _PRIOR_RATIO

    def _quota(self) -> int:
        """The tracked bytes the log may hold: ``quota_bytes`` and the disk quota's share for the database,
        whichever is smaller (0: unbounded)."""
        quota = self.config.quota_bytes
        if not self.config.disk_quota_bytes:
            return quota
        room = self._db_budget - self._fixed_pages * self._page_size
        disk = max(1, int(room / self._disk_ratio))
        return min(quota, disk) if quota else disk

    def _after_commit(self, nbytes: int) -> None:
        """After a commit of ``nbytes`` tracked bytes (0: a trim): tell the checkpoint thread; with a disk
        quota, measure the page ratio; and fold the WAL back into the database (truncating it) when it
        outgrew its limit, which only a disk quota or the background checkpoint leave to this."""
        ckpt = self._checkpointer
        if ckpt is not None:
            ckpt.note(nbytes)
            if ckpt.restart_wanted:
                self._restart_wal()
        elif not self.config.disk_quota_bytes:
            return  # wal_autocheckpoint and journal_size_limit keep the WAL
        if self.config.disk_quota_bytes:
            with suppress(sqlite3.Error):
                self._measure_disk_ratio()
        try:
            wal = os.stat(f"{self.path}-wal").st_size
        except OSError:
            return
        if wal > self._wal_limit:
            self._checkpoint()

    def disk_bytes(self) -> int:
        """What every file of the log takes on disk now (database, WAL, WAL index, reserve)."""
        total = 0
        for suffix in ("", "-wal", "-shm", ".reserve"):
            with suppress(OSError):
                total += os.stat(f"{self.path}{suffix}").st_blocks * 512
        return total

    def _load_meta(self) -> None:
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        self._next_seq = int(meta["next_seq"])
        self._bytes = int(meta["bytes"])
        self._entries = int(meta["entries"])
        self._dropped_oldest = int(meta["dropped_oldest"])
        self._refused = int(meta["refused"])
        self._torn_tails = int(meta.get("torn_tails", 0))

    def close(self) -> None:
        """Close the connection (idempotent). Later calls raise ``LogError``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._checkpointer is not None:
                self._checkpointer.close()  # first: the last connection to close folds the WAL back
            try:
                self._db.close()
            except sqlite3.Error as exc:
                logger.warning("closing log %s: %s", self.path, exc)

    def __enter__(self) -> DurableLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"DurableLog({str(self.path)!r}, next_seq={getattr(self, '_next_seq', '?')}, "
                f"entries={getattr(self, '_entries', '?')})")

    # -- writing ---------------------------------------------------------------------------------------------

    def append(
        self,
        datagrams: Sequence[Datagram],
        *,
        stream: str = "",
        stream_seqs: Sequence[int] | None = None,
        state: Mapping[str, int] | None = None,
        atomic: bool = False,
        appended_ns: int | None = None,
    ) -> AppendResult:
        """Append ``datagrams`` in order and apply ``state`` updates, all in one transaction.

        ``appended_ns`` (the caller's wall clock, Unix ns) is stored with every entry of this call and read
        back as ``Entry.appended_ns``: the gateway's receive time, which its sinks act on.

        ``stream_seqs`` (same length) records each datagram's number in its stream (the journal stores the
        agent's seq there). With the quota reached, FULL_POLICY applies: DROP_OLDEST deletes the oldest
        entries (and, if this group alone exceeds the quota, its own first datagrams, which still consume
        sequence numbers so the gap is visible downstream); REFUSE_NEW stores the prefix that fits and refuses
        the rest, or with ``atomic=True`` stores nothing and raises ``QuotaFull`` (no counter changes).
        ``state`` is applied whatever the policy did; use ``atomic=True`` when it depends on every entry.
        """
        if stream_seqs is not None and len(stream_seqs) != len(datagrams):
            raise ValueError(f"stream_seqs has {len(stream_seqs)} items for {len(datagrams)} datagrams")
        costs = entry_costs(datagrams, stream)
        if (self.config.disk_quota_bytes and not atomic and not state
                and sum(costs) > self._piece_bytes and len(datagrams) > 1):
            return self._append_in_pieces(datagrams, costs, stream, stream_seqs, appended_ns)
        with self._lock:
            self._check_open()
            try:
                with self._translate("append"):
                    disk_need = self._disk_deficit(sum(costs))
                    if disk_need and self.config.full_policy is FullPolicy.REFUSE_NEW:
                        raise LogFull(
                            f"log {self.path}: disk full: {len(datagrams)} entries of {sum(costs)} "
                            f"bytes would leave less than the {self._floor} bytes kept free for trims and "
                            "cursor commits; nothing was written",
                            path=str(self.path),
                        )
                    return self._append_locked(datagrams, costs, stream, stream_seqs, state, atomic,
                                               disk_need=disk_need, appended_ns=appended_ns)
            except LogFull as exc:
                if (isinstance(exc, QuotaFull) or self.config.full_policy is not FullPolicy.DROP_OLDEST
                        or not self._entries):
                    raise
                # The disk filled anyway (the estimate of what SQLite writes was short): the policy still
                # says the newest data wins. Drop the oldest entries (counted) worth twice this group plus
                # the floor, restore the reserve (the next full disk needs it), then try once more.
                self._enter_disk_full(None)
                dropped = self._drop_oldest_when_full(2 * sum(costs) + self._floor)
                self._make_reserve()
                logger.debug("log %s: disk full before the quota; dropped the %d oldest entries",
                             self.path, dropped)
                with self._translate("append"):
                    res = self._append_locked(datagrams, costs, stream, stream_seqs, state, atomic,
                                              appended_ns=appended_ns)
                return AppendResult(first_seq=res.first_seq, last_seq=res.last_seq, appended=res.appended,
                                    dropped=res.dropped + dropped, refused=res.refused)

    def room(self) -> int | None:
        """Tracked bytes the quota leaves for new entries now (None: unbounded). A snapshot read without the
        log's lock (a commit in another thread may be changing it): a hint, appends check again."""
        quota = self._quota()
        return max(0, quota - self._bytes) if quota else None

    def append_group(self, parts: Sequence[GroupPart]) -> list[AppendResult | LogError]:
        """Append several parts, each all or nothing, in one transaction: one commit (one fsync with
        ``synchronous=full``) for all of them. The gateway's group commit: batches of different agents
        waiting for the journal at the same time become durable together.

        Each part is what ``append(part.datagrams, ..., atomic=True)`` would store, with consecutive seqs in
        the order of ``parts``; the result holds, in that order, each part's ``AppendResult``, or the error
        that refused it with nothing of it written: ``QuotaFull`` when it does not fit in what the quota
        leaves after the parts before it (the others are still committed).

        Error handling: an error of the transaction itself (I/O, full disk, corrupt file) raises, and nothing
        of any part is written. Under DROP_OLDEST, or with the disk (nearly) full, the parts are appended
        one by one instead (one commit each, ``append``'s rules), each part's ``LogError`` in its place.
        """
        for part in parts:
            if part.stream_seqs is not None and len(part.stream_seqs) != len(part.datagrams):
                raise ValueError(
                    f"stream_seqs has {len(part.stream_seqs)} items for {len(part.datagrams)} datagrams"
                )
        costs = [entry_costs(part.datagrams, part.stream) for part in parts]
        one_by_one = self.config.full_policy is not FullPolicy.REFUSE_NEW
        if not one_by_one:
            with self._lock:
                self._check_open()
                with self._translate("append"):
                    one_by_one = bool(self._disk_deficit(sum(map(sum, costs))))
                    if not one_by_one:
                        return self._append_group_locked(parts, costs)
        out: list[AppendResult | LogError] = []
        for part in parts:
            try:
                out.append(self.append(
                    part.datagrams, stream=part.stream, stream_seqs=part.stream_seqs, state=part.state,
                    atomic=True, appended_ns=part.appended_ns,
                ))
            except LogError as exc:
                out.append(exc)
        return out

    def _append_group_locked(
        self, parts: Sequence[GroupPart], costs: list[list[int]]
    ) -> list[AppendResult | LogError]:
        quota = self._quota()
        room = quota - self._bytes if quota else None
        out: list[AppendResult | LogError | None] = []
        taken: list[tuple[int, GroupPart, int]] = []  # (index in out, part, its cost)
        for part, part_costs in zip(parts, costs, strict=True):
            cost = sum(part_costs)
            if room is not None and cost > room:
                out.append(QuotaFull(
                    f"log {self.path}: {len(part.datagrams)} entries of {cost} bytes do not fit in the quota "
                    f"({quota - room} of {quota} bytes used or taken by this commit, policy refuse-new)",
                    path=str(self.path),
                ))
                continue
            if room is not None:
                room -= cost
            taken.append((len(out), part, cost))
            out.append(None)
        if taken:
            db = self._db
            first = seq = self._next_seq
            stored = entries = 0
            state: dict[str, int] = {}
            db.execute("BEGIN IMMEDIATE")
            try:
                for index, part, cost in taken:
                    n = len(part.datagrams)
                    if n:
                        db.executemany(_INSERT, self._rows(
                            part.datagrams, 0, n, seq, part.stream, part.stream_seqs, part.appended_ns
                        ))
                    out[index] = AppendResult(first_seq=seq, last_seq=seq + n - 1, appended=n, dropped=0,
                                              refused=0)
                    seq += n
                    stored += cost
                    entries += n
                    if part.state:
                        state.update(part.state)
                bytes_now = self._bytes + stored
                entries_now = self._entries + entries
                _commit_counters(db, ["next_seq", seq, "bytes", bytes_now, "entries", entries_now], state)
            except BaseException:
                self._rollback()
                raise
            self._commits += 1
            self._next_seq, self._bytes, self._entries = seq, bytes_now, entries_now
            self._after_commit(stored)
            logger.debug("log %s: one commit of %d parts (%d entries from seq %d)", self.path, len(taken),
                         entries, first)
        return [r for r in out if r is not None]

    def _append_in_pieces(
        self, datagrams: Sequence[Datagram], costs: list[int], stream: str,
        stream_seqs: Sequence[int] | None, appended_ns: int | None,
    ) -> AppendResult:
        """A large non-atomic append under a disk quota: one commit per piece of at most ``_piece_bytes``, so
        that no commit grows the WAL beyond its share. The result is the one a single commit would give: the
        pieces' seqs are consecutive, and once a piece is refused (REFUSE_NEW) or fails for a full disk, the
        rest of the group is refused too (counted), so what is stored stays a prefix."""
        first_seq: int | None = None
        last_seq = appended = dropped = refused = 0
        start = 0
        n = len(datagrams)
        while start < n:
            stop, size = start, 0
            while stop < n and (stop == start or size + costs[stop] <= self._piece_bytes):
                size += costs[stop]
                stop += 1
            if refused:
                self._count_refused(n - start)
                refused += n - start
                break
            try:
                res = self.append(
                    datagrams[start:stop], stream=stream, appended_ns=appended_ns,
                    stream_seqs=None if stream_seqs is None else stream_seqs[start:stop],
                )
            except LogFull:
                if first_seq is None:
                    raise  # nothing written: as a single commit would have
                self._count_refused(n - start)
                refused += n - start
                break
            if first_seq is None:
                first_seq = res.first_seq
            if res.last_seq >= res.first_seq:
                last_seq = res.last_seq
            appended += res.appended
            dropped += res.dropped
            refused += res.refused
            start = stop
        assert first_seq is not None
        return AppendResult(first_seq=first_seq, last_seq=max(last_seq, first_seq - 1), appended=appended,
                            dropped=dropped, refused=refused)

    def _count_refused(self, n: int) -> None:
        """Count ``n`` datagrams refused without trying to store them (the tail of a group in pieces)."""
        with self._lock:
            self._check_open()
            total = self._refused + n
            self._small_write("append", lambda: self._db.execute(_UPSERT_META, ("refused", total)))
            self._refused = total

    def _append_locked(
        self,
        datagrams: Sequence[Datagram],
        costs: list[int],
        stream: str,
        stream_seqs: Sequence[int] | None,
        state: Mapping[str, int] | None,
        atomic: bool,
        *,
        disk_need: int = 0,
        appended_ns: int | None = None,
    ) -> AppendResult:
        quota = self._quota()
        n = len(datagrams)
        skip = 0  # leading datagrams of this group dropped at once (they consume seqs)
        keep = n  # datagrams [skip:keep] get stored
        free_needed = 0
        if quota:
            if self.config.full_policy is FullPolicy.REFUSE_NEW:
                room = quota - self._bytes
                total = 0
                for i, c in enumerate(costs):
                    if total + c > room:
                        keep = i
                        break
                    total += c
                if keep < n and atomic:
                    raise QuotaFull(
                        f"log {self.path}: {n} entries of {sum(costs)} bytes do not fit in the quota "
                        f"({self._bytes} of {quota} bytes used, policy refuse-new)",
                        path=str(self.path),
                    )
            else:
                total = sum(costs)
                while skip < n and total > quota:
                    total -= costs[skip]
                    skip += 1
                free_needed = self._bytes + total - quota
        # DROP_OLDEST with the disk nearly full: deleted rows' pages are reused by this very transaction.
        free_needed = max(free_needed, disk_need)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            dropped_old, freed = self._drop_oldest(free_needed) if free_needed > 0 else (0, 0)
            first = self._next_seq
            stored_first = first + skip
            if keep > skip:
                rows = self._rows(datagrams, skip, keep, stored_first, stream, stream_seqs, appended_ns)
                db.executemany(_INSERT, rows)
            stored_bytes = sum(costs[skip:keep])
            consumed = keep  # refused datagrams (the tail) take no seq
            next_seq = first + consumed
            bytes_now = self._bytes - freed + stored_bytes
            entries_now = self._entries - dropped_old + (keep - skip)
            dropped_total = self._dropped_oldest + dropped_old + skip
            refused_total = self._refused + (n - keep)
            # one statement for the counters that changed (drops and refusals are rare)
            meta: list[object] = ["next_seq", next_seq, "bytes", bytes_now, "entries", entries_now]
            if dropped_total != self._dropped_oldest:
                meta += ["dropped_oldest", dropped_total]
            if refused_total != self._refused:
                meta += ["refused", refused_total]
            _commit_counters(db, meta, state)
        except BaseException:
            self._rollback()
            raise
        self._commits += 1
        self._next_seq, self._bytes, self._entries = next_seq, bytes_now, entries_now
        self._dropped_oldest, self._refused = dropped_total, refused_total
        if dropped_old:
            with suppress(sqlite3.Error):  # the append is committed; reclaiming space may wait
                self._maybe_vacuum()
        self._after_commit(stored_bytes)
        return AppendResult(
            first_seq=first, last_seq=first + consumed - 1, appended=keep - skip,
            dropped=dropped_old + skip, refused=n - keep,
        )

    @staticmethod
    def _rows(
        datagrams: Sequence[Datagram], start: int, stop: int, first_seq: int, stream: str,
        stream_seqs: Sequence[int] | None, appended_ns: int | None,
    ) -> Iterator[tuple[object, ...]]:
        """The INSERT parameters of ``datagrams[start:stop]``, assembled by C iterators: no Python frame per
        row (this runs for every datagram the gateway journals and the agent spools)."""
        part = datagrams[start:stop]
        return zip(
            range(first_seq, first_seq + stop - start),
            repeat(stream),
            repeat(None) if stream_seqs is None else map(int, stream_seqs[start:stop]),
            map(_GET_TIME, part), map(_GET_EXPORTER, part), map(_GET_EXPORTER_PORT, part),
            map(_GET_LOCAL_PORT, part), map(_GET_PAYLOAD, part), repeat(appended_ns),
        )

    def _drop_oldest(self, need: int) -> tuple[int, int]:
        """Delete the oldest entries until at least ``need`` bytes are freed (inside a transaction)."""
        freed = count = 0
        upto = 0
        while freed < need:
            rows = self._db.execute(
                f"SELECT seq, {_COST_SQL} FROM entries WHERE seq > ? ORDER BY seq LIMIT 1024", (upto,)
            ).fetchall()
            if not rows:
                break
            for seq, cost in rows:
                upto = seq
                freed += int(cost)
                count += 1
                if freed >= need:
                    break
        if count:
            self._db.execute("DELETE FROM entries WHERE seq <= ?", (upto,))
        return count, freed

    def advance_seq(self, next_seq: int) -> int:
        """Make the next appended seq at least ``next_seq`` (never lowers it). Returns the next seq.

        The agent calls this after learning the gateway's acknowledged seq, so a lost or restored spool never
        hands out numbers the gateway has already seen.
        """
        with self._lock, self._translate("advance_seq"):
            self._check_open()
            if next_seq > self._next_seq:
                self._db.execute(_UPSERT_META, ("next_seq", int(next_seq)))
                self._next_seq = int(next_seq)
            return self._next_seq

    def renumber(self, next_seq: int) -> int:
        """Move every stored entry to new seqs starting at ``next_seq`` (or above every seq handed out, if
        that is higher), keeping their order and spacing; later appends continue above them. Returns how many
        entries moved (0 on an empty log, which then only has its next seq advanced).

        One transaction: a crash leaves either every entry at its old seq or every entry at its new one. The
        agent uses it when the gateway already holds seqs beyond a brand-new spool of the same agent id. It
        rewrites every stored row, so the WAL grows by about the log's size; on a full disk it raises
        ``LogFull`` with nothing changed.
        """
        with self._lock, self._translate("renumber"):
            self._check_open()
            row = self._db.execute("SELECT min(seq), count(*) FROM entries").fetchone()
            first = None if row is None or row[0] is None else int(row[0])
            if first is None:
                if next_seq > self._next_seq:
                    self._db.execute(_UPSERT_META, ("next_seq", int(next_seq)))
                    self._next_seq = int(next_seq)
                return 0
            # Every new seq is at least the old next seq, hence above every old one: the UPDATE, which SQLite
            # applies row by row, never collides with a row not yet moved.
            offset = max(int(next_seq), self._next_seq) - first
            new_next = self._next_seq + offset
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("UPDATE entries SET seq = seq + ?", (offset,))
                db.execute(_UPSERT_META, ("next_seq", new_next))
                db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            self._next_seq = new_next
            return int(row[1])

    def trim(self, upto: int, *, cursor: str | None = None) -> int:
        """Delete entries with ``seq <= upto``; returns how many. Space is reclaimed incrementally.

        ``cursor``: commit that cursor at ``upto`` first (``commit_cursor``), in the trim's own transaction
        when there is room: one commit (one fsync) instead of two; the agent's uploader does this per batch.

        Deleting needs a little free disk (SQLite writes the change to the WAL first). When the disk is
        (nearly) full, trim deletes in small steps, folding the WAL back after each, and if a step still finds
        no room it releases the reserve file and retries, so a consumer can always make room; then it gives
        the freed pages back to the filesystem and re-creates the reserve.
        """
        with self._lock:
            self._check_open()
            if self._disk_full or self._low_on_space():
                if cursor is not None:
                    self._commit_cursor_locked(cursor, upto)
                count = self._trim_in_steps(upto)
            else:
                try:
                    with self._translate("trim"):
                        count = self._trim_tx(upto, cursor=cursor)
                except LogFull:
                    self._enter_disk_full(None)
                    if cursor is not None:
                        self._commit_cursor_locked(cursor, upto)
                    count = self._trim_in_steps(upto)
                if count:
                    with suppress(sqlite3.Error):  # reclaiming space is an optimisation; never fail the trim
                        self._maybe_vacuum()
            self._make_reserve()
            if count:
                self._after_commit(0)
            return count

    def _drop_oldest_when_full(self, need: int) -> int:
        """DROP_OLDEST on a full disk: trim the oldest entries worth ``need`` bytes, counting them."""
        upto = 0
        freed = 0
        for seq, cost in self._db.execute(f"SELECT seq, {_COST_SQL} FROM entries ORDER BY seq"):
            upto = int(seq)
            freed += int(cost)
            if freed >= need:
                break
        return self._trim_in_steps(upto, dropped=True) if upto else 0

    def _trim_in_steps(self, upto: int, *, dropped: bool = False) -> int:
        """Trim on a (nearly) full disk: delete 16 entries per transaction, folding the WAL back into the file
        after each one so that it never needs more than a few free pages (one big DELETE would write every
        freed page's bookkeeping to the WAL at once), then return the freed pages to the filesystem."""
        count = 0
        while True:
            self._checkpoint()
            with self._translate("trim"):
                row = self._db.execute(
                    "SELECT seq FROM entries WHERE seq <= ? ORDER BY seq LIMIT 1 OFFSET 15", (upto,)
                ).fetchone()
            step = upto if row is None else int(row[0])
            count += self._with_reserve("trim", functools.partial(self._trim_tx, step, dropped=dropped))
            if step >= upto:
                break
        self._checkpoint()
        self._shrink()
        return count

    def _restart_wal(self) -> None:
        """After a background pass: fold back what was committed during it and make the next commit write the
        WAL from its beginning (a RESTART checkpoint; the pass did the bulk of the copy and the sync). Not
        while a pass runs, and without waiting for readers (busy: next time)."""
        ckpt = self._checkpointer
        if ckpt is None or not self._ckpt_lock.acquire(blocking=False):
            return
        try:
            ckpt.restart_wanted = False
            self._db.execute("PRAGMA busy_timeout = 0")
            try:
                busy = self._db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()[0][0]
            finally:
                self._db.execute(f"PRAGMA busy_timeout = {int(self.config.busy_timeout * 1000)}")
            if busy:
                ckpt.restart_wanted = True
        except sqlite3.Error as exc:
            logger.debug("log %s: restarting the write-ahead log failed: %s", self.path, exc)
        finally:
            self._ckpt_lock.release()

    def _checkpoint(self) -> None:
        """Fold the WAL into the database and truncate it (best effort: it may lack room, or be busy). After
        the checkpoint thread's pass in progress, if any (the WAL would be busy)."""
        with self._ckpt_lock, suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _shrink(self) -> None:
        """Give free pages back to the filesystem a few at a time, folding the WAL after each batch: moving
        pages writes them to the WAL first, so on a full disk a large batch would need the room it frees."""
        page = self._page_size
        for _ in range(1024):
            try:
                before = int(self._db.execute("PRAGMA freelist_count").fetchone()[0])
                if not before:
                    return
                room = (self._free_bytes() or 0) // page
                n = max(1, min(256, room // 4, before))
                self._db.executescript(f"PRAGMA incremental_vacuum({n});")
            except sqlite3.Error:
                return
            self._checkpoint()
            with suppress(sqlite3.Error):
                if int(self._db.execute("PRAGMA freelist_count").fetchone()[0]) >= before:
                    return

    def _with_reserve(self, op: str, write: Callable[[], _T]) -> _T:
        """Run a small write transaction; on a full disk, release the reserve file (its purpose), fold the
        WAL back and retry once. The caller re-creates the reserve once done."""
        try:
            with self._translate(op):
                return write()
        except LogFull:
            if not self._release_reserve():
                raise
            self._enter_disk_full(None)
            logger.debug("log %s: disk full during %s; released the reserve file", self.path, op)
        self._checkpoint()
        with self._translate(op):
            return write()

    def _low_on_space(self) -> bool:
        free = self._free_bytes()
        return free is not None and free < 2 * self._floor

    def _trim_tx(self, upto: int, *, dropped: bool = False, cursor: str | None = None) -> int:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if cursor is not None:
                db.execute(_UPSERT_CURSOR, (cursor, int(upto)))
            count, freed = db.execute(
                f"SELECT count(*), coalesce(sum({_COST_SQL}), 0) FROM entries WHERE seq <= ?", (upto,)
            ).fetchone()
            if count:
                db.execute("DELETE FROM entries WHERE seq <= ?", (upto,))
                updates = [("bytes", self._bytes - freed), ("entries", self._entries - count)]
                if dropped:
                    updates.append(("dropped_oldest", self._dropped_oldest + count))
                db.executemany(_UPSERT_META, updates)
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._bytes -= int(freed)
        self._entries -= int(count)
        if dropped:
            self._dropped_oldest += int(count)
        return int(count)

    def _make_reserve(self) -> None:
        """Create the reserve file if missing (best effort: on a full disk it stays missing)."""
        size = self._reserve_size
        if not size or self._reserve_path.exists():
            return
        try:
            fd = os.open(self._reserve_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        except OSError as exc:
            with suppress(OSError):
                self._reserve_path.unlink()
            logger.debug("log %s: cannot create the %d-byte reserve file: %s", self.path, size, exc)
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                # The filesystem cannot allocate ahead: appends keep the reserve's size free instead.
                self._reserve_size = 0

    def _release_reserve(self) -> bool:
        try:
            self._reserve_path.unlink()
        except OSError:
            return False
        return True

    def _small_write(self, op: str, write: Callable[[], object]) -> None:
        """A one-statement write (cursor commit, state update: a page or two), paid for by the reserve file
        when the disk is full; the reserve is re-created as soon as there is room (appends keep it free)."""
        try:
            self._with_reserve(op, write)
        finally:
            if not self._reserve_path.exists():
                self._make_reserve()
        if self._checkpointer is not None:
            self._checkpointer.note(0)

    def _free_bytes(self) -> int | None:
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def _disk_deficit(self, cost: int) -> int:
        """Bytes of old entries to drop before appending ``cost`` bytes (0: it fits above the floor).

        The estimate is deliberately generous: SQLite writes each page to the WAL first and to the database
        at the next checkpoint, so a group needs about twice its size until the WAL is reused. Free pages in
        the database count as room. Entering and leaving a disk-full episode is logged once each.
        """
        reserved = self._reserve_path.exists()
        if self._reserve_size and not reserved:
            self._make_reserve()  # released by a trim on a full disk: take it back before anything else
            reserved = self._reserve_path.exists()
        free = self._free_bytes()
        if free is None:
            return 0
        if free < 2 * self._floor + 2 * cost:
            # Close to the floor: fold the WAL into the file now, so that what the next checkpoint would add
            # to the file is on the disk already and the free space measured is what is really left.
            self._checkpoint()
            free = self._free_bytes() or 0
            reserved = self._reserve_path.exists()
        floor = self._slack if reserved else self._floor
        need = 2 * cost + 4 * self._page_size
        if not self._disk_full and free - floor >= need:
            return 0  # room without counting free pages: spare the query (this runs before every append)
        freelist = int(self._db.execute("PRAGMA freelist_count").fetchone()[0]) * self._page_size
        room = free + freelist - floor
        if need > room:
            self._enter_disk_full(free)
            return need - room
        if self._disk_full and room >= need + 2 * self._floor:
            self._disk_full = False
            logger.info("log %s: disk has room again (%d bytes free)", self.path, free)
        return 0

    def _enter_disk_full(self, free: int | None) -> None:
        if self._disk_full:
            return
        self._disk_full = True
        if free is None:
            free = self._free_bytes() or 0
        action = ("dropping the oldest entries" if self.config.full_policy is FullPolicy.DROP_OLDEST
                  else "refusing new entries")
        logger.warning(
            "log %s: disk full (%d bytes free; %d kept for trims and cursor commits): %s until there is "
            "room (logged once until it clears)", self.path, free, self._floor, action,
        )

    def _maybe_vacuum(self) -> None:
        # Free pages are reused by the next appends, so returning them to the filesystem after every trim
        # would only shrink and regrow the file: do it once they exceed the threshold or 1/8 of the quota.
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        threshold = self.config.vacuum_threshold_pages
        quota = self._quota()
        if quota:
            threshold = max(1, min(threshold, quota // (8 * self._page_size)))
        if free >= threshold:
            # execute() steps this pragma once (one page); executescript() runs it to completion.
            self._db.executescript("PRAGMA incremental_vacuum;")

    def commit_cursor(self, name: str, seq: int) -> None:
        """Durably record that consumer ``name`` has processed every entry up to ``seq``."""
        with self._lock:
            self._check_open()
            self._commit_cursor_locked(name, seq)

    def _commit_cursor_locked(self, name: str, seq: int) -> None:
        self._small_write("commit_cursor", lambda: self._db.execute(_UPSERT_CURSOR, (name, int(seq))))

    def set_state(self, key: str, value: int) -> None:
        """Durably set an integer state value (e.g. the gateway's ``hwm:<agent>``)."""
        with self._lock:
            self._check_open()
            self._small_write("set_state", lambda: self._db.execute(_UPSERT_STATE, (key, int(value))))

    def delete_state(self, key: str) -> None:
        """Remove a state key (no error if absent)."""
        with self._lock:
            self._check_open()
            self._small_write("delete_state", lambda: self._db.execute(_DELETE_STATE, (key,)))

    # -- reading ---------------------------------------------------------------------------------------------

    def read(self, after: int = 0, limit: int = 1000, max_bytes: int = 4 << 20) -> list[Entry]:
        """Entries with ``seq > after`` in order: at most ``limit``, and no more payload than ``max_bytes``
        (but always at least one entry when one exists, however large)."""
        if limit < 1:
            raise ValueError(f"read limit {limit} must be >= 1")
        out: list[Entry] = []
        with self._lock, self._translate("read"):
            self._check_open()
            total = 0
            add = out.append
            rows = self._db.execute(_SELECT, (int(after), int(limit)))
            for seq, stream, stream_seq, received_ns, exporter, exp_port, local_port, payload, added in rows:
                total += len(payload)
                if out and total > max_bytes:
                    break
                # Entry(seq, stream, stream_seq, Datagram(...)) without the frozen dataclasses' __init__
                d = make_datagram(received_ns, exporter, exp_port, local_port, payload)
                e = _new(Entry)
                _SET_SEQ(e, seq)
                _SET_STREAM(e, stream)
                _SET_STREAM_SEQ(e, stream_seq)
                _SET_DATAGRAM(e, d)
                _SET_APPENDED(e, added)
                add(e)
        return out

    def last_seq(self) -> int:
        """The last seq handed out (0 before the first append), even if that entry was trimmed or dropped."""
        with self._lock:
            return self._next_seq - 1

    def cursor(self, name: str) -> int:
        """The seq consumer ``name`` last committed (0 if it never did)."""
        with self._lock, self._translate("cursor"):
            self._check_open()
            row = self._db.execute("SELECT seq FROM cursors WHERE name = ?", (name,)).fetchone()
            return 0 if row is None else int(row[0])

    def cursors(self) -> dict[str, int]:
        """Every committed cursor by name."""
        with self._lock, self._translate("cursors"):
            self._check_open()
            return {str(k): int(v) for k, v in self._db.execute("SELECT name, seq FROM cursors")}

    def get_state(self, key: str) -> int | None:
        """A state value, or None when unset."""
        with self._lock, self._translate("get_state"):
            self._check_open()
            row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
            return None if row is None else int(row[0])

    def states(self, prefix: str = "") -> dict[str, int]:
        """Every state key starting with ``prefix`` (e.g. ``"hwm:"``) and its value."""
        with self._lock, self._translate("states"):
            self._check_open()
            rows = self._db.execute(
                "SELECT key, value FROM state WHERE substr(key, 1, ?) = ?", (len(prefix), prefix)
            )
            return {str(k): int(v) for k, v in rows}

    def count_after(self, after: int) -> int:
        """How many stored entries have ``seq > after`` (a consumer's backlog)."""
        with self._lock, self._translate("count_after"):
            self._check_open()
            row = self._db.execute("SELECT count(*) FROM entries WHERE seq > ?", (int(after),)).fetchone()
            return int(row[0])

    def stats(self) -> LogStats:
        """Counters: cheap (the size is tracked, not measured) but for ``file_bytes``, which stats files."""
        with self._lock, self._translate("stats"):
            self._check_open()
            row = self._db.execute("SELECT min(seq) FROM entries").fetchone()
            first = self._next_seq if row is None or row[0] is None else int(row[0])
            file_bytes = 0
            for suffix in ("", "-wal"):
                with suppress(OSError):
                    file_bytes += Path(str(self.path) + suffix).stat().st_size
            return LogStats(
                first_seq=first, last_seq=self._next_seq - 1, entries=self._entries, bytes=self._bytes,
                dropped_oldest=self._dropped_oldest, refused=self._refused,
                quota_bytes=self.config.quota_bytes, file_bytes=file_bytes, torn_tails=self._torn_tails,
                disk_full=self._disk_full, disk_bytes=self.disk_bytes(),
                disk_quota_bytes=self.config.disk_quota_bytes, commits=self._commits,
            )

    # -- plumbing --------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise LogError(f"log {self.path} is closed", path=str(self.path))

    def _rollback(self) -> None:
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            logger.warning("log %s: rollback failed: %s", self.path, exc)
        with suppress(sqlite3.Error):
            self._load_meta()

    @contextmanager
    def _translate(self, op: str) -> Iterator[None]:
        """Turn sqlite3 errors into the LogError hierarchy, naming the path and the operation."""
        try:
            yield
        except sqlite3.Error as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            primary = code & 0xFF if isinstance(code, int) else None
            where = str(self.path)
            if primary == _SQLITE_FULL or "disk is full" in str(exc):
                raise LogFull(
                    f"log {where}: disk full during {op} ({exc}); nothing was written", path=where
                ) from None
            text = str(exc)
            corrupt = "malformed" in text or "not a database" in text
            if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or corrupt:
                raise LogCorrupt(f"log {where} is corrupt ({exc}) during {op}", path=where) from None
            if primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
                raise LogLocked(
                    f"log {where} stayed locked by another connection for over {self.config.busy_timeout} s "
                    f"during {op}",
                    path=where,
                ) from None
            raise LogError(f"log {where}: {op} failed: {exc}", path=where) from None
