"""Process plumbing for long-running commands: logging to stderr, signals, named tasks.

Every daemon runs as ``asyncio.run(main(stop))`` where ``stop`` is set by SIGTERM/SIGINT, so shutdown always
happens in ``finally`` blocks and never by an exception thrown into arbitrary code.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, TypeVar

__all__ = [
    "LOG_FORMATS",
    "JsonFormatter",
    "OnceLogger",
    "TaskSet",
    "cancel_and_wait",
    "finish_then_cancel",
    "limit_malloc_arenas",
    "run_daemon",
    "setup_logging",
    "stderr_is_journal",
    "trim_malloc",
]

T = TypeVar("T")


LOG_FORMATS = ("text", "json")

# syslog priorities journald reads from a "<N>" line prefix (SyslogLevelPrefix=, on by default)
_SYSLOG_PRIORITY = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}


def stderr_is_journal(environ: Mapping[str, str] | None = None) -> bool:
    """True when stderr is connected to systemd's journal: ``JOURNAL_STREAM`` (``DEVICE:INODE``) is set and
    names stderr's file (systemd's advice: a child with redirected stderr inherits the variable)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``{"time", "level", "logger", "message"[, "exception"]}`` for log shippers;
    ``time`` is left out when journald stamps the line itself."""

    def __init__(self, *, timestamps: bool = True) -> None:
        super().__init__()
        self._timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {}
        if self._timestamps:
            doc["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + (
                f".{int(record.msecs):03d}Z")
        doc.update(level=record.levelname, logger=record.name, message=record.getMessage())
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class _JournalTextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"<{_SYSLOG_PRIORITY.get(record.levelname, 6)}>" + super().format(record)


def setup_logging(level: str = "info", fmt: str = "text", *, journal: bool | None = None) -> None:
    """Log lines to stderr.

    ``fmt="text"``: ``2026-11-26T05:15:14Z INFO flowtunnel.agent: message``; ``fmt="json"``: one JSON object
    per line. When stderr is the journal (``journal``; by default detected from ``JOURNAL_STREAM``) lines
    carry no timestamp, journald adds its own, and text lines start with a ``<N>`` syslog priority.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
    if journal is None:
        journal = stderr_is_journal()
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter(timestamps=not journal)
    elif journal:
        formatter = _JournalTextFormatter("%(levelname)s %(name)s: %(message)s")
    else:
        formatter = logging.Formatter("%(asctime)sZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
        formatter.converter = time.gmtime
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


#: glibc's ``mallopt`` parameter number of M_ARENA_MAX (malloc.h)
_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 1) -> bool:
    """Let glibc's malloc keep at most ``arenas`` arenas, as ``MALLOC_ARENA_MAX`` in the environment would;
    True if it took. Call it before threads start.

    glibc gives each thread that allocates its own arena, and memory freed in one is not reused by another:
    the agent's worker threads (spool commits, sealing with zstd contexts of a few MB) each kept their own
    peak, ~2 MB of resident memory for nothing on a box with 128 MB (measured at 1,000 flows/s: 50.5 MB
    peak RSS, 48.3 MB with one arena; issue 14). The threads mostly take turns under the GIL, so sharing an
    arena costs no measurable CPU. An explicit ``MALLOC_ARENA_MAX`` wins; elsewhere than glibc, nothing.
    """
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    import ctypes  # ~0.3 MB, only here

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, arenas))


_malloc_trim: Callable[[int], int] | None = None
_trimmed_at = float("-inf")


