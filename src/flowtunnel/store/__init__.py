"""The flow store: journaled datagrams decoded into DuckDB, and the read-only ways to ask it questions.

``StoreSink`` runs inside the gateway (decode, normalise, commit rows and cursor together, retention, the
query socket); ``open_query``/``top_sql``/``run_export`` serve ``flowtunnel query``, ``top`` and ``export``.
"""

from flowtunnel.store.errors import QueryError, QueryRejected, StoreBusy, StoreError, StoreNotFound
from flowtunnel.store.metrics import StoreCollector
from flowtunnel.store.query import (
    TOP_KEYS,
    QueryResult,
    StorePaths,
    check_read_only,
    export_sql,
    open_query,
    run_export,
    top_sql,
)
from flowtunnel.store.sink import StoreSink

__all__ = [
    "TOP_KEYS",
    "QueryError",
    "QueryRejected",
    "QueryResult",
    "StoreBusy",
    "StoreCollector",
    "StoreError",
    "StoreNotFound",
    "StorePaths",
    "StoreSink",
    "check_read_only",
    "export_sql",
    "open_query",
    "run_export",
    "top_sql",
]
