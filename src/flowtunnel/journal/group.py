"""Group commit for the SQLite journal: the appends of different agents waiting for the journal at the same
time go into one transaction, so one fsync makes all of them durable (one commit per batch held a 2-core
gateway at ~350 batches/s; bench/fleet.py, issue 16).

How: ``GroupCommit.append`` queues the request and waits; a thread of its own (``journal-commit``) takes
everything queued, commits it (``DurableLog.append_group``), hands the outcome to the event loop and takes
what queued meanwhile at once, so the requests that arrived during one commit all go in the next. Each
request is answered only once the commit holding its last datagram returned: ack after durable, as before.

Fairness: one agent adds at most ``agent_bytes`` to one commit and a commit holds at most ``max_bytes``; a
larger batch is journaled over several commits (in order, each moving the agent's high-water mark to its
last datagram), and between two of its pieces it goes to the back of the line. So a flooding agent's large
batch cannot make everybody's commit wait for it.

Why a thread of its own that takes the next commit itself: the event loop used to start each commit (in the
default executor) once the previous one was settled on the loop. On a busy gateway every hop through the loop
waits for a whole loop iteration, so the journal sat idle between commits (in the fleet's traces: 40 of 75
seconds, gaps p99 130-540 ms) while requests waited for it, and commits queued behind other ``to_thread``
work in the executor. Now the loop only hands requests over and takes answers back.

Marks: the agents' high-water marks are read once, all together, when the group commit is made, and kept up to
date by the commit thread, so reading one (``mark``) takes neither a thread nor the log's lock (which a
commit holds). A mark asked for while a commit holding a piece of that agent is under way is answered once
that commit is over: an older value would let a retry journal its datagrams twice.

Error handling: a commit that fails fails every request of it (nothing of that commit is written, nothing
acknowledged). A request split over several commits whose later piece fails raises ``JournalPartial``: its
first pieces are durable and the mark says so (the agent's retry is deduplicated against it).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flowtunnel.log import GroupPart, LogError, LogFull, QuotaFull, entry_costs

if TYPE_CHECKING:
    from flowtunnel.datagram import Datagram
    from flowtunnel.log import AppendResult, DurableLog

__all__ = ["DEFAULT_AGENT_BYTES", "DEFAULT_MAX_BYTES", "GroupCommit", "JournalPartial", "hwm_key"]

log = logging.getLogger("flowtunnel.journal")

#: Journal bytes one agent adds to one commit (about 180 softflowd datagrams): a batch of 2,000 datagrams
#: (2.8 MB) is journaled in about a dozen commits, each shared with everybody else waiting.
DEFAULT_AGENT_BYTES = 256 << 10
#: Journal bytes of one commit, all agents together (a commit writes them to the WAL before its fsync).
DEFAULT_MAX_BYTES = 8 << 20


def hwm_key(agent_id: str) -> str:
    """The SQLite journal's state key holding an agent's high-water mark."""
    return f"hwm:{agent_id}"


class JournalPartial(LogError):
    """An append journaled over several commits failed after its first ones: its first ``committed``
    datagrams are durable (journal seqs up to ``last_seq``) and the agent's mark is their last; the rest is
    not written. ``cause`` is the error of the commit that failed."""

    def __init__(self, message: str, *, path: str, committed: int, last_seq: int, cause: LogError) -> None:
        super().__init__(message, path=path)
        self.committed = committed
        self.last_seq = last_seq
        self.cause = cause


def _copy(exc: LogError) -> LogError:
    """The same error for another waiter (an exception object is raised by one coroutine only)."""
    try:
        return type(exc)(str(exc), path=exc.path)
    except TypeError:
        return LogError(str(exc), path=exc.path)


@dataclass(eq=False, slots=True)
class _Request:
    agent: str
    first_seq: int
    datagrams: Sequence[Datagram]
    costs: list[int]
    appended_ns: int | None
    future: asyncio.Future[tuple[int, int]]
    done: int = 0  # datagrams journaled so far (changed by the commit thread, under the group's lock)
    inflight: bool = False  # a piece of it is in a commit now
    first_journal: int | None = None
    last_journal: int = 0
    remaining: int = field(default=0)  # journal bytes not yet journaled


@dataclass(frozen=True, slots=True, kw_only=True)
class _Piece:
    request: _Request
    start: int
    stop: int
    cost: int


class GroupCommit:
    """Appends of many agents to one ``DurableLog``, committed in groups. Use from one event loop.

    ``on_commit(pieces, last_seq)`` is called on the event loop after each commit: how many batch pieces it
    held, and the journal's last seq (to wake the sinks). ``marks``: every agent's mark in ``log`` (its
    ``hwm:`` states, read in a thread by the caller); read here when not given (a blocking read).

    Resource handling: the commit thread starts with the first append and runs until ``close()``."""

    def __init__(
        self,
        log: DurableLog,
        *,
        agent_bytes: int = DEFAULT_AGENT_BYTES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        on_commit: Callable[[int, int], None] | None = None,
        marks: Mapping[str, int] | None = None,
    ) -> None:
        if agent_bytes < 1 or max_bytes < agent_bytes:
            raise ValueError(
                f"group commit agent_bytes {agent_bytes} must be >= 1 and <= max_bytes {max_bytes}"
            )
        self.log = log
        self.agent_bytes = agent_bytes
        self.max_bytes = max_bytes
        self._on_commit = on_commit
        if marks is None:
            marks = {k.removeprefix("hwm:"): v for k, v in log.states("hwm:").items()}
        # Shared with the commit thread, under _cond: the line, the bytes it holds, the marks, the agents of
        # the commit under way, and each request's progress.
        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._queued_bytes = 0
        self._marks: dict[str, int] = dict(marks)
        self._committing: set[str] = set()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._settled = asyncio.Event()  # on the loop: set (and replaced) when a commit's outcome arrives
        #: Commits made (transactions), and batch pieces they held: ``pieces / commits`` is the group size.
        self.commits = 0
        self.pieces = 0

    @property
    def waiting(self) -> int:
        """Requests queued or being committed."""
        return len(self._queue)

    async def mark(self, agent: str) -> int:
        """``agent``'s high-water mark: the highest agent seq journaled (0 if none), once no commit under way
        holds a piece of it."""
        while True:
            settled = self._settled
            with self._cond:
                if agent not in self._committing:
                    return self._marks.get(agent, 0)
            await settled.wait()

    def close(self) -> None:
        """Stop the commit thread once the commit under way (if any) returned; what is still queued then
        fails with ``LogError`` (nothing of it written). Blocking. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    async def append(
        self, agent: str, first_seq: int, datagrams: Sequence[Datagram], *, appended_ns: int | None
    ) -> tuple[int, int]:
        """Journal ``datagrams`` as ``agent``'s seqs ``first_seq ..`` (its mark then their last) once one or
        more group commits made them durable; their (first, last) journal seqs. Raises ``LogFull`` (or
        ``QuotaFull``: nothing written), ``LogError`` (nothing written), ``JournalPartial`` (see the module).
        """
        loop = asyncio.get_running_loop()
        costs = entry_costs(datagrams, agent)
        total = sum(costs)
        req = _Request(agent=agent, first_seq=first_seq, datagrams=datagrams, costs=costs,
                       appended_ns=appended_ns, future=loop.create_future(), remaining=total)
        with self._cond:
            if self._closed:
                raise LogError(f"log {self.log.path}: the journal is closing", path=str(self.log.path))
            if total > self.agent_bytes:
                # Journaled over several commits: it must fit now, with the queue ahead of it, or a later
                # piece would be refused after the first ones are durable.
                room = self.log.room()
                if room is not None and total > room - self._queued_bytes:
                    raise QuotaFull(
                        f"log {self.log.path}: {len(datagrams)} entries of {total} bytes do not fit in the "
                        f"{room} bytes the quota leaves, {self._queued_bytes} of them taken by appends "
                        "waiting (policy refuse-new)", path=str(self.log.path),
                    )
            if self._thread is None:
                self._loop = loop
                self._thread = threading.Thread(target=self._run, name="journal-commit", daemon=True)
                self._thread.start()
            self._queue.append(req)
            self._queued_bytes += total
            self._cond.notify()
        try:
            # Shielded: cancelling the waiter leaves the future to the commit thread's answer.
            return await asyncio.shield(req.future)
        except asyncio.CancelledError:
            # Its waiter is gone: what is not in a commit yet is not written (the agent retries); a piece
            # in the commit under way still completes.
            req.future.cancel()
            with self._cond:
                self._drop(req)
            raise

    def _drop(self, req: _Request) -> None:
        """Out of the line (under ``_cond``)."""
        if req in self._queue:
            self._queue.remove(req)
            self._queued_bytes -= req.remaining
            req.remaining = 0  # no longer counted as waiting, even if a piece of it is still committing

    def _take(self) -> list[_Piece]:
        """The next commit (under ``_cond``): in line order, one piece per request, at most ``agent_bytes``
        each, at most ``max_bytes`` in all (always at least one piece). A request with more to go moves to
        the back."""
        pieces: list[_Piece] = []
        total = 0
        agents: set[str] = set()
        for req in self._queue:
            if req.inflight or req.agent in agents:
                continue  # one piece per agent per commit: its pieces are journaled in order
            start = stop = req.done
            cost = 0
            n = len(req.datagrams)
            while stop < n and (stop == start or cost + req.costs[stop] <= self.agent_bytes):
                cost += req.costs[stop]
                stop += 1
            if pieces and total + cost > self.max_bytes:
                break
            pieces.append(_Piece(request=req, start=start, stop=stop, cost=cost))
            agents.add(req.agent)
            req.inflight = True
            total += cost
        for piece in pieces:
            req = piece.request
            if piece.stop < len(req.datagrams):
                self._queue.remove(req)
                self._queue.append(req)
        self._committing = agents
        return pieces

    def _run(self) -> None:
        """The commit thread: take what is queued, commit it, hand the outcome to the loop; again."""
        while True:
            pieces: list[_Piece] | None
            with self._cond:
                while True:
                    if self._closed:
                        pieces = None
                        break
                    pieces = self._take()
                    if pieces:
                        break
                    self._cond.wait()
            if pieces is None:
                self._close_queue()
                return
            try:
                self._commit(pieces)
            except Exception as exc:  # a bug in the bookkeeping: fail these requests, keep the thread going
                log.exception("group commit: a commit's outcome could not be handed over")
                self._abandon(pieces, exc)

    def _commit(self, pieces: list[_Piece]) -> None:
        parts = [
            GroupPart(
                datagrams=p.request.datagrams[p.start:p.stop], stream=p.request.agent,
                stream_seqs=range(p.request.first_seq + p.start, p.request.first_seq + p.stop),
                state={hwm_key(p.request.agent): p.request.first_seq + p.stop - 1},
                appended_ns=p.request.appended_ns,
            )
            for p in pieces
        ]
        try:
            results: list[AppendResult | LogError] | LogError = self.log.append_group(parts)
        except LogError as exc:
            results = exc
        except BaseException as exc:  # a bug: fail the requests rather than leave them waiting
            results = LogError(f"log {self.log.path}: group commit failed: {exc!r}", path=str(self.log.path))
        answers: list[tuple[_Request, tuple[int, int] | LogError]] = []
        ok = 0
        last = 0
        with self._cond:
            # Here, not on the loop: the next commit (taken right after) must see each request's progress.
            for i, piece in enumerate(pieces):
                req = piece.request
                req.inflight = False
                outcome = results if isinstance(results, LogError) else results[i]
                if isinstance(outcome, LogError):
                    self._drop(req)
                    answers.append((req, self._failure(req, outcome)))
                    continue
                ok += 1
                last = max(last, outcome.last_seq)
                req.done = piece.stop
                self._marks[req.agent] = req.first_seq + piece.stop - 1
                if req.remaining:  # still queued (a cancelled waiter's request was dropped from the count)
                    req.remaining -= piece.cost
                    self._queued_bytes -= piece.cost
                if req.first_journal is None:
                    req.first_journal = outcome.first_seq
                req.last_journal = max(req.last_journal, outcome.last_seq)
                if req.done >= len(req.datagrams):
                    self._drop(req)
                    answers.append((req, (req.first_journal, req.last_journal)))
            self._committing = set()
            if not isinstance(results, LogError):
                self.commits += 1
                self.pieces += ok
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._settle, answers, ok, last)
        except RuntimeError:  # the loop is closed: nobody waits for these answers any more
            log.debug("group commit: the event loop closed before a commit's outcome could be handed over")

    def _abandon(self, pieces: list[_Piece], exc: Exception) -> None:
        """Fail the requests of a commit whose outcome could not be handed over. Their agents' marks are read
        again from the log first (the commit may have been durable): their retries are deduplicated
        against them."""
        error = LogError(f"log {self.log.path}: group commit failed: {exc!r}", path=str(self.log.path))
        marks: dict[str, int] = {}
        for piece in pieces:
            with suppress(LogError):
                marks[piece.request.agent] = self.log.get_state(hwm_key(piece.request.agent)) or 0
        with self._cond:
            self._marks.update(marks)
            for piece in pieces:
                piece.request.inflight = False
                self._drop(piece.request)
            self._committing = set()
        answers: list[tuple[_Request, tuple[int, int] | LogError]] = [(p.request, error) for p in pieces]
        if self._loop is not None:
            with suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._settle, answers, 0, 0)

    def _close_queue(self) -> None:
        """Closed: what is still queued fails (nothing of it written)."""
        with self._cond:
            left = list(self._queue)
            for req in left:
                self._drop(req)
        if left and self._loop is not None:
            exc = LogError(f"log {self.log.path}: the journal closed before this commit",
                           path=str(self.log.path))
            answers: list[tuple[_Request, tuple[int, int] | LogError]] = [
                (req, self._failure(req, exc)) for req in left
            ]
            with suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._settle, answers, 0, 0)

    def _failure(self, req: _Request, exc: LogError) -> LogError:
        """The error a failed request is answered with: ``JournalPartial`` when pieces of it are durable."""
        if req.done:
            kind = "quota or disk full" if isinstance(exc, LogFull) else "error"
            return JournalPartial(
                f"agent {req.agent}: {req.done} of {len(req.datagrams)} datagrams journaled (seqs "
                f"{req.first_seq}..{req.first_seq + req.done - 1}), then a commit failed ({kind}): {exc}",
                path=exc.path, committed=req.done, last_seq=req.last_journal, cause=_copy(exc),
            )
        return _copy(exc)

    def _settle(self, answers: list[tuple[_Request, tuple[int, int] | LogError]], pieces: int,
                last_seq: int) -> None:
        """On the loop: the answers of one commit to their waiters, and the commit to ``on_commit``."""
        settled, self._settled = self._settled, asyncio.Event()
        settled.set()
        if self._on_commit is not None and pieces:
            self._on_commit(pieces, last_seq)
        for req, answer in answers:
            if req.future.done():
                continue
            if isinstance(answer, LogError):
                req.future.set_exception(answer)
            else:
                req.future.set_result(answer)
