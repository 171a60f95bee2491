"""Which gateway carries the next batch: a pure state machine fed the outcome of each exchange.

An agent may list several gateways of one cluster (``--gateway`` repeated): they share the journal, so any of
them holds this agent's mark and answers a resync correctly. The agent uses one at a time, the first listed
first, and moves to the next when the current one fails in a way another gateway may not: it cannot be
reached (connection refused, reset or lost, a TLS handshake or certificate failure), it does not answer in
time, it answers 5xx or 408, or its WebSocket closes as a server going away. Never on what every gateway would
answer alike (a 4xx refusal: the agent's key, its share of the journal, 429; a resync; a bad acknowledgement)
nor on what the path does (a proxy's refusal, a captive portal, bodies cut mid-way: those are the ladder's,
``flowtunnel.agent.transport.ladder``); the uploader does not consult it on the dns rung, which reaches the
cluster through the resolver whatever the URL.

A move to a gateway that has not failed since the last acknowledgement goes at once; when every gateway has
failed since then, the next move waits the delivery protocol's backoff, so an outage of the whole cluster
costs one attempt per gateway per backoff. After ``return_after`` seconds away from the first gateway it
goes back to it for one try (the first is the nearest, or the one the operator prefers). Each move is
returned once, with its reason, for the log and the status. Exactly once does not depend on this: one batch
is in flight at a time and every move is followed by a resynchronisation with the new gateway.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from flowtunnel.agent.transport.answers import Acked, Answer, Retry

__all__ = ["RETURN_AFTER", "Failover", "Move", "gateway_failure"]

RETURN_AFTER = 600.0
# WebSocket close codes of a server going away or failing (RFC 6455 7.4.1; 1006: closed without a frame).
_WS_GONE = frozenset({"ws-close-1001", "ws-close-1006", "ws-close-1011", "ws-close-1012", "ws-close-1013",
                      "ws-close-1014"})
_HTTP_5XX = re.compile(r"http-5\d\d")


@dataclass(frozen=True, kw_only=True)
class Move:
    """Move from gateway ``old`` to ``new`` because ``reason``; ``at_once``: try it without waiting (it has
    not failed since the last acknowledgement); ``round``: how many times every gateway failed since the last
    acknowledgement (0: this is the first time round; the caller logs later rounds quietly); ``failed``:
    ``old`` failed (``reason`` says how), else the agent goes back to the first gateway after a while."""

    old: str
    new: str
    reason: str
    at_once: bool
    round: int = 0
    failed: bool = True


def gateway_failure(answer: Answer) -> str | None:
    """Why this answer is the gateway's failure (another gateway may do better), or None."""
    if not isinstance(answer, Retry):
        return None
    cause = answer.cause
    if cause == "connection:cut-mid-body":
        return None  # a body limit on the path as often as a gateway dying: the delivery protocol's call
    if (cause.startswith(("connection:", "tls:")) or cause == "http-408" or _HTTP_5XX.fullmatch(cause)
            or cause in _WS_GONE):
        return answer.detail or cause
    return None


@dataclass(kw_only=True)
class Failover:
    gateways: tuple[str, ...]
    return_after: float = RETURN_AFTER
    index: int = 0
    good: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)  # gateway -> why it was left, last time
    moves: int = 0
    _down: set[str] = field(default_factory=set)  # failed since the last acknowledgement (or the last wrap)
    _rounds: int = 0  # times every gateway failed since the last acknowledgement
    _since: float | None = None  # when the agent left the first gateway

    def __post_init__(self) -> None:
        if not self.gateways:
            raise ValueError("Failover needs at least one gateway")

    @property
    def current(self) -> str:
        return self.gateways[self.index]

    def before(self, now: float) -> Move | None:
        """Before an exchange: time to go back to the first gateway for one try?"""
        if self.index == 0 or self._since is None or now - self._since < self.return_after:
            return None
        old = self.current
        self.index = 0
        self._since = None
        self.moves += 1
        return Move(old=old, new=self.current, at_once=True, failed=False,
                    reason=f"back to the first gateway after {self.return_after:.0f} s on {old}")

    def after(self, answer: Answer, cause: str | None, *, now: float) -> Move | None:
        """After an exchange with the current gateway: ``cause`` is the delivery protocol's failure cause
        (None when the batch or resync was acknowledged)."""
        url = self.current
        if isinstance(answer, Acked) and cause is None:
            self.good.add(url)
            self.failed.pop(url, None)
            self._down.clear()
            self._rounds = 0
            return None
        reason = gateway_failure(answer)
        if reason is None:
            return None
        self.failed[url] = reason
        if len(self.gateways) == 1:
            return None
        self._down.add(url)
        n = len(self.gateways)
        order = [(self.index + k) % n for k in range(1, n)]
        fresh = next((i for i in order if self.gateways[i] not in self._down), None)
        at_once = fresh is not None
        if fresh is None:
            fresh = order[0]  # every gateway failed: wrap round after the backoff, a new round starts
            self._down.clear()
            self._rounds += 1
        self.index = fresh
        self._since = None if fresh == 0 else (self._since if self._since is not None else now)
        self.moves += 1
        return Move(old=url, new=self.current, reason=reason, at_once=at_once, round=self._rounds)

    def status(self) -> dict[str, object]:
        return {
            "gateway": self.current,
            "gateways": {url: ("current" if url == self.current else
                               f"failed: {self.failed[url]}" if url in self.failed else
                               "good" if url in self.good else "untried")
                         for url in self.gateways},
            "gateway_moves": self.moves,
        }
