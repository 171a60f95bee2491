"""GET-only rung: sealed batches carried in the URLs (and a cookie) of GET requests, reassembled here.

For proxies that refuse POST, request bodies or ``Upgrade``: the agent writes a sealed batch as base64url
text, cuts it into pieces and sends piece ``i`` of ``n`` as ``GET /v1/g/<agent>/<batch_id>/<i>/<n>/<data>``
(plus an optional ``Cookie: ft=<more data>``); docs/protocol.md section 7.5. Pieces come in any order, on any
connection, possibly repeated; when the last missing one arrives the batch goes through the same
``Admission`` slot and ``Ingest.deliver`` as a POST, and that piece gets the POST answer.

``PieceBuffer`` is the reassembly itself, pure and clock-explicit (testable without sockets);
``PieceEndpoint`` is the aiohttp handler around it.

Resource handling (pieces are authenticated only as a whole, by the batch's AEAD tag once complete, so anyone
who knows an agent id can send pieces): pieces of an agent that is not enrolled are refused before they are
held; per batch at most ``max_pieces`` pieces and ``max_body`` decoded bytes (413); at most
``pending_per_agent`` incomplete batches per agent and ``pending_bytes`` in all, counting 64 bytes of overhead
per piece (503 ``busy``: the batches already being assembled keep their room); an incomplete batch is dropped
``max_age`` after its first piece (counted in ``flowtunnel_gateway_get_expired_batches``). Nothing reaches the
journal before the batch authenticates.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from flowtunnel.gateway.admission import Admission
from flowtunnel.gateway.edge import NO_STORE, http_response
from flowtunnel.gateway.ingest import Ack, Ingest, Outcome, Refusal, Rejected
from flowtunnel.gateway.metrics import GatewayMetrics
from flowtunnel.runtime import OnceLogger
from flowtunnel.wire import BadAgentId, validate_agent_id

__all__ = [
    "PIECE_OVERHEAD",
    "Complete",
    "Incomplete",
    "PieceBuffer",
    "PieceEndpoint",
    "PieceSettings",
]

log = logging.getLogger("flowtunnel.gateway.pieces")

#: Bytes of bookkeeping counted per held piece on top of its text, so floods of tiny pieces are bounded too.
PIECE_OVERHEAD = 64
MAX_COOKIE = 3000

_BATCH_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_NUMBER_RE = re.compile(r"^(0|[1-9][0-9]{0,8})$")
_B64URL_RE = re.compile(r"^[A-Za-z0-9_-]*$")


@dataclass(frozen=True, slots=True, kw_only=True)
class PieceSettings:
    """Bounds of the GET-only rung (``GatewayConfig`` keys ``get_*``; ``max_body`` as for POST)."""

    max_body: int
    max_pieces: int = 4096
    pending_per_agent: int = 4
    pending_bytes: int = 64 << 20
    max_age: float = 120.0
    retry_after: int = 5

    @property
    def max_chars(self) -> int:
        """Base64url characters of a batch of ``max_body`` bytes."""
        return -(-self.max_body * 4 // 3)


@dataclass(frozen=True, slots=True)
class Incomplete:
    """The batch still misses pieces (``have == of``: complete and being processed now)."""

    have: int
    of: int

    def as_json(self) -> dict[str, object]:
        return {"have": self.have, "of": self.of}


@dataclass(frozen=True, slots=True)
class Complete:
    """This piece completed the batch: the caller delivers ``body`` and calls ``PieceBuffer.finish``."""

    body: bytes


@dataclass(slots=True)
class _Pending:
    n: int
    started: float
    pieces: dict[int, str] = field(default_factory=dict)
    cost: int = 0
    chars: int = 0


class PieceBuffer:
    """Incomplete GET-only batches and the answers of recently completed ones. Not thread-safe.

    ``add`` returns what to answer: ``Incomplete``, ``Complete`` (deliver it, then ``finish``), the
    recorded ``Outcome`` of a completed batch, or a ``Refusal`` (bad piece, too large, busy).
    """

    def __init__(self, settings: PieceSettings, *, on_expired: Callable[[str, int, int], None] | None = None):
        self.settings = settings
        self._pending: OrderedDict[tuple[str, str], _Pending] = OrderedDict()  # oldest first
        self._per_agent: dict[str, int] = {}
        self._busy: set[tuple[str, str]] = set()  # complete, being delivered
        self._done: OrderedDict[tuple[str, str], tuple[float, Outcome]] = OrderedDict()
        self._on_expired = on_expired
        self.cost = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._pending)

    def expire(self, now: float) -> None:
        """Drop incomplete batches older than ``max_age`` (counted) and answers kept longer than that."""
        limit = now - self.settings.max_age
        while self._pending:
            key, pend = next(iter(self._pending.items()))
            if pend.started > limit:
                break
            self._drop(key)
            self.expired += 1
            if self._on_expired is not None:
                self._on_expired(key[0], len(pend.pieces), pend.n)
        while self._done:
            key, (when, _) = next(iter(self._done.items()))
            if when > limit and len(self._done) <= 64 * self.settings.pending_per_agent + 1024:
                break
            del self._done[key]

    def _drop(self, key: tuple[str, str]) -> None:
        pend = self._pending.pop(key)
        self.cost -= pend.cost
        left = self._per_agent.pop(key[0]) - 1
        if left:
            self._per_agent[key[0]] = left

    def add(self, agent: str, batch_id: str, i: int, n: int, text: str, now: float) -> (
        Incomplete | Complete | Outcome
    ):
        """Take piece ``i`` of ``n`` (already validated in form) of ``agent``'s batch ``batch_id``."""
        s = self.settings
        self.expire(now)
        key = (agent, batch_id)
        done = self._done.get(key)
        if done is not None:
            return done[1]
        if key in self._busy:
            return Incomplete(n, n)
        pend = self._pending.get(key)
        if pend is None:
            held = self._per_agent.get(agent, 0)
            if held >= s.pending_per_agent:
                return self._busy_refusal(
                    agent, f"agent {agent} has {held} GET-only batches pending (get_pending_per_agent "
                    f"{s.pending_per_agent})"
                )
            pend = _Pending(n=n, started=now)
            self._pending[key] = pend
            self._per_agent[agent] = held + 1
        elif n != pend.n:
            return Refusal(
                code="bad-piece", agent=agent,
                detail=f"piece {i} of batch {batch_id} says {n} pieces, earlier pieces said {pend.n}",
            )
        if i in pend.pieces:
            return Incomplete(len(pend.pieces), n)  # a repeat: the first copy counts
        cost = len(text) + PIECE_OVERHEAD
        if pend.chars + len(text) > s.max_chars:
            self._drop(key)
            return Refusal(
                code="too-large", agent=agent,
                detail=f"GET-only batch {batch_id} exceeds max_body {s.max_body} bytes "
                f"({pend.chars + len(text)} base64url characters so far)",
            )
        if self.cost + cost > s.pending_bytes:
            if not pend.pieces:
                self._drop(key)
            return self._busy_refusal(
                agent,
                f"GET-only batches pending hold {self.cost} bytes (get_pending_bytes {s.pending_bytes})",
            )
        pend.pieces[i] = text
        pend.cost += cost
        pend.chars += len(text)
        self.cost += cost
        if len(pend.pieces) < n:
            return Incomplete(len(pend.pieces), n)
        whole = "".join(pend.pieces[j] for j in range(n))
        self._drop(key)
        try:
            if len(whole) % 4 == 1:
                raise ValueError
            body = base64.urlsafe_b64decode(whole + "=" * (-len(whole) % 4))
        except (binascii.Error, ValueError):
            return Refusal(
                code="bad-piece", agent=agent,
                detail=f"the {n} pieces of batch {batch_id} ({len(whole)} characters) are not base64url",
            )
        self._busy.add(key)
        return Complete(body)

    def finish(self, agent: str, batch_id: str, outcome: Outcome, now: float) -> None:
        """Record the answer of a batch ``add`` returned ``Complete`` for. Acks and definite refusals are
        re-served to later pieces of the same id (a lost answer is not a lost ack); a refusal with
        ``retry_after`` is not, since the agent may re-send the batch under the same id."""
        key = (agent, batch_id)
        self._busy.discard(key)
        if isinstance(outcome, Ack) or outcome.retry_after is None:
            self._done[key] = (now, outcome)

    def abandon(self, agent: str, batch_id: str) -> None:
        """Forget a batch ``add`` returned ``Complete`` for whose delivery did not finish."""
        self._busy.discard((agent, batch_id))

    def _busy_refusal(self, agent: str, detail: str) -> Refusal:
        return Refusal(code="busy", detail=detail, agent=agent, retry_after=self.settings.retry_after)


