"""The gateway's HTTP surface (aiohttp): request shape checks, bounded body reads, JSON answers.

Routes (contract in docs/architecture.md, "HTTP between agent and gateway"):
``POST /v1/batches`` (and ``POST /v1/b``, the same with the smallest heads both ways: the agent's default),
``GET /v1/agents/{id}/state``, ``GET /v1/probe`` (``probe.py``), ``GET /v1/ws``
(``ws.py``), ``GET /v1/g/...`` (GET-only pieces, ``pieces.py``), ``GET /healthz``, and for operators (both
off with ``--no-metrics``) ``GET /metrics`` and ``GET /v1/status`` (the status.json document).

Resource handling (slow or hostile senders must not starve enrolled agents):
1. the declared length is checked against ``max_body`` before anything is read (413);
2. the batch header (the first ~100 bytes of the body) is read first, without holding anything: it must name
   an enrolled, non-revoked agent that matches ``X-Flowtunnel-Agent`` (when sent: ``/v1/b`` needs none), or
   the request is refused at once;
3. only then does the request take one of ``max_inflight`` slots (a small batch: one of ``max_small``, its own
   lane, see ``admission.py``), and at most ``max_inflight_per_agent`` of them per agent id, so a sender
   impersonating one agent id cannot hold them all;
4. the header must arrive within ``body_timeout``; then at least ``min_body_rate * body_timeout`` bytes in
   every ``body_timeout`` seconds, and the whole body within ``body_timeout + length / min_body_rate`` (408):
   a legitimate batch on a 20 kbit/s link gets its time, a stalled body loses its slot after one window.
Memory stays below about ``(max_body + 2 * max_raw) * max_inflight + (SMALL_BODY + 2 * SMALL_RAW) *
max_small`` whatever clients do.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from flowtunnel.gateway.admission import Admission, SourceRate
from flowtunnel.gateway.edge import CompactAnswer, count_rungs, http_response
from flowtunnel.gateway.ingest import SMALL_BODY, SMALL_RAW, Ingest, Rejected
from flowtunnel.gateway.metrics import CONTENT_TYPE_LATEST, GatewayMetrics
from flowtunnel.gateway.pieces import PieceEndpoint, PieceSettings
from flowtunnel.gateway.probe import probe_handler
from flowtunnel.gateway.ws import WsHub, WsSettings
from flowtunnel.runtime import OnceLogger
from flowtunnel.wire import CONTENT_TYPE, CONTENT_TYPES, HEADER, MAGIC, header_length
from flowtunnel.wire.batch import AGENT_LEN_OFFSET

__all__ = ["BATCH_CONTENT_TYPE", "HttpErrorLogger", "build_app"]

BATCH_CONTENT_TYPE = CONTENT_TYPE  # the wire module owns it; kept under this name for callers

INGEST_KEY: web.AppKey[Ingest] = web.AppKey("ingest", Ingest)
ADMISSION_KEY: web.AppKey[Admission] = web.AppKey("admission", Admission)


async def _short_server_header(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """``Server: flowtunnel`` instead of aiohttp's ``Python/3.x aiohttp/3.y.z``: 13 bytes less per answer on
    metered links (issue 14), and no library versions for a scanner. A ``CompactAnswer`` (the 200 of ``POST
    /v1/b``) goes without ``Server`` and without the ``Content-Type`` aiohttp adds: its agent knows what it
    asked for."""
    if isinstance(response, CompactAnswer):
        response.headers.popall("Server", None)
        response.headers.popall("Content-Type", None)
        return
    response.headers["Server"] = "flowtunnel"


class HttpErrorLogger(logging.Logger):
    """The logger given to aiohttp's request handler: requests it cannot even parse (bad request line,
    headers, Content-Length) are counted as rejects of cause ``bad-http`` and logged once per kind, without
    a traceback, instead of one ERROR with a traceback each; other errors (bugs) once per kind, with it."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        super().__init__("flowtunnel.gateway.http")
        self.parent = logging.getLogger("flowtunnel.gateway")
        self._metrics = metrics
        self._once = OnceLogger(self.parent.getChild("http"))
        self._bugs: set[str] = set()

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, HttpProcessingError):
            self._metrics.reject(None, "bad-http")
            # One line: the parser's message spans several, with a caret under the bad byte.
            text = " ".join(str(exc).split())[:300]
            self._once.warning(f"bad-http:{type(exc).__name__}", str(msg) + ": %s", *args, text)
            return
        cause = type(exc).__name__
        if cause in self._bugs or len(self._bugs) >= 64:
            super().debug(msg, *args, **kwargs)
            return
        self._bugs.add(cause)
        super().error(msg, *args, exc_info=exc_info, **kwargs)


def _burst(rate: float) -> int:
    """Probes a source may send at once: ten seconds' worth, at least 20 (an agent racing its rungs on a
    network where many agents share one proxy address)."""
    return max(20, math.ceil(10 * rate))