def trim_malloc(*, every: float = 1.0) -> bool:
    """Give the free pages of glibc's heap back to the system (``malloc_trim(0)``), at most once per ``every``
    seconds; True if it ran. Call it when a burst of work has freed its buffers (the agent: after each batch).

    Sealing a batch allocates and frees a few MB (record blocks, zstd workspaces, the body); glibc keeps the
    freed pages resident, and the next batch's buffers land partly elsewhere, so the heap's resident pages
    creep up to the sum of many batches' rather than one's: measured at 1,000 flows/s, ~6.5 MB of free
    heap resident and a 1-3 MB higher peak RSS (issue 14). A trim costs ~0.5 ms of CPU with the pages it
    gives back faulted in again by the next batch. Elsewhere than glibc, nothing.
    """
    global _malloc_trim, _trimmed_at
    now = time.monotonic()
    if now - _trimmed_at < every:
        return False
    _trimmed_at = now
    if _malloc_trim is None:
        if not sys.platform.startswith("linux"):
            return False
        import ctypes  # loaded already by limit_malloc_arenas in the agent

        try:
            fn = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not glibc
            _trimmed_at = float("inf")
            return False
        fn.argtypes = [ctypes.c_size_t]
        fn.restype = ctypes.c_int
        _malloc_trim = fn
    _malloc_trim(0)
    return True


class OnceLogger:
    """Logs the first occurrence of each cause at WARNING, later ones only at DEBUG.

    Bad input arrives in floods; the operator needs to hear of each cause once, and the counters for the rest.
    """

    def __init__(self, logger: logging.Logger, *, limit: int = 1024) -> None:
        self._logger = logger
        self._seen: set[str] = set()
        self._limit = limit

    def warning(self, cause: str, msg: str, *args: object) -> None:
        if cause in self._seen:
            self._logger.debug(msg, *args)
            return
        if len(self._seen) < self._limit:
            self._seen.add(cause)
        self._logger.warning("%s (further occurrences of %s are counted, not logged)", msg % args, cause)


class TaskSet:
    """Keeps a reference to each background task (no fire-and-forget) and cancels them all on close."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logging.getLogger("flowtunnel").error(
                "task %s failed", task.get_name(), exc_info=task.exception()
            )

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self, grace: float = 10.0) -> None:
        stuck = await cancel_and_wait(list(self._tasks), grace=grace)
        for task in stuck:
            logging.getLogger("flowtunnel").error(
                "task %s did not stop within %g s of its cancellation; left behind", task.get_name(), grace)


async def finish_then_cancel(fut: asyncio.Future[T]) -> T:
    """``await fut``; if the caller is cancelled meanwhile, wait for ``fut`` to end first (work handed to a
    thread cannot be stopped half-way: a commit finishes, then the cancellation goes on)."""
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait([fut])
        raise


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any]], *, grace: float = 10.0
) -> list[asyncio.Task[Any]]:
    """Cancel ``tasks`` and wait until they end; the tasks still running after ``grace`` s are returned.

    A task can swallow its cancellation: nats-py, for one, catches ``CancelledError`` while it queues a flush,
    and the task then goes on looping (or waits with no timer at all). Such a task is cancelled again every
    0.2 s, and shutdown is never held for good. Each task's exception is retrieved (it was logged, or is
    meaningless once cancelled)."""
    tasks = list(tasks)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(0.2, left))
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()
    return sorted(pending, key=lambda t: t.get_name())


#: The young-generation threshold of a server process after ``settle_gc`` (CPython's default: 700).
SERVER_GC_YOUNG = 10_000


def settle_gc(*, young: int = SERVER_GC_YOUNG) -> None:
    """Once a long-running server has started: freeze what start-up built, and collect the young generation
    less often.

    Why: a full collection walks every object the collector tracks, and it stops the event loop while it
    does. A gateway with 2,000 agents held ~300,000 (its modules, the app, per-agent metrics, 2,000
    connections) and ran a full collection every ~8 s, 150-300 ms of CPU each: every request in flight
    waited for it (bench/fleet.py). Start-up objects live as long as the process, so ``gc.freeze`` takes them
    out of every later collection. Collecting the young generation after ``young`` net allocations instead
    of 700 lets the objects of requests in flight die before a collection sees them, so far fewer are
    promoted to the old generation, whose growth is what triggers the full collections. Not for tests that
    run a gateway in-process (it changes the whole process): the command calls it.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, 1), middle, old)


def run_daemon(main: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run ``main(stop)`` in a fresh event loop; SIGTERM and SIGINT set ``stop``. Returns main's exit code."""

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            return await main(stop)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    return asyncio.run(runner())
