"""Errors raised by the flow store and its query paths.

    StoreError               the store cannot do what was asked (base; FlowtunnelError)
    ├── StoreNotFound        no database under the data directory (the gateway never ran a store sink)
    ├── StoreBusy            the database is held by another process and its query socket does not answer
    └── QueryError           a query failed (SQL error from DuckDB, timeout); the message is DuckDB's or ours
        └── QueryRejected    the SQL is not a single read-only statement (INSERT, COPY, ATTACH, ...)
"""

from __future__ import annotations

from flowtunnel.errors import FlowtunnelError

__all__ = ["QueryError", "QueryRejected", "StoreBusy", "StoreError", "StoreNotFound"]


class StoreError(FlowtunnelError):
    """The flow store could not complete an operation."""


class StoreNotFound(StoreError):
    """There is no flow database at the expected path."""


class StoreBusy(StoreError):
    """Another process holds the database for writing and no query server answers for it."""


class QueryError(StoreError):
    """A query failed while planning or running (bad SQL, unknown column, timeout)."""


class QueryRejected(QueryError):
    """The SQL would write or is not exactly one statement; queries are read-only."""