def build_app(
    *,
    ingest: Ingest,
    metrics: GatewayMetrics,
    serve_metrics: bool = True,
    max_body: int,
    max_inflight: int = 16,
    max_inflight_per_agent: int = 2,
    max_waiting: int = 0,
    max_small: int = 0,
    slot_wait: float = 0.0,
    body_timeout: float = 60.0,
    min_body_rate: int = 1024,
    retry_after: int = 5,
    status: Callable[[], dict[str, object]] | None = None,
    probe_rate: float = 2.0,
    ws: WsSettings | None = None,
    pieces: PieceSettings | None = None,
) -> web.Application:
    """The aiohttp application; the caller runs it (``web.AppRunner``) and owns ``ingest``'s journal."""
    # client_max_size guards any handler that calls request.read(); ours read the body themselves.
    app = web.Application(client_max_size=max_body)
    app.on_response_prepare.append(_short_server_header)
    app[INGEST_KEY] = ingest
    admission = Admission(
        max_inflight=max_inflight, max_inflight_per_agent=max_inflight_per_agent, max_waiting=max_waiting,
        max_small=max_small, on_change=metrics.inflight.set,
    )
    app[ADMISSION_KEY] = admission
    count_rungs(app, metrics)

    def fail(exc: Rejected) -> web.Response:
        return http_response(ingest.refuse(exc))

    async def post_batch(request: web.Request) -> web.Response:
        return await _timed(request, compact=False)

    async def post_compact(request: web.Request) -> web.Response:
        return await _timed(request, compact=True)

    async def _timed(request: web.Request, *, compact: bool) -> web.Response:
        started = time.monotonic()
        try:
            return await _post(request, compact=compact)
        finally:
            metrics.batch_seconds.observe(time.monotonic() - started)

    async def _post(request: web.Request, *, compact: bool) -> web.Response:
        """``POST /v1/batches``, or with ``compact`` ``POST /v1/b`` (docs/protocol.md section 7): no header
        is required but ``Content-Length`` (the agent is the batch header's, a ``Content-Type`` is not
        looked at), and the 200 is a ``CompactAnswer``."""
        agent_header = request.headers.get("X-Flowtunnel-Agent")
        agent = ingest.enrolled(agent_header)
        ctype = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if ctype not in CONTENT_TYPES and not compact:  # a label only: the body is read as a sealed batch
            detail = f"Content-Type {ctype!r} is not one of {', '.join(CONTENT_TYPES)}"
            return fail(Rejected("content-type", detail, agent=agent))
        length = request.content_length
        if length is None:
            return fail(Rejected("no-length", "Content-Length is required", agent=agent))
        if length > max_body:
            detail = f"body of {length} bytes exceeds max_body {max_body}"
            return fail(Rejected("too-large", detail, agent=agent))
        deadline = asyncio.get_running_loop().time() + body_timeout + length / min_body_rate
        # What already arrived with the headers (a small batch is usually all there): taken without a timer
        # or a wait. It was in memory already (aiohttp's buffer, bounded per connection), so nothing more is
        # held before the slot than before; a body still on its way is read with the timeouts below.
        head = request.content.read_nowait(length) if length else b""
        if len(head) < length and (len(head) <= AGENT_LEN_OFFSET or len(head) < (header_length(head) or 0)):
            try:
                async with asyncio.timeout(body_timeout):
                    head = await _read_head(request, length, head)
            except TimeoutError:
                return fail(Rejected("slow-body", "batch header not received in time", agent=agent))
        if compact and agent_header is None:
            agent_header = _agent_in(head)  # the batch names its agent; a bad header is admit's to refuse
        try:
            agent_id = ingest.admit(head, agent_header)
        except Rejected as exc:
            return fail(exc)
        small = _small(head, length)
        lane = admission.take_now(agent_id, small=small)  # a free slot: no context manager, no wait
        if lane is not None:
            try:
                return await _ingest(request, head, length, deadline, agent_id, agent_header, compact)
            finally:
                admission.release(agent_id, lane)
        async with admission.queued(agent_id, wait=slot_wait, small=small) as busy:
            if busy is not None:
                return fail(Rejected("busy", busy.detail(), agent=agent_id, retry_after=retry_after))
            return await _ingest(request, head, length, deadline, agent_id, agent_header, compact)

    async def _ingest(
        request: web.Request, head: bytes, length: int, deadline: float, agent_id: str,
        agent_header: str | None, compact: bool,
    ) -> web.Response:
        rest = b""
        try:
            if len(head) < length:
                async with asyncio.timeout_at(deadline):
                    rest = await _read_paced(request, length - len(head), window=body_timeout,
                                             rate=min_body_rate)
        except TimeoutError:
            detail = (f"body of {length} bytes too slow: under {min_body_rate} B/s over {body_timeout:g} s, "
                      "or not complete in time")
            return fail(Rejected("slow-body", detail, agent=agent_id))
        except asyncio.IncompleteReadError as exc:
            detail = f"body ended after {len(head) + len(exc.partial)} of {length} declared bytes"
            return fail(Rejected("truncated", detail, agent=agent_id))
        outcome = await ingest.deliver(
            head + rest if rest else head,
            agent_header=agent_header,
            rung="post",
            backlog=request.headers.get("X-Flowtunnel-Backlog"),
            dropped=request.headers.get("X-Flowtunnel-Dropped"),
            agent_acked=request.headers.get("X-Flowtunnel-Acked"),
        )
        return http_response(outcome, compact=compact)

    async def get_state(request: web.Request) -> web.Response:
        agent_id = request.match_info["agent"]
        try:
            answer = await ingest.state(agent_id, request.headers.get("X-Flowtunnel-Token"))
        except Rejected as exc:
            return http_response(exc.refusal())
        return http_response(answer)

    async def healthz(request: web.Request) -> web.Response:
        if ingest.closing:
            return web.json_response({"status": "shutting_down"}, status=503)
        return web.json_response({"status": "ok"})

    async def get_metrics(request: web.Request) -> web.Response:
        # In a thread: with 2,000 agents the text is ~36,000 series (2.8 MB) and takes ~0.5 s to render,
        # which on the event loop stalled every agent's request at each scrape (bench/fleet.py).
        body = await asyncio.to_thread(metrics.render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def get_status(request: web.Request) -> web.Response:
        assert status is not None
        return web.json_response(status())

    app.router.add_post("/v1/batches", post_batch)
    app.router.add_post("/v1/b", post_compact)
    app.router.add_get("/v1/agents/{agent}/state", get_state)
    app.router.add_get("/healthz", healthz)
    probes = SourceRate(rate=probe_rate, burst=_burst(probe_rate))
    app.router.add_get("/v1/probe", probe_handler(ingest, probes))
    hub = WsHub(
        ingest=ingest, admission=admission, metrics=metrics,
        settings=ws if ws is not None else WsSettings(max_body=max_body, retry_after=retry_after),
    )
    app.router.add_get("/v1/ws", hub.handle)
    app.on_shutdown.append(hub.close_all)
    getonly = PieceEndpoint(
        ingest=ingest, admission=admission, metrics=metrics, clock=time.monotonic,
        settings=pieces if pieces is not None else PieceSettings(max_body=max_body, retry_after=retry_after),
    )
    app.router.add_get("/v1/g/{agent}/{batch}/{i}/{n}/{data:[^/]*}", getonly.handle)
    if serve_metrics:
        app.router.add_get("/metrics", get_metrics)
    if status is not None:
        app.router.add_get("/v1/status", get_status)
    return app


async def _read_paced(request: web.Request, n: int, *, window: float, rate: int) -> bytes:
    """``n`` body bytes, of which at least ``rate * window`` (or all that is left) must arrive in every
    ``window`` seconds: a body that stalls is cut after one window (``TimeoutError``), not after the whole
    body's deadline. ``asyncio.IncompleteReadError`` if the body ends early."""
    chunks: list[bytes] = []
    got = 0
    per_window = max(1, int(rate * window))
    while got < n:
        need = min(n - got, per_window)
        async with asyncio.timeout(window):
            while need > 0:
                chunk = await request.content.read(min(n - got, 1 << 16))
                if not chunk:
                    raise asyncio.IncompleteReadError(b"".join(chunks), n)
                chunks.append(chunk)
                got += len(chunk)
                need -= len(chunk)
    return b"".join(chunks)


def _small(head: bytes, length: int) -> bool:
    """A body of at most ``SMALL_BODY`` bytes whose header announces a record block of at most ``SMALL_RAW``
    (opening the batch holds it to that): its slot comes from the small batches' lane."""
    if length > SMALL_BODY or len(head) < HEADER.size:
        return False
    raw_len: int = HEADER.unpack_from(head)[8]
    return raw_len <= SMALL_RAW


def _agent_in(head: bytes) -> str | None:
    """The agent id a batch header names, or ``None`` when ``head`` does not hold a readable one."""
    full = header_length(head)
    if full is None or len(head) < full or head[:4] != MAGIC:
        return None
    try:
        return bytes(head[HEADER.size : full]).decode("ascii")
    except UnicodeDecodeError:
        return None


async def _read_head(request: web.Request, length: int, head: bytes = b"") -> bytes:
    """``head`` (the start of the body already read) completed to the batch header: fixed part, then the
    agent id its length byte announces (less if the body is shorter; ``Ingest.admit`` says what is wrong with
    it). ``head`` may hold more than the header: what arrived with it."""
    if len(head) < HEADER.size:
        try:
            head += await request.content.readexactly(min(length, HEADER.size) - len(head))
        except asyncio.IncompleteReadError as exc:
            return head + exc.partial
    full = header_length(head)
    if full is not None and full > len(head):
        more = min(full - len(head), length - len(head))
        try:
            head += await request.content.readexactly(more)
        except asyncio.IncompleteReadError as exc:
            head += exc.partial
    return head
