"""``JournalNotify``: how ingest wakes the sinks when the journal grows, without polling.

One instance per gateway; ingest calls ``publish(last_seq)`` after each journal commit, each sink awaits
``wait(after_seq)`` when it has consumed everything. Level-triggered, so a wake-up can never be missed.
"""

from __future__ import annotations

import asyncio

__all__ = ["JournalNotify"]


class JournalNotify:
    """The journal's last committed sequence number, and a way to wait for it to pass a value."""

    def __init__(self, last_seq: int = 0) -> None:
        self._last = last_seq
        self._event = asyncio.Event()

    @property
    def last_seq(self) -> int:
        return self._last

    def publish(self, last_seq: int) -> None:
        """Called after a commit: entries up to ``last_seq`` are readable."""
        if last_seq > self._last:
            self._last = last_seq
            event, self._event = self._event, asyncio.Event()
            event.set()

    async def wait(self, after_seq: int) -> None:
        """Return once the journal holds entries past ``after_seq`` (wrap in ``asyncio.timeout`` to bound)."""
        while self._last <= after_seq:
            await self._event.wait()
