"""Seal once: which way a caught-up batch is sealed, learnt from trials instead of tried on every batch.

At default settings (``policy.DEFAULT``) a batch could go three ways: codec 2 (zstd, verbatim payloads, the
bundled dictionary), codec 3 (columnar, its dictionary) or against the compression context the gateway holds
(docs/protocol.md section 3.3). The uploader sealed every batch all three ways and kept the smallest: at
1,000 flows/s, ~3 ms of CPU per batch of ~48 KB, a fifth of the agent's CPU, for a winner that rarely
changes on one exporter's stream (softflowd v9: codec 3 or the context, 0.2 % apart). ``SealWays`` seals
every way on a trial, then only the way that won, until ``every`` batches or ``every_s`` seconds have passed
or the kept way's body per raw byte grows by more than ``drift`` over what it was at the trial (the traffic
changed), when the next batch is a trial again. When the context cannot be used (none held: after a start,
a failure or an ``unknown-context`` answer) and it is the kept way, the batch is a trial of the others; the
first batch with a context after a trial without one is a trial again. Above a quiet site's rate the codec
rule may allow ``LEAN`` (codec 5, ``policy.LEAN``) too: it is then one more way of the trial (it wins on
softflowd v9, ~24 % smaller; zstd with its bundled dictionary or the context wins on the Cisco IPFIX
captures, ~10 %), and the first batch that allows it after a trial without it is a trial again.

Pure: the caller passes ``now`` and what it sealed; no clock, no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["SealWays", "Way"]


class Way(enum.Enum):
    """A way to seal a batch at default settings."""

    ZSTD = "zstd"  # codec 2: verbatim payloads, zstd with the bundled dictionary
    COLUMNAR = "columnar"  # codec 3: columnar payloads, zstd with the bundled columnar dictionary
    CONTEXT = "context"  # codec 1 or 3 against the context the gateway holds (its layout the last batch's)
    LEAN = "lean"  # codec 5 at LZMA2 preset 1, field plans reused (``policy.LEAN``), where the rule allows it


#: the ways sealed without a context, in the order the sealer tries them
PLAIN = (Way.COLUMNAR, Way.ZSTD)


@dataclass(slots=True, kw_only=True)
class SealWays:
    """Which ways to seal the next batch (``plan``) and what was learnt from it (``observe``).

    ``every``: batches sealed one way before the next trial; ``every_s``: seconds after a trial when the next
    batch is one again; ``drift``: relative growth of the kept way's body per raw byte (against the trial's)
    that calls a trial at once.
    """

    every: int = 32
    every_s: float = 120.0
    drift: float = 0.10
    kept: Way | None = None  # the way that won the last trial; None: the next batch is a trial
    since: int = 0  # batches sealed one way since that trial
    trial_at: float = float("-inf")
    ratio: float = 0.0  # body / raw of the winner at the trial
    with_context: bool = False  # whether the context was one of the ways tried at that trial
    with_lean: bool = False  # whether LEAN was one of the ways tried at that trial

    def __post_init__(self) -> None:
        if self.every < 1 or self.every_s <= 0 or self.drift <= 0:
            raise ValueError(f"SealWays needs every >= 1, every_s > 0 and drift > 0, got {self.every}, "
                             f"{self.every_s} and {self.drift}")

    def plan(self, *, now: float, context: bool, lean: bool = False) -> tuple[Way, ...]:
        """The ways to seal the next batch: every way that can be used (a trial), or the kept one alone.
        ``context``: a context is held and may be used for this batch; ``lean``: the codec rule allows
        ``LEAN`` (tried first: a trial keeps the smallest body, the first one on a tie)."""
        usable = (*((Way.LEAN,) if lean else ()), *PLAIN, *((Way.CONTEXT,) if context else ()))
        kept = self.kept
        if (kept is None or kept not in usable or self.since >= self.every
                or (context and not self.with_context) or (lean and not self.with_lean)
                or not 0 <= now - self.trial_at < self.every_s):
            return usable
        return (kept,)

    def observe(self, *, tried: tuple[Way, ...], won: Way, body: int, raw: int, now: float) -> None:
        """The batch planned as ``tried`` went ``won``, ``body`` bytes sealed for ``raw`` payload bytes."""
        ratio = body / raw if raw > 0 else 0.0
        if len(tried) > 1:
            self.kept, self.since, self.trial_at, self.ratio = won, 0, now, ratio
            self.with_context = Way.CONTEXT in tried
            self.with_lean = Way.LEAN in tried
            return
        self.since += 1
        if self.ratio > 0 and ratio > self.ratio * (1 + self.drift):
            self.since = self.every  # the kept way got worse: the traffic changed, try every way again

    def reset(self) -> None:
        """Forget the winner (the codec rule chose another way meanwhile): the next batch is a trial."""
        self.kept = None
