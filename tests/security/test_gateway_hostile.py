"""A hostile internet against one running gateway process: fuzzed requests, lies about sizes, slow and
many connections, bombs with a valid key, hostile agent ids. Expectation: a precise 4xx, nothing journaled,
memory bounded, the process up and serving enrolled agents, and no key in its log.

One gateway subprocess serves the whole module (starting one costs seconds); the tests talk raw HTTP/1.1
over sockets so they can send what a well-behaved client library would refuse to.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flowtunnel.datagram import Datagram
from flowtunnel.wire import parse_key, seal_batch
from tests.peers import free_tcp_port
from tests.reliability.harness import find_leaks, log_lines
from tests.security.crafting import seal_packed, zstd_rle_frame

CT = "application/vnd.flowtunnel.batch"
BODY_TIMEOUT = 2.0
MAX_INFLIGHT = 8
MAX_BODY = 1 << 20


@dataclass(frozen=True, slots=True)
class LiveGateway:
    port: int
    pid: int
    data: Path
    log: Path
    agent: str
    key_text: str

    @property
    def key(self) -> bytes:
        return parse_key(self.key_text)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")


def _flowtunnel(*args: str) -> list[str]:
    return [sys.executable, "-m", "flowtunnel", *args]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    work = tmp_path_factory.mktemp("hostile-gateway")
    data = work / "data"
    out = subprocess.run(_flowtunnel("enroll", "field-1", "--data", str(data), "--format", "json"),
                         capture_output=True, check=True, timeout=60)
    doc = json.loads(out.stdout)
    port = free_tcp_port()
    log = work / "gateway.log"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            _flowtunnel("--log-level", "debug", "gateway", "--listen", f"127.0.0.1:{port}", "--data",
                        str(data), "--no-store", "--body-timeout", f"{BODY_TIMEOUT:g}s", "--max-inflight",
                        str(MAX_INFLIGHT), "--max-body", str(MAX_BODY)),
            stdout=fh, stderr=fh, stdin=subprocess.DEVNULL, env=env,
        )
    deadline = time.monotonic() + 60
    while "listening on" not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.05)
    live = LiveGateway(port=port, pid=proc.pid, data=data, log=log, agent=doc["agent_id"],
                       key_text=doc["key"])
    try:
        yield live
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        assert code == 0, f"gateway exited with {code} on SIGTERM:\n{live.log_text()[-3000:]}"


# -- raw HTTP -----------------------------------------------------------------------------------------------


async def exchange(port: int, data: bytes, *, wait: float = 15.0) -> tuple[int | None, bytes]:
    """Send ``data`` on a fresh connection; the status of the first response (None if the connection ended
    without one) and the response bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        got = await asyncio.wait_for(_read_response(reader), wait)
    except (ConnectionError, asyncio.IncompleteReadError):
        return None, b""
    finally:
        writer.close()
    status = int(got.split(b" ", 2)[1]) if got.startswith(b"HTTP/1.") else None
    return status, got


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        return exc.partial
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


def post(body: bytes, *, agent: str | None = None, extra: str = "", length: str | None = None,
         ctype: str = CT) -> bytes:
    head = f"POST /v1/batches HTTP/1.1\r\nHost: gw\r\nContent-Type: {ctype}\r\n"
    if agent is not None:
        head += f"X-Flowtunnel-Agent: {agent}\r\n"
    head += f"Content-Length: {len(body) if length is None else length}\r\n{extra}\r\n"
    return head.encode("latin-1") + body


def datagram(i: int) -> Datagram:
    return Datagram(received_ns=1_700_000_000_000_000_000 + i, exporter="127.0.0.1", exporter_port=40000,
                    local_port=2055, payload=b"\x00\x09" + i.to_bytes(4, "big") + b"\x00" * 40)


