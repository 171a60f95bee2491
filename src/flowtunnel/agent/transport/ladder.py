"""Which rung carries the next batch: a pure state machine fed the outcome of each exchange.

Rungs are tried best first for *reach* (``--rungs``, default ``post,ws,get``). A rung is *good* once a sealed
batch was acknowledged through it. The ladder steps down when the current rung shows a failure another rung
may not have: a refusal by the path rather than by the gateway (a proxy's 403/405/415 on POST, CONNECT
refused, Upgrade stripped), a datagram too large for the rung (``oversize``), bodies cut mid-way again and
again. Failures every rung would share (the gateway down, a captive portal, timeouts) never move it. On a
lower rung it climbs back to the top every ``reprobe_after`` seconds for one try, and steps down again if the
top still fails that way; a step down passes over a lower rung that failed less than ``reprobe_after`` ago
(when another is left).

Among rungs known to work it prefers *bytes* (``LEAN``): once ``post`` carried a batch, batches go by ``ws``
when it is configured below ``post`` and did not fail in the last ``reprobe_after`` seconds: the same sealed
batch with an 8-byte frame head and a 26-byte answer instead of ~170 bytes of HTTP heads per batch. The first
batch still goes by the reach order (a quick first acknowledgement). A failure of ``ws`` that is the rung's
(or no acknowledgement in ``_REPEATS`` tries of it, whatever the cause) goes back to ``post``, not down;
``ws`` is tried again ``reprobe_after`` seconds later. On ``ws`` the ladder never climbs back to ``post``
(``post`` would only hand batches back to ``ws``). ``--rungs post,get`` turns the preference off.

Each switch is returned once, with its reason, for the log and the status. Exactly once does not depend on
the ladder: one batch is in flight at a time and every switch is followed by a resynchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flowtunnel.agent.transport.answers import GATEWAY, Acked, Answer, Rejected, Retry, TooLarge

__all__ = ["LEAN", "RUNGS", "Ladder", "Switch"]

RUNGS = ("post", "ws", "get")
#: (from, to): once ``from`` carried a batch, batches go by ``to``, which carries them in fewer bytes
LEAN = ("post", "ws")
REPROBE_AFTER = 600.0
# The same rung failing this way this many times in a row steps down (one cut may be a bad link).
_REPEATS = 3
_PATH_CAUSES = ("connection:cut-mid-body",)  # 413s lower the body limit first (the delivery protocol)
# Failures of a connection: a lean try not acknowledged yet goes back after ``_REPEATS`` in a row.
_LINK_CAUSES = ("connection:", "ws-close-", "bad-response")


@dataclass(frozen=True, kw_only=True)
class Switch:
    """Move from rung ``old`` to ``new`` because ``reason``; ``for_bytes``: a move by the bytes preference
    (nothing failed)."""

    old: str
    new: str
    reason: str
    for_bytes: bool = False


@dataclass(kw_only=True)
class Ladder:
    rungs: tuple[str, ...] = RUNGS
    reprobe_after: float = REPROBE_AFTER
    index: int = 0
    good: set[str] = field(default_factory=set)
    carried: set[str] = field(default_factory=set)  # rungs that carried a batch of datagrams (acknowledged)
    failed: dict[str, str] = field(default_factory=dict)  # rung -> why it was left, last time
    failed_at: dict[str, float] = field(default_factory=dict)  # rung -> when
    switches: int = 0
    why: str = "the first rung"  # why the current rung carries batches (the status)
    for_bytes: bool = False  # on the ``LEAN`` rung by the bytes preference
    _since: float | None = None  # when the ladder last moved down
    _repeats: int = 0
    _last_cause: str | None = None
    _probing_up: bool = False  # a re-probe of the top, or a lean try, not acknowledged yet
    _misses: int = 0  # a lean try's failures in a row, whatever the cause

    @property
    def current(self) -> str:
        return self.rungs[self.index]

    @property
    def _lean(self) -> tuple[int, int] | None:
        """The indexes of ``LEAN``'s rungs when both are configured, ``to`` below ``from``; else None."""
        low, high = LEAN
        if low in self.rungs and high in self.rungs and self.rungs.index(low) < self.rungs.index(high):
            return self.rungs.index(low), self.rungs.index(high)
        return None

    def _recent(self, rung: str, now: float) -> bool:
        """Whether ``rung`` failed less than ``reprobe_after`` seconds ago."""
        return rung in self.failed and now - self.failed_at.get(rung, float("-inf")) < self.reprobe_after

    def fail(self, rung: str, reason: str, *, now: float) -> None:
        """Note that ``rung`` failed for ``reason`` (also for a rung that lost a race)."""
        self.failed[rung] = reason
        self.failed_at[rung] = now

    def use(self, rung: str, *, now: float, why: str = "") -> None:
        """Start on ``rung`` (remembered for this network, or the winner of a race)."""
        self._enter(self.rungs.index(rung), now)
        self.carried.clear()  # on this network, the first batch goes by the reach order again
        self.why = why or self.why

    def before(self, now: float) -> Switch | None:
        """Before an exchange: time to move to the lean rung, or to climb back to the top rung for one try?"""
        lean = self._lean
        if lean is not None and self.index == lean[1]:
            return None  # on the lean rung: the rungs above it carry batches in more bytes
        if (lean is not None and self.index == lean[0] and self.current in self.carried
                and not self._recent(self.rungs[lean[1]], now)):
            old, new = self.current, self.rungs[lean[1]]
            reason = f"fewer bytes per batch than {old} (no HTTP heads per batch)"
            if new in self.failed:
                reason += f"; it failed {now - self.failed_at.get(new, now):.0f} s ago ({self.failed[new]})"
            self._move(lean[1], now=now, why=f"fewer bytes per batch than {old}")
            self.for_bytes = self._probing_up = True
            return Switch(old=old, new=new, reason=reason, for_bytes=True)
        if self.index == 0 or self._since is None or now - self._since < self.reprobe_after:
            return None
        old = self.current
        reason = f"re-probing {self.rungs[0]} after {self.reprobe_after:.0f} s on {old}"
        self._move(0, now=now, why=reason)
        self._probing_up = True
        return Switch(old=old, new=self.current, reason=reason)

    def after(self, answer: Answer, cause: str | None, *, now: float, batch: bool = True) -> Switch | None:
        """After an exchange on the current rung: ``cause`` is the delivery protocol's failure cause (None
        when the batch or resync was acknowledged); ``batch``: datagrams went (not a resync)."""
        rung = self.current
        if isinstance(answer, Acked) and cause is None:
            self.good.add(rung)
            if batch:
                self.carried.add(rung)
            self.failed.pop(rung, None)
            self.failed_at.pop(rung, None)
            self._repeats = self._misses = 0
            self._probing_up = False
            return None
        reason = self._rung_failure(answer, cause)
        if reason is None:
            return None
        self.fail(rung, reason, now=now)
        lean = self._lean
        if lean is not None and self.index == lean[1] and not self._recent(self.rungs[lean[0]], now):
            # Off the lean rung: back to the rung it came from (known good, or untried), not down.
            back = self.rungs[lean[0]]
            self._move(lean[0], now=now, why=f"{rung} failed: {reason}")
            return Switch(old=rung, new=back, reason=f"{reason}; {rung} again in {self.reprobe_after:.0f} s")
        # Down, over lower rungs that failed lately (when another is left).
        lower = range(self.index + 1, len(self.rungs))
        new = next((i for i in lower if not self._recent(self.rungs[i], now)), self.index + 1)
        if new >= len(self.rungs):
            return None  # nowhere lower to go
        self._move(new, now=now, why=f"{rung} failed: {reason}")
        return Switch(old=rung, new=self.current, reason=reason)

    def _move(self, index: int, *, now: float, why: str) -> None:
        self._enter(index, now)
        self.switches += 1
        self.why = why

    def _enter(self, index: int, now: float) -> None:
        """On ``index`` from ``now``: its failure counts start from nothing, and no try is under way."""
        self.index = index
        self._since = None if index == 0 else now
        self._repeats = self._misses = 0
        self._probing_up = self.for_bytes = False

    def _rung_failure(self, answer: Answer, cause: str | None) -> str | None:
        """Why this failure is the rung's (another may get through), or None."""
        if cause == "oversize":
            return "a datagram too large for it even alone"
        if isinstance(answer, Rejected) and answer.by != GATEWAY:
            return f"{answer.by} refuses it ({answer.cause})"
        if self._probing_up and cause is not None and isinstance(answer, Rejected | TooLarge):
            return f"still failing ({cause})"
        if (self._probing_up and self.for_bytes and cause is not None and isinstance(answer, Retry)
                and cause.startswith(_LINK_CAUSES)):
            # A lean try not acknowledged yet: the rung it left is known to work, so a connection that
            # keeps failing (a proxy passing the upgrade, then nothing) does not keep batches waiting.
            self._misses += 1
            if self._misses >= _REPEATS:
                return f"no acknowledgement in {self._misses} tries ({cause})"
        if cause in _PATH_CAUSES:
            self._repeats = self._repeats + 1 if cause == self._last_cause else 1
            self._last_cause = cause
            if self._repeats >= _REPEATS:
                return f"{cause} {self._repeats} times in a row"
        return None

    def status(self) -> dict[str, object]:
        return {
            "rung": self.current,
            "rung_why": self.why,  # e.g. "fewer bytes per batch than post", "post failed: ..."
            "rung_for_bytes": self.for_bytes,
            "rungs": {name: (f"failed: {self.failed[name]}" if name in self.failed else
                             "good" if name in self.good else "untried")
                      for name in self.rungs},
            "switches": self.switches,
        }
