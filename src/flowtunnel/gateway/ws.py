"""``GET /v1/ws``: sealed batches as WebSocket messages on one long connection (docs/protocol.md section 7.4).

For networks whose proxy passes ``Upgrade`` (or ``wss://`` through CONNECT): no HTTP headers per batch. One
binary message is one sealed batch, exactly a POST body; the gateway answers each with one text message, in
order: the POST answer's JSON plus ``"status"`` (``edge.ws_answer``), or, on a connection that chose the
subprotocol ``flowtunnel.v2``, an acknowledgement as one binary message of 24 bytes (``wire.compact_ack``:
~26 bytes on the wire instead of ~105, the largest per-batch cost of this rung beside the batch itself).
Every batch goes through the same ``Admission`` slot and ``Ingest.deliver`` as a POST.

Resource handling (a sender that only knows an agent id must not hold more than a POST sender could):
- the upgrade is refused (plain JSON HTTP errors) unless it names an enrolled, non-revoked agent and offers
  the ``flowtunnel.v1`` subprotocol; at most ``max_connections`` connections, ``max_per_agent`` per agent id
  (when full, the oldest connection of that agent that has not delivered an authenticated batch is closed to
  make room, else 503 ``busy``);
- a connection must deliver an authenticated batch within ``auth_timeout`` (1008) and then one at least every
  ``idle_timeout`` (1000); the gateway pings every ``heartbeat`` and drops a connection that does not pong;
- messages are at most ``max_body`` (1009) and processed one at a time in order: the gateway reads ahead at
  most about one message and leaves the rest in TCP (back-pressure), so a connection holds at most about two
  batches in memory whatever the client pipelines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass

from aiohttp import WSCloseCode, WSMsgType, web

from flowtunnel.gateway.admission import Admission
from flowtunnel.gateway.edge import http_response, ws_answer
from flowtunnel.gateway.ingest import Ack, Ingest, Outcome, Rejected
from flowtunnel.gateway.metrics import GatewayMetrics
from flowtunnel.wire import BadAgentId, compact_ack, validate_agent_id

__all__ = ["WS_PROTOCOL", "WS_PROTOCOL_COMPACT", "WsHub", "WsSettings"]

log = logging.getLogger("flowtunnel.gateway.ws")

WS_PROTOCOL = "flowtunnel.v1"
#: ``flowtunnel.v1`` with acknowledgements as binary ``wire.compact_ack`` messages (docs/protocol.md 7.4);
#: preferred when the agent offers it (the client's order decides, and the agent offers it first)
WS_PROTOCOL_COMPACT = "flowtunnel.v2"
_PROTOCOLS = (WS_PROTOCOL_COMPACT, WS_PROTOCOL)


@dataclass(frozen=True, slots=True, kw_only=True)
class WsSettings:
    """Bounds of the WebSocket endpoint (``GatewayConfig`` keys ``max_ws``, ``max_ws_per_agent``,
    ``ws_heartbeat``, ``ws_idle_timeout``; ``body_timeout`` and ``max_body`` as for POST)."""

    max_body: int
    max_connections: int = 256
    max_per_agent: int = 4
    heartbeat: float = 30.0
    idle_timeout: float = 300.0
    auth_timeout: float = 60.0
    retry_after: int = 5
    #: How long a close handshake may take before the connection is simply dropped.
    close_timeout: float = 2.0


def _frame_overhead(n: int, *, masked: bool) -> int:
    """Bytes of a WebSocket frame header for a payload of ``n`` bytes (RFC 6455 section 5.2)."""
    return 2 + (4 if masked else 0) + (2 if 126 <= n < 65536 else 8 if n >= 65536 else 0)


class _Conn:
    __slots__ = ("agent", "authenticated", "compact", "ws")

    def __init__(self, ws: web.WebSocketResponse, agent: str, *, compact: bool) -> None:
        self.ws = ws
        self.agent = agent
        self.authenticated = False
        self.compact = compact  # acknowledgements as binary compact answers (flowtunnel.v2)


class WsHub:
    """The WebSocket endpoint of one gateway: its handler and its open connections (closed at shutdown)."""

    def __init__(
        self, *, ingest: Ingest, admission: Admission, metrics: GatewayMetrics, settings: WsSettings
    ) -> None:
        self._ingest = ingest
        self._admission = admission
        self._metrics = metrics
        self._settings = settings
        self._conns: list[_Conn] = []  # oldest first
        self._bugs: set[str] = set()

    def __len__(self) -> int:
        return len(self._conns)

    def _refuse(self, exc: Rejected) -> web.Response:
        return http_response(self._ingest.refuse(exc))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/ws``: check the handshake and the agent, then serve batches until the connection ends."""
        s = self._settings
        agent_text = request.headers.get("X-Flowtunnel-Agent") or request.query.get("agent")
        label = self._ingest.enrolled(agent_text)
        if not agent_text:
            return self._refuse(Rejected(
                "no-agent-header", "X-Flowtunnel-Agent (or ?agent=) is missing"
            ))
        ws = web.WebSocketResponse(
            protocols=_PROTOCOLS, max_msg_size=s.max_body, heartbeat=s.heartbeat, compress=False,
            timeout=s.close_timeout,
        )
        ready = ws.can_prepare(request)
        if not ready.ok or ready.protocol not in _PROTOCOLS:
            offered = request.headers.get("Sec-WebSocket-Protocol", "")
            why = ("not a WebSocket upgrade" if not ready.ok
                   else f"subprotocol {WS_PROTOCOL!r} not offered (offered: {offered[:80]!r})")
            return self._refuse(Rejected("ws-handshake", why, agent=label))
        try:
            agent = validate_agent_id(agent_text)
            self._ingest.entry(agent)
        except BadAgentId as exc:
            return self._refuse(Rejected("ws-handshake", str(exc)))
        except Rejected as exc:
            return self._refuse(exc)
        busy = await self._make_room(agent)
        if busy is not None:
            return self._refuse(Rejected("busy", busy, agent=agent, retry_after=s.retry_after))
        conn = _Conn(ws, agent, compact=ready.protocol == WS_PROTOCOL_COMPACT)
        self._conns.append(conn)
        self._metrics.ws_connections.set(len(self._conns))
        try:
            await ws.prepare(request)
            await self._serve(conn)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug: say so once, tell the client, keep serving the others
            cause = type(exc).__name__
            if cause in self._bugs:
                log.debug("WebSocket connection of agent %s failed again: %r", agent, exc)
            else:
                self._bugs.add(cause)
                log.error("WebSocket connection of agent %s failed (repeats are logged at debug level)",
                          agent, exc_info=exc)
            with contextlib.suppress(Exception):
                await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"internal error")
        finally:
            self._conns.remove(conn)
            self._metrics.ws_connections.set(len(self._conns))
        return ws

    async def _make_room(self, agent: str) -> str | None:
        """None when a connection for ``agent`` may open now (closing an unauthenticated one of the same
        agent if that makes room), else why not."""
        s = self._settings
        if len(self._conns) >= s.max_connections:
            return f"{len(self._conns)} WebSocket connections open (max_ws {s.max_connections})"
        mine = [c for c in self._conns if c.agent == agent]
        if len(mine) < s.max_per_agent:
            return None
        victim = next((c for c in mine if not c.authenticated), None)
        if victim is None:
            return (f"agent {agent} holds {len(mine)} WebSocket connections (max_ws_per_agent "
                    f"{s.max_per_agent})")
        self._ingest.reject(Rejected(
            "ws-unauthenticated",
            f"a WebSocket connection of agent {agent} without an authenticated batch was closed to make room",
            agent=agent,
        ))
        with contextlib.suppress(Exception):
            await victim.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"replaced by a newer one")
        return None

    async def _serve(self, conn: _Conn) -> None:
        s = self._settings
        ws = conn.ws
        while not ws.closed:
            timeout = s.idle_timeout if conn.authenticated else s.auth_timeout
            try:
                msg = await ws.receive(timeout=timeout)
            except TimeoutError:
                if conn.authenticated:
                    log.debug("closing idle WebSocket connection of agent %s", conn.agent)
                    await ws.close(code=WSCloseCode.OK, message=b"idle")
                else:
                    self._ingest.reject(Rejected(
                        "ws-unauthenticated",
                        f"no authenticated batch within {timeout:g} s of the WebSocket upgrade",
                        agent=conn.agent,
                    ))
                    await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"no authenticated batch")
                return
            if msg.type is WSMsgType.BINARY:
                data: bytes = msg.data
                self._metrics.rung_request("ws", bytes_in=len(data) + _frame_overhead(len(data), masked=True))
                outcome = await self._deliver(conn, data)
                if isinstance(outcome, Ack):
                    conn.authenticated = True
                answer: bytes | str
                if conn.compact and isinstance(outcome, Ack) and outcome.tag:
                    answer = compact_ack(outcome.acked, outcome.tag)
                else:
                    answer = json.dumps(ws_answer(outcome), separators=(",", ":"))
                try:
                    if isinstance(answer, bytes):
                        await ws.send_bytes(answer)
                    else:
                        await ws.send_str(answer)
                except ConnectionError:
                    return  # the client went away; an unanswered batch is re-sent, dedup makes it harmless
                out = len(answer) + _frame_overhead(len(answer), masked=False)
                self._metrics.rung_traffic("ws", bytes_out=out)
            elif msg.type is WSMsgType.TEXT:
                self._ingest.reject(Rejected(
                    "ws-text", "a text message where a binary sealed batch was expected",
                    agent=conn.agent,
                ))
                await ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=b"batches are binary messages")
                return
            elif msg.type is WSMsgType.ERROR:
                code = getattr(msg.data, "code", None)
                if code == WSCloseCode.MESSAGE_TOO_BIG:
                    self._ingest.reject(Rejected(
                        "too-large", f"WebSocket message exceeds max_body {s.max_body}", agent=conn.agent
                    ))
                else:
                    self._ingest.reject(Rejected(
                        "ws-protocol", f"WebSocket protocol error: {msg.data}", agent=conn.agent
                    ))
                return
            else:  # CLOSE, CLOSING, CLOSED: the client or the gateway ended the connection
                return

    async def _deliver(self, conn: _Conn, data: bytes) -> Outcome:
        with self._admission.slot(conn.agent) as busy:
            if busy is not None:
                return self._ingest.refuse(Rejected(
                    "busy", busy.detail(), agent=conn.agent, retry_after=self._settings.retry_after
                ))
            return await self._ingest.deliver(data, agent_header=conn.agent, rung="ws")

    async def close_all(self, app: web.Application | None = None) -> None:
        """Close every connection with 1001 (the gateway is shutting down): ``on_shutdown`` of the app."""
        for conn in list(self._conns):
            with contextlib.suppress(Exception):
                await conn.ws.close(code=WSCloseCode.GOING_AWAY, message=b"gateway shutting down")
