"""The journal interface: what ingest and the sinks need from the gateway's journal, whatever holds it.

Two faces, two implementations (the embedded SQLite ``DurableLog``, and a NATS JetStream stream):

* ``AgentJournal`` (async, ingest's side): the agent's high-water mark, and an idempotent append keyed by
  agent and agent sequence that succeeds only while the mark is still the one the caller decided on (a lost
  race with another gateway raises ``JournalConflict``: re-read the mark and decide again).
* ``JournalReader`` (sync, called from a sink's worker thread) and ``JournalWaiter`` (async): read entries
  past a position, a durable position per consumer, and a way to wait for entries past a position.

``SqliteAgentJournal`` is the thread hop for the SQLite log in one place: every blocking call goes through
a worker thread here, not in ingest; its appends are group commits (``flowtunnel.journal.group``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from flowtunnel.journal.group import (
    DEFAULT_AGENT_BYTES,
    DEFAULT_MAX_BYTES,
    GroupCommit,
    JournalPartial,
    hwm_key,
)
from flowtunnel.log import LogError, LogFull

if TYPE_CHECKING:
    from flowtunnel.datagram import Datagram
    from flowtunnel.journal.notify import JournalNotify
    from flowtunnel.log import DurableLog, Entry

__all__ = [
    "AgentJournal",
    "Appended",
    "JournalConflict",
    "JournalFull",
    "JournalPartial",
    "JournalReader",
    "JournalUnavailable",
    "JournalWaiter",
    "SqliteAgentJournal",
    "hwm_key",
]


class JournalConflict(LogError):
    """The agent's mark moved since the caller read it (another gateway appended): re-read and re-decide."""


class JournalFull(LogFull):
    """The journal (or the agent's share of it) cannot take the append now; nothing was written."""


class JournalUnavailable(LogError):
    """The journal cannot be reached or did not confirm the append in time; nothing is acknowledged."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Appended:
    """Journal positions ``first_seq .. last_seq`` of one append (a JetStream message holds many datagrams,
    so there the range is the messages' stream sequences)."""

    first_seq: int
    last_seq: int


class AgentJournal(Protocol):
    """Ingest's face of the journal (async: each implementation does its own waiting)."""

    #: Whether several gateways share this journal (then ingest must not trust a cached mark alone).
    shared: bool

    async def hwm(self, agent: str) -> int:
        """The agent's high-water mark: the highest agent seq journaled (0 if none)."""
        ...

    async def append(
        self, agent: str, first_seq: int, datagrams: Sequence[Datagram], *, hwm: int,
        appended_ns: int | None = None,
    ) -> Appended:
        """Journal ``datagrams`` as the agent's ``first_seq ..`` and make the mark their last seq, only if the
        mark is still ``hwm``; ``appended_ns`` is the gateway's receive time (kept with each entry).
        Raises ``JournalConflict`` (the mark moved), ``JournalFull``/``LogFull`` (no room, nothing written),
        ``JournalPartial`` (an append split over several commits failed after its first ones: that prefix
        is journaled and the mark moved to its end), ``LogError`` (anything else; nothing acknowledged)."""
        ...

    def forget(self, agent: str) -> None:
        """Drop whatever the journal caches about ``agent`` (its mark may have moved elsewhere)."""
        ...


class JournalReader(Protocol):
    """A sink's face of the journal: entries past a position, and durable positions per consumer name.

    Blocking: call from a worker thread (``DurableLog`` is one)."""

    def read(self, after: int = 0, limit: int = 1000, max_bytes: int = 4 << 20) -> list[Entry]: ...

    def cursor(self, name: str) -> int: ...

    def commit_cursor(self, name: str, seq: int) -> None: ...


class JournalWaiter(Protocol):
    """The journal's last position, and a way to wait until it passes a value (``JournalNotify``)."""

    @property
    def last_seq(self) -> int: ...

    async def wait(self, after_seq: int) -> None: ...


class SqliteAgentJournal:
    """``AgentJournal`` over the embedded ``DurableLog``: one gateway per journal (its data-dir lock), so
    the per-agent lock in ingest is enough and a conflict cannot happen.

    Appends of different agents waiting at the same time share one commit (``GroupCommit``: one fsync for
    all of them), each agent adding at most ``agent_bytes`` to one commit. ``on_commit(pieces)`` is called
    after each commit with how many batch pieces it held (the metrics). ``marks``: every agent's mark
    (``log.states("hwm:")`` without the prefix), read by the caller in a thread; the group commit keeps them
    (read here, blocking, when not given).

    Resource handling: holds the commit thread until ``close()``, to be called before the log's."""

    shared = False

    def __init__(
        self, log: DurableLog, notify: JournalNotify, *, agent_bytes: int = DEFAULT_AGENT_BYTES,
        max_bytes: int = DEFAULT_MAX_BYTES, on_commit: Callable[[int], None] | None = None,
        marks: Mapping[str, int] | None = None,
    ) -> None:
        self.log = log
        self.notify = notify
        self._on_commit = on_commit
        self.group = GroupCommit(log, agent_bytes=agent_bytes, max_bytes=max(max_bytes, agent_bytes),
                                 on_commit=self._committed, marks=marks)

    def _committed(self, pieces: int, last_seq: int) -> None:
        self.notify.publish(last_seq)
        if self._on_commit is not None:
            self._on_commit(pieces)

    def forget(self, agent: str) -> None:
        return None

    def close(self) -> None:
        """Let the commit thread go (after the commit under way, if any)."""
        self.group.close()

    async def hwm(self, agent: str) -> int:
        # From memory (no thread, no wait for the log's lock): at start-up 2,000 agents' first requests
        # each read theirs, and through worker threads they queued with the commits.
        return await self.group.mark(agent)

    async def append(
        self, agent: str, first_seq: int, datagrams: Sequence[Datagram], *, hwm: int,
        appended_ns: int | None = None,
    ) -> Appended:
        first, last = await self.group.append(agent, first_seq, datagrams, appended_ns=appended_ns)
        return Appended(first_seq=first, last_seq=last)