async def status_doc(gw: LiveGateway) -> dict[str, object]:
    status, raw = await exchange(gw.port, b"GET /v1/status HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert status == 200
    doc: dict[str, object] = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    return doc


async def journal_entries(gw: LiveGateway) -> int:
    journal = (await status_doc(gw))["journal"]
    assert isinstance(journal, dict)
    return int(journal["last_seq"])


_next_seq = 0


async def legit_batch(gw: LiveGateway) -> int:
    """An enrolled agent's next batch; its HTTP status."""
    global _next_seq
    status, raw = await exchange(gw.port, b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert status == 200, raw
    token_body = seal_batch(agent_id=gw.agent, key=gw.key, first_seq=1, datagrams=[], nonce=os.urandom(12))
    status, raw = await exchange(gw.port, post(token_body, agent=gw.agent))
    assert status == 200, raw
    acked = int(json.loads(raw.split(b"\r\n\r\n", 1)[1])["acked"])
    _next_seq = max(_next_seq, acked)
    body = seal_batch(agent_id=gw.agent, key=gw.key, first_seq=_next_seq + 1, datagrams=[datagram(_next_seq)],
                      nonce=os.urandom(12))
    status, raw = await exchange(gw.port, post(body, agent=gw.agent))
    if status == 200:
        _next_seq += 1
    return status or 0


# -- fuzzed requests ----------------------------------------------------------------------------------------

_HEADER_NAMES = ["X-Flowtunnel-Agent", "Content-Type", "Transfer-Encoding", "X-Flowtunnel-Backlog",
                 "X-Flowtunnel-Dropped", "Expect", "Connection", "Host", "X-A", "Bad Name", "X\x00", "\xff"]
_VALUES = ["", "field-1", "../../etc/passwd", "chunked", "100-continue", "close", "a" * 9000, "\x01\x02",
           "\xe9\xff", "999999999999999999999999", "spool_full=1,x=" + "9" * 50, "a=b," * 2000, CT, "-1"]


def fuzzed_request(rng: random.Random) -> bytes:
    headers = "".join(
        f"{rng.choice(_HEADER_NAMES)}: {rng.choice(_VALUES)}\r\n" for _ in range(rng.choice([0, 1, 3, 8, 70]))
    )
    body = rng.randbytes(rng.choice([0, 1, 44, 100, 5000]))
    # (a declared length above the body's is a slow body: tested on its own, it would cost body_timeout here)
    length = rng.choice([None, None, "0", "5", "1" * 30, "-5", "0x10"])
    return post(body, extra=headers, length=length, ctype=rng.choice([CT, "text/plain", "", CT + "; x=1"]))


async def test_fuzzed_requests_get_a_4xx_and_the_gateway_keeps_serving(gateway: LiveGateway) -> None:
    before = await journal_entries(gateway)
    rng = random.Random(5)
    statuses = []
    for _ in range(150):
        status, raw = await exchange(gateway.port, fuzzed_request(rng), wait=BODY_TIMEOUT + 10)
        statuses.append(status)
        assert status is None or 400 <= status < 500, raw[:300]
    assert sum(1 for s in statuses if s is not None) > 100  # most got an answer, not a hang-up
    assert await journal_entries(gateway) == before
    assert await legit_batch(gateway) == 200


async def test_fuzzed_bodies_of_an_enrolled_agent_get_a_precise_4xx_and_write_nothing(
    gateway: LiveGateway,
) -> None:
    before = await journal_entries(gateway)
    valid = seal_batch(agent_id=gateway.agent, key=gateway.key, first_seq=10**6,
                       datagrams=[datagram(i) for i in range(5)], nonce=os.urandom(12))
    rng = random.Random(9)
    seen = set()
    for i in range(150):
        if i % 3 == 0:
            body = rng.randbytes(rng.randint(0, 3000))
        else:
            mutated = bytearray(valid)
            for _ in range(rng.randint(1, 4)):
                mutated[rng.randrange(len(mutated))] ^= rng.randint(1, 255)
            body = bytes(mutated)
        status, raw = await exchange(gateway.port, post(body, agent=gateway.agent))
        assert status in (400, 401, 413), raw[:300]
        seen.add(json.loads(raw.split(b"\r\n\r\n", 1)[1])["error"])
    assert "authentication-failed" in seen
    assert "bad-magic" in seen
    assert await journal_entries(gateway) == before


@pytest.mark.parametrize(
    ("length", "expected"),
    [("1000000000000", 413), (str(2**63), 413), (str(2**64 + 1), 400), ("-1", 400), ("abc", 400),
     ("1, 2", 400), (str(MAX_BODY + 1), 413)],
)
async def test_absurd_content_length_is_refused_without_reading_the_body(
    gateway: LiveGateway, length: str, expected: int
) -> None:
    status, raw = await exchange(gateway.port, post(b"", agent=gateway.agent, length=length))
    assert status == expected, raw[:300]


async def test_missing_length_and_wrong_type_get_their_own_status(gateway: LiveGateway) -> None:
    body = b"x" * 10
    chunked = (f"POST /v1/batches HTTP/1.1\r\nHost: gw\r\nContent-Type: {CT}\r\n"
               "Transfer-Encoding: chunked\r\n\r\na\r\n").encode() + body + b"\r\n0\r\n\r\n"
    assert (await exchange(gateway.port, chunked))[0] == 411
    assert (await exchange(gateway.port, post(body, ctype="application/json")))[0] == 415


# -- slow and many ------------------------------------------------------------------------------------------


async def test_slow_body_is_cut_off_with_408(gateway: LiveGateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(post(b"", agent=gateway.agent, length="1000") + b"\x00" * 10)
    got = await asyncio.wait_for(_read_response(reader), BODY_TIMEOUT + 15)
    writer.close()
    assert got.startswith(b"HTTP/1.1 408"), got[:200]


async def test_slow_unauthenticated_bodies_do_not_starve_enrolled_agents(gateway: LiveGateway) -> None:
    """Regression (found by this suite): slow bodies used to hold every body slot for body_timeout."""
    conns = []
    for _ in range(MAX_INFLIGHT):
        _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(post(b"", length=str(MAX_BODY)) + b"x")
        conns.append(writer)
    await asyncio.sleep(0.3)
    try:
        assert await legit_batch(gateway) == 200
    finally:
        for writer in conns:
            writer.close()
        await asyncio.sleep(BODY_TIMEOUT + 0.5)  # let the slots go for the next tests


async def test_stalled_bodies_naming_an_enrolled_agent_do_not_starve_it(gateway: LiveGateway) -> None:
    """Regression (found by this suite): stalled bodies whose clear header names an enrolled agent held that
    agent's slots until the whole body's deadline (~17 min for 1 MiB)."""
    body = seal_batch(agent_id=gateway.agent, key=os.urandom(32), first_seq=1, datagrams=[datagram(1)],
                      nonce=os.urandom(12))
    head = body[: len(body) - 16]  # the clear header naming the agent, then nothing more for a long time
    conns = []
    for _ in range(MAX_INFLIGHT):
        _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(post(b"", agent=gateway.agent, length=str(MAX_BODY)) + head)
        conns.append(writer)
    await asyncio.sleep(BODY_TIMEOUT + 1.0)  # stalled well past body_timeout
    try:
        assert await legit_batch(gateway) == 200
    finally:
        for writer in conns:
            writer.close()


async def test_slow_headers_and_many_idle_connections_leave_memory_bounded_and_service_up(
    gateway: LiveGateway,
) -> None:
    base = gateway.rss_mib()
    conns: list[asyncio.StreamWriter] = []
    for i in range(600):
        _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(b"POST /v1/batches HTTP/1.1\r\nHost: gw\r\n" if i % 2 else b"")
        conns.append(writer)
    await asyncio.sleep(0.5)
    for writer in conns[::2]:
        writer.write(b"X-Drip: 1\r\n")
    await asyncio.sleep(0.5)
    try:
        assert await legit_batch(gateway) == 200
        assert gateway.rss_mib() - base < 64
    finally:
        for writer in conns:
            writer.close()


async def test_concurrent_large_bodies_are_bounded_by_max_inflight(gateway: LiveGateway) -> None:
    base = gateway.rss_mib()
    body = os.urandom(MAX_BODY)

    async def one() -> int | None:
        return (await exchange(gateway.port, post(body, agent=gateway.agent), wait=60))[0]

    statuses = await asyncio.gather(*(one() for _ in range(40)))
    assert set(statuses) <= {400, 503, None}, statuses
    assert 400 in statuses
    # max_inflight bodies of max_body each, plus per-connection buffers: far below 40 x 1 MiB of copies
    assert gateway.rss_mib() - base < MAX_INFLIGHT * MAX_BODY / (1 << 20) * 4 + 32
    assert await legit_batch(gateway) == 200


# -- bombs and hostile ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize("declare", [1 << 30, 4096, None], ids=["honest", "lying", "no-size"])
async def test_decompression_bomb_with_a_valid_key_is_refused_over_http(
    gateway: LiveGateway, declare: int | None
) -> None:
    before, base = await journal_entries(gateway), gateway.rss_mib()
    raw_len = declare if declare == 1 << 30 else 4096
    bomb = zstd_rle_frame(1 << 30, declare=declare)
    body = seal_packed(agent_id=gateway.agent, key=gateway.key, packed=bomb, raw_len=raw_len, count=1,
                       first_seq=10**9, nonce=os.urandom(12))
    status, raw = await exchange(gateway.port, post(body, agent=gateway.agent))
    assert status in (400, 413), raw[:300]
    assert await journal_entries(gateway) == before
    assert gateway.rss_mib() - base < 32


HOSTILE_HEADER_IDS = ["../../etc/passwd", "a/../../b", "a" * 8000, "field-1\x7f", "caf\xe9", "field-1 x",
                      "field-1,field-1", "*", "%2e%2e%2f"]


@pytest.mark.parametrize("agent_id", HOSTILE_HEADER_IDS, ids=lambda s: repr(s[:16]))
async def test_hostile_agent_id_in_the_header_is_refused(gateway: LiveGateway, agent_id: str) -> None:
    body = seal_batch(agent_id=gateway.agent, key=gateway.key, first_seq=10**7, datagrams=[datagram(1)],
                      nonce=os.urandom(12))
    status, raw = await exchange(gateway.port, post(body, agent=agent_id))
    assert status is not None, raw[:300]
    assert 400 <= status < 500, raw[:300]


@pytest.mark.parametrize(
    "path",
    ["/v1/agents/..%2F..%2Fregistry/state", "/v1/agents/%2e%2e/state", "/v1/agents/" + "a" * 4000 + "/state",
     "/v1/agents/field-1%00/state", "/v1/agents/field-1/../../metrics/state", "/v1/agents//state"],
    ids=lambda s: s[:30],
)
async def test_hostile_agent_id_in_the_state_path_is_refused(gateway: LiveGateway, path: str) -> None:
    token = seal_batch(agent_id=gateway.agent, key=gateway.key, first_seq=1, datagrams=[],
                       nonce=os.urandom(12))
    tok = base64.urlsafe_b64encode(token).decode().rstrip("=")
    status, raw = await exchange(
        gateway.port, f"GET {path} HTTP/1.1\r\nHost: gw\r\nX-Flowtunnel-Token: {tok}\r\n\r\n".encode()
    )
    assert status is not None, raw[:300]
    assert 400 <= status < 500, raw[:300]
    assert b"acked" not in raw


@pytest.mark.parametrize("name", ["../../evil", "a" * 64, "x\ny", "", "/tmp/abs"], ids=repr)
def test_enroll_refuses_hostile_names_and_writes_nothing_outside(tmp_path: Path, name: str) -> None:
    data = tmp_path / "data"
    proc = subprocess.run(_flowtunnel("enroll", name, "--data", str(data), "--format", "json"),
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode == 2, proc
    assert b"agent id" in proc.stderr
    assert proc.stdout == b""
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["data"])
    assert not (tmp_path / "evil").exists()


# -- logs ---------------------------------------------------------------------------------------------------


async def test_a_flood_of_malformed_requests_is_logged_once_per_cause(gateway: LiveGateway) -> None:
    """Regression (found by this suite): aiohttp logged each malformed request at ERROR with a traceback."""
    offset = len(gateway.log_text())
    for _ in range(30):
        await exchange(gateway.port, post(b"", length="-1"))
    new = gateway.log_text()[offset:]
    assert len(log_lines(new, "ERROR")) + len(log_lines(new, "WARNING")) <= 3, new[:2000]


async def test_no_key_in_the_gateway_log_or_status(gateway: LiveGateway) -> None:
    """Last in the module: by now the log holds debug output of every test above."""
    assert await legit_batch(gateway) == 200
    texts = [gateway.log_text(), json.dumps(await status_doc(gateway))]
    for path in gateway.data.iterdir():
        if path.suffix in (".json", ".log", ".txt"):
            texts.append(path.read_text(errors="replace"))
    assert find_leaks(texts, gateway.key_text) == []
