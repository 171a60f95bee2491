"""The console's HTTP side: pages, static assets, JSON endpoints, login/logout, and the operator-access gate
in front of ``/metrics`` and ``/v1/status``.

Routes (all under ``/console`` but the two guarded ones):
``GET /console`` (the login form, or the agents page once logged in), ``GET /console/agent``,
``/console/flows``, ``/console/query`` (pages), ``GET /console/static/...`` (JS, CSS, uPlot),
``POST /console/login`` (field ``token``), ``POST /console/logout``, and the JSON endpoints
``GET /console/api/{agents,agent,sources,series,top,query}`` (``/console/api/query?format=csv`` downloads
CSV; ``sources`` is the udp-forward mapping ``flowtunnel sources`` lists).

Every answer carries a strict Content-Security-Policy (scripts and styles only from ``/console/static``, no
inline code, no framing) and ``X-Content-Type-Options: nosniff``; data is put into pages by the scripts with
``textContent``, never as HTML. Bad requests (range, filter, SQL) get 400 with ``{"error": text}``, a store
that cannot answer 503; never a 500.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from flowtunnel.gateway.console.auth import COOKIE_NAME, OperatorAuth, same_origin
from flowtunnel.gateway.console.data import (
    DEFAULT_ROWS,
    MAX_ROWS,
    MAX_TOP,
    BadRequest,
    ConsoleData,
    Table,
    parse_limit,
    parse_range,
)
from flowtunnel.runtime import OnceLogger
from flowtunnel.store.errors import QueryError, StoreError

__all__ = ["CSP", "GuardSettings", "add_console", "csv_cell", "guard_middleware", "operator_access"]

log = logging.getLogger("flowtunnel.gateway.console")

CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Not no-referrer: under it browsers send "Origin: null" with the login form, which the check refuses.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_STATIC_TYPES: Final = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
_PAGES: Final = ("agents", "agent", "flows", "query")
_GUARDED: Final = ("/metrics", "/v1/status")
_QUERY_MODES: Final = ("filter", "sql")
_MAX_PARAM: Final = 100_000
#: First characters that make a spreadsheet read a CSV text cell as a formula (OWASP, "CSV Injection").
_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True, slots=True, kw_only=True)
class GuardSettings:
    """Who may read ``/metrics`` and ``/v1/status``: with ``metrics_public`` anyone; else a holder of the
    operator credential, or, when no operator token is configured, loopback peers only."""

    metrics_public: bool = False


def _static(name: str) -> bytes:
    return resources.files("flowtunnel.gateway.console").joinpath("static", name).read_bytes()


def _is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status, headers=_SECURITY_HEADERS)


def operator_access(auth: OperatorAuth, settings: GuardSettings, request: web.Request) -> bool:
    """True when ``request`` may read what ``/metrics`` and ``/v1/status`` show (agent ids among it): the
    rules of ``GuardSettings``. Open endpoints (``/v1/health``) ask it before naming agents."""
    if settings.metrics_public:
        return True
    if auth.configured:
        return auth.bearer_ok(request.headers.get("Authorization")) or auth.sessions.valid(
            request.cookies.get(COOKIE_NAME))
    return _is_loopback(request.remote)


def guard_middleware(auth: OperatorAuth, settings: GuardSettings) -> Any:
    """Middleware refusing ``/metrics`` and ``/v1/status`` without the operator credential (401)."""
    once = OnceLogger(log)

    @web.middleware
    async def guard(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path not in _GUARDED or operator_access(auth, settings, request):
            return await handler(request)
        if auth.configured:
            return web.json_response(
                {"error": f"{request.path} needs the operator token: send 'Authorization: Bearer TOKEN'"},
                status=401, headers={"WWW-Authenticate": 'Bearer realm="flowtunnel"'},
            )
        once.warning("remote-metrics", "refused %s from %s: without --admin-token-file only loopback may "
                     "read it (or give --metrics-public)", request.path, request.remote)
        return web.json_response(
            {"error": f"{request.path} is served to loopback only: configure --admin-token-file and send "
                      "'Authorization: Bearer TOKEN', or start the gateway with --metrics-public"},
            status=403,
        )

    return guard


class Console:
    """Handlers of the console routes."""

    def __init__(self, *, auth: OperatorAuth, data: ConsoleData, session_ttl: float) -> None:
        self.auth = auth
        self.data = data
        self.session_ttl = session_ttl
        self._once = OnceLogger(log)

    # -- access -------------------------------------------------------------------------------------------

    def _logged_in(self, request: web.Request) -> bool:
        return self.auth.sessions.valid(request.cookies.get(COOKIE_NAME))

    @staticmethod
    def _origin_problem(request: web.Request) -> str | None:
        return same_origin(request.headers, scheme=request.scheme, host=request.host)

    def _page(self, name: str) -> web.Response:
        return web.Response(body=_static(f"{name}.html"), content_type="text/html", charset="utf-8",
                            headers=_SECURITY_HEADERS)

    async def index(self, request: web.Request) -> web.Response:
        return self._page("agents" if self._logged_in(request) else "login")

    def page(self, name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            if not self._logged_in(request):
                raise web.HTTPSeeOther("/console", headers=_SECURITY_HEADERS)
            return self._page(name)
        return handler

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _STATIC_FILES:
            return _error(404, "no such console file")
        suffix = name[name.rfind("."):]
        ctype = _STATIC_TYPES.get(suffix, "application/octet-stream")
        return web.Response(body=_static(name), content_type=ctype,
                            headers={**_SECURITY_HEADERS, "Cache-Control": "private, max-age=300"})

    async def login(self, request: web.Request) -> web.StreamResponse:
        problem = self._origin_problem(request)
        if problem is not None:
            return _error(403, problem)
        if not self.auth.configured:
            return _error(403, "the console has no operator token: start the gateway with --admin-token-file")
        try:
            form = await request.post()
        except (ValueError, HttpProcessingError):  # the latter: a multipart part whose headers do not parse
            return _error(400, "the login form could not be read")
        token = form.get("token")
        if not isinstance(token, str) or not self.auth.token_ok(token[:4096]):
            self._once.warning("login", "console login refused from %s: wrong operator token (further "
                               "refusals are not logged)", request.remote)
            # The same page again, with the message its script shows (no data reflected into HTML).
            raise web.HTTPSeeOther("/console?denied=1", headers=_SECURITY_HEADERS)
        sid = self.auth.sessions.create()
        resp = web.HTTPSeeOther("/console", headers=_SECURITY_HEADERS)
        resp.set_cookie(COOKIE_NAME, sid, max_age=int(self.session_ttl), path="/console", httponly=True,
                        secure=request.secure, samesite="Strict")
        log.info("console login from %s", request.remote)
        raise resp

    async def logout(self, request: web.Request) -> web.StreamResponse:
        problem = self._origin_problem(request)
        if problem is not None:
            return _error(403, problem)
        self.auth.sessions.end(request.cookies.get(COOKIE_NAME))
        resp = web.HTTPSeeOther("/console", headers=_SECURITY_HEADERS)
        resp.del_cookie(COOKIE_NAME, path="/console")
        raise resp

    # -- JSON ---------------------------------------------------------------------------------------------

    def api(self, fn: Callable[[web.Request], Awaitable[web.StreamResponse]]
            ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            if not self._logged_in(request):
                return _error(401, "log in to the console first (POST /console/login with the token)")
            if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
                return _error(403, "cross-site request refused")
            if len(request.query_string) > _MAX_PARAM:
                return _error(400, f"query string of {len(request.query_string)} characters exceeds "
                                   f"{_MAX_PARAM}")
            try:
                return await fn(request)
            except BadRequest as exc:
                return _error(400, str(exc))
            except LookupError as exc:
                return _error(404, str(exc))
            except QueryError as exc:  # FilterError, QueryRejected, DuckDB errors, timeouts
                return _error(400, str(exc))
            except StoreError as exc:
                return _error(503, f"the flow store cannot answer: {exc}")
        return handler

    @staticmethod
    def _json(doc: object) -> web.Response:
        return web.json_response(doc, headers=_SECURITY_HEADERS)

    async def api_agents(self, request: web.Request) -> web.StreamResponse:
        return self._json(await self.data.agents())

    async def api_agent(self, request: web.Request) -> web.StreamResponse:
        agent_id = request.query.get("id", "")
        return self._json(await self.data.agent(agent_id, request.query.get("range")))

    async def api_sources(self, request: web.Request) -> web.StreamResponse:
        return self._json(await self.data.sources())

    async def api_series(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        seconds, clamped = parse_range(q.get("range"))
        doc = await self.data.series(
            group=q.get("group", "none"), agent=q.get("agent") or None, exporter=q.get("exporter") or None,
            range_seconds=seconds, flow_filter=self.data.compile(q.get("filter")),
        )
        return self._json({**doc, "range_s": seconds, "clamped": clamped})

    async def api_top(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        seconds, clamped = parse_range(q.get("range"))
        table = await self.data.top(
            by=q.get("by", "src_addr"), order=q.get("order", "bytes"), range_seconds=seconds,
            limit=parse_limit(q.get("limit"), default=20, maximum=MAX_TOP),
            flow_filter=self.data.compile(q.get("filter")), agent=q.get("agent") or None,
        )
        return self._json({**_table_doc(table), "range_s": seconds, "clamped": clamped})

    async def api_query(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        mode = q.get("mode", "filter")
        if mode not in _QUERY_MODES:
            raise BadRequest(f"query mode {mode[:20]!r} is not filter or sql")
        limit = parse_limit(q.get("limit"), default=DEFAULT_ROWS, maximum=MAX_ROWS)
        seconds, clamped = parse_range(q.get("range"))
        if mode == "sql":
            text = q.get("q", "")
            if not text.strip():
                raise BadRequest("type a SELECT statement")
            table = await self.data.sql(text, limit=limit)
        else:
            table = await self.data.flows(flow_filter=self.data.compile(q.get("q")), range_seconds=seconds,
                                          limit=limit)
        if q.get("format") == "csv":
            return _csv(table)
        return self._json({**_table_doc(table), "range_s": seconds, "clamped": clamped, "limit": limit})


def _table_doc(table: Table) -> dict[str, Any]:
    return {"columns": table.columns, "types": table.types, "rows": table.rows, "truncated": table.truncated}


def csv_cell(value: object) -> object:
    """A value as the CSV download writes it. Spreadsheets (Excel, LibreOffice) run a text cell starting with
    ``=``, ``+``, ``-``, ``@``, tab or CR as a formula, and values come from exporters' fields and anyone's
    SQL: such text gets a leading single quote (OWASP's advice for CSV injection; shown as text, not run).
    Numbers stay numbers (a negative one is not text); None is an empty cell."""
    if type(value) is str:  # the common case first: a 10,000-row download asks 170,000 times
        return "'" + value if value.startswith(_FORMULA_START) else value
    if value is None:
        return ""
    if isinstance(value, bool | int | float):
        return value
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _csv(table: Table) -> web.Response:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([csv_cell(c) for c in table.columns])
    for row in table.rows:
        writer.writerow([csv_cell(v) for v in row])
    name = time.strftime("flowtunnel-%Y%m%dT%H%M%SZ.csv", time.gmtime())
    return web.Response(
        body=out.getvalue().encode(), content_type="text/csv", charset="utf-8",
        headers={**_SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{name}"'},
    )


_STATIC_FILES: Final = frozenset({
    "console.css", "common.js", "login.js", "agents.js", "agent.js", "flows.js", "query.js",
    "vendor/uplot/uPlot.iife.min.js", "vendor/uplot/uPlot.min.css", "vendor/uplot/LICENSE",
    "vendor/uplot/VERSION",
})


def add_console(app: web.Application, console: Console) -> None:
    """Register the console's routes on ``app``."""
    r = app.router
    r.add_get("/console", console.index)
    r.add_get("/console/", console.index)
    for name in _PAGES[1:]:
        r.add_get(f"/console/{name}", console.page(name))
    r.add_get("/console/static/{name:.+}", console.static)
    r.add_post("/console/login", console.login)
    r.add_post("/console/logout", console.logout)
    r.add_get("/console/api/agents", console.api(console.api_agents))
    r.add_get("/console/api/agent", console.api(console.api_agent))
    r.add_get("/console/api/sources", console.api(console.api_sources))
    r.add_get("/console/api/series", console.api(console.api_series))
    r.add_get("/console/api/top", console.api(console.api_top))
    r.add_get("/console/api/query", console.api(console.api_query))
