"""The durable log (SQLite, WAL mode) used as the agent's spool and the gateway's journal."""

from flowtunnel.log.durable import (
    ENTRY_OVERHEAD,
    MIN_DISK_QUOTA,
    AppendResult,
    DurableLog,
    Entry,
    FullPolicy,
    LogConfig,
    LogStats,
    QuotaFull,
)
from flowtunnel.log.errors import LogCorrupt, LogError, LogFull, LogLocked
from flowtunnel.log.wal import WalTail, inspect_wal

__all__ = [
    "ENTRY_OVERHEAD",
    "MIN_DISK_QUOTA",
    "AppendResult",
    "DurableLog",
    "Entry",
    "FullPolicy",
    "LogConfig",
    "LogCorrupt",
    "LogError",
    "LogFull",
    "LogLocked",
    "LogStats",
    "QuotaFull",
    "WalTail",
    "inspect_wal",
]
