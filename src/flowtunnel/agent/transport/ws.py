"""The WebSocket rung: one long connection, one binary message per sealed batch, one text answer per batch
(docs/protocol.md 7.4), with wsproto (sans-I/O) over the agent's HTTP client's connection.

The connection is opened like the HTTP rungs' (direct, CONNECT + TLS for ``wss``, or through a proxy with an
absolute-URI upgrade request for ``ws``), probed for a captive portal on plain HTTP first, then upgraded. A
proxy that strips ``Upgrade`` makes the gateway answer ``400 ws-handshake``: that is the path's refusal, not
the gateway's, so the ladder steps down. No per-batch HTTP headers: backlog and drops travel sealed.

Bytes: the agent offers the subprotocol ``flowtunnel.v2`` before ``flowtunnel.v1``; a gateway that knows it
acknowledges each batch with one binary message of 24 bytes (``wire.compact_ack``) instead of a JSON text of
~105 (refusals stay JSON). The rest of a batch's cost is its 8-byte frame head (a client must mask) and the
sealed batch itself, which is the same on every rung.

wsproto is imported when a connection is upgraded, not with this module: it builds a 64 KiB masking table at
import (~18 ms, ~1.4 MB), which an agent whose batches go by POST never needs (``_Socket``). And it is
imported without OpenSSL (``_load_wsproto``): its handshake checks the gateway's ``Sec-WebSocket-Accept`` with
one SHA-1 through ``hashlib``, whose import maps libcrypto, ~3 MB of the agent's RSS (issue 14: the agent
path loads no OpenSSL, ``wire/digest.py``), since the ladder moves batches to this rung once POST carried one.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import sys
import types
from collections.abc import Sequence
from typing import TYPE_CHECKING

from flowtunnel.agent.transport.answers import Acked, Answer, Hints, Rejected, Retry, TooLarge, from_http
from flowtunnel.agent.transport.http11 import MAX_RESPONSE, ConnectionLost, PhaseTimeout
from flowtunnel.agent.transport.post import PostTransport
from flowtunnel.wire import COMPACT_ACK_BYTES, parse_compact_ack

if TYPE_CHECKING:
    from wsproto import WSConnection
    from wsproto.events import Event

__all__ = ["SUBPROTOCOL", "SUBPROTOCOL_COMPACT", "WsTransport"]

SUBPROTOCOL = "flowtunnel.v1"
#: ``flowtunnel.v1`` with acknowledgements as binary compact answers (docs/protocol.md 7.4); offered first
SUBPROTOCOL_COMPACT = "flowtunnel.v2"
_READ = 64 * 1024


def _load_wsproto() -> None:
    """Import wsproto, with CPython's built-in SHA-1 (``_sha1``, no OpenSSL) standing in for ``hashlib``
    during the import when nothing imported ``hashlib`` yet; the stand-in is gone from ``sys.modules``
    afterwards, so a later ``import hashlib`` gets the real module."""
    if "wsproto.utilities" in sys.modules:
        return
    if "hashlib" in sys.modules:
        import wsproto.utilities
        return
    builtin: types.ModuleType = importlib.import_module("_sha1")  # CPython's own, as hashlib falls back to
    shim = types.ModuleType("hashlib", "flowtunnel: SHA-1 for wsproto's handshake without OpenSSL")
    shim.__dict__["sha1"] = builtin.__dict__["sha1"]  # type: ignore[misc]
    sys.modules["hashlib"] = shim
    try:
        import wsproto.utilities  # noqa: F401
    finally:
        if sys.modules.get("hashlib") is shim:
            del sys.modules["hashlib"]


class _Socket:
    """One upgraded connection: the streams, wsproto's state, and a task that reads it for as long as it is
    open (``start``). That task answers the gateway's pings at once, between batches too (the gateway drops
    a connection whose pong does not come within half its ``ws_heartbeat``: before, nothing read while the
    agent was idle, and the next batch met a dead connection), notes a close (``closed``: the next batch
    opens a new connection, without a failed attempt), and queues the rest (messages, the close, a broken
    connection) in ``inbox`` for the exchange waiting for its answer.

    wsproto is imported here, when a connection is upgraded (the module docstring says why); the imports are
    local so mypy sees its types."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _load_wsproto()
        from wsproto import ConnectionType, WSConnection

        self.reader, self.writer = reader, writer
        self.ws: WSConnection = WSConnection(ConnectionType.CLIENT)
        self.compact = False  # the gateway chose flowtunnel.v2: acknowledgements come as binary messages
        self.inbox: asyncio.Queue[Event | ConnectionLost] = asyncio.Queue()
        self.closed = False  # closed by the gateway, broken, or given up by this side
        self._reading: asyncio.Task[None] | None = None

    def start(self, early: Sequence[Event]) -> None:
        """Read the connection from now on; ``early``: events that came with the upgrade's answer."""
        for event in early:
            self._take(event)
        self._reading = asyncio.get_running_loop().create_task(self._read(), name="ws-reader")

    async def _read(self) -> None:
        from wsproto.utilities import LocalProtocolError, RemoteProtocolError

        try:
            while not self.closed:
                try:
                    data = await self.reader.read(_READ)
                except OSError as exc:  # ssl.SSLError too (a subclass)
                    raise ConnectionLost(f"connection broken ({type(exc).__name__})") from None
                if not data:
                    raise ConnectionLost("connection closed")
                try:
                    self.ws.receive_data(data)
                    for event in self.ws.events():
                        self._take(event)
                except (RemoteProtocolError, LocalProtocolError) as exc:
                    raise ConnectionLost(f"malformed WebSocket traffic ({exc})") from None
        except ConnectionLost as exc:
            self.closed = True
            self.inbox.put_nowait(exc)

    def _take(self, event: Event) -> None:
        from wsproto.connection import ConnectionState
        from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

        if isinstance(event, Ping):
            self.send(self.ws.send(event.response()))  # a few bytes: written without waiting for a drain
        elif isinstance(event, CloseConnection):
            if self.ws.state is ConnectionState.REMOTE_CLOSING:
                self.send(self.ws.send(event.response()))
            self.closed = True
            self.inbox.put_nowait(event)
        elif isinstance(event, TextMessage | BytesMessage):
            self.inbox.put_nowait(event)

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    def close(self) -> None:
        self.closed = True  # never called by the reading task itself: it only marks ``closed``
        if self._reading is not None:
            self._reading.cancel()
        with contextlib.suppress(Exception):  # closing a broken transport may raise anything
            self.writer.close()

    async def wait_closed(self) -> None:
        """``close``, then wait for the reading task to end."""
        self.close()
        if self._reading is not None:
            await asyncio.gather(self._reading, return_exceptions=True)


