"""What a gateway sink is, and the loop most sinks share: read from a cursor, act, commit the cursor.

A sink reads the journal from its own cursor and commits it only after its side effect is done, so a crash
repeats at most the batch in flight (at-least-once), never skips one. The store sink commits its cursor inside
DuckDB with the rows instead, which makes it exactly-once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from flowtunnel.journal.notify import JournalNotify

if TYPE_CHECKING:
    from flowtunnel.journal import JournalReader, JournalWaiter
    from flowtunnel.log import Entry

__all__ = ["CursorSink", "JournalNotify", "Sink"]

log = logging.getLogger("flowtunnel.gateway.sinks")


@runtime_checkable
class Sink(Protocol):
    """A consumer of the journal. ``run`` returns only when cancelled; ``status`` is cheap and JSON-able."""

    name: str

    async def run(self, journal: JournalReader, notify: JournalWaiter) -> None: ...

    def status(self) -> dict[str, object]: ...


class CursorSink:
    """Base for sinks whose cursor lives in the journal: subclasses implement ``handle`` (and maybe
    ``start``/``stop``); ``run`` does the reading, waiting and committing.

    Resource handling: ``stop`` is awaited when ``run`` ends, cancelled or not; cancelling waits for the
    batch in flight to be handled and its cursor committed.
    """

    name = "sink"
    batch_limit = 2000
    batch_bytes = 4 << 20
    #: On cancellation, how long the batch in flight may take to finish before it is abandoned.
    stop_grace = 10.0

    def __init__(self) -> None:
        self.cursor = 0
        self.last_seq = 0
        self.handled = 0

    async def start(self, journal: JournalReader) -> None:
        """Called once before the first entry is handled."""

    async def handle(self, entries: Sequence[Entry]) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        """Called once when ``run`` ends (flush, close files and sockets)."""

    def status(self) -> dict[str, object]:
        return {"cursor": self.cursor, "lag": max(0, self.last_seq - self.cursor), "handled": self.handled}

    async def run(self, journal: JournalReader, notify: JournalWaiter) -> None:
        self.cursor = journal.cursor(self.name)
        try:
            await self.start(journal)
            while True:
                self.last_seq = notify.last_seq
                entries = await asyncio.to_thread(
                    journal.read, after=self.cursor, limit=self.batch_limit, max_bytes=self.batch_bytes
                )
                if not entries:
                    await notify.wait(self.cursor)
                    continue
                # A stop request lets the batch in flight finish and commit, so a graceful restart repeats
                # nothing (only a crash can repeat one batch).
                step = asyncio.ensure_future(self._step(journal, entries))
                try:
                    await asyncio.shield(step)
                except asyncio.CancelledError:
                    # Bounded: a sink stuck on its output (a full stdout pipe) must not block shutdown.
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(self.stop_grace):
                            await asyncio.shield(step)
                    raise
        finally:
            await self.stop()

    async def _step(self, journal: JournalReader, entries: Sequence[Entry]) -> None:
        await self.handle(entries)
        last = entries[-1].seq
        await asyncio.to_thread(journal.commit_cursor, self.name, last)
        self.cursor = last
        self.handled += len(entries)
