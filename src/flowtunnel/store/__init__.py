"""The flow store: journaled datagrams decoded into DuckDB, and the read-only ways to ask it questions.

``StoreSink`` runs inside the gateway (decode, normalise, commit rows and cursor together, retention, the
query socket); ``open_query``/``top_sql``/``run_export`` serve ``flowtunnel query``, ``top`` and ``export``;
``compile_filter`` turns an nfdump-style filter into a parameterised SQL condition for any of them.
"""

from flowtunnel.store.errors import QueryError, QueryRejected, StoreBusy, StoreError, StoreNotFound
from flowtunnel.store.filter import CompiledFilter, FilterError, compile_filter, parse_stat, restrict_sql
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
    "CompiledFilter",
    "FilterError",
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
    "compile_filter",
    "export_sql",
    "open_query",
    "parse_stat",
    "restrict_sql",
    "run_export",
    "top_sql",
]
