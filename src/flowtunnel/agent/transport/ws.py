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
import (~18 ms, ~1.4 MB), which an agent whose batches go by POST never needs (``_wsproto``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from types import ModuleType
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


def _wsproto() -> tuple[ModuleType, ModuleType, ModuleType]:
    """wsproto, its events and its errors, imported on the first WebSocket connection (module docstring)."""
    import wsproto
    import wsproto.events
    import wsproto.utilities

    return wsproto, wsproto.events, wsproto.utilities


class _Socket:
    """One upgraded connection: the streams and wsproto's state."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        ws, self.events, self.errors = _wsproto()
        self.ws: WSConnection = ws.WSConnection(ws.ConnectionType.CLIENT)
        self.compact = False  # the gateway chose flowtunnel.v2: acknowledgements come as binary messages

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a broken transport may raise anything
            self.writer.close()


class WsTransport(PostTransport):
    """Batches as WebSocket messages on one kept connection (see the module docstring)."""

    name = "ws"

    _sock: _Socket | None = None

    async def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        await super().close()

    async def _carry(self, batch: bytes, hints: Hints) -> Answer:
        what = hints.what
        if self._sock is None:
            opened = await self._upgrade(hints)
            if not isinstance(opened, _Socket):
                return opened
            self._sock = opened
        sock = self._sock
        try:
            await self._write(sock, sock.ws.send(sock.events.Message(data=batch)))
            return await self._answer_of(sock, what)
        except BaseException:
            sock.close()
            self._sock = None
            raise

    async def _upgrade(self, hints: Hints) -> _Socket | Answer:
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
            ev = sock.events
            await self._write(sock, sock.ws.send(ev.Request(host=host, target=target, subprotocols=offered,
                                                            extra_headers=extra)))
            status, body = 0, b""
            while True:
                for event in await self._events(sock, "waiting for the WebSocket upgrade"):
                    if isinstance(event, ev.AcceptConnection):
                        sock.compact = event.subprotocol == SUBPROTOCOL_COMPACT
                        return sock
                    if isinstance(event, ev.RejectConnection):
                        status = event.status_code
                        if not event.has_body:
                            return self._rejected(status, b"", hints.what)
                    elif isinstance(event, ev.RejectData):
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
        text: list[str] = []
        data = bytearray()
        ev = sock.events
        while True:
            for event in await self._events(sock, f"waiting for the answer to {what}"):
                if isinstance(event, ev.TextMessage):
                    text.append(event.data)
                    if event.message_finished:
                        return self._decode("".join(text), what)
                elif isinstance(event, ev.BytesMessage):
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
                elif isinstance(event, ev.Ping):
                    await self._write(sock, sock.ws.send(event.response()))
                elif isinstance(event, ev.CloseConnection):
                    self._sock = None
                    sock.close()
                    if event.code == 1009:
                        return TooLarge(detail=f"{what}: the gateway closed the WebSocket: message too big "
                                        f"({event.reason})", by="gateway")
                    return Retry(cause=f"ws-close-{event.code}", detail=(
                        f"{what}: the gateway closed the WebSocket ({event.code} {event.reason})"))

    def _decode(self, text: str, what: str) -> Answer:
        try:
            doc = json.loads(text)
            status = int(doc.pop("status"))
        except (ValueError, KeyError, TypeError, AttributeError):
            return Retry(cause="bad-response", detail=f"{what}: a WebSocket answer that is not the gateway's")
        after = doc.pop("retry_after", None)
        return from_http(status, json.dumps(doc).encode(), what=what,
                         retry_after=None if after is None else str(int(after)), now=self._clock(),
                         path=self._path_name())

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
        """Read once and return what wsproto made of it (at least one event, or raise)."""
        while True:
            try:
                async with asyncio.timeout(self.client.timeouts.read):
                    data = await sock.reader.read(_READ)
            except TimeoutError:
                raise PhaseTimeout(f"{phase}: nothing for {self.client.timeouts.read:g} s (read timeout)") \
                    from None
            except (OSError, ssl.SSLError) as exc:
                raise ConnectionLost(f"{phase}: connection broken ({type(exc).__name__})") from None
            if not data:
                raise ConnectionLost(f"{phase}: connection closed")
            try:
                sock.ws.receive_data(data)
                events = list(sock.ws.events())
            except (sock.errors.RemoteProtocolError, sock.errors.LocalProtocolError) as exc:
                raise ConnectionLost(f"{phase}: malformed WebSocket traffic ({exc})") from None
            if events:
                return events
