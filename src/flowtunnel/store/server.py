"""The store's query server (unix socket, run by the store sink inside the gateway) and its client.

Why a socket: DuckDB lets one process hold the database for writing, and then no other process can open it at
all. Rather than have the writer cut immutable segments for readers (more files, compaction, and queries that
lag ingest by a segment), the process that holds the database answers queries itself on connections of its own
database instance, so queries see every committed row while ingest goes on. That instance is locked down for
queries and each query runs in the sandbox of ``flowtunnel.store.sandbox`` (read-only transaction, no files,
extensions or settings, memory cap, timeout, answer size cap).

Protocol: newline-delimited JSON over ``DATA/store/query.sock`` (mode 0600: the data directory's owner only).
Request: ``{"op": "query", "sql": ..., "params": [...], "timeout": s}`` or
``{"op": "export", "target": "/abs/dir", "since_seconds": s|null, "now": iso, "timeout": s, "filter": text,
"clock": "flow"|"received"}``
(``filter``, an nfdump-style filter, is optional).
Response to a query: ``{"columns": [...], "types": [...]}``, then one JSON array per row, then
``{"end": rows}``; to an export: ``{"rows": n}``. Any failure: ``{"error": text, "kind": "rejected"|"query"}``
(possibly after some rows).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

import duckdb

from flowtunnel.store import sandbox
from flowtunnel.store.errors import QueryError, QueryRejected, StoreError
from flowtunnel.store.export import export_sql, install_partitions, new_staging, remove_staging
from flowtunnel.store.filter import FilterError, compile_filter
from flowtunnel.store.query import FETCH_ROWS, QueryResult, describe, jsonable
from flowtunnel.store.sandbox import QueryLimits, check_read_only

__all__ = ["QueryClient", "QueryServer"]

log = logging.getLogger("flowtunnel.store.server")
T = TypeVar("T")

MAX_REQUEST: Final = 1 << 20
MAX_CONCURRENT: Final = 4
_SUN_PATH_MAX: Final = 107


@contextlib.contextmanager
def short_path(path: Path) -> Iterator[str]:
    """``path`` as a name that fits a unix socket address (107 bytes).

    Deep data directories (CI temporary paths) exceed it; on Linux the directory is then reached through
    ``/proc/self/fd/N``, which names the same socket file. Raises ``StoreError`` where that is unavailable.
    """
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield str(path)
        return
    try:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise StoreError(f"cannot open {path.parent} for the query socket: {exc.strerror}") from None
    try:
        alias = f"/proc/self/fd/{fd}/{path.name}"
        if not os.path.isdir(f"/proc/self/fd/{fd}") or len(alias) > _SUN_PATH_MAX:
            raise StoreError(
                f"query socket path {path} is {len(os.fsencode(path))} bytes, over the unix socket limit of "
                f"{_SUN_PATH_MAX}: use a shorter data directory"
            )
        yield alias
    finally:
        os.close(fd)


class QueryServer:
    """Answers read-only queries on connections from ``cursor_factory`` (new connections to the writer's DB).

    Resource handling: at most ``MAX_CONCURRENT`` queries run at once (others wait); each runs in a worker
    thread inside a read-only transaction that is rolled back, with ``limits.per_query_memory``; a query
    running longer than its timeout is interrupted, and so is every running query when ``interrupt_all`` is
    called (the sink does when a commit fails: ingest needs the memory). An answer over
    ``limits.max_result_bytes`` is cut with an error. Exports write into ``staging`` (the one directory the
    locked instance may write), then move complete files into the target.

    Error handling: every failure of a request, DuckDB's fatal errors included, is answered to its client
    and counted in ``failed``; none escapes the session task.
    """

    def __init__(
        self,
        path: Path,
        cursor_factory: Callable[[], duckdb.DuckDBPyConnection],
        *,
        limits: QueryLimits | None = None,
        staging: Path | None = None,
    ) -> None:
        self.path = path
        self._cursor_factory = cursor_factory
        self._limits = limits or QueryLimits()
        self._staging = staging
        self._server: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[Any]] = set()
        self._running: set[duckdb.DuckDBPyConnection] = set()
        self._evicted: set[duckdb.DuckDBPyConnection] = set()  # interrupted by ``interrupt_all``
        self._limit = asyncio.Semaphore(MAX_CONCURRENT)
        # Queries block a thread until they end or time out: threads of their own, so that they never take
        # the event loop's default pool, where the gateway's ingest opens batches and writes the journal.
        self._pool = concurrent.futures.ThreadPoolExecutor(MAX_CONCURRENT, thread_name_prefix="store-query")
        self.queries = 0
        self.rejected = 0
        self.failed = 0
        self.interrupted = 0

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # left behind by a killed process; nobody answers on it
        old_umask = os.umask(0o177)
        try:
            with short_path(self.path) as path:
                self._server = await asyncio.start_unix_server(self._serve, path=path, limit=MAX_REQUEST)
        finally:
            os.umask(old_umask)
        log.info("store query server listening on %s", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self.interrupt_all()  # queries in worker threads would otherwise run on past the database's close
            sessions = list(self._sessions)
            for task in sessions:
                task.cancel()
            await asyncio.gather(*sessions, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def interrupt_all(self) -> int:
        """Interrupt every query running now; returns how many. Safe from any thread."""
        running = list(self._running)
        for cur in running:
            self._evicted.add(cur)
            with contextlib.suppress(duckdb.Error):
                cur.interrupt()
        self.interrupted += len(running)
        return len(running)

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            # asyncio.Server owns the session tasks; we keep them to cancel sessions in flight on close().
            self._sessions.add(task)
            task.add_done_callback(self._sessions.discard)
        try:
            await self._session(reader, writer)
        except asyncio.CancelledError:
            # close() cancels sessions in flight. Python 3.11's stream server reads the session task's
            # exception() in a callback, which raises (and logs "Exception in callback") for a cancelled
            # task: end the session normally instead; nobody awaits its result.
            log.debug("query session cancelled by close()")

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("request is not a JSON object")
            except ValueError as exc:
                await self._send(writer, {"error": f"bad request: {exc}", "kind": "query"})
                return
            async with self._limit:
                if request.get("op") == "export":
                    await self._export(request, writer)
                else:
                    await self._query(request, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            log.debug("query client went away")
        except Exception as exc:  # a DuckDB fatal error, a failed export move, ...: answer, never crash
            self.failed += 1
            log.error("store query failed: %s: %s", type(exc).__name__, exc)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self._send(writer, {"error": f"the store could not answer: {exc}", "kind": "query"})
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, obj: object) -> None:
        writer.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
        await writer.drain()

    def _open(self) -> duckdb.DuckDBPyConnection:
        cur = self._cursor_factory()
        try:
            sandbox.begin(cur, self._limits)
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                cur.close()
            raise
        self._running.add(cur)
        return cur

    def _close(self, cur: duckdb.DuckDBPyConnection) -> None:
        self._running.discard(cur)
        self._evicted.discard(cur)
        sandbox.rollback(cur)

    async def _begin(self, writer: asyncio.StreamWriter) -> duckdb.DuckDBPyConnection | None:
        try:
            return await self._thread(self._open)
        except duckdb.Error as exc:  # FatalException: the database was invalidated; the sink reopens it
            self.failed += 1
            log.warning("store query refused: the database cannot start a query: %s", exc)
            await self._send(writer, {"error": f"the store cannot run queries now: {exc}", "kind": "query"})
            return None

    async def _query(self, request: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        self.queries += 1
        sql = request.get("sql")
        params = request.get("params") or []
        timeout = float(request.get("timeout") or 300.0)
        try:
            if not isinstance(sql, str) or not isinstance(params, list):
                raise QueryError("request needs 'sql' (text) and 'params' (a list)")
            check_read_only(sql)
        except QueryRejected as exc:
            self.rejected += 1
            await self._send(writer, {"error": str(exc), "kind": "rejected"})
            return
        except QueryError as exc:
            self.failed += 1
            await self._send(writer, {"error": str(exc), "kind": "query"})
            return
        cur = await self._begin(writer)
        if cur is None:
            return
        timer = asyncio.get_running_loop().call_later(timeout, cur.interrupt)
        rows = 0
        sent = 0
        cap = self._limits.max_result_bytes
        try:
            try:
                await self._thread(cur.execute, sql, params)
                columns, types = describe(cur)
                await self._send(writer, {"columns": columns, "types": types})
                while True:
                    chunk = await self._thread(cur.fetchmany, FETCH_ROWS)
                    if not chunk:
                        break
                    rows += len(chunk)
                    data = b"".join(
                        json.dumps([jsonable(v) for v in row], separators=(",", ":")).encode() + b"\n"
                        for row in chunk
                    )
                    sent += len(data)
                    if sent > cap:
                        self.failed += 1
                        await self._send(writer, {
                            "error": f"the answer exceeds the query server's limit of {cap} bytes after "
                                     f"{rows - len(chunk)} rows: add a LIMIT or aggregate",
                            "kind": "query",
                        })
                        return
                    writer.write(data)
                    await writer.drain()
            except duckdb.InterruptException:
                self.failed += 1
                reason = (
                    "query interrupted: a store commit failed meanwhile, and ingest comes first"
                    if cur in self._evicted else f"query interrupted after its {timeout:g} s timeout"
                )
                await self._send(writer, {"error": reason, "kind": "query"})
                return
            except duckdb.Error as exc:
                self.failed += 1
                await self._send(writer, {"error": sandbox.error_text(exc, self._limits), "kind": "query"})
                return
            await self._send(writer, {"end": rows})
        finally:
            timer.cancel()
            await self._thread(self._close, cur)

    async def _export(self, request: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        self.queries += 1
        try:
            target = Path(str(request["target"]))
            since = request.get("since_seconds")
            now = dt.datetime.fromisoformat(str(request["now"]))
            if not target.is_absolute():
                raise ValueError(f"export target {target} is not an absolute path")
            since_seconds = None if since is None else float(since)
            clock = str(request.get("clock") or "flow")
            if clock not in ("flow", "received"):
                raise ValueError(f"unknown clock {clock!r}: choose flow or received")
            flow_filter = request.get("filter")
            if flow_filter is not None:
                if not isinstance(flow_filter, str):
                    raise ValueError("'filter' must be text")
                compile_filter(flow_filter)  # refused here, before any staging
        except (KeyError, ValueError) as exc:
            await self._send(writer, {"error": f"bad export request: {exc}", "kind": "query"})
            return
        except FilterError as exc:
            await self._send(writer, {"error": str(exc), "kind": "query"})
            return
        if self._staging is None:
            await self._send(writer, {"error": "this query server has no export staging directory",
                                      "kind": "query"})
            return
        timeout = float(request.get("timeout") or 3600.0)
        staging = await self._thread(new_staging, self._staging)
        try:
            sql, params = export_sql(
                staging / "parts", since_seconds=since_seconds, now=now, flow_filter=flow_filter, clock=clock
            )
            cur = await self._begin(writer)
            if cur is None:
                return
            timer = asyncio.get_running_loop().call_later(timeout, cur.interrupt)
            try:
                row = await self._thread(lambda: cur.execute(sql, params).fetchone())
            except duckdb.Error as exc:
                self.failed += 1
                await self._send(writer, {"error": f"export to {target} failed: {exc}", "kind": "query"})
                return
            finally:
                timer.cancel()
                await self._thread(self._close, cur)
            try:
                await self._thread(install_partitions, staging / "parts", target)
            except OSError as exc:
                self.failed += 1
                text = f"export to {target} failed while moving files into place: {exc}"
                await self._send(writer, {"error": text, "kind": "query"})
                return
        finally:
            await self._thread(remove_staging, staging)
        await self._send(writer, {"rows": int(row[0]) if row else 0})


class QueryClient:
    """Blocking client of a ``QueryServer``; ``connect`` returns ``None`` when no server answers."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._file = sock.makefile("rb")

    @classmethod
    def connect(cls, path: Path) -> QueryClient | None:
        if not path.exists():
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with short_path(path) as name:
                sock.connect(name)
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()  # a socket file left by a killed gateway
            return None
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def __enter__(self) -> QueryClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def abort(self) -> None:
        """End the connection from another thread: a read blocked in it returns at once (the query's reader
        then raises ``QueryError``); the server ends the query when it next writes. Safe to call twice."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _request(self, obj: dict[str, object], timeout: float) -> None:
        self._sock.settimeout(timeout + 30.0)
        self._sock.sendall(json.dumps(obj).encode() + b"\n")

    def _line(self) -> Any:
        line = self._file.readline()
        if not line:
            raise QueryError("the store's query server closed the connection before answering")
        return json.loads(line)

    @staticmethod
    def _raise(reply: dict[str, Any]) -> None:
        if reply.get("kind") == "rejected":
            raise QueryRejected(str(reply["error"]))
        raise QueryError(str(reply["error"]))

    def query(self, sql: str, params: list[object], *, timeout: float) -> QueryResult:
        self._request({"op": "query", "sql": sql, "params": params, "timeout": timeout}, timeout)
        head = self._line()
        if "error" in head:
            self._raise(head)
        return QueryResult(columns=list(head["columns"]), types=list(head["types"]), rows=self._rows())

    def _rows(self) -> Iterator[list[object]]:
        while True:
            item = self._line()
            if isinstance(item, list):
                yield item
                continue
            if "error" in item:
                self._raise(item)
            return

    def export(
        self, target: Path, *, since_seconds: float | None, now: dt.datetime, timeout: float,
        flow_filter: str | None = None, clock: str = "flow",
    ) -> int:
        self._request(
            {"op": "export", "target": str(target), "since_seconds": since_seconds, "now": now.isoformat(),
             "timeout": timeout, "filter": flow_filter, "clock": clock},
            timeout,
        )
        reply = self._line()
        if "error" in reply:
            self._raise(reply)
        return int(reply["rows"])
