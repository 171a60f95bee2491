"""``JournalNotify`` moved to ``flowtunnel.journal.notify`` (the store must not import the gateway); this
name stays for the gateway's own imports."""

from flowtunnel.journal.notify import JournalNotify

__all__ = ["JournalNotify"]