class WsTransport(PostTransport):
    """Batches as WebSocket messages on one kept connection (see the module docstring).

    Resource handling: the connection is read by its own task while open (``_Socket``), so pings are
    answered while no batch is in flight; ``close`` ends both."""

    name = "ws"

    _sock: _Socket | None = None

    @property
    def batch_route(self) -> str:
        return f"WebSocket messages on {self._prefix}/v1/ws"

    async def close(self) -> None:
        if self._sock is not None:
            await self._sock.wait_closed()
            self._sock = None
        await super().close()

    async def _carry(self, batch: bytes, hints: Hints) -> Answer:
        _load_wsproto()
        from wsproto.events import Message

        what = hints.what
        if self._sock is not None and (self._sock.closed or not self._sock.inbox.empty()):
            # Closed by the gateway while idle (ws_idle_timeout) or broken, or it sent something no batch
            # asked for: a new connection, quietly, as the HTTP client reopens a kept-alive one.
            await self._sock.wait_closed()
            self._sock = None
        if self._sock is None:
            opened = await self._upgrade(hints)
            if not isinstance(opened, _Socket):
                return opened
            self._sock = opened
        sock = self._sock
        try:
            await self._write(sock, sock.ws.send(Message(data=batch)))
            return await self._answer_of(sock, what)
        except BaseException:
            sock.close()
            self._sock = None
            raise

    async def _upgrade(self, hints: Hints) -> _Socket | Answer:
        _load_wsproto()
        from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request

        refused, _ = await self._verified(hints.what)  # the probe, on plain HTTP, on this connection
        if refused is None and not self.client.live:
            # The route was trusted without a probe (the gateway answered on it lately), but the upgrade
            # needs an open connection: the probe opens one (before, a new connection within 60 s of the
            # last probe failed with "no live connection to hand over" until the trust ran out).
            refused = await self._probe(hints.what)
        if refused is not None:
            return refused
        reader, writer, proxy_auth = self.client.detach()
        sock = _Socket(reader, writer)
        try:
            host = self.client.host_header
            target = f"{self._prefix}/v1/ws"
            if self.client.forward:
                target = f"http://{host}{target}"
            extra = [(b"X-Flowtunnel-Agent", hints.agent_id.encode())]
            if proxy_auth is not None:
                extra.append((b"Proxy-Authorization", proxy_auth.encode("latin-1")))
            offered = [SUBPROTOCOL_COMPACT, SUBPROTOCOL]
            await self._write(sock, sock.ws.send(Request(host=host, target=target, subprotocols=offered,
                                                         extra_headers=extra)))
            status, body = 0, b""
            while True:
                events = await self._events(sock, "waiting for the WebSocket upgrade")
                for i, event in enumerate(events):
                    if isinstance(event, AcceptConnection):
                        sock.compact = event.subprotocol == SUBPROTOCOL_COMPACT
                        sock.start(events[i + 1:])
                        return sock
                    if isinstance(event, RejectConnection):
                        status = event.status_code
                        if not event.has_body:
                            sock.close()
                            return self._rejected(status, b"", hints.what)
                    elif isinstance(event, RejectData):
                        body += event.data[:MAX_RESPONSE]
                        if event.body_finished:
                            sock.close()
                            return self._rejected(status, body, hints.what)
        except BaseException:
            sock.close()
            raise

    def _rejected(self, status: int, body: bytes, what: str) -> Answer:
        answer = from_http(status, body, what=f"{what} (WebSocket upgrade)", now=self._clock(),
                           path=self._path_name())
        if status == 400 and b"ws-handshake" in body:
            # The gateway saw no upgrade: something on the path stripped it.
            return Rejected(cause="ws-upgrade-stripped", detail=f"{what}: the gateway saw no WebSocket "
                            "upgrade (a proxy stripped Upgrade)",
                            by=f"{self._path_name()} (Upgrade stripped)")
        return answer

    async def _answer_of(self, sock: _Socket, what: str) -> Answer:
        from wsproto.events import BytesMessage, CloseConnection, TextMessage

        text: list[str] = []
        data = bytearray()
        phase = f"waiting for the answer to {what}"
        while True:
            try:
                async with asyncio.timeout(self.client.timeouts.read):
                    event = await sock.inbox.get()
            except TimeoutError:
                raise PhaseTimeout(f"{phase}: nothing for {self.client.timeouts.read:g} s (read timeout)") \
                    from None
            if isinstance(event, ConnectionLost):
                raise ConnectionLost(f"{phase}: {event}") from None
            if isinstance(event, TextMessage):
                text.append(event.data)
                if event.message_finished:
                    return self._decode("".join(text), what)
            elif isinstance(event, BytesMessage):
                data += event.data
                if sock.compact and len(data) <= COMPACT_ACK_BYTES and not event.message_finished:
                    continue
                if sock.compact and len(data) == COMPACT_ACK_BYTES:
                    # verified by the delivery protocol like any acknowledgement: nothing trusted yet
                    acked, tag = parse_compact_ack(bytes(data))
                    return Acked(acked=acked, tag=tag)
                self._sock = None  # what follows on this connection cannot be matched to a batch
                sock.close()
                return Retry(cause="bad-response", detail=(
                    f"{what}: a binary WebSocket answer of {len(data)} bytes, not the gateway's"))
            elif isinstance(event, CloseConnection):
                self._sock = None
                sock.close()
                if event.code == 1009:
                    return TooLarge(detail=f"{what}: the gateway closed the WebSocket: message too big "
                                    f"({event.reason})", by="gateway")
                return Retry(cause=f"ws-close-{event.code}", detail=(
                    f"{what}: the gateway closed the WebSocket ({event.code} {event.reason})"))

    def _decode(self, text: str, what: str) -> Answer:
        try:
            doc: object = json.loads(text)
            if not isinstance(doc, dict):
                raise TypeError("not an object")
            fields: dict[str, object] = doc
            status = int(str(fields.pop("status")))
            after = fields.pop("retry_after", None)
            retry_after = None if after is None else str(int(str(after)))
        except (ValueError, KeyError, TypeError):
            return Retry(cause="bad-response", detail=f"{what}: a WebSocket answer that is not the gateway's")
        return from_http(status, json.dumps(fields).encode(), what=what, retry_after=retry_after,
                         now=self._clock(), path=self._path_name())

    async def _write(self, sock: _Socket, data: bytes) -> None:
        try:
            sock.writer.write(data)
            async with asyncio.timeout(self.client.timeouts.read):
                await sock.writer.drain()
        except TimeoutError:
            raise PhaseTimeout(f"sending on the WebSocket took longer than {self.client.timeouts.read:g} s") \
                from None
        except (OSError, RuntimeError) as exc:
            raise ConnectionLost(
                f"WebSocket connection broken while sending ({type(exc).__name__})") from None

    async def _events(self, sock: _Socket, phase: str) -> list[Event]:
        """Before the upgrade's answer (nothing reads the connection yet): read once and return what wsproto
        made of it (at least one event, or raise)."""
        from wsproto.utilities import LocalProtocolError, RemoteProtocolError

        while True:
            try:
                async with asyncio.timeout(self.client.timeouts.read):
                    data = await sock.reader.read(_READ)
            except TimeoutError:
                raise PhaseTimeout(f"{phase}: nothing for {self.client.timeouts.read:g} s (read timeout)") \
                    from None
            except OSError as exc:  # ssl.SSLError too (a subclass)
                raise ConnectionLost(f"{phase}: connection broken ({type(exc).__name__})") from None
            if not data:
                raise ConnectionLost(f"{phase}: connection closed")
            try:
                sock.ws.receive_data(data)
                events = list(sock.ws.events())
            except (RemoteProtocolError, LocalProtocolError) as exc:
                raise ConnectionLost(f"{phase}: malformed WebSocket traffic ({exc})") from None
            if events:
                return events
