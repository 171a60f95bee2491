"""The query path is a sandbox: what the red-team pass did through ``flowtunnel query`` is refused.

Against a real gateway process holding the store (queries through its socket) and against a stopped store
(opened directly): no file written (``EXPLAIN ANALYZE COPY``), no setting changed and the writer's next commit
works (``SET GLOBAL memory_limit``, ``CHECKPOINT``, ``threads``), no file read (``read_blob`` of
``registry.sqlite``, ``read_text``, ``glob``, ``read_csv('/etc/passwd')``), no extension installed, and the
``list(range(400M))`` memory bomb refused while the gateway's RSS stays bounded, and interrupted at its
timeout. Ordinary queries still work. The console's query page (``/console/api/query``) reaches the store
through the same socket and sandbox: the same list is run through it, on the same live gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import http.client
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest

from flowtunnel.datagram import Datagram
from flowtunnel.gateway.app import BATCH_CONTENT_TYPE
from flowtunnel.gateway.registry import Registry
from flowtunnel.netflow import FieldSpec, Template, encode_v9
from flowtunnel.store import QueryError, QueryRejected, StoreSink, open_query, sandbox, top_sql
from flowtunnel.store.server import QueryClient, QueryServer
from flowtunnel.wire import seal_batch
from tests.peers import free_tcp_port
from tests.store._support import fill_journal, run_sink_until

TEMPLATE = Template(
    256,
    (FieldSpec(8, 4), FieldSpec(12, 4), FieldSpec(7, 2), FieldSpec(11, 2), FieldSpec(4, 1), FieldSpec(1, 8),
     FieldSpec(2, 8), FieldSpec(152, 8), FieldSpec(153, 8)),
)
PER_DATAGRAM = 5
BOMB = "SELECT max(x) FROM (SELECT list(i) AS x FROM range(400000000) t(i))"
RSS_BOUND = 2 << 30  # generous: the store's instance is capped at 1 GiB, Python and aiohttp take ~150 MiB
TOKEN = "op-token-sandbox-0123456789abcdefghijklmn"


def _datagrams(first: int, count: int) -> list[Datagram]:
    now_ms = int(time.time() * 1000)
    out = []
    for i in range(first, first + count):
        records = [
            {"sourceIPv4Address": f"10.9.0.{r + 1}", "destinationIPv4Address": "192.0.2.9",
             "sourceTransportPort": 40000 + r, "destinationTransportPort": 443, "protocolIdentifier": 6,
             "octetDeltaCount": 1000 * (r + 1), "packetDeltaCount": r + 1,
             "flowStartMilliseconds": now_ms - 2000, "flowEndMilliseconds": now_ms - 1000}
            for r in range(PER_DATAGRAM)
        ]
        out.append(Datagram(
            received_ns=time.time_ns(), exporter="127.0.0.1", exporter_port=40000, local_port=2055,
            payload=encode_v9(templates=[TEMPLATE], data=[(TEMPLATE, records)], sys_uptime_ms=1000 + i,
                              unix_secs=now_ms // 1000, sequence=i, source_id=1),
        ))
    return out


def _until(what: str, check: Callable[[], bool], limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {limit} s")
        time.sleep(0.02)


def _rows(data: Path, sql: str, timeout: float = 60.0) -> list[list[object]]:
    with open_query(data, sql, timeout=timeout) as result:
        return list(result.rows)


def _count(data: Path) -> int:
    [[n]] = _rows(data, "SELECT count(*) FROM flows")
    assert isinstance(n, int)
    return n


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def rss_watch(pid: int, bound: int) -> Iterator[list[int]]:
    """Sample ``pid``'s RSS while the block runs; past ``bound`` it is killed (to protect the machine)."""
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            try:
                rss = _rss(pid)
            except OSError:
                return
            peak[0] = max(peak[0], rss)
            if rss > bound:
                os.kill(pid, signal.SIGKILL)
                return

    thread = threading.Thread(target=sample, name="rss-watch", daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()


def _answers(path: Path) -> bool:
    client = QueryClient.connect(path)
    if client is None:
        return False
    client.close()
    return True


@dataclass
class LiveGateway:
    data: Path
    url: str
    key: bytes
    proc: subprocess.Popen[bytes]
    log: Path
    next_seq: int = 1

    def post(self, count: int) -> None:
        body = seal_batch(agent_id="site-a", key=self.key, first_seq=self.next_seq,
                          datagrams=_datagrams(self.next_seq, count), nonce=os.urandom(12))
        req = urllib.request.Request(
            self.url + "/v1/batches", data=body, method="POST",
            headers={"Content-Type": BATCH_CONTENT_TYPE, "X-Flowtunnel-Agent": "site-a"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200
        self.next_seq += count

    def stored(self, rows: int) -> None:
        _until(f"{rows} rows in the store", lambda: _count(self.data) == rows)

    def console(self, sql: str) -> tuple[int, dict[str, Any]]:
        """``sql`` typed into the console's query page: its status and JSON answer."""
        host, port = self.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        try:
            conn.request("POST", "/console/login", body=urllib.parse.urlencode({"token": TOKEN}),
                         headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": self.url})
            login = conn.getresponse()
            login.read()
            cookie = login.getheader("Set-Cookie", "").split(";", 1)[0]
            assert login.status == 303, login.status
            assert cookie
            query = urllib.parse.urlencode({"mode": "sql", "q": sql})
            conn.request("GET", f"/console/api/query?{query}", headers={"Cookie": cookie})
            resp = conn.getresponse()
            doc = json.loads(resp.read())
            assert isinstance(doc, dict)
            return resp.status, doc
        finally:
            conn.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    root = tmp_path_factory.mktemp("sandbox")
    data = root / "gw"
    data.mkdir(mode=0o700)
    with Registry(data) as registry:
        key = registry.enroll("site-a").key
    token = root / "admin.token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    port = free_tcp_port()
    log = root / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flowtunnel", "gateway", "--listen", f"127.0.0.1:{port}",
             "--data", str(data), "--admin-token-file", str(token)],
            stdout=out, stderr=subprocess.STDOUT,
        )
    gw = LiveGateway(data=data, url=f"http://127.0.0.1:{port}", key=key, proc=proc, log=log)
    try:
        _until("query socket", lambda: _answers(data / "store" / "query.sock"))
        gw.post(4)
        gw.stored(4 * PER_DATAGRAM)
        yield gw
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store no process holds: queries open it directly (read-only, sandboxed)."""
    root = tmp_path_factory.mktemp("stopped")
    journal = fill_journal(root / "journal.sqlite", _datagrams(1, 4))
    asyncio.run(run_sink_until(StoreSink(data_dir=root / "data", query_socket=False), journal))
    journal.close()
    with Registry(root / "data") as registry:
        registry.enroll("site-a")
    return root / "data"


def _both(gateway: LiveGateway, stopped: Path) -> list[Path]:
    return [gateway.data, stopped]


# --- writes -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", [
    "EXPLAIN ANALYZE COPY (SELECT 'x' AS l) TO '{path}' (FORMAT csv)",
    "explain /* hidden */ analyze COPY (SELECT 'x' AS l) TO '{path}' (FORMAT csv)",
    "EXPLAIN (ANALYZE) COPY (SELECT 'x' AS l) TO '{path}' (FORMAT csv)",
    "EXPLAIN COPY (SELECT 'x' AS l) TO '{path}' (FORMAT csv)",
    "COPY (SELECT 'x' AS l) TO '{path}' (FORMAT csv)",
])
def test_explain_analyze_copy_writes_no_file(
    form: str, gateway: LiveGateway, stopped: Path, tmp_path: Path
) -> None:
    for data in _both(gateway, stopped):
        evil = tmp_path / f"evil-{data.name}.sh"
        with pytest.raises(QueryRejected):
            _rows(data, form.format(path=evil))
        assert not evil.exists()


def test_settings_cannot_be_changed_and_the_writer_keeps_committing(
    gateway: LiveGateway, stopped: Path
) -> None:
    settings = "SELECT current_setting('memory_limit'), current_setting('threads')"
    before = _rows(gateway.data, settings)
    failures = gateway.log.read_bytes().count(b"commit of cursor")
    for sql in ["EXPLAIN ANALYZE SET GLOBAL memory_limit='1MB'", "EXPLAIN ANALYZE CHECKPOINT",
                "SET GLOBAL threads=1", "EXPLAIN ANALYZE SET GLOBAL threads=1", "SET memory_limit='1MB'",
                "EXPLAIN ANALYZE SET enable_external_access=true", "EXPLAIN ANALYZE PRAGMA threads=1",
                "CHECKPOINT", "EXPLAIN ANALYZE FORCE CHECKPOINT"]:
        for data in _both(gateway, stopped):
            with pytest.raises(QueryRejected):
                _rows(data, sql)
    assert _rows(gateway.data, settings) == before
    rows = _count(gateway.data)
    gateway.post(2)  # the store sink's next commit works
    gateway.stored(rows + 2 * PER_DATAGRAM)
    assert gateway.log.read_bytes().count(b"commit of cursor") == failures


def test_files_cannot_be_read(gateway: LiveGateway, stopped: Path) -> None:
    key = gateway.key
    for data in _both(gateway, stopped):
        registry = data / "registry.sqlite"
        assert registry.exists()
        for sql in [f"SELECT content FROM read_blob('{registry}')",
                    f"SELECT content FROM read_text('{registry}')",
                    f"SELECT * FROM glob('{data}/*')", "SELECT * FROM read_csv('/etc/passwd')",
                    f"SELECT * FROM read_blob('{data}/store/export-staging/../../registry.sqlite')",
                    f"SELECT * FROM sqlite_scan('{registry}', 'agents')",
                    "SELECT * FROM read_text('/etc/passwd')", f"FROM '{registry}'"]:
            with pytest.raises(QueryError) as caught:
                _rows(data, sql)
            text = str(caught.value)
            assert key.hex() not in text
            assert "root:" not in text


def test_extensions_cannot_be_installed_or_loaded(gateway: LiveGateway, stopped: Path) -> None:
    for data in _both(gateway, stopped):
        for sql in ["INSTALL httpfs", "EXPLAIN ANALYZE INSTALL httpfs", "LOAD httpfs",
                    "EXPLAIN ANALYZE LOAD httpfs", "ATTACH ':memory:' AS m"]:
            with pytest.raises(QueryRejected):
                _rows(data, sql)
        with pytest.raises(QueryError, match="disabled"):
            _rows(data, "SELECT * FROM read_parquet('http://127.0.0.1:9/x.parquet')")


def test_the_memory_bomb_fails_with_a_clear_error_and_the_gateway_stays_bounded(gateway: LiveGateway) -> None:
    with (
        rss_watch(gateway.proc.pid, RSS_BOUND) as peak,
        pytest.raises(QueryError, match=r"Out of Memory.*the store's limit of"),
    ):
        _rows(gateway.data, BOMB, timeout=120)
    assert gateway.proc.poll() is None, "the gateway was killed: its RSS passed the bound"
    assert peak[0] < RSS_BOUND
    rows = _count(gateway.data)
    gateway.post(1)
    gateway.stored(rows + PER_DATAGRAM)


def test_the_memory_bomb_on_a_stopped_store_fails_with_a_clear_error(stopped: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowtunnel", "query", "--data", str(stopped), BOMB],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    with rss_watch(proc.pid, RSS_BOUND) as peak:
        _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (proc.returncode, err)
    assert "Out of Memory" in err
    assert "store's limit of" in err
    assert "SET" not in err
    assert peak[0] < RSS_BOUND


def test_the_memory_bomb_is_interrupted_at_its_timeout(gateway: LiveGateway, stopped: Path) -> None:
    """Before, the bomb overran ``--timeout`` (a stopped store's query had no timeout at all): now it ends at
    its timeout, long before it could reach the memory cap, through the socket and directly alike. The
    timeout is the shortest allowed: on a fast host the bomb reached the 1 GiB cap within 0.5 s."""
    for data in _both(gateway, stopped):
        with pytest.raises(QueryError, match=r"after its 0\.1 s timeout"):
            _rows(data, BOMB, timeout=0.1)
    assert gateway.proc.poll() is None


# --- the console's query page: the same list through /console/api/query ---------------------------------

CONSOLE_REFUSED = [
    "EXPLAIN ANALYZE COPY (SELECT 'x' AS l) TO '{evil}' (FORMAT csv)",
    "EXPLAIN (ANALYZE) COPY (SELECT 'x' AS l) TO '{evil}' (FORMAT csv)",
    "COPY (SELECT 'x' AS l) TO '{evil}' (FORMAT csv)",
    "EXPLAIN ANALYZE SET GLOBAL memory_limit='1MB'", "EXPLAIN ANALYZE CHECKPOINT", "CHECKPOINT",
    "SET GLOBAL threads=1", "EXPLAIN ANALYZE SET GLOBAL threads=1", "FROM checkpoint()",
    "SELECT content FROM read_blob('{registry}')", "SELECT content FROM read_text('{registry}')",
    "SELECT * FROM glob('{data}/*')", "SELECT * FROM read_csv('/etc/passwd')", "FROM '{registry}'",
    "INSTALL httpfs", "EXPLAIN ANALYZE INSTALL httpfs", "LOAD httpfs",
    "SELECT * FROM read_parquet('http://127.0.0.1:9/x.parquet')",
]


def test_the_console_query_page_refuses_the_whole_list(gateway: LiveGateway, tmp_path: Path) -> None:
    settings = "SELECT current_setting('memory_limit'), current_setting('threads')"
    status, before = gateway.console(settings)
    assert status == 200, before
    failures = gateway.log.read_bytes().count(b"commit of cursor")
    evil = tmp_path / "evil.sh"
    for form in CONSOLE_REFUSED:
        sql = form.format(evil=evil, registry=gateway.data / "registry.sqlite", data=gateway.data)
        status, doc = gateway.console(sql)
        assert status == 400, (sql, status, doc)  # refused with the reason, never a 500 nor rows
        assert "rows" not in doc
        assert gateway.key.hex() not in json.dumps(doc)
        assert "root:" not in doc["error"]
    assert not evil.exists()
    assert gateway.console(settings) == (200, before)
    rows = _count(gateway.data)
    gateway.post(2)  # the store sink's next commit works
    gateway.stored(rows + 2 * PER_DATAGRAM)
    assert gateway.log.read_bytes().count(b"commit of cursor") == failures
    status, doc = gateway.console("SELECT count(*) FROM flows")
    assert (status, doc["rows"]) == (200, [[rows + 2 * PER_DATAGRAM]])


def test_the_memory_bomb_through_the_console_page_is_refused_and_the_gateway_stays_bounded(
    gateway: LiveGateway,
) -> None:
    with rss_watch(gateway.proc.pid, RSS_BOUND) as peak:
        status, doc = gateway.console(BOMB)
    assert gateway.proc.poll() is None, "the gateway was killed: its RSS passed the bound"
    assert peak[0] < RSS_BOUND
    assert status == 400, doc
    # The memory cap or the console's 30 s timeout, whichever comes first on a loaded machine.
    assert re.search(r"Out of Memory.*the store's limit of|after its 30 s timeout", doc["error"]), doc
    rows = _count(gateway.data)
    gateway.post(1)
    gateway.stored(rows + PER_DATAGRAM)


def test_ordinary_queries_still_work(gateway: LiveGateway, stopped: Path) -> None:
    for data in _both(gateway, stopped):
        [[n, total]] = _rows(data, "SELECT count(*), sum(bytes) FROM flows")
        assert isinstance(n, int)
        assert n >= 4 * PER_DATAGRAM
        assert total == n // PER_DATAGRAM * sum(1000 * (r + 1) for r in range(PER_DATAGRAM))
        sql, params = top_sql(by="src_addr", now=dt.datetime.now(dt.UTC), since_seconds=3600)
        with open_query(data, sql, params) as result:
            ranked = list(result.rows)
        assert ranked[0][0] == f"10.9.0.{PER_DATAGRAM}"
        plan = _rows(data, "EXPLAIN SELECT count(*) FROM flows")
        assert plan
        assert "physical_plan" in str(plan[0][0])
        assert _rows(data, "DESCRIBE flows")
        assert _rows(data, "SELECT current_setting('TimeZone')") == [["UTC"]]


# --- the sandbox itself, beneath the SQL check (defence in depth; the console uses it directly) ----------

class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        self.send_error(404)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_locked_instance_refuses_what_the_sql_check_would_miss(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    repo = f"http://127.0.0.1:{server.server_address[1]}"
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    limits = sandbox.QueryLimits(memory_limit="256MiB", threads=1)
    conn = duckdb.connect(str(tmp_path / "db.duckdb"), config=sandbox.instance_config(
        limits, custom_extension_repository=repo, autoinstall_extension_repository=repo,
    ))
    try:
        conn.execute("CREATE TABLE t AS SELECT 1 AS a")
        sandbox.lock(conn, allowed_directories=[tmp_path / "staging"])
        cur = sandbox.begin(conn.cursor(), limits)
        for sql in ["INSTALL httpfs", "LOAD httpfs", f"SELECT * FROM read_text('{secret}')",
                    f"COPY t TO '{tmp_path}/out.csv'", "SET GLOBAL memory_limit='8GB'", "SET threads=8",
                    "INSERT INTO t VALUES (2)", f"ATTACH '{tmp_path}/other.db' AS m"]:
            with pytest.raises(duckdb.Error):
                cur.execute(sql)
            cur.execute("ROLLBACK")
            cur.execute("BEGIN TRANSACTION READ ONLY")
        with pytest.raises(duckdb.OutOfMemoryException):
            cur.execute(BOMB)
        sandbox.rollback(cur)
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)
        assert not (tmp_path / "out.csv").exists()
    finally:
        conn.close()
        server.shutdown()
        server.server_close()
    assert _Recorder.hits == []  # no extension download was even attempted


@pytest.mark.parametrize("sql", [
    "EXPLAIN ANALYZE SELECT 1", "explain analyze select 1", "EXPLAIN (ANALYZE) SELECT 1",
    "EXPLAIN (FORMAT json) SELECT 1", "-- c\nEXPLAIN /* c */ ANALYZE SELECT 1", "EXPLAIN DELETE FROM flows",
    "EXPLAIN INSERT INTO flows (agent) VALUES ('x')", "EXPLAIN ANALYZE INSTALL httpfs",
    "SUMMARIZE SELECT 1; SELECT 2",
])
def test_explain_only_of_a_plain_select(sql: str) -> None:
    with pytest.raises(QueryRejected):
        sandbox.check_read_only(sql)


# --- fatal DuckDB errors in the query server ----------------------------------------------------------------

async def test_a_fatal_duckdb_error_is_answered_not_left_to_the_event_loop(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    calls = 0

    def factory() -> duckdb.DuckDBPyConnection:
        nonlocal calls
        calls += 1
        raise duckdb.FatalException("FATAL Error: database has been invalidated because of a previous error")

    server = QueryServer(tmp_path / "q.sock", factory)
    await server.start()
    try:
        for _ in range(2):
            with pytest.raises(QueryError, match="invalidated"):
                await asyncio.to_thread(_client_query, tmp_path / "q.sock", "SELECT 1")
    finally:
        await server.close()
    assert calls == 2
    assert server.failed == 2
    assert unhandled == []


def _client_query(path: Path, sql: str) -> list[list[object]]:
    client = QueryClient.connect(path)
    assert client is not None
    with client:
        return list(client.query(sql, [], timeout=10).rows)


@pytest.mark.parametrize("sql", [
    "FROM checkpoint()", "SELECT * FROM force_checkpoint()", 'SELECT * FROM main."CheckPoint" ( )',
    "FROM truncate_duckdb_logs()", "SELECT * FROM query('FROM checkpoint()')", "FROM enable_logging()",
    "FROM query_table('flows')", "SELECT 1 FROM flows, checkpoint()",
])
def test_selects_of_acting_table_functions_are_refused(sql: str) -> None:
    with pytest.raises(QueryRejected, match="acts, not reads"):
        sandbox.check_read_only(sql)


def test_names_of_acting_functions_elsewhere_are_fine() -> None:
    assert sandbox.check_read_only("SELECT 'checkpoint()' AS checkpoint, query FROM (SELECT 1 AS query)")


def test_the_timeout_holds_on_a_stopped_store_too(stopped: Path) -> None:
    with pytest.raises(QueryError, match=r"after its 0\.3 s timeout"):
        _rows(stopped, "SELECT count(*) FROM range(100000000000) a", timeout=0.3)
