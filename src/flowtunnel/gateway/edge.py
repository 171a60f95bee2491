"""The HTTP edge: where transport-neutral outcomes (``Ack``, ``Refusal``) become HTTP statuses and bodies.

Ingest and ``wire/`` decide *what* happened (a cause code such as ``resync`` or ``limit-exceeded``); only this
module says which HTTP status that is, for every endpoint alike: POST and GET pieces answer with the status,
WebSocket messages carry it as ``"status"`` (docs/protocol.md 7.4). The table is the one of
docs/architecture.md ("Errors").

It also counts, per rung, requests and the bytes each way (``rung_traffic``), so bench/ can compare rungs.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from flowtunnel.gateway.ingest import Ack, Outcome, Refusal, StateAnswer
from flowtunnel.gateway.metrics import GatewayMetrics
from flowtunnel.wire import compact_ack

__all__ = [
    "HTTP_STATUS",
    "NO_STORE",
    "RUNG_KEY",
    "CompactAnswer",
    "count_rungs",
    "http_response",
    "http_status",
    "request_bytes",
    "spread_retry_after",
    "ws_answer",
]

#: Cause code → HTTP status. Codes not listed (a new wire error) are client errors: 400.
HTTP_STATUS: Final[Mapping[str, int]] = MappingProxyType({
    # the request or batch is malformed
    **dict.fromkeys(
        ("bad-batch", "bad-magic", "unsupported-version", "truncated", "malformed-header",
         "unknown-dictionary", "malformed-records", "bad-key", "bad-agent-id", "no-agent-header",
         "agent-mismatch", "bad-token", "bad-probe", "bad-piece", "ws-handshake", "ws-text", "ws-protocol",
         "bad-http"),
        400,
    ),
    # who sent it cannot be authenticated, or is not allowed
    "unknown-agent": 401, "authentication-failed": 401, "no-token": 401,
    "revoked": 403,
    "slow-body": 408, "ws-unauthenticated": 408,
    "resync": 409, "out-of-order": 409, "unknown-context": 409,
    "no-length": 411,
    "too-large": 413, "limit-exceeded": 413,
    "content-type": 415,
    "rate-limited": 429, "agent-rate": 429, "agent-share": 429,
    # the gateway cannot take it now: try again after retry_after
    **dict.fromkeys(("busy", "journal-full", "journal-error", "registry-unavailable", "shutting-down"), 503),
})

#: Headers of answers a proxy must neither cache nor sniff (probes, GET pieces: their URLs are GETs).
NO_STORE: Final[Mapping[str, str]] = MappingProxyType(
    {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
)

#: The request's rung (post, ws, get, probe, state), set by ``count_rungs``'s middleware.
RUNG_KEY: Final = web.RequestKey("rung", str)

_RUNGS: Final = (("/v1/batches", "post"), ("/v1/b", "post"), ("/v1/ws", "ws"), ("/v1/g/", "get"),
                 ("/v1/probe", "probe"), ("/v1/agents/", "state"))


def http_status(code: str) -> int:
    """The HTTP status of a refusal with cause ``code``."""
    return HTTP_STATUS.get(code, 400)


class CompactAnswer(web.Response):
    """The 200 of ``POST /v1/b``: ``wire.compact_ack`` (24 bytes) with the smallest head HTTP allows, status
    line, ``Content-Length`` and ``Date`` (``app``'s response hook drops the ``Server`` and ``Content-Type``
    that aiohttp adds): ~100 bytes instead of ~215 for the JSON answer (docs/protocol.md section 7)."""


def spread_retry_after(refusal: Refusal, draw: Callable[[], float] = random.random) -> int | None:
    """The Retry-After (seconds) to send with ``refusal``. A 503 (the gateway busy, its journal full or
    failing, shutting down: what a whole fleet meets at the same moment) gets its ``retry_after`` spread
    over ``[r, 2r]`` by ``draw()`` (uniform in [0, 1)), so agents refused together do not all come back in
    the same second; other refusals (429: the agent's own budget, which says when it refills) keep theirs."""
    after = refusal.retry_after
    if after is None or http_status(refusal.code) != 503:
        return after
    return after + min(after, int(draw() * (after + 1)))


def http_response(
    outcome: Outcome | StateAnswer, *, headers: Mapping[str, str] | None = None, compact: bool = False,
    draw: Callable[[], float] = random.random,
) -> web.Response:
    """The HTTP answer to an outcome: 200 with the ack JSON (``compact``: a ``CompactAnswer`` for an
    ``Ack``), or the refusal's status with ``{"error", "detail", ...}`` and ``Retry-After`` when it has
    one (spread: ``spread_retry_after``)."""
    extra = dict(headers or {})
    if isinstance(outcome, Refusal):
        after = spread_retry_after(outcome, draw)
        if after is not None:
            extra["Retry-After"] = str(after)
        return _json(outcome.as_json(), status=http_status(outcome.code), headers=extra)
    if compact and isinstance(outcome, Ack):
        return CompactAnswer(body=compact_ack(outcome.acked, outcome.tag), headers=extra)
    return _json(outcome.as_json(), headers=extra)


def _json(doc: dict[str, object], *, status: int = 200, headers: dict[str, str]) -> web.Response:
    """A compact JSON answer: no spaces, and ``application/json`` without a charset (JSON is UTF-8, RFC
    8259): every answer to an agent costs bytes on a metered link (issue 14)."""
    return web.Response(body=json.dumps(doc, separators=(",", ":")).encode(), status=status,
                        headers={"Content-Type": "application/json", **headers})


def ws_answer(outcome: Outcome, *, draw: Callable[[], float] = random.random) -> dict[str, object]:
    """The WebSocket answer to one batch: the POST answer's JSON plus ``"status"`` (and ``"retry_after"``
    where POST sends ``Retry-After``, spread the same way)."""
    if isinstance(outcome, Ack):
        return {"status": 200, **outcome.as_json()}
    doc: dict[str, object] = {"status": http_status(outcome.code), **outcome.as_json()}
    after = spread_retry_after(outcome, draw)
    if after is not None:
        doc["retry_after"] = after
    return doc


def request_bytes(request: web.BaseRequest) -> int:
    """The request line and headers as parsed (HTTP/1.1 framing), without the body."""
    n = len(request.method) + len(request.raw_path) + len("  HTTP/1.1\r\n\r\n")
    for name, value in request.raw_headers:
        n += len(name) + len(value) + 4
    return n


def _response_bytes(response: web.StreamResponse) -> int:
    n = len("HTTP/1.1 200 \r\n\r\n") + len(response.reason or "")
    for name, value in response.headers.items():
        n += len(name) + len(value) + 4
    if isinstance(response, web.Response) and response.body is not None and isinstance(response.body, bytes):
        n += len(response.body)
    return n


def count_rungs(app: web.Application, metrics: GatewayMetrics) -> None:
    """Count every request of a known rung (``rung_request``) with its bytes in (request line, headers,
    declared body) and out (status line, headers, body of a plain response; WebSocket messages are counted
    by the WebSocket endpoint itself)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        for prefix, rung in _RUNGS:
            if path.startswith(prefix):
                request[RUNG_KEY] = rung
                metrics.rung_request(rung, bytes_in=request_bytes(request) + (request.content_length or 0))
                break
        return await handler(request)

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        rung = request.get(RUNG_KEY)
        if isinstance(rung, str):
            metrics.rung_traffic(rung, bytes_out=_response_bytes(response))

    app.middlewares.append(middleware)
    app.on_response_prepare.append(on_prepare)
