"""A bad network in a box: an asyncio TCP proxy that delays, throttles, cuts, black-holes and answers itself.

This machine's kernel has no netem, so the reliability tests put this proxy between agent and gateway (or
agent and tinyproxy). It shapes each direction (latency, seeded jitter, a token-bucket bandwidth cap shared by
all connections, as on one GPRS link), switches the whole link between modes at run time (forward, black hole,
refuse, reset, and timed outages of either kind), and applies per-request faults to HTTP/1.1 traffic: RST
after N bytes of a request or of its response, a swallowed response, or a proxy-style answer (407, 502, 503
with ``Retry-After``) instead of forwarding. It counts bytes both ways, so benchmarks can use it as a relay.

Every random choice (fault probability, jitter) comes from generators seeded by ``seed``, so a failing run can
be replayed. Control methods are plain synchronous calls on the event loop's thread; ``ThreadedLink`` runs an
emulator on its own loop in a thread for synchronous callers.

Error handling: a connection the emulator cannot open upstream is reset towards the client and counted
(``upstream_failures``); a peer's reset ends both sides of that connection. Nothing is raised into the caller.

Resource handling: each direction buffers at most ``_QUEUE_CHUNKS`` chunks of ``_CHUNK`` bytes, so TCP
back-pressure reaches the sender as it would on a slow link; ``close()`` resets every open connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "Action",
    "Fault",
    "LinkEmulator",
    "LinkStats",
    "Mode",
    "Shape",
    "ThreadedLink",
]

T = TypeVar("T")

_CHUNK = 4096
_QUEUE_CHUNKS = 16
_SLICE = 512  # bytes written per token-bucket grant: keeps a 40 kbit/s link smooth (~100 ms per slice)
_MAX_HEAD = 64 * 1024
_RST_GRACE = 1.0  # seconds between a cut-off message and the RST that follows it
_LINGER_RST = struct.pack("ii", 1, 0)
_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class Mode(enum.Enum):
    """What the link does with connections, switchable at run time."""

    FORWARD = "forward"  # a working link (subject to shapes and faults)
    BLACKHOLE = "blackhole"  # accepts, reads, never answers; open connections go silent in both directions
    REFUSE = "refuse"  # listener closed (connection refused); open connections are reset
    RESET = "reset"  # accepts then resets at once; open connections are reset


class Action(enum.Enum):
    """A per-request fault on HTTP/1.1 traffic."""

    # RST once `after` bytes of the request (head included) reached the server; a shorter request is
    # forwarded whole and the connection is reset before any response comes back.
    ABORT_REQUEST = "abort-request"
    # request forwarded; RST once `after` bytes of the response reached the client
    ABORT_RESPONSE = "abort-response"
    DROP_RESPONSE = "drop-response"  # request forwarded; the response is swallowed and the connection hangs
    ANSWER = "answer"  # request not forwarded; the emulator answers `status` itself, as a proxy would


@dataclass(frozen=True, slots=True, kw_only=True)
class Shape:
    """One direction of the link: fixed latency plus seeded jitter (order kept), and a bandwidth cap."""

    latency: float = 0.0
    jitter: float = 0.0
    rate_bps: float | None = None  # bits per second, shared by every connection; None = unlimited
    burst: int = 1500  # bytes the bucket may hold (one packet by default)

    def __post_init__(self) -> None:
        if self.latency < 0 or self.jitter < 0:
            raise ValueError(f"latency {self.latency} and jitter {self.jitter} must be >= 0")
        if self.rate_bps is not None and self.rate_bps <= 0:
            raise ValueError(f"rate_bps {self.rate_bps} must be > 0 (None for unlimited)")
        if self.burst < 1:
            raise ValueError(f"burst {self.burst} must be >= 1 byte")


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """A per-request fault: applies to requests whose request line contains ``match``.

    ``count`` requests are hit (``None``: every matching request until ``clear_faults``); each candidate is
    hit with ``probability``, drawn from the emulator's seeded generator.
    """

    action: Action
    after: int = 0
    status: int = 503
    retry_after: float | None = None
    match: str = ""
    count: int | None = 1
    probability: float = 1.0
    body: bytes | None = None  # ANSWER: the body to send (default: a short text naming the status)
    content_type: str = "text/plain"

    def __post_init__(self) -> None:
        if self.after < 0:
            raise ValueError(f"after {self.after} must be >= 0 bytes")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability {self.probability} must be within 0..1")
        if self.count is not None and self.count < 1:
            raise ValueError(f"count {self.count} must be >= 1 (None for unlimited)")
        if not 100 <= self.status <= 599:
            raise ValueError(f"status {self.status} is not an HTTP status")


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkStats:
    """Counters since the emulator started (a snapshot)."""

    connections: int
    refused: int  # connections reset at accept because the mode was RESET
    blackholed: int  # connections that went silent
    reset: int  # connections the emulator reset (faults, mode changes, close)
    upstream_failures: int
    requests: int  # HTTP requests seen from clients
    messages: int  # WebSocket messages seen from clients after an Upgrade (data frames with FIN set)
    faults: dict[str, int]  # Action value -> requests hit
    bytes_from_client: int
    bytes_to_server: int
    bytes_from_server: int
    bytes_to_client: int


@dataclass(slots=True)
class _Counters:
    connections: int = 0
    refused: int = 0
    blackholed: int = 0
    reset: int = 0
    upstream_failures: int = 0
    requests: int = 0
    messages: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    bytes_from_client: int = 0
    bytes_to_server: int = 0
    bytes_from_server: int = 0
    bytes_to_client: int = 0


class _Bucket:
    """A token bucket in virtual time: concurrent callers get consecutive slots without a lock."""

    def __init__(self) -> None:
        self._t = 0.0

    def delay(self, nbytes: int, shape: Shape, now: float) -> float:
        if shape.rate_bps is None:
            return 0.0
        rate = shape.rate_bps / 8.0
        self._t = max(self._t, now - shape.burst / rate) + nbytes / rate
        return max(0.0, self._t - now)


class _Abort:
    """Queue marker: reset the connection once everything queued before it was delivered."""


class _Close:
    """Queue marker: close the connection gracefully once everything queued before it was delivered."""


_ABORT = _Abort()
_CLOSE = _Close()
_EOF = b""
_Item = tuple[float, bytes] | _Abort | _Close


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a middlebox that gives up on a connection does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()


@dataclass(slots=True)
class _Exchange:
    """What was decided for the HTTP request currently flowing on a connection."""

    fault: Fault | None = None
    sent: int = 0  # bytes of this request forwarded so far (head included)


class _Conn:
    """One client connection and, once opened, its upstream connection."""

    def __init__(self, emu: LinkEmulator, client: asyncio.StreamWriter) -> None:
        self.emu = emu
        self.client = client
        self.server: asyncio.StreamWriter | None = None
        self.silent = False  # black-holed: read and discard everything
        self.dead = False
        self.raw = not emu.http
        self.head = bytearray()
        self.body_left = 0
        self.in_body = False
        self.exchange = _Exchange()
        self.recording = bytearray()  # the current request's bytes, when the emulator records
        self.response_fault: Fault | None = None  # armed once the faulty request is fully forwarded
        self.response_sent = 0
        self.aborting = False  # an ABORT marker is queued: drop whatever the client sends after it
        self.ws = False  # after an Upgrade: the client's bytes are WebSocket frames, counted as they pass
        self.ws_head = bytearray()  # the frame head read so far
        self.ws_left = 0  # payload bytes of the current frame still to pass
        self.tasks: list[asyncio.Task[None]] = []
        self.up: asyncio.Queue[_Item] = asyncio.Queue(_QUEUE_CHUNKS)
        self.down: asyncio.Queue[_Item] = asyncio.Queue(_QUEUE_CHUNKS)

    def reset(self, *, partial: asyncio.StreamWriter | None = None) -> None:
        """RST both sides; ``partial`` (the side just sent a cut-off message) is reset after a grace delay.

        A peer that receives a RST before reading discards what was queued for it, so the side that should
        see "N bytes, then a reset" gets a moment to read its N bytes first.
        """
        if self.dead:
            return
        self.emu._counters.reset += 1
        for writer in (self.client, self.server):
            if writer is None:
                continue
            if writer is partial:
                self.emu._later_rst(writer)
            else:
                _rst(writer)
        self.stop()

    def stop(self) -> None:
        """Mark dead and cancel the pumps (a pump blocked on a full queue would otherwise wait forever)."""
        self.dead = True
        me = asyncio.current_task()
        for task in self.tasks:
            if task is not me:
                task.cancel()

    # -- client -> server ------------------------------------------------------------------------------------

    async def feed_up(self, data: bytes, now: float) -> None:
        """Route client bytes: raw passthrough, or HTTP request by request so faults can pick requests."""
        while data and not self.dead and not self.aborting:
            if self.raw:
                if self.ws:
                    self._count_frames(data)
                await self._forward_up(data, now)
                return
            if not self.in_body:
                self.head += data
                end = self.head.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.head) > _MAX_HEAD:
                        self._go_raw()
                        data, self.head = bytes(self.head), bytearray()
                        continue
                    return
                head, data = bytes(self.head[: end + 4]), bytes(self.head[end + 4 :])
                self.head = bytearray()
                self._start_request(head)
                if self.emu.record:
                    self.recording = bytearray(head)
                await self._request_bytes(head, now)
                if self.raw:
                    continue
                self.in_body = True
                if self.body_left == 0:
                    await self._end_request()
                continue
            take = data[: self.body_left]
            data = data[len(take) :]
            self.body_left -= len(take)
            if self.emu.record:
                self.recording += take
            await self._request_bytes(take, now)
            if self.body_left == 0:
                await self._end_request()

    def _go_raw(self) -> None:
        self.raw = True
        self.in_body = False

    def _count_frames(self, data: bytes) -> None:
        """Count the client's WebSocket messages (RFC 6455 5.2: a data frame with FIN set ends one) in bytes
        that pass raw; control frames (close, ping, pong) are not messages."""
        pos = 0
        while pos < len(data):
            if self.ws_left:
                step = min(self.ws_left, len(data) - pos)
                self.ws_left -= step
                pos += step
                continue
            self.ws_head.append(data[pos])
            pos += 1
            h = self.ws_head
            if len(h) < 2:
                continue
            n = h[1] & 0x7F
            need = 2 + {126: 2, 127: 8}.get(n, 0) + (4 if h[1] & 0x80 else 0)
            if len(h) < need:
                continue
            self.ws_left = n if n < 126 else int.from_bytes(h[2:4] if n == 126 else h[2:10], "big")
            if h[0] & 0x80 and h[0] & 0x0F < 0x8:
                self.emu._counters.messages += 1
            self.ws_head = bytearray()

    def _start_request(self, head: bytes) -> None:
        emu = self.emu
        emu._counters.requests += 1
        lines = head.split(b"\r\n")
        request_line = lines[0].decode("latin-1")
        self.body_left = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            lname = name.strip().lower()
            if lname == b"content-length":
                try:
                    self.body_left = max(0, int(value.strip()))
                except ValueError:
                    self._go_raw()
            elif lname == b"transfer-encoding" and b"chunked" in value.lower():
                self._go_raw()  # request boundaries unknown from here on: pass the rest through
            elif lname == b"upgrade":
                # A WebSocket upgrade: frames follow the head, not requests. Read as heads they were held
                # back until 64 KiB gathered (or a stray CRLFCRLF), so a batch's frame waited for later ones.
                self._go_raw()
                self.ws = True
        if request_line.upper().startswith("CONNECT "):
            self._go_raw()
        self.exchange = _Exchange(fault=emu._pick_fault(request_line))

    async def _request_bytes(self, data: bytes, now: float) -> None:
        fault = self.exchange.fault
        if fault is not None and fault.action is Action.ANSWER:
            return  # swallowed: the "proxy" answers instead of forwarding
        if fault is not None and fault.action is Action.ABORT_REQUEST:
            room = fault.after - self.exchange.sent
            if len(data) >= room:
                if room > 0:
                    await self._forward_up(data[:room], now)
                self.exchange.sent += max(room, 0)
                await self.up.put(_ABORT)
                self.aborting = True
                return
        self.exchange.sent += len(data)
        await self._forward_up(data, now)

    async def _end_request(self) -> None:
        self.in_body = False
        if self.emu.record:
            self.emu.recorded.append(bytes(self.recording))
            self.recording = bytearray()
        fault = self.exchange.fault
        if fault is None or self.aborting:
            return
        if fault.action is Action.ABORT_REQUEST:
            # Shorter than `after`: forwarded whole, then cut before any response can come back.
            await self.up.put(_ABORT)
            self.aborting = True
        elif fault.action is Action.ANSWER:
            await self.down.put((time.monotonic(), _answer(fault)))
            await self.down.put(_CLOSE)
        elif fault.action in (Action.ABORT_RESPONSE, Action.DROP_RESPONSE):
            self.response_fault = fault
            self.response_sent = 0

    async def _forward_up(self, data: bytes, now: float) -> None:
        await self.up.put((now, data))

    # -- server -> client ------------------------------------------------------------------------------------

    async def feed_down(self, data: bytes, now: float) -> None:
        fault = self.response_fault
        if fault is not None and fault.action is Action.DROP_RESPONSE:
            return
        if fault is not None and fault.action is Action.ABORT_RESPONSE:
            room = fault.after - self.response_sent
            if len(data) >= room:
                if room > 0:
                    await self.down.put((now, data[:room]))
                self.response_sent += max(room, 0)
                self.response_fault = None
                await self.down.put(_ABORT)
                return
            self.response_sent += len(data)
        await self.down.put((now, data))


def _answer(fault: Fault) -> bytes:
    reason = _REASONS.get(fault.status, "OK" if fault.status == 200 else "Error")
    body = fault.body
    if body is None:
        body = f"{fault.status} {reason} (injected by linkemu)\n".encode()
    headers = [
        f"HTTP/1.1 {fault.status} {reason}",
        f"Content-Type: {fault.content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if fault.retry_after is not None:
        headers.append(f"Retry-After: {fault.retry_after:g}")
    if fault.status == 407:
        headers.append('Proxy-Authenticate: Basic realm="linkemu"')
    return ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + body


class LinkEmulator:
    """A TCP proxy from ``listen`` to ``upstream`` that behaves like the link you configure.

    Use as ``async with LinkEmulator(upstream=(host, port), seed=7) as link:`` and point the client at
    ``link.port``. Change ``link.up`` / ``link.down`` (``Shape``), call ``set_mode``, ``outage``,
    ``add_fault`` at any time; ``stats()`` returns the counters.
    """

    def __init__(
        self,
        *,
        upstream: tuple[str, int],
        listen: tuple[str, int] = ("127.0.0.1", 0),
        seed: int = 0,
        http: bool = True,
        up: Shape | None = None,
        down: Shape | None = None,
        record: bool = False,
    ) -> None:
        self.upstream = upstream
        self.http = http
        #: with ``record``, every complete HTTP request a client sent (head and body), in order
        self.record = record
        self.recorded: list[bytes] = []
        self.seed = seed
        self.up = up or Shape()
        self.down = down or Shape()
        self._listen = listen
        self._rng = random.Random(f"faults-{seed}")  # separate streams: jitter draws must not shift faults
        self._jitter_rng = random.Random(f"jitter-{seed}")
        self._mode = Mode.FORWARD
        self._faults: list[list[Any]] = []  # [Fault, remaining count or None]
        self._counters = _Counters()
        self._buckets = {"up": _Bucket(), "down": _Bucket()}
        self._server: asyncio.Server | None = None
        self._port = 0
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._recover: asyncio.TimerHandle | None = None
        self._pending_rst: dict[asyncio.StreamWriter, asyncio.TimerHandle] = {}
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._listen_now()

    async def __aenter__(self) -> LinkEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._recover is not None:
            self._recover.cancel()
        await self._stop_listening()
        for conn in list(self._conns):
            conn.reset()
        for writer, handle in list(self._pending_rst.items()):
            handle.cancel()
            _rst(writer)
        self._pending_rst.clear()
        # Reset connections end their handlers by themselves; cancelling a handler task instead would make
        # asyncio's stream callback log the CancelledError as an unhandled exception.
        handlers = list(self._handlers)
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=5.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    @property
    def port(self) -> int:
        return self._port

    @property
    def host(self) -> str:
        return self._listen[0]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    @property
    def mode(self) -> Mode:
        return self._mode

    # -- control (synchronous, on the loop's thread) ---------------------------------------------------------

    def set_mode(self, mode: Mode) -> None:
        """Switch the link; takes effect at once for new and open connections. Cancels a pending recovery."""
        if self._recover is not None:
            self._recover.cancel()
            self._recover = None
        self._apply_mode(mode)

    def outage(self, seconds: float, mode: Mode = Mode.REFUSE) -> None:
        """Break the link now (``mode``) and restore FORWARD after ``seconds``; returns at once."""
        if mode is Mode.FORWARD:
            raise ValueError("an outage needs a failing mode (blackhole, refuse or reset)")
        self.set_mode(mode)
        self._recover = asyncio.get_running_loop().call_later(seconds, self._end_outage)

    def add_fault(self, fault: Fault) -> None:
        self._faults.append([fault, fault.count])

    def clear_faults(self) -> None:
        self._faults.clear()

    def pending_faults(self) -> int:
        """How many counted fault hits are still to come (unlimited faults count as one)."""
        return sum(1 if left is None else left for _, left in self._faults)

    def reset_connections(self) -> int:
        """Reset every open connection (a NAT or proxy dropping its state); returns how many."""
        conns = list(self._conns)
        for conn in conns:
            conn.reset()
        return len(conns)

    def stats(self) -> LinkStats:
        c = self._counters
        return LinkStats(
            connections=c.connections,
            refused=c.refused,
            blackholed=c.blackholed,
            reset=c.reset,
            upstream_failures=c.upstream_failures,
            requests=c.requests,
            messages=c.messages,
            faults=dict(c.faults),
            bytes_from_client=c.bytes_from_client,
            bytes_to_server=c.bytes_to_server,
            bytes_from_server=c.bytes_from_server,
            bytes_to_client=c.bytes_to_client,
        )

    # -- internals -------------------------------------------------------------------------------------------

    def _later_rst(self, writer: asyncio.StreamWriter) -> None:
        def fire() -> None:
            self._pending_rst.pop(writer, None)
            _rst(writer)

        self._pending_rst[writer] = asyncio.get_running_loop().call_later(_RST_GRACE, fire)

    def _end_outage(self) -> None:
        self._recover = None
        if not self._closed:
            self._apply_mode(Mode.FORWARD)

    def _apply_mode(self, mode: Mode) -> None:
        previous, self._mode = self._mode, mode
        if mode in (Mode.REFUSE, Mode.RESET):
            self.reset_connections()
        elif mode is Mode.BLACKHOLE:
            for conn in self._conns:
                if not conn.silent:
                    conn.silent = True
                    self._counters.blackholed += 1
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        if mode is Mode.REFUSE and previous is not Mode.REFUSE:
            loop.call_soon(self._spawn_listener_change, False)
        elif mode is not Mode.REFUSE and previous is Mode.REFUSE:
            loop.call_soon(self._spawn_listener_change, True)

    def _spawn_listener_change(self, listen: bool) -> None:
        coro = self._listen_now() if listen else self._stop_listening()
        task = asyncio.get_running_loop().create_task(coro, name="linkemu-listener")
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _listen_now(self) -> None:
        if self._server is not None or self._closed:
            return
        host, port = self._listen[0], self._port or self._listen[1]
        self._server = await asyncio.start_server(self._accept, host, port, reuse_address=True)
        self._port = self._server.sockets[0].getsockname()[1]

    async def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()

    def _pick_fault(self, request_line: str) -> Fault | None:
        for slot in self._faults:
            fault, left = slot
            if fault.match not in request_line:
                continue
            if fault.probability < 1.0 and self._rng.random() >= fault.probability:
                continue
            if left is not None:
                slot[1] = left - 1
                if slot[1] == 0:
                    self._faults.remove(slot)
            key = fault.action.value if fault.action is not Action.ANSWER else f"answer-{fault.status}"
            self._counters.faults[key] = self._counters.faults.get(key, 0) + 1
            return fault  # type: ignore[no-any-return]
        return None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        c = self._counters
        c.connections += 1
        if self._mode in (Mode.RESET, Mode.REFUSE):
            c.refused += 1
            _rst(writer)
            return
        conn = _Conn(self, writer)
        self._conns.add(conn)
        try:
            if self._mode is Mode.BLACKHOLE:
                conn.silent = True
                c.blackholed += 1
                await self._swallow(reader, conn)
                return
            try:
                server_reader, server_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                c.upstream_failures += 1
                conn.reset()
                return
            conn.server = server_writer
            if conn.dead:  # reset while connecting
                _rst(server_writer)
                return
            try:
                async with asyncio.TaskGroup() as tg:
                    conn.tasks = [
                        tg.create_task(self._read_client(reader, conn), name="linkemu-read-client"),
                        tg.create_task(self._write(conn, conn.up, server_writer, "up"), name="linkemu-up"),
                        tg.create_task(self._read_server(server_reader, conn), name="linkemu-read-server"),
                        tg.create_task(self._write(conn, conn.down, writer, "down"), name="linkemu-down"),
                    ]
            except* (ConnectionError, OSError):
                conn.reset()
        finally:
            self._conns.discard(conn)
            if not conn.dead:
                writer.close()
                if conn.server is not None:
                    conn.server.close()

    async def _swallow(self, reader: asyncio.StreamReader, conn: _Conn) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while not conn.dead:
                data = await reader.read(_CHUNK)
                if not data:
                    return
                self._counters.bytes_from_client += len(data)

    async def _read_client(self, reader: asyncio.StreamReader, conn: _Conn) -> None:
        while not conn.dead:
            data = await reader.read(_CHUNK)
            if not data:
                await conn.up.put((time.monotonic(), _EOF))
                return
            self._counters.bytes_from_client += len(data)
            if conn.silent:
                continue
            await conn.feed_up(data, time.monotonic())

    async def _read_server(self, reader: asyncio.StreamReader, conn: _Conn) -> None:
        while not conn.dead:
            data = await reader.read(_CHUNK)
            if not data:
                await conn.down.put((time.monotonic(), _EOF))
                return
            self._counters.bytes_from_server += len(data)
            if conn.silent:
                continue
            await conn.feed_down(data, time.monotonic())

    async def _write(
        self, conn: _Conn, queue: asyncio.Queue[_Item], writer: asyncio.StreamWriter, direction: str
    ) -> None:
        bucket = self._buckets[direction]
        last_due = 0.0
        while not conn.dead:
            item = await queue.get()
            if isinstance(item, _Abort):
                await writer.drain()
                conn.reset(partial=writer)
                return
            if isinstance(item, _Close):
                await writer.drain()
                _close_both(conn)
                return
            stamp, data = item
            if conn.silent:
                continue  # black-holed: keep draining so the reader keeps reading
            shape = self.up if direction == "up" else self.down
            extra = self._jitter_rng.uniform(0.0, shape.jitter) if shape.jitter else 0.0
            due = max(stamp + shape.latency + extra, last_due)  # jitter never reorders bytes
            last_due = due
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is _EOF or not data:
                if conn.silent or conn.dead:
                    return
                if writer.can_write_eof():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return
            for i in range(0, len(data), _SLICE):
                piece = data[i : i + _SLICE]
                shape = self.up if direction == "up" else self.down
                pause = bucket.delay(len(piece), shape, time.monotonic())
                if pause > 0:
                    await asyncio.sleep(pause)
                if conn.dead:
                    return
                if conn.silent:
                    break
                writer.write(piece)
                if direction == "up":
                    self._counters.bytes_to_server += len(piece)
                else:
                    self._counters.bytes_to_client += len(piece)
                await writer.drain()


def _close_both(conn: _Conn) -> None:
    """Graceful close after an injected answer: FIN to the client, RST to the (unused) upstream."""
    conn.client.close()
    if conn.server is not None:
        _rst(conn.server)
    conn.stop()


class ThreadedLink:
    """A ``LinkEmulator`` on its own event loop in a daemon thread, for synchronous tests and benchmarks.

    ``with ThreadedLink(upstream=(host, port), seed=1) as link:``
    ``    link.call(lambda e: e.set_mode(Mode.BLACKHOLE))``
    """

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="linkemu", daemon=True)
        self.emulator: LinkEmulator | None = None

    def __enter__(self) -> ThreadedLink:
        self._thread.start()
        self.emulator = self._run(self._make())
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _make(self) -> LinkEmulator:
        emu = LinkEmulator(**self._kwargs)
        await emu.start()
        return emu

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(timeout=30)

    def call(self, fn: Callable[[LinkEmulator], T]) -> T:
        """Run ``fn(emulator)`` on the emulator's loop and return its result."""
        emu = self.emulator
        assert emu is not None, "ThreadedLink not entered"

        async def run() -> T:
            return fn(emu)

        return self._run(run())

    @property
    def port(self) -> int:
        assert self.emulator is not None
        return self.emulator.port

    @property
    def url(self) -> str:
        assert self.emulator is not None
        return self.emulator.url

    def stats(self) -> LinkStats:
        return self.call(lambda e: e.stats())

    def close(self) -> None:
        if self.emulator is not None:
            self._run(self.emulator.close())
            self.emulator = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if not self._loop.is_closed() and not self._thread.is_alive():
            self._loop.close()

