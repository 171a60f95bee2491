"""Transport-neutral admission: who may take gateway resources now, whatever endpoint a request came in on.

``Admission`` holds the in-flight batch slots: at most ``max_inflight`` batches are ingested at once, and at
most ``max_inflight_per_agent`` of them for one agent id, so a sender impersonating one agent id (ids are not
secret) cannot take them all. POST, WebSocket and GET-piece endpoints all take a slot from the same
``Admission`` before handing a batch to ingest, so the bounds hold across rungs.

``SourceRate`` is a token bucket per source address, for cheap unauthenticated endpoints (the probe) that a
flood must not turn into registry lookups and MAC computations without limit. Its table is bounded.

Both are synchronous and do no I/O (``SourceRate`` takes its clock as an argument): the edges do the I/O.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        if not 1 <= max_inflight_per_agent <= max_inflight:
            raise ValueError(
                f"max_inflight_per_agent {max_inflight_per_agent} is outside 1 .. max_inflight "
                f"({max_inflight})"
            )
        self.max_inflight = max_inflight
        self.max_inflight_per_agent = max_inflight_per_agent
        self._busy = 0
        self._per_agent: dict[str, int] = {}
        self._on_change = on_change

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
        if busy is not None:
            yield busy
            return
        self._busy += 1
        self._per_agent[agent_id] = self._per_agent.get(agent_id, 0) + 1
        if self._on_change is not None:
            self._on_change(self._busy)
        try:
            yield None
        finally:
            self._busy -= 1
            left = self._per_agent.pop(agent_id) - 1
            if left:
                self._per_agent[agent_id] = left
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
