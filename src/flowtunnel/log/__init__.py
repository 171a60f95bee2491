"""The durable log (SQLite, WAL mode) used as the agent's spool and the gateway's journal."""

from flowtunnel.log.durable import (
    ENTRY_OVERHEAD,
    MIN_DISK_QUOTA,
    AppendResult,
    DurableLog,
    Entry,
    FullPolicy,
    GroupPart,
    LogConfig,
    LogStats,
    QuotaFull,
    entry_costs,
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
    "GroupPart",
    "LogConfig",
    "LogCorrupt",
    "LogError",
    "LogFull",
    "LogLocked",
    "LogStats",
    "QuotaFull",
    "WalTail",
    "entry_costs",
    "inspect_wal",
]
