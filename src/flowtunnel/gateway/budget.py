"""Per-agent admission budgets: what one enrolled agent may cost the gateway, so a rogue or broken agent
with a valid key cannot fill the journal or take the CPU from the others.

A sealed batch expands: a kilobyte of zstd can carry twenty thousand datagrams of zeros. Three bounds, all in
*journal bytes* (payload, exporter and agent id bytes plus ``ENTRY_OVERHEAD`` per datagram: what the journal
quota counts, so tiny datagrams cost what they cost on disk):

1. per request: ``WireLimits`` (datagrams and raw bytes per batch), checked before decryption;
2. per agent and time: a token bucket of ``rate`` bytes/s holding at most ``burst`` bytes. A batch is let in
   while the bucket is above zero and then charged in full (the bucket may go negative, so a batch bigger
   than the burst is never refused forever); below zero the agent gets 429 with the time until it refills;
3. per agent and journal: at most ``share`` bytes of the journal held for one agent (not yet consumed by
   every sink). A batch that would go beyond gets 429, unless the agent holds nothing.

Only authenticated batches are charged: a sender without the key cannot spend an agent's budget.
Memory: one bucket and at most ``MAX_CHUNKS`` ledger entries per agent.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from flowtunnel.datagram import Datagram
from flowtunnel.log import ENTRY_OVERHEAD

__all__ = ["MAX_CHUNKS", "AgentBudgets", "BudgetConfig", "OverBudget", "journal_cost", "scan_journal_usage"]

#: Ledger entries kept per agent; beyond, the newest two are merged (their bytes are then released together).
MAX_CHUNKS = 256


def journal_cost(agent: str, datagrams: Iterable[Datagram]) -> int:
    """The journal bytes ``datagrams`` take under stream ``agent`` (the journal quota's measure)."""
    fixed = len(agent.encode()) + ENTRY_OVERHEAD
    exporters: dict[str, int] = {}
    total = 0
    for d in datagrams:
        n = exporters.get(d.exporter)
        if n is None:
            n = exporters[d.exporter] = len(d.exporter.encode())
        total += len(d.payload) + n + fixed
    return total


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetConfig:
    """``rate`` journal bytes/s per agent (0 = unlimited) with a bucket of ``burst`` bytes; ``share`` journal
    bytes one agent may hold (0 = unlimited)."""

    rate: int = 0
    burst: int = 0
    share: int = 0

    def __post_init__(self) -> None:
        if self.rate < 0 or self.share < 0:
            raise ValueError(f"rate {self.rate} and share {self.share} must be >= 0 (0 = unlimited)")
        if self.rate and self.burst < 1:
            raise ValueError(f"burst {self.burst} must be positive with a rate")


@dataclass(frozen=True, slots=True, kw_only=True)
class OverBudget:
    """Why an agent is held back now: ``code`` (metrics cause), ``detail``, seconds to wait."""

    code: str
    detail: str
    retry_after: int


@dataclass(slots=True)
class _Agent:
    tokens: float
    at: float
    held: int = 0
    chunks: deque[list[int]] = field(default_factory=deque)  # [last journal seq, bytes], oldest first


class AgentBudgets:
    """The budgets of every agent seen since start. Use from the event loop only.

    ``check`` before reading a body, ``fits_share`` before a journal append, ``charge`` after authentication,
    ``journaled`` after an append, ``trimmed`` after the journal was trimmed.
    """

    def __init__(self, config: BudgetConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._agents: dict[str, _Agent] = {}

    def _agent(self, agent: str) -> _Agent:
        st = self._agents.get(agent)
        now = self._clock()
        if st is None:
            st = self._agents[agent] = _Agent(tokens=float(self.config.burst), at=now)
        elif self.config.rate:
            st.tokens = min(float(self.config.burst), st.tokens + (now - st.at) * self.config.rate)
            st.at = now
        return st

    def check(self, agent: str, *, default_wait: int) -> OverBudget | None:
        """A refusal if ``agent`` has overspent its rate or fills its journal share, else None."""
        cfg = self.config
        st = self._agent(agent)
        if cfg.rate and st.tokens <= 0:
            wait = max(1, math.ceil((1 - st.tokens) / cfg.rate))
            return OverBudget(
                code="agent-rate",
                detail=(f"agent {agent} is over its budget of {cfg.rate} journal bytes/s "
                        f"(burst {cfg.burst}): retry in {wait} s"),
                retry_after=min(wait, 3600),
            )
        if cfg.share and st.held >= cfg.share:
            return OverBudget(
                code="agent-share",
                detail=(f"agent {agent} holds {st.held} bytes of the journal, its share is {cfg.share}: "
                        "retry once the sinks have consumed them"),
                retry_after=default_wait,
            )
        return None

    def fits_share(self, agent: str, cost: int, *, default_wait: int) -> OverBudget | None:
        """A refusal if journaling ``cost`` more bytes would take ``agent`` beyond its share (an agent that
        holds nothing may always append one batch, or one batch bigger than the share would stall it)."""
        share = self.config.share
        st = self._agent(agent)
        if not share or st.held == 0 or st.held + cost <= share:
            return None
        return OverBudget(
            code="agent-share",
            detail=(f"agent {agent} holds {st.held} bytes of the journal; {cost} more would exceed its share "
                    f"of {share}: retry once the sinks have consumed them"),
            retry_after=default_wait,
        )

    def charge(self, agent: str, cost: int) -> None:
        """Spend ``cost`` bytes of an authenticated batch from the agent's bucket."""
        if self.config.rate:
            self._agent(agent).tokens -= cost

    def journaled(self, agent: str, last_seq: int, cost: int) -> None:
        """``cost`` bytes were appended for ``agent``, up to journal seq ``last_seq``."""
        st = self._agent(agent)
        st.held += cost
        chunks = st.chunks
        if chunks and len(chunks) >= MAX_CHUNKS:
            chunks[-1][0] = max(chunks[-1][0], last_seq)
            chunks[-1][1] += cost
        else:
            chunks.append([last_seq, cost])

    def trimmed(self, upto: int) -> None:
        """The journal dropped every entry up to seq ``upto``: release what the agents held there."""
        for st in self._agents.values():
            chunks = st.chunks
            while chunks and chunks[0][0] <= upto:
                st.held -= chunks.popleft()[1]
            if not chunks:
                st.held = 0

    def seed(self, usage: dict[str, tuple[int, int]]) -> None:
        """Start from what the journal already holds: ``{agent: (last seq, bytes)}``."""
        for agent, (last_seq, cost) in usage.items():
            if cost > 0:
                self.journaled(agent, last_seq, cost)

    def agents(self) -> list[str]:
        return list(self._agents)

    def held(self, agent: str) -> int:
        st = self._agents.get(agent)
        return st.held if st is not None else 0


def scan_journal_usage(path: Path) -> dict[str, tuple[int, int]]:
    """Per agent (journal stream): the last seq and the journal bytes of what ``path`` holds now.

    Read on a separate read-only connection (the journal is in WAL mode: the writer is not blocked); one pass
    over the table at start-up. An unreadable journal gives ``{}`` (the budgets then start empty).
    """
    if not path.exists():
        return {}
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    except sqlite3.Error:
        return {}
    try:
        rows = db.execute(
            "SELECT stream, max(seq), sum(length(payload) + length(CAST(exporter AS BLOB)) "
            f"+ length(CAST(stream AS BLOB)) + {ENTRY_OVERHEAD}) FROM entries GROUP BY stream"
        ).fetchall()
    except sqlite3.Error:
        return {}
    finally:
        db.close()
    return {str(s): (int(last), int(cost)) for s, last, cost in rows if s is not None and last is not None}
