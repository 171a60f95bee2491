"""The link emulator does to the bytes what it was told: delays, caps, cuts, swallows and answers them.

A small recording HTTP server stands upstream; clients speak raw HTTP/1.1 over asyncio streams so that each
test sees exactly which bytes crossed the emulator. Timing is only bounded from below (a slow link can only
be slower on a loaded machine, never faster).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable

import pytest

from tests.linkemu import Action, Fault, LinkEmulator, Mode, Shape, ThreadedLink, _Bucket


class Upstream:
    """HTTP/1.1 server recording every byte per connection; answers each request with `reply_size` bytes."""

    def __init__(self, reply_size: int = 10) -> None:
        self.reply_size = reply_size
        self.connections: list[bytearray] = []
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = bytearray()
        self.connections.append(seen)
        pending = bytearray()
        try:
            while chunk := await reader.read(65536):
                seen += chunk
                pending += chunk
                while (end := pending.find(b"\r\n\r\n")) >= 0:
                    length = 0
                    for line in bytes(pending[:end]).split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    if len(pending) < end + 4 + length:
                        break
                    self.requests.append(bytes(pending[: end + 4 + length]))
                    del pending[: end + 4 + length]
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.reply_size
                        + b"r" * self.reply_size
                    )
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    await up.start()
    yield up
    await up.close()


@pytest.fixture
async def link(upstream: Upstream) -> AsyncIterator[LinkEmulator]:
    assert upstream.server is not None
    port = upstream.server.sockets[0].getsockname()[1]
    async with LinkEmulator(upstream=("127.0.0.1", port), seed=42) as emu:
        yield emu


def request(path: str = "/v1/batches", body: bytes = b"", method: str = "POST") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: gw\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    )


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def connect(link: LinkEmulator) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", link.port)


async def exchange(link: LinkEmulator, data: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await connect(link)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader), 10)
    finally:
        writer.close()


async def read_all(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """Everything until EOF or reset; the flag says whether it ended with a reset."""
    got = bytearray()
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 10):
            got += chunk
    except ConnectionResetError:
        return bytes(got), True
    return bytes(got), False


async def until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def assert_silent(reader: asyncio.StreamReader, seconds: float = 0.5) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), seconds)


async def test_forwards_keepalive_requests_byte_exact_and_counts_them(
    link: LinkEmulator, upstream: Upstream
) -> None:
    reader, writer = await connect(link)
    first, second = request(body=b"a" * 3000), request("/healthz", method="GET")
    writer.write(first)
    assert await read_response(reader) == (200, {"content-length": "10"}, b"r" * 10)
    writer.write(second)
    assert (await read_response(reader))[0] == 200
    writer.close()
    assert upstream.requests == [first, second]
    stats = link.stats()
    assert stats.connections == 1
    assert stats.requests == 2
    assert stats.bytes_from_client == stats.bytes_to_server == len(first) + len(second)
    assert stats.bytes_from_server == stats.bytes_to_client == 2 * len(
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" + b"r" * 10
    )


async def test_bandwidth_cap_slows_a_body_to_the_configured_rate(
    link: LinkEmulator, upstream: Upstream
) -> None:
    link.up = Shape(rate_bps=40_000, burst=1500)  # GPRS-like: 5000 bytes/s
    data = request(body=b"x" * 6000)
    started = time.monotonic()
    status, _, _ = await exchange(link, data)
    elapsed = time.monotonic() - started
    assert status == 200
    assert upstream.requests == [data]
    assert elapsed >= (len(data) - 1500) / 5000 * 0.95


def test_bucket_grants_a_burst_then_paces_at_the_rate() -> None:
    bucket, shape = _Bucket(), Shape(rate_bps=8000, burst=100)  # 1000 bytes/s
    assert bucket.delay(100, shape, now=1000.0) == 0.0  # the burst is free
    assert bucket.delay(500, shape, now=1000.0) == pytest.approx(0.5)
    assert bucket.delay(500, shape, now=1000.0) == pytest.approx(1.0)  # queued behind the first
    assert bucket.delay(10, Shape(), now=1000.0) == 0.0


async def test_latency_is_added_in_each_direction(link: LinkEmulator) -> None:
    link.up, link.down = Shape(latency=0.2), Shape(latency=0.3, jitter=0.1)
    started = time.monotonic()
    status, _, body = await exchange(link, request(body=b"ping"))
    assert (status, body) == (200, b"r" * 10)
    assert time.monotonic() - started >= 0.5


async def test_abort_request_delivers_exactly_n_bytes_then_resets(
    link: LinkEmulator, upstream: Upstream
) -> None:
    link.add_fault(Fault(action=Action.ABORT_REQUEST, after=50))
    data = request(body=b"b" * 500)
    reader, writer = await connect(link)
    writer.write(data)
    got, was_reset = await read_all(reader)
    writer.close()
    assert (got, was_reset) == (b"", True)
    await until(lambda: len(upstream.connections[0]) >= 50)
    assert bytes(upstream.connections[0]) == data[:50]
    assert upstream.requests == []
    assert link.stats().faults == {"abort-request": 1}
    # count=1: the next request goes through
    assert (await exchange(link, data))[0] == 200
    assert upstream.requests == [data]


async def test_abort_request_longer_than_the_request_cuts_before_the_answer(
    link: LinkEmulator, upstream: Upstream
) -> None:
    link.add_fault(Fault(action=Action.ABORT_REQUEST, after=10_000))
    data = request(body=b"short")
    reader, writer = await connect(link)
    writer.write(data)
    got, was_reset = await read_all(reader)
    writer.close()
    assert (got, was_reset) == (b"", True)
    await until(lambda: len(upstream.connections[0]) >= len(data))
    assert bytes(upstream.connections[0]) == data


async def test_abort_response_cuts_the_answer_after_n_bytes(link: LinkEmulator, upstream: Upstream) -> None:
    link.add_fault(Fault(action=Action.ABORT_RESPONSE, after=20))
    data = request(body=b"c" * 100)
    reader, writer = await connect(link)
    writer.write(data)
    got, was_reset = await read_all(reader)
    writer.close()
    assert was_reset
    assert got == b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"[:20]
    assert upstream.requests == [data]  # the server did its part: the ack was lost on the way back


async def test_drop_response_forwards_the_request_and_never_answers(
    link: LinkEmulator, upstream: Upstream
) -> None:
    link.add_fault(Fault(action=Action.DROP_RESPONSE))
    data = request(body=b"d")
    reader, writer = await connect(link)
    writer.write(data)
    await assert_silent(reader)
    writer.close()
    assert upstream.requests == [data]
    assert link.stats().bytes_to_client == 0


@pytest.mark.parametrize(
    ("status", "retry_after", "header", "value"),
    [
        (503, 7.0, "retry-after", "7"),
        (407, None, "proxy-authenticate", 'Basic realm="linkemu"'),
        (502, None, "", ""),
    ],
)
async def test_answer_replies_like_a_proxy_without_forwarding(
    link: LinkEmulator, upstream: Upstream, status: int, retry_after: float | None, header: str, value: str
) -> None:
    link.add_fault(Fault(action=Action.ANSWER, status=status, retry_after=retry_after, count=2))
    for _ in range(2):
        got_status, headers, body = await exchange(link, request(body=b"e" * 300))
        assert got_status == status
        assert headers["connection"] == "close"
        assert str(status).encode() in body
        if header:
            assert headers[header] == value
    assert upstream.requests == []
    assert (await exchange(link, request()))[0] == 200
    assert link.stats().faults == {f"answer-{status}": 2}


async def test_faults_only_hit_requests_matching_the_request_line(link: LinkEmulator) -> None:
    link.add_fault(Fault(action=Action.ANSWER, status=502, match="POST /v1/batches", count=None))
    assert (await exchange(link, request("/v1/agents/a/state", method="GET")))[0] == 200
    assert (await exchange(link, request("/v1/batches")))[0] == 502
    assert (await exchange(link, request("/v1/batches")))[0] == 502
    link.clear_faults()
    assert (await exchange(link, request("/v1/batches")))[0] == 200


async def test_blackhole_accepts_and_reads_but_never_answers_even_open_connections(
    link: LinkEmulator, upstream: Upstream
) -> None:
    old_reader, old_writer = await connect(link)
    old_writer.write(request(body=b"1"))
    await read_response(old_reader)
    link.set_mode(Mode.BLACKHOLE)
    old_writer.write(request(body=b"2"))
    reader, writer = await connect(link)
    writer.write(request(body=b"3" * 10_000))
    await writer.drain()
    await assert_silent(reader)
    await assert_silent(old_reader, 0.1)
    assert len(upstream.requests) == 1
    link.set_mode(Mode.FORWARD)
    assert (await exchange(link, request()))[0] == 200
    await assert_silent(old_reader, 0.1)  # black-holed connections stay dead, as after a NAT loses state
    writer.close()
    old_writer.close()
    stats = link.stats()
    assert stats.blackholed == 2
    assert stats.bytes_from_client >= 10_000


async def test_refuse_outage_refuses_then_recovers_on_the_same_port(link: LinkEmulator) -> None:
    reader, writer = await connect(link)
    port = link.port
    link.outage(0.5, Mode.REFUSE)
    got, was_reset = await read_all(reader)
    writer.close()
    assert (got, was_reset) == (b"", True)
    await asyncio.sleep(0.05)
    with pytest.raises(ConnectionRefusedError):
        await connect(link)
    deadline = time.monotonic() + 10
    while True:
        try:
            assert (await exchange(link, request()))[0] == 200
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, "link did not recover from the outage"
            await asyncio.sleep(0.1)
    assert link.port == port
    assert link.mode is Mode.FORWARD


async def test_reset_mode_resets_at_accept(link: LinkEmulator, upstream: Upstream) -> None:
    link.set_mode(Mode.RESET)
    reader, writer = await connect(link)
    with contextlib.suppress(ConnectionError):
        writer.write(request())
    got, _ = await read_all(reader)
    writer.close()
    assert got == b""
    assert upstream.requests == []
    assert link.stats().refused == 1


async def test_unreachable_upstream_resets_the_client_and_is_counted() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    async with LinkEmulator(upstream=("127.0.0.1", dead_port)) as emu:
        reader, writer = await connect(emu)
        got, _ = await read_all(reader)
        writer.close()
        assert got == b""
        assert emu.stats().upstream_failures == 1


async def _decisions(port: int, seed: int) -> list[int]:
    async with LinkEmulator(upstream=("127.0.0.1", port), seed=seed) as emu:
        emu.add_fault(Fault(action=Action.ANSWER, status=503, count=None, probability=0.5))
        return [(await exchange(emu, request()))[0] for _ in range(16)]


async def test_random_faults_replay_identically_with_the_same_seed(upstream: Upstream) -> None:
    assert upstream.server is not None
    port = upstream.server.sockets[0].getsockname()[1]
    first, again, other = await _decisions(port, 1), await _decisions(port, 1), await _decisions(port, 2)
    assert first == again
    assert set(first) == {200, 503}
    assert first != other


def test_threaded_link_serves_synchronous_callers() -> None:
    payload = request(body=b"sync")

    async def serve_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(payload))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    with ThreadedLink(upstream=("127.0.0.1", 9), seed=3) as link:
        # point it at a real upstream started on the link's own loop
        async def start() -> asyncio.Server:
            return await asyncio.start_server(serve_once, "127.0.0.1", 0)

        async def stop(server: asyncio.Server) -> None:
            server.close()
            await server.wait_closed()

        server = link._run(start())
        port = server.sockets[0].getsockname()[1]
        link.call(lambda e: setattr(e, "upstream", ("127.0.0.1", port)))
        with socket.create_connection(("127.0.0.1", link.port), timeout=10) as sock:
            sock.sendall(payload)
            got = b""
            while chunk := sock.recv(4096):
                got += chunk
        assert got.endswith(b"\r\n\r\nok")
        assert link.stats().bytes_to_server == len(payload)
        link.call(lambda e: e.set_mode(Mode.RESET))
        assert link.call(lambda e: e.mode) is Mode.RESET
        link._run(stop(server))


async def test_records_every_complete_request_it_carries(upstream: Upstream) -> None:
    assert upstream.server is not None
    port = upstream.server.sockets[0].getsockname()[1]
    async with LinkEmulator(upstream=("127.0.0.1", port), record=True) as emu:
        first, second = request(body=b"one"), request("/healthz", method="GET")
        reader, writer = await connect(emu)
        writer.write(first[:10])
        await writer.drain()
        writer.write(first[10:] + second)
        await read_response(reader)
        await read_response(reader)
        writer.close()
        assert emu.recorded == [first, second]


async def test_answer_can_carry_a_forged_body(link: LinkEmulator, upstream: Upstream) -> None:
    forged = Fault(action=Action.ANSWER, status=200, body=b'{"acked": 7}', content_type="application/json")
    link.add_fault(forged)
    status, headers, body = await exchange(link, request())
    assert (status, headers["content-type"], body) == (200, "application/json", b'{"acked": 7}')
    assert upstream.requests == []


async def test_what_follows_an_upgrade_request_passes_through_at_once(
    link: LinkEmulator, upstream: Upstream
) -> None:
    """WebSocket frames after the upgrade's head are not HTTP requests. Before: they were gathered as a
    request head until 64 KiB (or a CRLFCRLF) came, so a small frame never reached the gateway."""
    reader, writer = await connect(link)
    head = b"GET /v1/ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    frame = b"\x82\x88abcd" + b"12345678"  # a masked binary frame of 8 bytes
    writer.write(head)
    await writer.drain()
    await asyncio.wait_for(read_response(reader), 10)
    writer.write(frame)
    await writer.drain()
    await until(lambda: bytes(upstream.connections[0]).endswith(frame), within=5.0)
    writer.close()
    assert link.stats().bytes_from_client == len(head) + len(frame)


async def test_websocket_messages_after_an_upgrade_are_counted(
    link: LinkEmulator, upstream: Upstream
) -> None:
    """bench/wire.py's per-exchange figures divide by HTTP requests + WebSocket messages: before, the ws
    rung's batches were not counted at all (a quiet site's run read 4 "requests" for 20 batches). Frames
    split across writes, a 16-bit length, a message in two fragments and a ping (not a message) are told
    apart."""
    reader, writer = await connect(link)
    head = b"GET /v1/ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    writer.write(head)
    await writer.drain()
    await asyncio.wait_for(read_response(reader), 10)
    big = b"\x82\xfe" + (300).to_bytes(2, "big") + b"abcd" + bytes(300)  # one message, 16-bit length
    fragments = b"\x02\x82abcdxy" + b"\x80\x82abcdzz"  # binary without FIN, then its continuation with FIN
    ping = b"\x89\x80abcd"
    small = b"\x82\x88abcd12345678"
    data = big + fragments + ping + small
    for i in range(0, len(data), 7):  # frame heads cut between writes
        writer.write(data[i:i + 7])
        await writer.drain()
    await until(lambda: bytes(upstream.connections[0]).endswith(small), within=5.0)
    writer.close()
    stats = link.stats()
    assert (stats.requests, stats.messages) == (1, 3)
