"""The WAL folded back into a log's database from a thread of its own, between and during commits.

SQLite's ``wal_autocheckpoint`` runs the checkpoint inside the commit that crosses the interval: that commit,
and everybody waiting for it, pays for copying the WAL into the database and syncing it (in the gateway's
fleet: p50 5-37 ms, p99 61-413 ms for those commits against p50 1-12 ms, p99 21-88 ms for the others). A
PASSIVE checkpoint from a second connection takes no writer lock, so commits go on meanwhile; this module
runs one when the WAL holds about a checkpoint interval, or a second after a commit at the latest.

How much WAL the commits wrote is estimated, not read (SQLite says it only to a checkpoint): a commit writes
whole pages, so a small one (a datagram, an agent's mark) writes several 16 KiB pages for a few hundred
bytes. Each pass returns the WAL's frames, from which the WAL written per commit since the last pass is
learnt; the thread is woken once the commits noted since make an interval by that measure or by their
bytes. (Counting their bytes alone, the WAL of the fleet's small commits reached four intervals before a
pass ran.)

What it cannot do alone is restart the WAL: SQLite writes the WAL from its beginning again only when a
transaction begins while every frame is folded back and nobody reads it, and on a busy log a commit is nearly
always under way when a pass ends. So after each pass ``restart_wanted`` is set, and the writer, after its
next commit, folds back the few frames committed during the pass and restarts the WAL itself (``DurableLog``:
a RESTART checkpoint that does not wait for readers; the copy and the sync are then of a few pages, not of
the interval). The writer also keeps a hard bound: a WAL larger than its limit is checkpointed and truncated
by the commit that finds it so, as without this thread. (Measured without the restart step: the WAL
reached its 16 MiB limit 34 times in 75 s of the fleet, each a truncating checkpoint in a commit, p50 13 ms.)

Error handling: a failed pass (busy, full disk, I/O) is logged at debug level and retried at the next
trigger; the writer's bound keeps the WAL's size whatever happens here. Resource handling: one SQLite
connection and one thread, from construction until ``close()``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

__all__ = ["Checkpointer"]

logger = logging.getLogger(__name__)


class Checkpointer:
    """A thread that runs ``PRAGMA wal_checkpoint(PASSIVE)`` on the log at ``path`` from its own connection.

    ``note(nbytes)`` (the writer, after each commit): ``nbytes`` more committed; a pass runs once the
    commits noted since the last pass make ``threshold`` bytes of WAL (estimated, see the module), or
    ``period`` seconds after the first of them.
    ``lock`` is held during each pass: the writer takes it for its own (truncating) checkpoints, which a
    pass in progress would make fail. ``synchronous`` is the writer's setting: a checkpoint syncs the WAL and
    the database as it says.
    """

    def __init__(
        self, path: Path, *, lock: threading.Lock, threshold: int, period: float = 1.0,
        synchronous: str = "full", busy_timeout: float = 5.0,
    ) -> None:
        self.path = path
        self.threshold = threshold
        self.period = period
        self._lock = lock
        self._cond = threading.Condition()
        self._pending = 0  # bytes noted since the last pass
        self._commits = 0  # commits noted since the last pass
        self._since: float | None = None  # monotonic time of the first note since the last pass
        self._stop = False
        #: Passes run.
        self.passes = 0
        #: Set after each pass: the writer's next commit may restart the WAL (and clears it).
        self.restart_wanted = False
        self._db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            self._db.execute("PRAGMA wal_autocheckpoint = 0")  # this connection never writes anyway
            self._page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        except BaseException:
            self._db.close()
            raise
        self._per_commit = 4 * self._page_size  # WAL bytes per commit, learnt from each pass
        self._thread = threading.Thread(target=self._run, name=f"checkpoint {path.name}", daemon=True)
        self._thread.start()

    def note(self, nbytes: int) -> None:
        """``nbytes`` were committed: wake the thread when they make a checkpoint's worth."""
        with self._cond:
            self._pending += nbytes
            self._commits += 1
            if self._since is None:  # the thread sleeps until told: now it has a deadline
                self._since = time.monotonic()
                self._cond.notify()
            elif self._written() >= self.threshold:
                self._cond.notify()

    def _written(self) -> int:
        """WAL bytes the commits noted since the last pass wrote, as far as can be told (under ``_cond``)."""
        return max(self._pending, self._commits * self._per_commit)

    def close(self) -> None:
        """Stop the thread (after its pass in progress, if any) and close the connection. Idempotent."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join()
        try:
            self._db.close()
        except sqlite3.Error as exc:  # pragma: no cover - closing a connection with no statement open
            logger.debug("log %s: closing the checkpoint connection: %s", self.path, exc)

    def _due(self) -> float | None:
        """Seconds to wait before the next pass (0: now), None: nothing committed since the last one."""
        if self._since is None:
            return None
        if self._written() >= self.threshold:
            return 0.0
        return max(0.0, self._since + self.period - time.monotonic())

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (wait := self._due()) != 0.0:
                    self._cond.wait(wait)
                if self._stop:
                    return
                commits = self._commits
                self._pending, self._commits, self._since = 0, 0, None
            done = self._checkpoint_pass()
            if done is not None and commits:
                # The WAL restarted at the first commit after the last pass (the writer's restart step), so
                # its frames now are about what these commits wrote; a new pass's own commits are few.
                per_commit = done[0] * self._page_size // commits
                with self._cond:
                    self._per_commit = max(self._page_size, per_commit)

    def _checkpoint_pass(self) -> tuple[int, int] | None:
        """One PASSIVE checkpoint: the WAL's frames and how many of them are folded back (None: failed)."""
        try:
            with self._lock:
                rows = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            logger.debug("log %s: background checkpoint failed: %s", self.path, exc)
            return None
        self.passes += 1
        self.restart_wanted = True
        _busy, frames, folded = (int(v) for v in rows[0])
        return frames, folded
