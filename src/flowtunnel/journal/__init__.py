"""The gateway's journal, named: ``AgentJournal`` (ingest), ``JournalReader``/``JournalWaiter`` (sinks), with
the embedded SQLite log as the default and NATS JetStream for scale-out (``flowtunnel.journal.jetstream``,
imported only when asked for: it needs the ``nats`` extra)."""

from flowtunnel.journal.base import (
    AgentJournal,
    Appended,
    JournalConflict,
    JournalFull,
    JournalPartial,
    JournalReader,
    JournalUnavailable,
    JournalWaiter,
    SqliteAgentJournal,
    hwm_key,
)
from flowtunnel.journal.notify import JournalNotify

__all__ = [
    "AgentJournal",
    "Appended",
    "JournalConflict",
    "JournalFull",
    "JournalNotify",
    "JournalPartial",
    "JournalReader",
    "JournalUnavailable",
    "JournalWaiter",
    "SqliteAgentJournal",
    "hwm_key",
]
