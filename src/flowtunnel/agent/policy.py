"""Pure decisions of the uploader: backoff, Retry-After, bandwidth budgets, batch sizing, response classes.

Nothing here reads a clock, a socket or a random source: callers pass ``now`` (seconds) and random draws in,
so every rule is unit-tested exactly and the asyncio uploader stays a thin loop around these functions.
"""

from __future__ import annotations

import email.utils
import enum
import math
from dataclasses import dataclass

__all__ = [
    "BatchSizer",
    "DailyBudget",
    "Outcome",
    "TokenBucket",
    "backoff_delay",
    "classify_status",
    "parse_retry_after",
]

# A Retry-After longer than this is treated as this: a misconfigured gateway must not park an agent for weeks.
MAX_RETRY_AFTER = 3600.0


def backoff_delay(attempt: int, *, base: float, cap: float, draw: float) -> float:
    """Exponential backoff with full jitter: ``draw * min(cap, base * 2**attempt)``.

    ``attempt`` counts consecutive failures from 0; ``draw`` is a uniform random number in [0, 1). Full jitter
    spreads many agents that lost the gateway at the same moment, so they do not return in lock step.
    """
    if attempt < 0:
        raise ValueError(f"attempt {attempt} must be >= 0")
    if not 0.0 <= draw <= 1.0:
        raise ValueError(f"draw {draw} must be in [0, 1]")
    # 2**attempt overflows floats after ~1000 attempts; the cap is reached long before.
    ceiling = cap if attempt >= 64 else min(cap, base * (2.0**attempt))
    return draw * ceiling


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or ``None``.

    Unparseable values give ``None`` (the caller falls back to its own backoff); dates in the past give 0;
    values are capped at ``MAX_RETRY_AFTER``.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isdigit():
        return min(float(text), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive result means the zone was "-0000"
        return None
    return min(max(0.0, when.timestamp() - now), MAX_RETRY_AFTER)


class Outcome(enum.Enum):
    """What the uploader does after a gateway response."""

    OK = "ok"  # 200: the batch is durable at the gateway
    RETRY = "retry"  # transient: back off (honouring Retry-After) and try again
    TOO_LARGE = "too-large"  # 413: shrink the body limit and try again at once
    REJECTED = "rejected"  # retrying the same request cannot help: log loudly, keep the data, back off long


def classify_status(status: int) -> Outcome:
    """Map an HTTP status to what the uploader should do."""
    if status == 200:
        return Outcome.OK
    if status == 413:
        return Outcome.TOO_LARGE
    if status in (407, 408, 425, 429) or status >= 500:
        return Outcome.RETRY
    return Outcome.REJECTED


@dataclass(slots=True)
class TokenBucket:
    """A bandwidth cap on request body bytes: ``rate`` bytes/s refill, at most ``burst`` bytes saved up.

    ``delay(n, now)`` says how long to wait before ``n`` bytes may go; ``spend(n, now)`` takes them (the level
    may go negative for a request larger than the burst, which then delays the next one accordingly).
    ``rate <= 0`` means unlimited.
    """

    rate: float
    burst: float
    level: float = 0.0
    stamp: float | None = None

    def _refill(self, now: float) -> None:
        if self.stamp is None:
            self.level = self.burst
        elif now > self.stamp:
            self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now if self.stamp is None else max(self.stamp, now)

    def delay(self, n: int, now: float) -> float:
        if self.rate <= 0:
            return 0.0
        self._refill(now)
        # A request larger than the burst may go once the bucket is full, otherwise it would never go.
        need = min(float(n), self.burst)
        if self.level >= need:
            return 0.0
        return (need - self.level) / self.rate

    def spend(self, n: int, now: float) -> None:
        if self.rate <= 0:
            return
        self._refill(now)
        self.level -= n


@dataclass(slots=True)
class DailyBudget:
    """A cap in bytes per UTC day for metered links; ``limit <= 0`` means unlimited.

    ``day`` and ``used`` are plain numbers so the caller can persist them across restarts.
    """

    limit: int
    day: int = -1
    used: int = 0

    def _roll(self, now: float) -> None:
        today = int(now // 86400)
        if today != self.day:
            self.day, self.used = today, 0

    def delay(self, n: int, now: float) -> float:
        """0 if ``n`` more bytes fit today (or none went yet today), else seconds to the next UTC midnight."""
        if self.limit <= 0:
            return 0.0
        self._roll(now)
        # The first request of a day always goes, whatever its size, or a too-small limit would stall forever.
        if self.used == 0 or self.used + n <= self.limit:
            return 0.0
        return (self.day + 1) * 86400 - now

    def spend(self, n: int, now: float) -> None:
        if self.limit <= 0:
            return
        self._roll(now)
        self.used += n


@dataclass(slots=True)
class BatchSizer:
    """How many raw datagram bytes to read for the next batch so the sealed body lands under ``max_body``.

    Keeps a moving estimate of the compression ratio (raw bytes / body bytes) from the batches sent; starts at
    1 (no compression assumed) so the first batch never overshoots. ``max_body`` may shrink at run time when a
    proxy answers 413.
    """

    max_body: int
    ratio: float = 1.0
    max_ratio: float = 20.0
    # Aim below the limit: compression varies from batch to batch, and a re-seal costs CPU.
    headroom: float = 0.85

    def raw_target(self) -> int:
        return max(1, int(self.max_body * self.headroom * self.ratio))

    def observe(self, raw_bytes: int, body_bytes: int) -> None:
        if raw_bytes <= 0 or body_bytes <= 0:
            return
        sample = min(self.max_ratio, raw_bytes / body_bytes)
        # Trust a drop in ratio at once (it risks oversized bodies) and a rise slowly.
        self.ratio = sample if sample < self.ratio else 0.8 * self.ratio + 0.2 * sample
        if not math.isfinite(self.ratio) or self.ratio < 0.5:
            self.ratio = 0.5

    def shrink(self, floor: int) -> bool:
        """Halve ``max_body`` (not below ``floor``) after a 413; False if it was already at the floor."""
        if self.max_body <= floor:
            return False
        self.max_body = max(floor, self.max_body // 2)
        return True
