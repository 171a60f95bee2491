"""Transport-neutral admission: who may take gateway resources now, whatever endpoint a request came in on.

``Admission`` holds the in-flight batch slots: at most ``max_inflight`` batches are ingested at once, and at
most ``max_inflight_per_agent`` of them for one agent id, so a sender impersonating one agent id (ids are not
secret) cannot take them all. ``queued`` waits for a slot in arrival order (at most ``max_waiting`` requests
wait, each at most ``wait`` seconds) instead of refusing at once: with a fleet of thousands of agents and
the journal as the bottleneck, an immediate refusal made admission a lottery that some agents lost for
minutes in a row (bench/fleet.py), while a FIFO queue serves every agent in turn and their next batches
simply grow (POST waits; the other edges still refuse at once, and never overtake the line). POST,
WebSocket and GET-piece endpoints all take a slot from the same ``Admission``
before handing a batch to ingest, so the bounds hold across rungs.

``SourceRate`` is a token bucket per source address, for cheap unauthenticated endpoints (the probe) that a
flood must not turn into registry lookups and MAC computations without limit. Its table is bounded.

Both are synchronous and do no I/O (``SourceRate`` takes its clock as an argument): the edges do the I/O.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

__all__ = ["Admission", "Busy", "SourceRate"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Busy:
    """Why no slot was free: for the ``busy`` refusal's detail."""

    total: int
    for_agent: int
    agent: str

    def detail(self) -> str:
        return f"{self.total} batches in progress ({self.for_agent} for agent {self.agent})"


class Admission:
    """In-flight batch slots, total and per agent id. Not thread-safe: event loop only.

    Resource handling: a slot is held from ``slot()`` until its ``with`` block ends, so a task cancelled
    mid-ingest gives it back.
    """

    def __init__(
        self,
        *,
        max_inflight: int,
        max_inflight_per_agent: int,
        max_waiting: int = 0,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        if not 1 <= max_inflight_per_agent <= max_inflight:
            raise ValueError(
                f"max_inflight_per_agent {max_inflight_per_agent} is outside 1 .. max_inflight "
                f"({max_inflight})"
            )
        self.max_inflight = max_inflight
        self.max_inflight_per_agent = max_inflight_per_agent
        if max_waiting < 0:
            raise ValueError(f"max_waiting {max_waiting} must be >= 0")
        self.max_waiting = max_waiting
        self._busy = 0
        self._per_agent: dict[str, int] = {}
        self._on_change = on_change
        # Requests waiting for a slot, first come first served; a freed slot passes to the first of them.
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def busy(self) -> int:
        return self._busy

    def in_use(self, agent_id: str) -> int:
        return self._per_agent.get(agent_id, 0)

    def check(self, agent_id: str) -> Busy | None:
        """None if ``agent_id`` could take a slot now, else why not."""
        held = self._per_agent.get(agent_id, 0)
        if self._busy >= self.max_inflight or held >= self.max_inflight_per_agent:
            return Busy(total=self._busy, for_agent=held, agent=agent_id)
        return None

    @contextmanager
    def slot(self, agent_id: str) -> Iterator[Busy | None]:
        """Hold a slot for ``agent_id`` for the ``with`` block; yields None when held, or ``Busy`` (and holds
        nothing) when none was free."""
        busy = self.check(agent_id)
        if busy is not None or self._waiters:  # nobody overtakes the queue
            yield busy or Busy(total=self._busy, for_agent=self.in_use(agent_id), agent=agent_id)
            return
        self._take(agent_id)
        try:
            yield None
        finally:
            self._release(agent_id)

    @asynccontextmanager
    async def queued(self, agent_id: str, *, wait: float) -> AsyncIterator[Busy | None]:
        """Like ``slot``, but when every slot is taken, wait up to ``wait`` seconds in arrival order (if fewer
        than ``max_waiting`` already wait). The per-agent bound still refuses at once."""
        held = self._per_agent.get(agent_id, 0)
        if held >= self.max_inflight_per_agent or (
            self._busy >= self.max_inflight and (len(self._waiters) >= self.max_waiting or wait <= 0)
        ):
            yield Busy(total=self._busy, for_agent=held, agent=agent_id)
            return
        # The per-agent count covers waiting requests too: one id cannot fill the queue.
        self._per_agent[agent_id] = held + 1
        if self._busy < self.max_inflight and not self._waiters:
            self._busy += 1
        else:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            granted = True
            try:
                async with asyncio.timeout(wait):
                    await waiter
            except TimeoutError:
                granted = self._abandon(waiter, agent_id)  # handed over just as the wait ended: use it
            except BaseException:  # cancelled: the client went away, or the gateway stops
                if self._abandon(waiter, agent_id):
                    self._release(agent_id)
                raise
            if not granted:
                yield Busy(total=self._busy, for_agent=self.in_use(agent_id), agent=agent_id)
                return
        if self._on_change is not None:
            self._on_change(self._busy)
        try:
            yield None
        finally:
            self._release(agent_id)

    def _abandon(self, waiter: asyncio.Future[None], agent_id: str) -> bool:
        """A wait ended without its slot: leave the queue; True if the slot had been handed over anyway."""
        if waiter.done() and not waiter.cancelled():
            return True
        waiter.cancel()
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        self._forget(agent_id)
        return False

    def _take(self, agent_id: str) -> None:
        self._busy += 1
        self._per_agent[agent_id] = self._per_agent.get(agent_id, 0) + 1
        if self._on_change is not None:
            self._on_change(self._busy)

    def _forget(self, agent_id: str) -> None:
        left = self._per_agent.pop(agent_id) - 1
        if left:
            self._per_agent[agent_id] = left

    def _release(self, agent_id: str) -> None:
        self._forget(agent_id)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on: the count of slots in use is unchanged
                return
        self._busy -= 1
        if self._on_change is not None:
            self._on_change(self._busy)


class SourceRate:
    """Token bucket per source: ``rate`` requests per second on average, bursts of ``burst``.

    At most ``max_sources`` buckets are kept (least recently used dropped first), so a flood from many
    addresses costs bounded memory; a dropped bucket starts full again, which only errs on the lenient side.
    """

    def __init__(
        self,
        *,
        rate: float,
        burst: int,
        max_sources: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate {rate}/s and burst {burst} must be positive")
        self.rate = rate
        self.burst = burst
        self._max = max_sources
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, source: str) -> float:
        """Take one token for ``source``: 0.0 if allowed, else the seconds until a token is available."""
        now = self._clock()
        tokens, last = self._buckets.pop(source, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[source] = (tokens, now)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)
