"""Process plumbing for long-running commands: logging to stderr, signals, named tasks.

Every daemon runs as ``asyncio.run(main(stop))`` where ``stop`` is set by SIGTERM/SIGINT, so shutdown always
happens in ``finally`` blocks and never by an exception thrown into arbitrary code.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["OnceLogger", "TaskSet", "run_daemon", "setup_logging"]

T = TypeVar("T")


def setup_logging(level: str = "info") -> None:
    """Log lines to stderr: ``2026-11-26T05:15:14Z INFO flowtunnel.agent: message``."""
    formatter = logging.Formatter("%(asctime)sZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


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

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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
