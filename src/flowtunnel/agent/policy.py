"""Pure decisions of the uploader: backoff, Retry-After, bandwidth budgets, batch sizing, response classes,
the link's throughput, the rate of data to seal and the bytes-lean codec rule that follows from them.

Nothing here reads a clock, a socket or a random source: callers pass ``now`` (seconds) and random draws in,
so every rule is unit-tested exactly and the asyncio uploader stays a thin loop around these functions.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

__all__ = [
    "CPU_SHARE",
    "DEFAULT",
    "FAST",
    "LEAN",
    "LEAN_SHARE",
    "MIN_WINDOW",
    "SMALL",
    "TIGHT",
    "TIGHT_SHARE",
    "ArrivalRate",
    "BatchSizer",
    "CodecChoice",
    "DailyBudget",
    "LinkEstimate",
    "Outcome",
    "TokenBucket",
    "backoff_delay",
    "budget_latency",
    "choose_codec",
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
    import email.utils  # (an HTTP date is rare: the email package stays off the agent's import)

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


#: Days a ``DailyBudget`` remembers what was spent on (the most recently spent-on ones).
BUDGET_DAYS = 32


@dataclass(slots=True)
class DailyBudget:
    """A cap in bytes per UTC day for metered links; ``limit <= 0`` means unlimited.

    What was spent is kept per day number (``spent``: UTC day → bytes), not as one running count for "the
    current day": a clock that jumps forward a day and back (NTP on a box that booted with a wrong clock, a
    battery-less RTC) finds the earlier day's spend where it left it, so no calendar day ever gets more than
    ``limit`` (but for the first request of a day, which always goes). The ``BUDGET_DAYS`` most recently
    spent-on days are remembered; ``spent`` is a plain dict so the caller can persist it across restarts.
    """

    limit: int
    spent: dict[int, int] = field(default_factory=dict)

    @staticmethod
    def day_of(now: float) -> int:
        return int(now // 86400)

    def used(self, now: float) -> int:
        """Bytes spent on the UTC day of ``now``."""
        return self.spent.get(self.day_of(now), 0)

    def delay(self, n: int, now: float) -> float:
        """0 if ``n`` more bytes fit today (or none went yet today), else seconds to the next UTC midnight."""
        if self.limit <= 0:
            return 0.0
        day = self.day_of(now)
        used = self.spent.get(day, 0)
        # The first request of a day always goes, whatever its size, or a too-small limit would stall forever.
        if used == 0 or used + n <= self.limit:
            return 0.0
        return (day + 1) * 86400 - now

    def spend(self, n: int, now: float) -> None:
        if self.limit <= 0:
            return
        day = self.day_of(now)
        used = self.spent.pop(day, 0) + n
        self.spent[day] = used  # re-inserted: the dict's order is the order days were last spent on
        while len(self.spent) > BUDGET_DAYS:
            del self.spent[next(iter(self.spent))]


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


@dataclass(frozen=True, slots=True, kw_only=True)
class CodecChoice:
    """One way to seal a batch: ``codec`` (``None``: the sealer's zstd choice, codecs 2/3) at ``level``
    (zstd's, or the LZMA2 preset of codecs 4-6), and what it costs on softflowd v9 export data: ``cpu``
    seconds and ``body`` bytes per raw payload byte."""

    name: str
    codec: int | None
    level: int
    cpu: float
    body: float


# Measured with ``Uploader._seal``'s calls on softflowd v9 batches of 0.1-4 MB of distinct payload
# (10,000-conversation traces; wire code of 2026-11-26), CPU per raw MB / body per raw byte:
#   codec 2 (zstd + dictionary) level 3:           ~8-10 ms / 0.36
#   sealer's choice (codec 3, columnar + zstd, or 2) level 6: ~30-45 ms / 0.21
#   codec 4 (columnar + LZMA2) preset 6:           ~150-230 ms / 0.16
# and (2026-12-06) on batches of 2-35 softflowd v9 datagrams, the sealer's choice at zstd level 15 against
# level 6: 4.5-5 % smaller bodies (levels 17-22: no smaller, and up to 2x the CPU), on Cisco IPFIX batches of
# 378 datagrams 15 % smaller (0.061 against 0.072 of raw). With the context tried too (loading the bundled
# dictionary and the context costs ~3-5 ms per batch at level 15, ~0.5 ms at 6): ~5 ms a batch of 2
# datagrams, ~10 ms one of 10 (~700 ms per raw MB) against ~0.9 and ~1.5 ms at level 6. From 4 datagrams on
# the uploader tries codec 5 (field deltas + LZMA2, ~1 ms a datagram) beside level 6 instead: a batch of 10
# ~13 ms (~1,000 ms per raw MB) for 0.22 of raw against 0.27 at level 15 (35 datagrams: 0.18 against 0.25).
#
# and (2026-12-07) codec 5 at LZMA2 preset 1 with the field plans chosen once and reused (``wire.PlanCache``;
# choosing them every batch was ~200 of codec 5's ~250 ms per raw MB): on softflowd v9 batches of 475
# datagrams 0.170 of raw UDP at ~40 ms per raw MB where the sealer's choice at level 6 gave 0.221 at ~31
# (both codecs tried), on batches of 36 0.211 at ~44 against 0.258 at ~35; on Cisco IPFIX batches of 378
# 0.068 at ~26 against 0.066 at ~32 (zstd's bundled dictionary knows those captures). Presets 2-3: ~1 %
# fewer bytes for ~10 % more CPU; 4-6 (LZMA's normal mode) 0.144-0.148 at ~80-130 ms. As the uploader seals
# (its template cache learning each datagram, agent info, the plans' first choice amortised over 20
# batches): v9 batches of 356 (10,000 flows/s) ~60 ms per raw MB against ~33 for the sealer's choice at
# level 6; the context tried beside either adds ~20-25. For big batches (``SMALL``) codec 5 at preset 6
# with the plans reused instead of codec 4: softflowd v9 batches of 1,782-2,376 datagrams 0.137-0.138 of raw
# against 0.154-0.157, at ~125-175 ms per raw MB (the plans' first choice included) against ~105-110;
# Cisco IPFIX batches of 1,135: 0.046 against 0.051.
FAST = CodecChoice(name="fast", codec=2, level=3, cpu=10e-9, body=0.36)
DEFAULT = CodecChoice(name="default", codec=None, level=6, cpu=35e-9, body=0.21)
SMALL = CodecChoice(name="small", codec=5, level=6, cpu=190e-9, body=0.14)
TIGHT = CodecChoice(name="tight", codec=None, level=15, cpu=1000e-9, body=0.20)
LEAN = CodecChoice(name="lean", codec=5, level=1, cpu=60e-9, body=0.17)


@dataclass(slots=True)
class LinkEstimate:
    """The upload's achieved throughput, from the uploads themselves: bytes moved over request time.

    ``observe(raw, body, seconds, choice)`` per acknowledged request: raw payload bytes, body bytes, the time
    from sending it to the answer, and how it was sealed. ``observe_round_trip(seconds)`` per request without
    datagrams (the uploader's resynchronisations, at start and after failures): the quickest of them is the
    round trip plus the gateway's fixed cost, taken off each batch's time (at most half of it). The sums
    decay by ``decay`` per request, so the estimate follows the last few batches, weighted by their bytes: a
    1 MB backlog batch outweighs a hundred small ones. The gateway's work per datagram still counts as link
    time, so the estimate errs on the slow side (towards saving bytes). The body each batch would have had
    with ``DEFAULT`` is kept too (``body / choice.body * DEFAULT.body``), so the data's own compressibility
    is known whichever codec measured it. Everything is ``None`` before the first measurement.
    """

    decay: float = 0.7
    raw: float = 0.0
    body: float = 0.0
    default_body: float = 0.0
    seconds: float = 0.0
    round_trip: float | None = None

    def observe_round_trip(self, seconds: float) -> None:
        if math.isfinite(seconds) and seconds >= 0:
            self.round_trip = seconds if self.round_trip is None else min(self.round_trip, seconds)

    def observe(self, raw_bytes: int, body_bytes: int, seconds: float, choice: CodecChoice = DEFAULT) -> None:
        if raw_bytes <= 0 or body_bytes <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        d = self.decay
        self.raw = d * self.raw + raw_bytes
        self.body = d * self.body + body_bytes
        self.default_body = d * self.default_body + body_bytes * DEFAULT.body / choice.body
        # At most half a request's time goes as round trip: the resynchronisations that measure it often open
        # the connection (TCP, TLS set-up), so it may be overstated. A clock tick of zero on a fast loopback
        # counts as a microsecond, so the rate stays finite.
        self.seconds = d * self.seconds + max(seconds - (self.round_trip or 0.0), seconds / 2, 1e-6)

    @property
    def body_rate(self) -> float | None:
        """Request body bytes per second (what the link carried), or ``None`` before the first measurement."""
        return self.body / self.seconds if self.seconds > 0 else None

    @property
    def default_ratio(self) -> float | None:
        """Body bytes per raw byte this data gets with ``DEFAULT``."""
        return self.default_body / self.raw if self.raw > 0 else None


#: Bytes one request costs beyond its body, both ways (request head ~145 B, answer ~215 B, TCP/IP headers of
#: its segments and ACKs ~240 B on an established connection): what a longer latency saves per request.
REQUEST_OVERHEAD = 600
#: The longest latency a daily byte budget may impose (the user's own ``--latency`` may be longer).
MAX_BUDGET_LATENCY = 3600.0


def budget_latency(
    *, daily_bytes: int, used_today: int, now: float, body_rate: float, configured: float,
    overhead: int = REQUEST_OVERHEAD,
) -> float:
    """The latency target that keeps the rest of today's uploads within ``daily_bytes``: with ``body_rate``
    body bytes/s to send and ``overhead`` bytes per request, a latency ``L`` costs ``body_rate + overhead /
    L`` bytes/s, which must not exceed what is left of the budget over what is left of the UTC day. Never
    below ``configured`` (the user's ``--latency``), never above ``MAX_BUDGET_LATENCY`` unless configured so;
    without a budget, ``configured``. If even the longest latency cannot fit (the data alone exceeds the
    budget), the longest: the budget itself then stops uploads until midnight (``DailyBudget``).
    """
    if daily_bytes <= 0:
        return configured
    day_end = (math.floor(now / 86400) + 1) * 86400
    allowed = max(0, daily_bytes - used_today) / max(1.0, day_end - now)  # bytes/s left for today
    spare = allowed - max(0.0, body_rate)
    needed = overhead / spare if spare > 0 else math.inf
    return max(configured, min(MAX_BUDGET_LATENCY, needed))


#: The share of one core the agent's sealing may take before it trades bytes for CPU (issue 14): below it the
#: agent seals as small as it can, whatever link it measured, since bytes may be metered on any link.
CPU_SHARE = 0.25
#: ``TIGHT`` (zstd level 15 where ``DEFAULT`` uses 6, or codec 5 tried too from 4 datagrams a batch) only
#: while its sealing CPU stays within this share of a core: a quiet site (up to ~15,000 raw bytes/s, ~10
#: softflowd v9 datagrams/s of 1,400 bytes) gets 5-20 % smaller bodies for CPU it does not miss, and the
#: agent at 1,000 flows/s (~50 KB/s) keeps a cheaper seal (``LEAN``, ~0.3 % of a core there; issue 14's 1 %
#: goal for the whole agent).
TIGHT_SHARE = 0.015
#: ``LEAN`` (codec 5 at LZMA2 preset 1, field plans reused) for batches that are not big while its sealing CPU
#: stays within this share of a core: up to ~830 KB/s arriving (~600 softflowd v9 datagrams/s of 1,400
#: bytes, ~17,000 flows/s). Measured (docs/benchmarks.md, issue 14's codec 5 round): ~58-67 ms per raw MB
#: at 10,000 flows/s (~500 KB/s: ~3-3.4 % of a core) where ``DEFAULT`` sealed one way took ~32 (~1.6 %), for
#: 0.172 of raw UDP against 0.225: ~1.5-1.7 % of a core for ~24 % fewer bytes, out of the footprint goal
#: there (6 % for the whole agent; 4.5 % measured with it), chosen for bytes (issue 14). Above the share the
#: agent seals ``DEFAULT`` as before: a gateway opens codec 5 at ~2 times zstd's CPU (~17 against ~9 ms per
#: raw MB, softflowd v9 batches of 475), and the chain's throughput at 100,000 flows/s (``bench/store.py``)
#: was measured with zstd.
LEAN_SHARE = 0.05


#: ``ArrivalRate`` reads what arrived over at least this many seconds
MIN_WINDOW = 1.0


@dataclass(slots=True)
class ArrivalRate:
    """Raw payload bytes per second arriving in the spool: what the agent must seal to keep up.

    ``observe(last_seq=, raw_bytes=, count=, now=)`` per sealed batch: the spool's last seq at ``now`` gives
    the datagrams that arrived since the previous call (an exponentially decayed rate with time constant
    ``tau`` seconds: ``rate <- rate * exp(-dt / tau) + arrived / tau``, so a burst fades); the batch gives
    the mean datagram size. A clock stepping back counts as no time passing; a spool renumbered downwards
    counts as nothing arrived. 0 before two observations.

    In the first few ``tau`` the sum has seen only ``1 - exp(-elapsed / tau)`` of a window: the rate is
    divided by that (as Adam's moment estimates are), so a steady ``R`` reads ``R`` from the second
    observation on; over a window of at least ``MIN_WINDOW`` (1 s), so batches sealed back to back at start
    (a backlog) do not read the few datagrams between them as a flood. Without it a busy agent's first
    batches (1,000 flows/s: ~5 s) read as a quiet site's and were sealed the quiet way (level 15, LZMA), at
    several times the CPU and ~3 MB more peak memory.
    """

    tau: float = 10.0
    datagrams: float = 0.0
    mean_size: float = 0.0
    last_seq: int | None = None
    stamp: float | None = None
    #: when the first observation was made (None: not counted from one, e.g. a rate given as measured)
    since: float | None = None

    def observe(self, *, last_seq: int, raw_bytes: int, count: int, now: float) -> None:
        if not math.isfinite(now):
            return
        if count > 0 and raw_bytes >= 0:
            size = raw_bytes / count
            self.mean_size = size if self.mean_size == 0 else 0.8 * self.mean_size + 0.2 * size
        if self.stamp is not None and self.last_seq is not None:
            self.datagrams *= math.exp(-max(0.0, now - self.stamp) / self.tau)
            self.datagrams += max(0, last_seq - self.last_seq) / self.tau
        else:
            self.since = now
        self.stamp = now if self.stamp is None else max(self.stamp, now)
        self.last_seq = last_seq

    @property
    def bytes_per_second(self) -> float:
        seen = 1.0
        if self.since is not None and self.stamp is not None:
            seen = -math.expm1(-max(self.stamp - self.since, MIN_WINDOW) / self.tau)
        return self.datagrams * self.mean_size / seen


def choose_codec(
    link: LinkEstimate, *, big: bool, bandwidth: int, daily_bytes: int, arrival: float = 0.0,
) -> CodecChoice:
    """How to seal the next batch, bytes-lean: the smallest-body choice whose sealing CPU at ``arrival``
    (raw bytes/s arriving, ``ArrivalRate``; doubled for a ``big`` batch, so a backlog drains at least as fast
    as data arrives) stays within ``CPU_SHARE`` of a core, whatever link was measured. ``SMALL`` (codec 5,
    columnar + field deltas + LZMA2 preset 6) only for ``big`` batches (a backlog, or above
    ``BIG_BATCH_BYTES``). A batch that is not big goes ``TIGHT`` (zstd level 15, or a compression
    stream) while that costs at most ``TIGHT_SHARE`` of a core at ``arrival`` (a quiet site: below ~15
    KB/s), with or without a budget; else ``LEAN`` (codec 5 at LZMA2 preset 1) while that costs at most
    ``LEAN_SHARE`` (up to ~830 KB/s). With a daily byte budget (``daily_bytes > 0``) bytes count more than
    CPU: ``SMALL`` for big batches, ``LEAN`` otherwise.

    Only when no choice keeps within the share (the agent cannot keep up otherwise) does the link decide:
    the choice with the least sealing CPU plus upload time per raw byte, since one request is in flight at a
    time and each batch is sealed before it goes, so a busy agent moves one batch per (seal CPU + upload
    time). Upload time per raw byte is the choice's body (scaled to this data's compressibility as measured,
    ``link.default_ratio``) over the link's body rate (as measured, or as capped by ``bandwidth``, whichever
    is slower). With the figures above, at softflowd's compressibility: ``SMALL`` for big batches up to
    ~0.65 MB/s arriving (~470 datagrams/s of 1,400 bytes), ``DEFAULT`` up to ~7 MB/s (3.5 MB/s for big
    batches), then ``FAST`` up to 25 MB/s, then the race, where
    ``FAST`` wins above ~6 MB/s of body and ``SMALL`` below ~450 KB/s.
    """
    need = max(0.0, arrival) * (2.0 if big else 1.0)
    if not big and TIGHT.cpu * need <= TIGHT_SHARE:
        return TIGHT
    if daily_bytes > 0:
        return SMALL if big else LEAN
    if not big and LEAN.cpu * need <= LEAN_SHARE:
        return LEAN
    leanest_first = (SMALL, DEFAULT, FAST) if big else (DEFAULT, FAST)
    for choice in leanest_first:
        if choice.cpu * need <= CPU_SHARE:
            return choice
    per_byte = [link.seconds / link.body] if link.body > 0 else []  # link seconds per body byte
    if bandwidth > 0:
        per_byte.append(1.0 / bandwidth)
    if not per_byte:
        return FAST  # CPU-bound and nothing known about the link: the cheapest seal keeps up best
    link_s = max(per_byte)
    ratio = link.default_ratio or DEFAULT.body
    return min(leanest_first, key=lambda c: c.cpu + ratio * c.body / DEFAULT.body * link_s)