class PieceEndpoint:
    """``GET /v1/g/{agent}/{batch_id}/{i}/{n}/{data}``: checks a piece, feeds ``PieceBuffer``, answers."""

    def __init__(
        self,
        *,
        ingest: Ingest,
        admission: Admission,
        metrics: GatewayMetrics,
        settings: PieceSettings,
        clock: Callable[[], float],
    ) -> None:
        self._ingest = ingest
        self._admission = admission
        self._metrics = metrics
        self._clock = clock
        self._once = OnceLogger(log)
        self.buffer = PieceBuffer(settings, on_expired=self._expired)

    def _expired(self, agent: str, have: int, of: int) -> None:
        self._metrics.get_expired.inc()
        self._once.warning(
            "get-expired", "GET-only batch of agent %s dropped incomplete after %g s (%d of %d pieces)",
            agent, self.buffer.settings.max_age, have, of,
        )

    def _answer(self, outcome: Outcome | Incomplete) -> web.Response:
        self._metrics.get_pending_batches.set(len(self.buffer))
        self._metrics.get_pending_bytes.set(self.buffer.cost)
        if isinstance(outcome, Incomplete):
            return web.json_response(outcome.as_json(), headers=NO_STORE)
        return http_response(outcome, headers=NO_STORE)

    def _refuse(self, exc: Rejected) -> web.Response:
        return self._answer(self._ingest.refuse(exc))

    async def handle(self, request: web.Request) -> web.Response:
        info = request.match_info
        agent_text, batch_id = info["agent"], info["batch"]
        i_text, n_text, data = info["i"], info["n"], info["data"]
        cookie = request.cookies.get("ft", "")
        label = self._ingest.enrolled(agent_text)
        try:
            agent = validate_agent_id(agent_text)
        except BadAgentId as exc:
            return self._refuse(Rejected("bad-piece", str(exc)))
        why = None
        if not _BATCH_ID_RE.match(batch_id):
            why = f"batch id {batch_id[:40]!r} is not 16 lowercase hex digits"
        elif not (_NUMBER_RE.match(i_text) and _NUMBER_RE.match(n_text)):
            why = f"piece {i_text[:12]!r} of {n_text[:12]!r} is not two decimal numbers"
        elif not 0 <= int(i_text) < int(n_text) <= self.buffer.settings.max_pieces:
            why = (f"piece {i_text} of {n_text} is outside 0 <= i < n <= get_max_pieces "
                   f"{self.buffer.settings.max_pieces}")
        elif not _B64URL_RE.match(data):
            why = f"piece data of {len(data)} characters is not base64url"
        elif len(cookie) > MAX_COOKIE or not _B64URL_RE.match(cookie):
            why = f"cookie ft of {len(cookie)} characters is not base64url of at most {MAX_COOKIE}"
        if why is not None:
            return self._refuse(Rejected("bad-piece", why, agent=label))
        try:
            self._ingest.entry(agent)
        except Rejected as exc:
            return self._refuse(exc)
        got = self.buffer.add(agent, batch_id, int(i_text), int(n_text), data + cookie, self._clock())
        if isinstance(got, Refusal):
            return self._answer(self._ingest.refused(got))
        if not isinstance(got, Complete):
            return self._answer(got)
        try:
            outcome = await self._deliver(agent, got.body)
        except BaseException:
            self.buffer.abandon(agent, batch_id)  # cancelled or failed: nothing recorded, the agent re-sends
            raise
        self.buffer.finish(agent, batch_id, outcome, self._clock())
        return self._answer(outcome)

    async def _deliver(self, agent: str, body: bytes) -> Outcome:
        with self._admission.slot(agent) as busy:
            if busy is not None:
                return self._ingest.refuse(Rejected(
                    "busy", busy.detail(), agent=agent, retry_after=self.buffer.settings.retry_after
                ))
            return await self._ingest.deliver(body, agent_header=agent, rung="get")
