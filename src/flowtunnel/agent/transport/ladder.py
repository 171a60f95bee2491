"""Which rung carries the next batch: a pure state machine fed the outcome of each exchange.

Rungs are tried best first (``--rungs``, default ``post,ws,get``). A rung is *good* once a sealed batch was
acknowledged through it. The ladder steps down when the current rung shows a failure another rung may not
have: a refusal by the path rather than by the gateway (a proxy's 403/405/415 on POST, CONNECT refused), a
datagram too large for the rung (``oversize``), bodies cut mid-way again and again. Failures every rung would
share (the gateway down, a captive portal, timeouts) never move it. On a lower rung it climbs back to the top
every ``reprobe_after`` seconds for one try, and steps down again if the top still fails that way. Each switch
is returned once, with its reason, for the log and the status. Exactly once does not depend on the ladder:
one batch is in flight at a time and every switch is followed by a resynchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flowtunnel.agent.transport.answers import GATEWAY, Acked, Answer, Rejected, TooLarge

__all__ = ["RUNGS", "Ladder", "Switch"]

RUNGS = ("post", "ws", "get")
REPROBE_AFTER = 600.0
# The same rung failing this way this many times in a row steps down (one cut may be a bad link).
_REPEATS = 3
_PATH_CAUSES = ("connection:cut-mid-body",)  # 413s lower the body limit first (the delivery protocol)


@dataclass(frozen=True, kw_only=True)
class Switch:
    """Move from rung ``old`` to ``new`` because ``reason``."""

    old: str
    new: str
    reason: str


@dataclass(kw_only=True)
class Ladder:
    rungs: tuple[str, ...] = RUNGS
    reprobe_after: float = REPROBE_AFTER
    index: int = 0
    good: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)  # rung -> why it was left, last time
    switches: int = 0
    _since: float | None = None  # when the ladder last moved down
    _repeats: int = 0
    _last_cause: str | None = None
    _probing_up: bool = False

    @property
    def current(self) -> str:
        return self.rungs[self.index]

    def use(self, rung: str, *, now: float) -> None:
        """Start on ``rung`` (remembered for this network, or the winner of a race)."""
        self.index = self.rungs.index(rung)
        self._since = None if self.index == 0 else now
        self._repeats = 0
        self._probing_up = False

    def before(self, now: float) -> Switch | None:
        """Before an exchange: time to climb back to the top rung for one try?"""
        if self.index == 0 or self._since is None or now - self._since < self.reprobe_after:
            return None
        old = self.current
        self.index = 0
        self._since = now
        self._probing_up = True
        self._repeats = 0
        self.switches += 1
        return Switch(old=old, new=self.current, reason=f"re-probing {self.current} after "
                      f"{self.reprobe_after:.0f} s on {old}")

    def after(self, answer: Answer, cause: str | None, *, now: float) -> Switch | None:
        """After an exchange on the current rung: ``cause`` is the delivery protocol's failure cause (None
        when the batch or resync was acknowledged)."""
        rung = self.current
        if isinstance(answer, Acked) and cause is None:
            self.good.add(rung)
            self.failed.pop(rung, None)
            self._repeats = 0
            self._probing_up = False
            return None
        reason = self._rung_failure(answer, cause)
        if reason is None:
            return None
        if self.index + 1 >= len(self.rungs):
            self.failed[rung] = reason
            return None  # nowhere lower to go
        self.failed[rung] = reason
        self.index += 1
        self._since = now
        self._repeats = 0
        self._probing_up = False
        self.switches += 1
        return Switch(old=rung, new=self.current, reason=reason)

    def _rung_failure(self, answer: Answer, cause: str | None) -> str | None:
        """Why this failure is the rung's (another may get through), or None."""
        if cause == "oversize":
            return "a datagram too large for it even alone"
        if isinstance(answer, Rejected) and answer.by != GATEWAY:
            return f"{answer.by} refuses it ({answer.cause})"
        if self._probing_up and cause is not None and isinstance(answer, Rejected | TooLarge):
            return f"still failing ({cause})"
        if cause in _PATH_CAUSES:
            self._repeats = self._repeats + 1 if cause == self._last_cause else 1
            self._last_cause = cause
            if self._repeats >= _REPEATS:
                return f"{cause} {self._repeats} times in a row"
        return None

    def status(self) -> dict[str, object]:
        return {
            "rung": self.current,
            "rungs": {name: (f"failed: {self.failed[name]}" if name in self.failed else
                             "good" if name in self.good else "untried")
                      for name in self.rungs},
            "switches": self.switches,
        }
