"""Group commit for the SQLite journal: the appends of different agents waiting for the journal at the same
time go into one transaction, so one fsync makes all of them durable (one commit per batch held a 2-core
gateway at ~350 batches/s; bench/fleet.py, issue 16).

How: ``GroupCommit.append`` queues the request and waits for its turn at the commit lock; whoever holds the
lock commits everything queued by then (``DurableLog.append_group``, in a worker thread), so the requests
that arrived during one commit all go in the next. Each request is answered only once the commit holding
its last datagram returned: ack after durable, as before.

Fairness: one agent adds at most ``agent_bytes`` to one commit and a commit holds at most ``max_bytes``; a
larger batch is journaled over several commits (in order, each moving the agent's high-water mark to its
last datagram), and between two of its pieces it goes to the back of the line. So a flooding agent's large
batch cannot make everybody's commit wait for it.

Error handling: a commit that fails fails every request of it (nothing of that commit is written, nothing
acknowledged). A request split over several commits whose later piece fails raises ``JournalPartial``: its
first pieces are durable and the mark says so (the agent's retry is deduplicated against it).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
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
    done: int = 0  # datagrams journaled so far
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
    held, and the journal's last seq (to wake the sinks)."""

    def __init__(
        self,
        log: DurableLog,
        *,
        agent_bytes: int = DEFAULT_AGENT_BYTES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        on_commit: Callable[[int, int], None] | None = None,
    ) -> None:
        if agent_bytes < 1 or max_bytes < agent_bytes:
            raise ValueError(
                f"group commit agent_bytes {agent_bytes} must be >= 1 and <= max_bytes {max_bytes}"
            )
        self.log = log
        self.agent_bytes = agent_bytes
        self.max_bytes = max_bytes
        self._on_commit = on_commit
        self._queue: deque[_Request] = deque()
        self._queued_bytes = 0
        self._lock = asyncio.Lock()
        self._settled = asyncio.Event()  # replaced after each commit's outcome is settled
        #: Commits made (transactions), and batch pieces they held: ``pieces / commits`` is the group size.
        self.commits = 0
        self.pieces = 0

    @property
    def waiting(self) -> int:
        """Requests queued or being committed."""
        return len(self._queue)

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
        if total > self.agent_bytes:
            # Journaled over several commits: it must fit now, with the queue ahead of it, or a later piece
            # would be refused after the first ones are durable.
            room = self.log.room()
            if room is not None and total > room - self._queued_bytes:
                raise QuotaFull(
                    f"log {self.log.path}: {len(datagrams)} entries of {total} bytes do not fit in the "
                    f"{room} bytes the quota leaves, {self._queued_bytes} of them taken by appends waiting "
                    "(policy refuse-new)", path=str(self.log.path),
                )
        req = _Request(agent=agent, first_seq=first_seq, datagrams=datagrams, costs=costs,
                       appended_ns=appended_ns, future=loop.create_future(), remaining=total)
        self._queue.append(req)
        self._queued_bytes += total
        try:
            while not req.future.done():
                settled = self._settled
                if req.inflight:  # in a commit that a cancelled waiter started: wait for its outcome
                    await settled.wait()
                    continue
                async with self._lock:
                    if req.future.done() or req.inflight:
                        continue
                    took = await self._round(loop)
                if not took:  # everything queued is in a commit already (or its agent's is)
                    await settled.wait()
            return req.future.result()
        except asyncio.CancelledError:
            # Its waiter is gone: what is not in a commit yet is not written (the agent retries).
            req.future.cancel()
            self._drop(req)
            raise

    def _drop(self, req: _Request) -> None:
        if req in self._queue:
            self._queue.remove(req)
            self._queued_bytes -= req.remaining
            req.remaining = 0  # no longer counted as waiting, even if a piece of it is still committing

    def _take(self) -> list[_Piece]:
        """The next commit: in line order, one piece per request, at most ``agent_bytes`` each, at most
        ``max_bytes`` in all (always at least one piece). A request with more to go moves to the back."""
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
        return pieces

    async def _round(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Commit the next group; False when there was nothing to take."""
        pieces = self._take()
        if not pieces:
            return False
        parts = [
            GroupPart(
                datagrams=p.request.datagrams[p.start:p.stop], stream=p.request.agent,
                stream_seqs=range(p.request.first_seq + p.start, p.request.first_seq + p.stop),
                state={hwm_key(p.request.agent): p.request.first_seq + p.stop - 1},
                appended_ns=p.request.appended_ns,
            )
            for p in pieces
        ]

        def commit() -> None:
            # The outcome is handed to the loop from here, not by the awaiting coroutine: if that one is
            # cancelled meanwhile, the other requests of this commit still get their answer.
            try:
                results: list[AppendResult | LogError] | LogError = self.log.append_group(parts)
            except LogError as exc:
                results = exc
            except BaseException as exc:  # a bug: fail the requests rather than leave them waiting
                results = LogError(f"log {self.log.path}: group commit failed: {exc!r}",
                                   path=str(self.log.path))
            loop.call_soon_threadsafe(self._settle, pieces, results)

        # Shielded: cancelling the waiter that started it must not cancel a commit not yet begun.
        await asyncio.shield(loop.run_in_executor(None, commit))
        return True

    def _settle(self, pieces: list[_Piece], results: list[AppendResult | LogError] | LogError) -> None:
        """On the loop: each piece's outcome to its request (every one of them, if the commit failed)."""
        settled, self._settled = self._settled, asyncio.Event()
        settled.set()
        if not isinstance(results, LogError):
            ok = [r for r in results if not isinstance(r, LogError)]
            self.commits += 1
            self.pieces += len(ok)
            if self._on_commit is not None and ok:
                self._on_commit(len(ok), max(r.last_seq for r in ok))
        for i, piece in enumerate(pieces):
            req = piece.request
            req.inflight = False
            outcome = results if isinstance(results, LogError) else results[i]
            if isinstance(outcome, LogError):
                self._fail(req, outcome)
                continue
            req.done = piece.stop
            if req.remaining:  # still queued (a cancelled waiter's request was dropped from the count)
                req.remaining -= piece.cost
                self._queued_bytes -= piece.cost
            if req.first_journal is None:
                req.first_journal = outcome.first_seq
            req.last_journal = max(req.last_journal, outcome.last_seq)
            if req.done >= len(req.datagrams):
                self._drop(req)
                if not req.future.done():
                    req.future.set_result((req.first_journal, req.last_journal))

    def _fail(self, req: _Request, exc: LogError) -> None:
        self._drop(req)
        if req.future.done():
            return
        if req.done:
            kind = "quota or disk full" if isinstance(exc, LogFull) else "error"
            req.future.set_exception(JournalPartial(
                f"agent {req.agent}: {req.done} of {len(req.datagrams)} datagrams journaled (seqs "
                f"{req.first_seq}..{req.first_seq + req.done - 1}), then a commit failed ({kind}): {exc}",
                path=exc.path, committed=req.done, last_seq=req.last_journal, cause=_copy(exc),
            ))
        else:
            req.future.set_exception(_copy(exc))
