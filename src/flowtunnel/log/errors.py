"""Errors raised by the durable log.

    LogError                 anything the log cannot do (base; names the database path)
    ├── LogFull              the disk (not the quota) is full: nothing of the failed call was written
    ├── LogCorrupt           damaged file or not a flowtunnel log; the caller decides what to do
    └── LogLocked            another process or connection holds the database longer than busy_timeout
"""

from __future__ import annotations

from flowtunnel.errors import FlowtunnelError

__all__ = ["LogCorrupt", "LogError", "LogFull", "LogLocked"]


class LogError(FlowtunnelError):
    """The durable log could not complete an operation; ``path`` is the database file."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class LogFull(LogError):
    """The filesystem holding the log is full (SQLITE_FULL); the transaction was rolled back."""


class LogCorrupt(LogError):
    """The database file failed its integrity check or is not a SQLite database at all."""


class LogLocked(LogError):
    """The database stayed locked by another connection for longer than the configured busy timeout."""
