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

Small batches (a POST whose body and record block are both small: the usual batch of a quiet agent) take
their slot from a lane of their own, ``max_small`` slots, with its own line: a slot is held until the batch
is acknowledged, so while the journal commits, 16 slots meant at most 16 batches per commit, and a slow
commit (a WAL checkpoint, a slow fsync) or a stalled event loop left thousands of agents queueing for them
(bench/fleet.py: the slowest 1 % of requests spent 85-98 % of their time waiting for a slot, nearly all of
them batches of 0-2 datagrams). A small batch costs little memory (``max_small`` x the small bounds), so its
lane can be wide, and every small batch that arrives during a commit goes into the next one. The per-agent
bound counts both lanes together.

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
from dataclasses import dataclass, field

__all__ = ["Admission", "Busy", "SourceRate"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Busy:
    """Why no slot was free: for the ``busy`` refusal's detail."""

    total: int
    for_agent: int
    agent: str

    def detail(self) -> str:
        return f"{self.total} batches in progress ({self.for_agent} for agent {self.agent})"


@dataclass(eq=False, slots=True)
class _Lane:
    """Slots of one kind: how many, how many are taken, and who waits for one (first come first served)."""

    limit: int
    busy: int = 0
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)


class Admission:
    """In-flight batch slots, total and per agent id, and a lane of slots for small batches (``max_small``;
    0: they share the others). Not thread-safe: event loop only.

    Resource handling: a slot is held from ``slot()`` until its ``with`` block ends, so a task cancelled
    mid-ingest gives it back.
    """

    def __init__(
        self,
        *,
        max_inflight: int,
        max_inflight_per_agent: int,
        max_waiting: int = 0,
        max_small: int = 0,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        if not 1 <= max_inflight_per_agent <= max_inflight:
            raise ValueError(
                f"max_inflight_per_agent {max_inflight_per_agent} is outside 1 .. max_inflight "
                f"({max_inflight})"
            )
        self.max_inflight = max_inflight
        self.max_inflight_per_agent = max_inflight_per_agent
        if max_waiting < 0 or max_small < 0:
            raise ValueError(f"max_waiting {max_waiting} and max_small {max_small} must be >= 0")
        self.max_waiting = max_waiting
        self.max_small = max_small
        self._per_agent: dict[str, int] = {}
        self._on_change = on_change
        # Each lane's requests waiting for a slot, first come first served; a freed slot passes to the first.
        self._main = _Lane(limit=max_inflight)
        self._small = _Lane(limit=max_small) if max_small else self._main

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot, both lanes."""
        return len(self._main.waiters) + (len(self._small.waiters) if self._small is not self._main else 0)

    @property
    def busy(self) -> int:
        """Slots taken, both lanes."""
        return self._main.busy + (self._small.busy if self._small is not self._main else 0)

    def in_use(self, agent_id: str) -> int:
        return self._per_agent.get(agent_id, 0)

    def check(self, agent_id: str) -> Busy | None:
        """None if ``agent_id`` could take a slot now, else why not."""
        held = self._per_agent.get(agent_id, 0)
        if self._main.busy >= self.max_inflight or held >= self.max_inflight_per_agent:
            return Busy(total=self._main.busy, for_agent=held, agent=agent_id)
        return None

    @contextmanager
    def slot(self, agent_id: str) -> Iterator[Busy | None]:
        """Hold a slot for ``agent_id`` for the ``with`` block; yields None when held, or ``Busy`` (and holds
        nothing) when none was free."""
        busy = self.check(agent_id)
        if busy is not None or self._main.waiters:  # nobody overtakes the queue
            yield busy or Busy(total=self._main.busy, for_agent=self.in_use(agent_id), agent=agent_id)
            return
        self._take(agent_id)
        try:
            yield None
        finally:
            self._release(agent_id, self._main)

    @asynccontextmanager
    async def queued(self, agent_id: str, *, wait: float, small: bool = False) -> AsyncIterator[Busy | None]:
        """Like ``slot``, but when every slot is taken, wait up to ``wait`` seconds in arrival order (if fewer
        than ``max_waiting`` already wait). The per-agent bound still refuses at once. ``small``: a slot of
        the small batches' lane (when there is one)."""
        lane = self.take_now(agent_id, small=small)
        if lane is not None:
            try:
                yield None
            finally:
                self.release(agent_id, lane)
            return
        lane = self._small if small else self._main
        held = self._per_agent.get(agent_id, 0)
        if held >= self.max_inflight_per_agent or (
            lane.busy >= lane.limit and (len(lane.waiters) >= self.max_waiting or wait <= 0)
        ):
            yield Busy(total=lane.busy, for_agent=held, agent=agent_id)
            return
        # The per-agent count covers waiting requests too: one id cannot fill the queue.
        self._per_agent[agent_id] = held + 1
        if lane.busy < lane.limit and not lane.waiters:
            lane.busy += 1
        else:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            lane.waiters.append(waiter)
            granted = True
            try:
                async with asyncio.timeout(wait):
                    await waiter
            except TimeoutError:
                granted = self._abandon(waiter, agent_id, lane)  # handed over just as the wait ended: use it
            except BaseException:  # cancelled: the client went away, or the gateway stops
                if self._abandon(waiter, agent_id, lane):
                    self._release(agent_id, lane)
                raise
            if not granted:
                yield Busy(total=lane.busy, for_agent=self.in_use(agent_id), agent=agent_id)
                return
        if self._on_change is not None:
            self._on_change(self.busy)
        try:
            yield None
        finally:
            self._release(agent_id, lane)

    def take_now(self, agent_id: str, *, small: bool = False) -> _Lane | None:
        """``queued``'s fast path, without a context manager: a slot taken at once when one is free and
        nobody waits for one (None otherwise: then use ``queued``). The caller must ``release(agent_id,
        lane)`` with the lane returned, in a ``finally``."""
        lane = self._small if small else self._main
        held = self._per_agent.get(agent_id, 0)
        if held >= self.max_inflight_per_agent or lane.busy >= lane.limit or lane.waiters:
            return None
        self._per_agent[agent_id] = held + 1
        lane.busy += 1
        if self._on_change is not None:
            self._on_change(self.busy)
        return lane

    def release(self, agent_id: str, lane: _Lane) -> None:
        """Give back a slot of ``take_now``."""
        self._release(agent_id, lane)

    def _abandon(self, waiter: asyncio.Future[None], agent_id: str, lane: _Lane) -> bool:
        """A wait ended without its slot: leave the queue; True if the slot had been handed over anyway."""
        if waiter.done() and not waiter.cancelled():
            return True
        waiter.cancel()
        if waiter in lane.waiters:
            lane.waiters.remove(waiter)
        self._forget(agent_id)
        return False

    def _take(self, agent_id: str) -> None:
        self._main.busy += 1
        self._per_agent[agent_id] = self._per_agent.get(agent_id, 0) + 1
        if self._on_change is not None:
            self._on_change(self.busy)

    def _forget(self, agent_id: str) -> None:
        left = self._per_agent.pop(agent_id) - 1
        if left:
            self._per_agent[agent_id] = left

    def _release(self, agent_id: str, lane: _Lane) -> None:
        self._forget(agent_id)
        while lane.waiters:
            waiter = lane.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on: the count of slots in use is unchanged
                return
        lane.busy -= 1
        if self._on_change is not None:
            self._on_change(self.busy)


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
