"""Ingest: from a sealed batch body to a journal commit and an acknowledgement, or a precise rejection.

The HTTP layer (``app.py``) checks the request's shape and reads the body; everything about the batch
itself happens here: find the agent, authenticate and open the batch, drop what is at or below the agent's
high-water mark, append the rest to the journal with the new mark in the same transaction, then answer.
Appends are serialised per agent, so two retries of one batch racing each other cannot both pass the check.

Error handling: every refusal is a ``Rejected`` carrying a short machine-readable code (the JSON ``error``,
the metrics "cause" label) and a detail for the agent's log; nothing is written to the journal for it. No
HTTP status here: the endpoints map codes to their transport's status (``gateway/edge.py``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flowtunnel.datagram import Datagram
from flowtunnel.gateway.budget import AgentBudgets, BudgetConfig, OverBudget, journal_cost
from flowtunnel.gateway.contexts import ContextCache
from flowtunnel.gateway.metrics import MAX_FIGURE, GatewayMetrics, parse_count, parse_dropped_header
from flowtunnel.gateway.nonces import NonceWindow, Seen
from flowtunnel.gateway.registry import AgentEntry, AgentKeys, RegistryError
from flowtunnel.gateway.streams import StreamCache
from flowtunnel.journal import AgentJournal, JournalConflict, JournalPartial, hwm_key
from flowtunnel.log import LogError, LogFull
from flowtunnel.runtime import OnceLogger
from flowtunnel.wire import (
    FLAG_CONTEXT,
    FLAG_STREAM,
    FLAG_STREAM_START,
    HEADER,
    MAGIC,
    AuthenticationFailed,
    Batch,
    WireError,
    WireLimits,
    ack_tag,
    header_length,
    open_batch,
    peek_header,
    stream_of,
    validate_agent_id,
)

__all__ = [
    "SMALL_BODY", "SMALL_RAW", "Ack", "Ingest", "Outcome", "Refusal", "Rejected", "StateAnswer", "clock_skew",
    "hwm_key",
]

log = logging.getLogger("flowtunnel.gateway.ingest")


def clock_skew(batch: Batch, fresh: list[Datagram], now: float) -> float:
    """One batch's estimate of its agent's clock minus the gateway's ``now``, in seconds.

    Both clues the batch carries are lower bounds, late by however long the data waited: the agent's clock
    when it sealed the batch (agent info ``clock_ms``, sealed and authenticated) and the agent's receive time
    of the newest datagram. The larger is the tighter. Only batches with new datagrams are sampled: a
    replayed batch must not move the figure.
    """
    newest = max(d.received_ns for d in fresh) / 1e9
    sealed = batch.agent_info.get("clock_ms")
    agent_now = newest if sealed is None else max(newest, sealed / 1000)
    return agent_now - now


class Rejected(Exception):
    """A request the gateway refuses: ``code`` (the cause: JSON ``error``, metrics label), ``detail`` (for
    humans). No transport status: each edge maps ``code`` (``gateway/edge.py`` for HTTP and WebSocket).

    ``agent`` is set only when the agent is enrolled, so metrics labels stay bounded.
    """

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        agent: str | None = None,
        retry_after: int | None = None,
        extra: dict[str, int] | None = None,
    ) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.agent = agent
        self.retry_after = retry_after
        self.extra = extra or {}

    def refusal(self) -> Refusal:
        """The transport-neutral form the endpoints answer with (the edge maps ``code`` to a status)."""
        return Refusal(
            code=self.code, detail=self.detail, agent=self.agent, retry_after=self.retry_after,
            extra=dict(self.extra),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """A batch (or request) the gateway refused, whatever carried it: ``code`` is the cause (the JSON
    ``error``, the metrics label), ``detail`` for the agent's log, ``retry_after`` seconds when trying again
    later can work, ``extra`` more JSON fields (``acked`` of a resync). Each transport maps ``code`` to its
    own status at its edge (``gateway/edge.py`` for HTTP and WebSocket)."""

    code: str
    detail: str
    agent: str | None = None
    retry_after: int | None = None
    extra: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, object]:
        doc: dict[str, object] = {"error": self.code, "detail": self.detail}
        doc.update(self.extra)
        return doc


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    """The answer to an accepted batch (the JSON body of the 200)."""

    agent: str
    acked: int
    accepted: int
    duplicates: int
    gap: int = 0
    tag: str = ""  # ack_tag over (agent, request nonce, acked): docs/protocol.md section 7.1
    first_journal_seq: int | None = field(default=None, repr=False)

    def as_json(self) -> dict[str, object]:
        return {
            "agent": self.agent,
            "acked": self.acked,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "tag": self.tag,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class StateAnswer:
    """The answer to ``GET /v1/agents/<id>/state`` (the JSON body of the 200)."""

    agent: str
    acked: int
    tag: str

    def as_json(self) -> dict[str, object]:
        return {"agent": self.agent, "acked": self.acked, "tag": self.tag}


#: A batch this small (sealed, and its record block once decompressed) is opened on the event loop: that
#: takes less time than the hop to a worker thread and back (2,000 agents: a hop per request was ~10 % of
#: the gateway's CPU). A POST this small also takes its slot from the small batches' lane (``app.py``).
SMALL_BODY = 16 << 10
SMALL_RAW = 64 << 10

#: Lost races for one batch (a shared journal) before ingest gives up with 503.
_CONFLICT_ATTEMPTS = 8

#: Rungs on which batches can overtake each other: a gap must be declared (``Ingest._check_gap``).
GAPLESS_RUNGS = frozenset({"ws", "get"})

#: What ``Ingest.deliver`` answers: an acknowledgement or a refusal, both transport-neutral.
Outcome = Ack | Refusal


def _wire_code(exc: WireError) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code:
        return code
    return type(exc).__name__.lower()


class Ingest:
    """The batch path of one gateway. Not thread-safe: use from the event loop only."""

    def __init__(
        self,
        *,
        journal: AgentJournal,
        keys: AgentKeys,
        metrics: GatewayMetrics,
        limits: WireLimits | None = None,
        retry_after: int = 5,
        budgets: AgentBudgets | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._journal = journal
        self._keys = keys
        self._metrics = metrics
        self._limits = limits if limits is not None else WireLimits()
        self._retry_after = retry_after
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        self._hwm: dict[str, int] = {}
        self._lost_hint: dict[str, int] = {}
        self.budgets = budgets if budgets is not None else AgentBudgets(BudgetConfig())
        self._nonces = NonceWindow()
        self.once = OnceLogger(log)
        self.contexts = ContextCache()  # compression contexts per agent (docs/protocol.md section 3.3)
        self.streams = StreamCache()  # compression streams per agent (docs/protocol.md section 3.4)
        metrics.compression_streams.set_function(lambda: float(len(self.streams)))
        self.closing = False

    # -- shared by the handlers --------------------------------------------------------------------------

    def refused(self, refusal: Refusal) -> Refusal:
        """Count and (once per cause) log a refusal decided outside ingest (an edge, a reassembly)."""
        self._metrics.reject(refusal.agent, refusal.code)
        self.once.warning(
            refusal.code, "rejected request (%s, agent %s): %s", refusal.code, refusal.agent or "?",
            refusal.detail,
        )
        return refusal

    def reject(self, exc: Rejected) -> None:
        """Count and (once per cause) log a rejection."""
        self.refused(exc.refusal())

    def enrolled(self, agent_id: str | None) -> str | None:
        """``agent_id`` if it names an enrolled agent (for metrics labels), else None."""
        if not agent_id:
            return None
        try:
            entry = self._keys.lookup(agent_id)
        except RegistryError:
            return None
        return agent_id if entry is not None else None

    async def hwm(self, agent_id: str) -> int:
        """The agent's high-water mark (cached; a shared journal's append checks it, see ``_commit``)."""
        value = self._hwm.get(agent_id)
        if value is None:
            try:
                value = await self._journal.hwm(agent_id)
            except LogError as exc:
                raise Rejected(
                    "journal-error", str(exc), agent=agent_id, retry_after=self._retry_after
                ) from None
            self._hwm[agent_id] = value
        return value

    def entry(self, agent_id: str) -> AgentEntry:
        """The registry entry of an enrolled, non-revoked agent; ``Rejected`` (not yet counted) otherwise."""
        return self._entry(agent_id)

    def _entry(self, agent_id: str) -> AgentEntry:
        try:
            entry = self._keys.lookup(agent_id)
        except RegistryError as exc:
            raise Rejected("registry-unavailable", str(exc), retry_after=self._retry_after) from None
        if entry is None:
            self.streams.forget(agent_id)
            raise Rejected("unknown-agent", f"agent {agent_id!r} is not enrolled at this gateway")
        if entry.revoked:
            self.streams.forget(agent_id)
            raise Rejected("revoked", f"agent {agent_id!r} has been revoked", agent=agent_id)
        return entry

    def admit(self, head: bytes, agent_header: str | None) -> str:
        """Check the start of a body (magic and agent id, read before the rest) against the headers and the
        registry; the agent id, or ``Rejected`` (not yet counted: the caller does). Everything else about the
        batch is checked once it is complete."""
        label = self.enrolled(agent_header)
        if head[:4] != MAGIC[: len(head[:4])]:
            detail = f"body does not start with the batch magic {MAGIC!r} (got {bytes(head[:4])!r})"
            raise Rejected("bad-magic", detail, agent=label)
        header_len = header_length(head) or HEADER.size
        if len(head) < header_len:
            detail = f"body of {len(head)} bytes ends inside the {header_len}-byte batch header"
            raise Rejected("truncated", detail, agent=label)
        try:
            agent_id = validate_agent_id(bytes(head[HEADER.size : header_len]).decode("ascii"))
        except (UnicodeDecodeError, ValueError) as exc:
            detail = f"header agent id is invalid: {exc}"
            raise Rejected("malformed-header", detail, agent=label) from None
        self._check_agent(agent_id, agent_header)
        self._refuse(self.budgets.check(agent_id, default_wait=self._retry_after), agent_id)
        return agent_id

    @staticmethod
    def _refuse(refusal: OverBudget | None, agent: str) -> None:
        if refusal is not None:
            raise Rejected(refusal.code, refusal.detail, agent=agent, retry_after=refusal.retry_after)

    def _check_agent(self, agent_id: str, agent_header: str | None) -> AgentEntry:
        if agent_header is None:
            raise Rejected(
                "no-agent-header", "X-Flowtunnel-Agent is missing", agent=self.enrolled(agent_id)
            )
        if agent_header != agent_id:
            raise Rejected(
                "agent-mismatch",
                f"X-Flowtunnel-Agent {agent_header[:64]!r} differs from the batch's agent {agent_id[:64]!r}",
                agent=self.enrolled(agent_id),
            )
        return self._entry(agent_id)

    async def _open(
        self, body: bytes, agent_header: str | None, *, budget: bool = False, streams: bool = False
    ) -> tuple[Batch, bytes, bool]:
        """Authenticate and open ``body``: the batch, the key that opened it (which also tags the answer),
        and whether it is an exact copy of a recent request (a replay); re-reads the registry once if the
        key may have been rotated. A recent nonce reused with other content is counted and logged.
        ``budget``: refuse (429) an agent over its budget before decrypting (every rung: WebSocket messages
        and GET pieces do not pass through ``admit``). ``streams``: a stream frame continues the agent's held
        stream (docs/protocol.md section 3.4; taken out of the cache: the caller keeps ``batch.stream`` once
        the batch is acknowledged); otherwise a continuation is ``unknown-context``."""
        batch, key = await self._authenticate(body, agent_header, budget=budget, streams=streams)
        seen = self._nonces.check(batch.agent_id, key, batch.header.nonce, body[-16:])
        if seen is Seen.REUSED:
            self._metrics.nonce_reuse(batch.agent_id)
            self.once.warning(
                f"nonce-reuse:{batch.agent_id}",
                "agent %s reused a recent nonce with different content under the same key (a broken or "
                "hostile client: it weakens the encryption of both batches; see docs/security.md)",
                batch.agent_id,
            )
        return batch, key, seen is Seen.REPLAYED

    async def _authenticate(
        self, body: bytes, agent_header: str | None, *, budget: bool, streams: bool = False
    ) -> tuple[Batch, bytes]:
        try:
            header = peek_header(body, self._limits)
        except WireError as exc:
            raise Rejected(_wire_code(exc), str(exc), agent=self.enrolled(agent_header)) from None
        agent_id = header.agent_id
        entry = self._check_agent(agent_id, agent_header)
        if budget:
            self._refuse(self.budgets.check(agent_id, default_wait=self._retry_after), agent_id)
        # Decryption and bounded decompression take milliseconds per MiB: off the event loop, but for a
        # small batch (the usual one of a quiet agent), which takes less than the hop to a thread and back.
        inline = len(body) <= SMALL_BODY and header.raw_len <= SMALL_RAW
        # A continuation frame decodes against the agent's stream, out of the cache meanwhile (a second frame
        # of that stream at the same time finds none: unknown-context).
        held = None
        if streams and header.flags & FLAG_STREAM and not header.flags & FLAG_STREAM_START:
            held = self.streams.take(agent_id, header.dict_id)
        # Only a batch compressed against a context needs them (copied, hashed: ``ContextCache.of``).
        contexts = self.contexts.of(agent_id) if header.flags & FLAG_CONTEXT else None
        for attempt in (0, 1):
            try:
                if inline:
                    batch = open_batch(body, key=entry.key, limits=self._limits, contexts=contexts,
                                       stream=held)
                else:
                    batch = await asyncio.to_thread(open_batch, body, key=entry.key, limits=self._limits,
                                                    contexts=contexts, stream=held)
                return batch, entry.key
            except WireError as exc:
                if isinstance(exc, AuthenticationFailed) and attempt == 0 and self._keys.refresh_if_stale():
                    entry = self._entry(agent_id)
                    continue
                if held is not None:
                    self.streams.give_back(agent_id, held, position=stream_of(header.dict_id)[1])
                raise Rejected(_wire_code(exc), str(exc), agent=agent_id) from None
        raise AssertionError("unreachable")

    # -- every endpoint that carries batches ----------------------------------------------------------------

    def refuse(self, exc: Rejected) -> Refusal:
        """Count and (once per cause) log a refusal decided at an edge; its neutral form."""
        self.reject(exc)
        return exc.refusal()

    async def deliver(
        self,
        body: bytes,
        *,
        agent_header: str | None,
        rung: str,
        backlog: str | None = None,
        dropped: str | None = None,
        agent_acked: str | None = None,
    ) -> Outcome:
        """The one entry point for a sealed batch, whatever carried it (``rung``: ``post``, ``ws``, ``get``):
        journal its new part and acknowledge it, or refuse it. The caller holds an ``Admission`` slot.

        ``agent_header`` is the agent id the transport named (header, connection, URL), which must equal the
        batch's. ``backlog``/``dropped``/``agent_acked`` are POST's clear-text advisory headers (other rungs
        carry those figures only sealed, in the agent info).

        Error handling: never raises for anything about the batch: a refusal is returned, already counted
        (by cause, and per rung) and logged once per cause.
        """
        try:
            ack = await self.submit(
                body, agent_header=agent_header, backlog=backlog, dropped=dropped, agent_acked=agent_acked,
                gapless=rung in GAPLESS_RUNGS,
            )
        except Rejected as exc:
            self._metrics.rung_batch(rung, "refused")
            return exc.refusal()
        self._metrics.rung_batch(rung, "acked")
        if agent_header is not None:
            self._metrics.agent_rung(agent_header, rung)
        return ack

    # -- POST /v1/batches ---------------------------------------------------------------------------------

    async def submit(
        self,
        body: bytes,
        *,
        agent_header: str | None,
        backlog: str | None = None,
        dropped: str | None = None,
        agent_acked: str | None = None,
        gapless: bool = False,
    ) -> Ack:
        """Journal the new part of one sealed batch and return the acknowledgement.

        ``gapless``: refuse (409 ``out-of-order``) new datagrams that would leave a gap above the high-water
        mark the agent has not declared (``_check_gap``), instead of counting the gap as the agent's drops.

        ``backlog`` and ``dropped`` are the clear-text advisory headers: used only when the batch does not
        carry the same figures sealed, and only for a batch that brought new datagrams. ``agent_acked`` (the
        clear-text ``X-Flowtunnel-Acked``) is ignored: anyone on the path could set it; only the sealed
        ``acked`` can trigger a resync (409).

        Error handling: raises ``Rejected`` (already counted and logged) for anything not accepted; a
        journal that cannot commit (disk or quota full, I/O error) gives 503 with Retry-After, nothing acked.
        """
        try:
            if self.closing:
                raise Rejected(
                    "shutting-down", "the gateway is shutting down", retry_after=self._retry_after
                )
            batch, key, replayed = await self._open(body, agent_header, budget=True, streams=True)
            stream, batch_stream = batch.stream, batch.stream
            try:
                # Only an authenticated batch spends the agent's budget (bounded decompression has been paid).
                self.budgets.charge(batch.agent_id, journal_cost(batch.agent_id, batch.datagrams))
                ack = await self._commit(
                    batch, key, http_bytes=len(body), backlog=backlog, dropped=dropped, replayed=replayed,
                    gapless=gapless,
                )
                # The agent continues a stream only past acknowledged frames: keep it now, not before. An
                # exact copy of a start frame already seen (a replay) does not replace the stream held.
                if stream is not None and not replayed:
                    evicted = self.streams.evicted
                    self.streams.keep(batch.agent_id, stream,
                                      start=bool(batch.header.flags & FLAG_STREAM_START))
                    if self.streams.evicted > evicted:
                        self._metrics.compression_streams_evicted.inc(self.streams.evicted - evicted)
                    stream = None
            finally:
                if stream is not None:  # refused after decoding: its state is the agent's no more
                    stream.decoder.close()
            if batch.datagrams and batch_stream is None:  # the agent's next batch may use this one's context
                self.contexts.remember(batch.agent_id, batch.context)
            return ack
        except Rejected as exc:
            self.reject(exc)
            raise

    async def _commit(
        self, batch: Batch, key: bytes, *, http_bytes: int, backlog: str | None, dropped: str | None,
        replayed: bool, gapless: bool = False,
    ) -> Ack:
        agent = batch.agent_id
        lock = self._locks.get(agent)
        if lock is None:
            lock = self._locks[agent] = asyncio.Lock()
        async with lock:
            # A journal shared by several gateways: the append succeeds only while the mark is the one
            # decided on; a lost race re-reads the mark and decides again (the batch may now be a duplicate).
            for attempt in range(_CONFLICT_ATTEMPTS):
                try:
                    hwm, fresh, skip, gap, lost, journal_first = await self._decide_and_append(
                        agent, batch, replayed=replayed, gapless=gapless
                    )
                    break
                except JournalConflict as exc:
                    self._hwm.pop(agent, None)
                    self._journal.forget(agent)
                    if attempt == _CONFLICT_ATTEMPTS - 1:
                        raise Rejected(
                            "journal-error", f"agent {agent}: the mark kept moving: {exc}", agent=agent,
                            retry_after=self._retry_after,
                        ) from None
        if replayed and not fresh:
            self._metrics.replay(agent)  # an exact copy of a recent request changes no figure
        else:
            figures = _advisory(batch, backlog, dropped) if fresh else (None, {})
            self._metrics.accepted(
                agent,
                now=self._clock(),
                acked=hwm,
                accepted=len(fresh),
                duplicates=skip,
                gap=gap,
                lost=lost,
                http_bytes=http_bytes,
                datagram_bytes=sum(len(d.payload) for d in fresh),
                backlog=figures[0],
                dropped=figures[1],
                backlog_age=_info_figure(batch, "backlog_age") if fresh else None,
            )
        tag = ack_tag(key, agent_id=agent, request_nonce=batch.header.nonce, acked=hwm)
        return Ack(
            agent=agent, acked=hwm, accepted=len(fresh), duplicates=skip, gap=gap, tag=tag,
            first_journal_seq=journal_first,
        )

    async def _decide_and_append(
        self, agent: str, batch: Batch, *, replayed: bool, gapless: bool
    ) -> tuple[int, list[Datagram], int, int, int, int | None]:
        """Under the agent's lock: the part of ``batch`` above the mark, journaled (raises
        ``JournalConflict`` when another gateway moved the mark meanwhile); (mark, fresh, skipped, gap, lost,
        first journal seq)."""
        # A mark cached by a gateway that shares its journal may be stale: refusals based on it are decided
        # again on a fresh read (appends are checked by the journal itself).
        cached = self._journal.shared and agent in self._hwm
        hwm = await self.hwm(agent)
        datagrams: list[Datagram] = list(batch.datagrams)
        first = batch.first_seq
        skip = min(len(datagrams), max(0, hwm + 1 - first))
        fresh = datagrams[skip:]
        gap = lost = 0
        journal_first: int | None = None
        if not fresh:
            return hwm, fresh, skip, gap, lost, journal_first
        new_first = first + skip
        try:
            self._check_known_ack(agent, hwm, batch)
            self._check_gap(agent, hwm, new_first, batch, gapless=gapless)
        except Rejected as exc:
            if cached:
                raise JournalConflict(f"agent {agent}: {exc.code} against a cached mark", path="") from None
            raise
        cost = journal_cost(agent, fresh)
        self._refuse(self.budgets.fits_share(agent, cost, default_wait=self._retry_after), agent)
        gap = new_first - (hwm + 1)
        # The part of the gap this gateway lost itself (reported at the resync), not the agent.
        hint = self._lost_hint.get(agent, hwm)
        lost = min(gap, max(0, hint - hwm))
        gap -= lost
        # The gateway's own receive time, journaled with every entry: retention and every "received"
        # the sinks act on use it; the datagrams keep the agent's (whose clock may be hours off).
        now = self._clock()
        try:
            res = await self._journal.append(agent, new_first, fresh, hwm=hwm, appended_ns=int(now * 1e9))
        except JournalConflict:
            raise
        except LogError as exc:
            # Nothing acknowledged. The cached mark is dropped: a batch journaled over several commits may
            # have moved it before failing (JournalPartial), and the next request re-reads it.
            self._hwm.pop(agent, None)
            cause: LogError = exc
            if isinstance(exc, JournalPartial):
                self.budgets.journaled(agent, exc.last_seq, journal_cost(agent, fresh[: exc.committed]))
                cause = exc.cause
            if isinstance(cause, LogFull):
                code = "agent-share" if type(cause).__name__ == "AgentQuotaFull" else "journal-full"
                raise Rejected(
                    code, f"journal cannot take {len(fresh)} datagrams: {exc}",
                    agent=agent, retry_after=self._retry_after,
                ) from None
            raise Rejected(
                "journal-error", str(exc), agent=agent, retry_after=self._retry_after
            ) from None
        except BaseException:
            self._hwm.pop(agent, None)  # cancelled: the append may still commit; re-read the mark next time
            raise
        self._lost_hint.pop(agent, None)
        self._hwm[agent] = hwm = new_first + len(fresh) - 1
        journal_first = res.first_seq
        self.budgets.journaled(agent, res.last_seq, cost)
        self._metrics.held(agent, self.budgets.held(agent))
        self._metrics.clock_sample(agent, clock_skew(batch, fresh, now))
        if gap:
            self.once.warning(
                f"gap:{agent}", "agent %s skipped %d sequence numbers (its drops) before %d",
                agent, gap, new_first,
            )
        if lost:
            log.error(
                "agent %s: %d datagrams (seq %d..%d) acknowledged earlier are missing from the "
                "journal (restored from a backup, or a torn tail) and no longer at the agent: lost",
                agent, lost, new_first - lost, new_first - 1,
            )
        return hwm, fresh, skip, gap, lost, journal_first

    def _check_gap(self, agent: str, hwm: int, new_first: int, batch: Batch, *, gapless: bool) -> None:
        """Refuse new datagrams that would skip sequence numbers the agent still holds.

        Batches may overtake each other on the rungs that pipeline (several WebSocket messages in flight,
        GET pieces completing in any order) or when an agent races rungs: if batch k+1 were journaled while k
        is refused or late, the gap would count as the agent's drops and k would later be a "duplicate" below
        the mark: lost. So a gap is accepted only where the agent declares it, in the sealed agent info key
        ``spool_first`` (the lowest seq it still holds; everything below it that the gateway lacks, it
        dropped): a batch declaring it is held to it on every rung, and a batch on a ``gapless`` rung (ws,
        get) must declare it to leave a gap. Otherwise 409 ``out-of-order`` with the mark: the agent
        resynchronises and re-sends from ``acked + 1``. Nothing is written.
        """
        if new_first <= hwm + 1:
            return
        declared = batch.agent_info.get("spool_first")
        if declared is None and not gapless:
            return  # an agent that does not declare its spool sends one batch at a time (POST)
        if declared is not None and declared >= new_first:
            return
        held = "" if declared is None else f" (its spool starts at {declared})"
        raise Rejected(
            "out-of-order",
            f"batch of agent {agent} starts at seq {new_first}, but this gateway holds only up to {hwm} and "
            f"the agent still holds the seqs between{held}: send them first",
            agent=agent, extra={"acked": hwm},
        )

    def _check_known_ack(self, agent: str, hwm: int, batch: Batch) -> None:
        """Refuse new datagrams from an agent that believes more was acknowledged than the journal holds.

        The agent says which seq it last saw acknowledged (``acked`` in the batch's authenticated agent
        info; the clear-text ``X-Flowtunnel-Acked`` header is not trusted: anyone on the path could force a
        409 and a false lost-data hint with it). Above this gateway's mark, the journal lost
        acknowledged datagrams (restored from a backup, torn tail): answer 409 with the real mark so the agent
        resynchronises, re-sends what it still has and counts the rest as lost at the gateway, instead of
        this gateway taking the hole for the agent's own drops.
        """
        claimed = batch.agent_info.get("acked")
        if claimed is None or claimed <= hwm:
            return
        self._lost_hint[agent] = max(claimed, self._lost_hint.get(agent, 0))
        raise Rejected(
            "resync",
            f"agent {agent} last saw seq {claimed} acknowledged, but this gateway holds only up to {hwm}: "
            "resynchronise (the difference was lost here)",
            agent=agent, extra={"acked": hwm},
        )

    # -- GET /v1/agents/<id>/state ------------------------------------------------------------------------

    async def state(self, agent_id: str, token: str | None) -> StateAnswer:
        """The agent's high-water mark, for a request proving its identity with an empty sealed batch, tagged
        for the nonce of that batch."""
        try:
            if not token:
                raise Rejected(
                    "no-token", "X-Flowtunnel-Token is missing", agent=self.enrolled(agent_id)
                )
            try:
                body = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            except (binascii.Error, ValueError):
                raise Rejected(
                    "bad-token", "X-Flowtunnel-Token is not base64url", agent=self.enrolled(agent_id)
                ) from None
            batch, key, replayed = await self._open(body, agent_id)
            if self._journal.shared:  # another gateway may have moved it
                self._hwm.pop(batch.agent_id, None)
                self._journal.forget(batch.agent_id)
            hwm = await self.hwm(batch.agent_id)
        except Rejected as exc:
            self.reject(exc)
            raise
        if replayed:
            self._metrics.replay(batch.agent_id)
        else:
            self._metrics.seen(batch.agent_id, now=self._clock(), acked=hwm)
        tag = ack_tag(key, agent_id=batch.agent_id, request_nonce=batch.header.nonce, acked=hwm)
        return StateAnswer(agent=batch.agent_id, acked=hwm, tag=tag)


def _info_figure(batch: Batch, key: str) -> int | None:
    """A whole number the agent sealed in its agent info under ``key`` (clamped), or None."""
    value = batch.agent_info.get(key)
    return min(value, MAX_FIGURE) if isinstance(value, int) and value >= 0 else None


def _advisory(batch: Batch, backlog: str | None, dropped: str | None) -> tuple[int | None, dict[str, int]]:
    """The backlog and drops an agent reports with a batch of new datagrams: the sealed (authenticated)
    values of its agent info where it sent them, else the clear-text headers, parsed strictly (ASCII digits,
    bounded length) and clamped; never an exception (the batch is already committed)."""
    info = batch.agent_info
    sealed_backlog = info.get("backlog")
    backlog_n = min(sealed_backlog, MAX_FIGURE) if sealed_backlog is not None else parse_count(backlog)
    if "acked" in info or any(k.startswith("dropped:") for k in info):
        # An agent that seals its figures seals every non-zero drop count: the header adds nothing.
        drops = {k.removeprefix("dropped:"): min(v, MAX_FIGURE) for k, v in info.items()
                 if k.startswith("dropped:") and len(k) > len("dropped:")}
    else:
        drops = parse_dropped_header(dropped) if dropped else {}
    return backlog_n, drops
