"""The agent's own HTTP/1.1 client: asyncio streams driven by h11 (sans-I/O), for one gateway route.

Why not aiohttp: proxies that want NTLM or Negotiate authenticate the *connection* (a three-message handshake
on one keep-alive connection), which aiohttp cannot do, and the agent must know exactly which phase failed
(CONNECT refused by the proxy, TLS, a body cut mid-way) to pick another rung. h11 keeps the HTTP framing
correct and leaves every byte and every connection to us. Routes: direct (http or https); through a proxy
with CONNECT (https: TLS to the gateway inside the tunnel, custom CA, pin); through a proxy with absolute-URI
requests (plain http). One connection, kept alive; every phase (connect, proxy handshake, TLS, sending,
waiting for the answer) under its own timeout. Proxy authentication goes through a ``ProxyAuthenticator``
(one per connection; the handshake runs on a body-less request before any body is sent).

Errors are ``HttpError`` subclasses whose messages never hold credentials (proxy URLs are masked)::

    HttpError
     ├── ConnectFailed        TCP connect / DNS to the gateway or the proxy
     ├── ProxyRefused         the proxy answered CONNECT (or the handshake) with a refusal
     ├── TlsFailed            TLS handshake or certificate verification
     │    └── PinMismatch     the certificate is not the pinned one (``intercepted``: a chain the box trusts)
     ├── PhaseTimeout         a phase took longer than its timeout
     └── ConnectionLost       the connection closed or broke (``mid_body``: while the body was being sent)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, urlsplit

import h11

from flowtunnel.agent.config import mask_url
from flowtunnel.agent.proxy.auth import ProxyAuthenticator, ProxyAuthError, ProxyCredentials
from flowtunnel.tls import ssl_module
from flowtunnel.wire.digest import sha256

if TYPE_CHECKING:  # x509 (~3 MB) is loaded only after a pin mismatch, to name the issuer
    import ssl  # (at run time from flowtunnel.tls.ssl_module: an agent without TLS has none)

    from cryptography import x509

__all__ = [
    "ConnectFailed",
    "ConnectionLost",
    "HttpClient",
    "HttpError",
    "PhaseTimeout",
    "PinMismatch",
    "ProxyRefused",
    "Response",
    "Routes",
    "Timeouts",
    "TlsFailed",
]

logger = logging.getLogger(__name__)

MAX_RESPONSE = 64 * 1024  # answer bodies beyond this are cut (the gateway's are < 1 KB)
_READ = 64 * 1024
_MAX_AUTH_ROUNDS = 4  # 407s answered on one connection before the proxy counts as refusing


class HttpError(Exception):
    """Base of the client's errors; ``phase`` names where it failed ("connect", "proxy", "tls", ...)."""

    phase = "http"


class ConnectFailed(HttpError):
    phase = "connect"


class ProxyRefused(HttpError):
    """The proxy refused to open the tunnel or to authenticate us (``status``: its HTTP status)."""

    phase = "proxy"

    def __init__(self, message: str, *, status: int, auth: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.auth = auth


class TlsFailed(HttpError):
    phase = "tls"


class PinMismatch(TlsFailed):
    """The gateway's certificate is not the pinned one. ``intercepted``: its chain is trusted by this box (a
    TLS-intercepting proxy re-signing with a CA the box trusts); ``issuer`` names who signed it."""

    def __init__(self, message: str, *, got: str, want: str, issuer: str, intercepted: bool) -> None:
        super().__init__(message)
        self.got, self.want, self.issuer, self.intercepted = got, want, issuer, intercepted


class PhaseTimeout(HttpError):
    phase = "timeout"


class ConnectionLost(HttpError):
    """The connection closed or broke; ``mid_body``: while the request body was being sent."""

    phase = "connection"

    def __init__(self, message: str, *, mid_body: bool = False) -> None:
        super().__init__(message)
        self.mid_body = mid_body


@dataclass(frozen=True, kw_only=True)
class Timeouts:
    connect: float = 15.0  # TCP connect, proxy handshake and TLS, each
    read: float = 60.0  # between the end of the request and the answer, and between reads
    total: float = 180.0  # one whole exchange


@dataclass(frozen=True, kw_only=True)
class Response:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    def headers_named(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]


def _headers(event: h11.Response | h11.InformationalResponse) -> tuple[tuple[str, str], ...]:
    return tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers)


class _Conn:
    """One open connection and its h11 state."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 auth: ProxyAuthenticator | None = None) -> None:
        self.reader, self.writer = reader, writer
        self.h11 = h11.Connection(h11.CLIENT)
        self.auth = auth  # absolute-URI requests: asked for each request's Proxy-Authorization (Basic)
        self.first_auth: str | None = None  # the value ``auth.initial()`` gave for the first request

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


@dataclass(kw_only=True)
class Routes:
    """The ways to the gateway, best first, each ``(proxy URL without credentials or None for DIRECT,
    credentials, where it came from)``, and the one in use (``index``): shared by the clients of every rung,
    so a route one found dead is skipped by the others and each change is logged once."""

    items: tuple[tuple[str | None, ProxyCredentials | None, str], ...]
    index: int = 0


class HttpClient:
    """HTTP/1.1 to one gateway (``base``: http[s]://host:port), directly or through ``proxy``.

    ``proxy`` is the proxy's URL without credentials; with ``credentials`` each connection gets its own
    ``ProxyAuthenticator`` (Basic, NTLM, Negotiate; the scheme that worked is preferred on the next one).
    ``ssl_context`` verifies the gateway (https only); ``pin_sha256`` (hex) is checked on top of it.
    ``routes``: instead of ``proxy`` and ``credentials``, several routes (``Routes``), tried in order when the
    route in use cannot be connected to (refused, unreachable, timed out: a PAC's ``PROXY a; PROXY b;
    DIRECT``); the route that connected stays in use for every client sharing ``routes``, and each change is
    logged once. A proxy that answers, even with a refusal, is not a connection failure: its answer stands.

    Resource handling: at most one connection, opened on demand and kept alive between requests; ``close``
    closes it. A connection whose exchange failed in any way is closed, never reused.
    """

    def __init__(
        self, base: str, *, proxy: str | None = None,
        credentials: ProxyCredentials | None = None,
        ssl_context: ssl.SSLContext | None = None, pin_sha256: str | None = None,
        timeouts: Timeouts = Timeouts(), probe: Callable[[], str] = lambda: "/v1/probe",
        on_intercept: str = "allow",
        routes: Routes | None = None,
    ) -> None:
        self._base: SplitResult = urlsplit(base)
        self._tls = self._base.scheme == "https"
        self._host = self._base.hostname or ""
        self._port = self._base.port or (443 if self._tls else 80)
        self.auth_scheme: str | None = None  # the proxy auth scheme that worked, once known
        self._routes = routes or Routes(items=((proxy, credentials, "given"),))
        self._route_index = self._routes.index
        self._proxy: SplitResult | None = None
        self.proxy_text: str | None = None
        self._credentials: ProxyCredentials | None = None
        self._use_route(self._route_index)
        self._probe = probe  # path and query of a body-less GET for proxy auth handshakes
        self._on_intercept = on_intercept
        self.intercepted: str | None = None  # the intercepting certificate's issuer, once seen
        self._ssl = ssl_context
        self._pin = pin_sha256.replace(":", "").lower() if pin_sha256 else None
        self._timeouts = timeouts
        self._conn: _Conn | None = None
        self.connections = 0  # connections opened (for status and tests)

    def _use_route(self, index: int) -> None:
        proxy, credentials, _ = self._routes.items[index]
        self._route_index = index
        self._proxy = urlsplit(proxy) if proxy else None
        self.proxy_text = mask_url(proxy)
        self._credentials = credentials
        self.auth_scheme = None

    @property
    def route(self) -> str:
        if self._proxy is None:
            return "direct"
        return f"proxy {self.proxy_text} ({'CONNECT' if self._tls else 'absolute URI'})"

    @property
    def host_header(self) -> str:
        return self._host_header()

    @property
    def timeouts(self) -> Timeouts:
        return self._timeouts

    @property
    def forward(self) -> bool:
        """Requests go to the proxy with an absolute URI (plain http through a proxy)."""
        return self._proxy is not None and not self._tls

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _authenticator(self) -> ProxyAuthenticator | None:
        if self._credentials is None or self._proxy is None:
            return None
        return ProxyAuthenticator(self._credentials, proxy_host=self.proxy_text or "",
                                  prefer=self.auth_scheme)

    # -- requests --------------------------------------------------------------------------------------------

    @property
    def live(self) -> bool:
        """A kept-alive connection is open (as far as can be seen without using it)."""
        conn = self._conn
        return conn is not None and not (conn.reader.at_eof() or conn.writer.is_closing())

    def detach(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str | None]:
        """Hand the live kept-alive connection (proxy, TLS and auth done) over for another protocol (a
        WebSocket upgrade), with the ``Proxy-Authorization`` value an absolute-URI request on it needs (or
        None). The client forgets it: the caller closes it."""
        conn = self._conn
        if conn is None or not self.live:
            raise ConnectionLost("no live connection to hand over")
        self._conn = None
        value = conn.first_auth
        if value is None and conn.auth is not None and self.forward:
            value = conn.auth.initial()
        return conn.reader, conn.writer, value

    async def request(
        self, method: str, path: str, *, body: bytes = b"", headers: Sequence[tuple[str, str]] = (),
        reuse_only: bool = False,
    ) -> Response:
        """One request on the kept-alive connection (opened first if needed; with ``reuse_only``, raise
        ``ConnectionLost`` instead: the caller verified that connection); raises ``HttpError``."""
        try:
            async with asyncio.timeout(self._timeouts.total):
                conn = self._conn
                if conn is not None and (conn.reader.at_eof() or conn.writer.is_closing()):
                    # The server (or a proxy) closed the kept-alive connection while it was idle. No request
                    # is ever re-sent blindly: an answer lost on the way is the delivery protocol's business.
                    self._drop(conn)
                    conn = None
                if conn is None:
                    if reuse_only:
                        raise ConnectionLost("the verified connection closed before the request")
                    conn = await self._open()
                try:
                    response = await self._exchange(conn, method, path, body, headers)
                except BaseException:
                    self._drop(conn)
                    raise
                if (conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE):
                    conn.h11.start_next_cycle()
                else:
                    self._drop(conn)
                return response
        except TimeoutError:
            await self.close()
            raise PhaseTimeout(
                f"no complete answer within {self._timeouts.total:g} s (total timeout)") from None

    def _drop(self, conn: _Conn) -> None:
        conn.close()
        if self._conn is conn:
            self._conn = None

    async def _exchange(
        self, conn: _Conn, method: str, path: str, body: bytes, headers: Sequence[tuple[str, str]],
    ) -> Response:
        target = path
        all_headers = [("Host", self._host_header()), *headers]
        if self.forward:
            target = f"http://{self._host_header()}{path}"
            value = conn.first_auth
            if value is None and conn.auth is not None:
                value = conn.auth.initial()
            if value is not None:
                all_headers.append(("Proxy-Authorization", value))
        if method != "GET" or body:
            all_headers.append(("Content-Length", str(len(body))))
        # Headers and body in one write: a peer that answers after reading only the headers (a proxy refusing
        # the request) would otherwise close with the body unread, and the reset destroys its answer.
        events: list[h11.Event] = [h11.Request(method=method, target=target, headers=all_headers)]
        if body:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        if body:
            try:
                await self._send(conn, *events)
            except ConnectionLost as exc:
                # A proxy with a body limit may answer 413 and close before reading the body: read the answer
                # that may be waiting; if there is none, the body was cut.
                try:
                    return await self._receive(conn, phase="reading the answer after the body was cut")
                except HttpError:
                    raise ConnectionLost(
                        f"connection closed while sending a body of {len(body)} bytes ({exc})", mid_body=True,
                    ) from None
        else:
            await self._send(conn, *events)
        answer = await self._receive(conn, phase="waiting for the answer")
        if self.forward and conn.auth is not None and not _challenges(answer):
            conn.auth.done()
            conn.first_auth = None
        return answer

    def _host_header(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        default = 443 if self._tls else 80
        return host if self._port == default else f"{host}:{self._port}"

    async def _send(self, conn: _Conn, *events: h11.Event) -> None:
        try:
            data = b"".join(conn.h11.send(event) or b"" for event in events)
        except h11.LocalProtocolError as exc:
            raise ConnectionLost(f"cannot send on this connection ({exc})") from None
        try:
            conn.writer.write(data)
            async with asyncio.timeout(self._timeouts.read):
                await conn.writer.drain()
        except TimeoutError:
            raise PhaseTimeout(f"sending took longer than {self._timeouts.read:g} s (read timeout)") from None
        except (OSError, RuntimeError) as exc:  # RuntimeError: a closed transport on some paths
            raise ConnectionLost(f"connection broken while sending ({type(exc).__name__})") from None

    async def _receive(self, conn: _Conn, *, phase: str) -> Response:
        """Read one answer (skipping 1xx); its body up to ``MAX_RESPONSE`` bytes."""
        response: h11.Response | None = None
        broken: str | None = None
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise ConnectionLost(f"malformed HTTP answer ({exc})") from None
            if event is h11.NEED_DATA:
                if broken is not None:
                    if conn.h11.their_state is h11.CLOSED or response is None:
                        raise ConnectionLost(f"{phase}: connection broken ({broken})")
                    conn.h11.receive_data(b"")  # the reset ends a body delimited by the connection's end
                    continue
                try:
                    async with asyncio.timeout(self._timeouts.read):
                        data = await conn.reader.read(_READ)
                except TimeoutError:
                    raise PhaseTimeout(
                        f"{phase}: nothing for {self._timeouts.read:g} s (read timeout)") from None
                except OSError as exc:  # ssl.SSLError too (a subclass)
                    # A peer that answers and then resets (a proxy refusing a request whose body it did not
                    # read) leaves the answer in the stream's buffer, which the reset hides: read it anyway.
                    broken = type(exc).__name__
                    data = _salvage(conn.reader)
                    if not data and (response is None or conn.h11.their_state is h11.CLOSED):
                        raise ConnectionLost(f"{phase}: connection broken ({broken})") from None
                if not data and response is None:
                    raise ConnectionLost(f"{phase}: connection closed before any answer")
                conn.h11.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                response = event
                if conn.h11.their_state is h11.SWITCHED_PROTOCOL or (
                        conn.h11.our_state is h11.SWITCHED_PROTOCOL):
                    return Response(status=event.status_code, headers=_headers(event), body=b"")
                continue
            if isinstance(event, h11.Data):
                if size < MAX_RESPONSE:
                    chunks.append(event.data[: MAX_RESPONSE - size])
                size += len(event.data)
                continue
            if isinstance(event, h11.EndOfMessage):
                assert response is not None
                return Response(status=response.status_code, headers=_headers(response),
                                body=b"".join(chunks))
            if isinstance(event, h11.ConnectionClosed):
                raise ConnectionLost(f"{phase}: connection closed mid-answer")
            if event is h11.PAUSED:
                # A CONNECT answer switches protocols: the caller handles it.
                assert response is not None
                return Response(status=response.status_code, headers=_headers(response), body=b"")

    # -- opening ---------------------------------------------------------------------------------------------

    async def _tcp(self) -> _Conn:
        """A new TCP connection on the route in use, else on the next route that connects (``fallbacks``,
        in order, wrapping round); the route in use's error when none does."""
        shared = self._routes
        start = shared.index  # another rung's client may have moved on already
        first: HttpError | None = None
        for step in range(len(shared.items)):
            index = (start + step) % len(shared.items)
            if index != self._route_index:
                self._use_route(index)
            try:
                conn = await self._tcp_once()
            except (ConnectFailed, PhaseTimeout) as exc:
                first = first or exc
                continue
            if index != shared.index:
                shared.index = index
                logger.warning("%s; now going %s (from %s)", first, self.route, shared.items[index][2])
            return conn
        if self._route_index != start:
            self._use_route(start)
        assert first is not None
        raise first

    async def _tcp_once(self) -> _Conn:
        """A new TCP connection to the gateway, or to the proxy when there is one."""
        timeouts = self._timeouts
        if self._proxy is None:
            host, port, what = self._host, self._port, f"gateway {self._host}:{self._port}"
        else:
            host, port = self._proxy.hostname or "", self._proxy.port or 3128
            what = f"proxy {self.proxy_text}"
        try:
            async with asyncio.timeout(timeouts.connect):
                reader, writer = await asyncio.open_connection(host, port, limit=_READ)
        except TimeoutError:
            raise PhaseTimeout(f"connecting to {what} took longer than {timeouts.connect:g} s") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {what}: {exc.strerror or type(exc).__name__}") from None
        self.connections += 1
        return _Conn(reader, writer)

    async def _open(self) -> _Conn:
        conn = await self._tcp()
        try:
            if self._proxy is not None:
                auth = self._authenticator()
                if self._tls:
                    conn = await self._handshake(conn, auth, connect=True)
                else:
                    conn.auth = auth
                    if auth is not None:
                        conn.first_auth = auth.initial()  # a scheme known to work (Basic) goes at once
                        if conn.first_auth is None:
                            conn = await self._handshake(conn, auth, connect=False)
            if self._tls:
                conn = await self._start_tls(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    async def _handshake(self, conn: _Conn, auth: ProxyAuthenticator | None, *, connect: bool) -> _Conn:
        box = [conn]  # the connection in use, which may be replaced by a fresh one (closed on failure)
        try:
            return await self._handshake_on(box, auth, connect=connect)
        except BaseException:
            box[0].close()
            raise

    async def _handshake_on(
        self, box: list[_Conn], auth: ProxyAuthenticator | None, *, connect: bool
    ) -> _Conn:
        """With the proxy, on a body-less request so no body is ever sent twice: ``connect``: CONNECT to the
        gateway (the open tunnel comes back); otherwise a GET of the gateway's probe with an absolute URI,
        which authenticates this connection (NTLM, Negotiate) or learns the scheme (Basic) before any batch.
        Raises ``ProxyRefused`` for a refusal, a login that fails, or a 407 loop."""
        conn = box[0]
        port = self._port
        target = f"[{self._host}]:{port}" if ":" in self._host else f"{self._host}:{port}"
        what = f"CONNECT to port {port}" if connect else "the request"
        value = auth.initial() if auth is not None else None
        for _ in range(_MAX_AUTH_ROUNDS):
            headers = [("Host", target if connect else self._host_header())]
            if value is not None:
                headers.append(("Proxy-Authorization", value))
            if connect:
                request = h11.Request(method="CONNECT", target=target, headers=headers)
            else:
                request = h11.Request(method="GET", target=f"http://{self._host_header()}{self._probe()}",
                                      headers=headers)
            try:
                async with asyncio.timeout(self._timeouts.connect):
                    await self._send(conn, request, h11.EndOfMessage())
                    answer = await self._receive(conn, phase="waiting for the proxy's answer")
            except TimeoutError:
                raise PhaseTimeout(f"the proxy {self.proxy_text} did not answer {what} within "
                                   f"{self._timeouts.connect:g} s") from None
            challenges = _challenges(answer)
            if connect and 200 <= answer.status < 300:
                if auth is not None:
                    auth.done()
                    self.auth_scheme = auth.scheme
                # h11 hands the connection over: TLS runs on the same stream from here.
                return _Conn(conn.reader, conn.writer)
            if not challenges:
                if connect:
                    raise ProxyRefused(f"the proxy {self.proxy_text} refused {what} (HTTP {answer.status}"
                                       f"{_reason(answer)})", status=answer.status)
                if auth is not None:
                    auth.done()
                    self.auth_scheme = auth.scheme
                if auth is not None and auth.scheme in ("ntlm", "negotiate") and self._next_cycle(conn):
                    return conn  # this connection is the one authenticated
                # Basic is not bound to a connection, and a proxy may close this one right after answering
                # (tinyproxy does, despite HTTP/1.1): the batches go on a fresh one.
                return await self._fresh(conn, auth)
            if auth is None:
                raise ProxyRefused(f"the proxy {self.proxy_text} wants authentication for {what} "
                                   f"(HTTP {answer.status}) and no credentials are configured",
                                   status=407, auth=True)
            try:
                value = auth.respond(challenges)
            except ProxyAuthError as exc:  # its messages name proxy, scheme and user, never the password
                raise ProxyRefused(f"proxy authentication for {what} failed: {exc}", status=407,
                                   auth=True) from None
            if not self._next_cycle(conn):
                if auth.scheme != "basic":
                    raise ProxyRefused(f"the proxy {self.proxy_text} closed the connection during "
                                       f"{auth.scheme} authentication", status=407, auth=True)
                conn = box[0] = await self._fresh(conn, auth)  # Basic is not bound to a connection
        raise ProxyRefused(f"the proxy {self.proxy_text} kept answering 407 to {what} after "
                           f"{_MAX_AUTH_ROUNDS} rounds", status=407, auth=True)

    @staticmethod
    def _next_cycle(conn: _Conn) -> bool:
        """Ready the connection for its next request; False when the proxy closes it."""
        if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
            return True
        return False

    async def _fresh(self, old: _Conn, auth: ProxyAuthenticator | None) -> _Conn:
        old.close()
        conn = await self._tcp()
        conn.auth = auth
        return conn

    async def _start_tls(self, conn: _Conn) -> _Conn:
        ssl = ssl_module(f"the TLS handshake with {self._host}:{self._port}")
        ctx = self._ssl or ssl.create_default_context()
        try:
            async with asyncio.timeout(self._timeouts.connect):
                await conn.writer.start_tls(ctx, server_hostname=self._host)
        except TimeoutError:
            raise PhaseTimeout(f"TLS handshake with {self._host}:{self._port} took longer than "
                               f"{self._timeouts.connect:g} s") from None
        except ssl.SSLCertVerificationError as exc:
            raise TlsFailed(f"the gateway's certificate did not verify: {exc.verify_message}") from None
        except (ssl.SSLError, OSError) as exc:
            raise TlsFailed(f"TLS handshake with {self._host}:{self._port} failed: "
                            f"{getattr(exc, 'reason', None) or type(exc).__name__}") from None
        if self._pin is not None:
            sslobj = conn.writer.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            got = sha256(der or b"").hex()
            if got != self._pin:
                error = pin_mismatch(der or b"", got, self._pin, self._host)
                if not error.intercepted and await self._box_trusts():
                    error = pin_mismatch(der or b"", got, self._pin, self._host, trusted=True)
                if not (error.intercepted and self._on_intercept == "allow"):
                    raise error
                if self.intercepted is None:
                    logger.warning("%s; allowed (--on-intercept allow): batches stay sealed end to end, the "
                                   "interceptor sees only the HTTP metadata", error)
                self.intercepted = error.issuer
        return _Conn(conn.reader, conn.writer)

    async def _box_trusts(self) -> bool:
        """Whether OpenSSL, with this box's CAs (the system bundle, ``SSL_CERT_FILE``), accepts the chain now
        presented for the gateway: one more handshake on a new connection, only after a pin mismatch whose
        leaf cryptography's stricter web-PKI checks refused (mitmproxy's leaves have no key identifiers)."""
        ssl = ssl_module(f"the TLS handshake with {self._host}:{self._port}")
        try:
            async with asyncio.timeout(self._timeouts.connect * 2):
                conn = await self._tcp()
                try:
                    if self._proxy is not None:
                        conn = await self._handshake(conn, self._authenticator(), connect=True)
                    await conn.writer.start_tls(ssl.create_default_context(), server_hostname=self._host)
                    return True
                finally:
                    conn.close()
        except (HttpError, ssl.SSLError, OSError, TimeoutError):
            return False


def _challenges(answer: Response) -> list[str]:
    """The proxy's auth challenges: a 407's ``Proxy-Authenticate``, or a proxy's bare 401 with
    ``WWW-Authenticate`` (tinyproxy asks that way); none for any other answer."""
    if answer.status == 407:
        return answer.headers_named("proxy-authenticate") or ["(none)"]
    if answer.status == 401 and not answer.body.lstrip().startswith(b"{"):
        return answer.headers_named("proxy-authenticate") or answer.headers_named("www-authenticate")
    return []


def _salvage(reader: asyncio.StreamReader) -> bytes:
    """What ``reader`` had buffered before its connection broke (asyncio raises the error first)."""
    buffer = getattr(reader, "_buffer", None)
    if not isinstance(buffer, bytearray):
        return b""
    data = bytes(buffer)
    buffer.clear()
    return data


def _reason(answer: Response) -> str:
    from flowtunnel.agent.transport.answers import error_text

    text = error_text(answer.body) if answer.body else ""
    return f": {text}" if text and text != "(empty body)" else ""


def pin_mismatch(der: bytes, got: str, want: str, host: str, *, trusted: bool = False) -> PinMismatch:
    """The error for a certificate that is not the pinned one, naming its issuer, and whether this box trusts
    its chain (then it is interception: a proxy re-signing with a CA the box's administrator installed).
    ``trusted``: already known to be trusted (OpenSSL accepted the chain)."""
    issuer, verified = _issuer_and_trust(der, host)
    trusted = trusted or verified
    if trusted:
        message = (f"gateway certificate sha256 {got[:4]}… does not match --pin-sha256 {want[:4]}…: TLS "
                   f"interception by {issuer} (a CA this box trusts)")
    else:
        message = (f"gateway certificate sha256 {got[:4]}… does not match --pin-sha256 {want[:4]}… "
                   f"(issuer {issuer})")
    return PinMismatch(message, got=got, want=want, issuer=issuer, intercepted=trusted)


def _issuer_and_trust(der: bytes, host: str) -> tuple[str, bool]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.x509 import verification

    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return "(unreadable certificate)", False
    issuer = cert.issuer.rfc4514_string() or "(no issuer name)"
    roots = _box_roots()
    if not roots:
        return issuer, False
    try:
        name: x509.IPAddress | x509.DNSName
        try:
            name = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            name = x509.DNSName(host)
        verifier = (verification.PolicyBuilder().store(verification.Store(roots))
                    .time(datetime.datetime.now(datetime.UTC)).build_server_verifier(name))
        verifier.verify(cert, [])
    except (verification.VerificationError, ValueError):
        return issuer, False
    return issuer, True


@functools.cache
def _box_roots() -> list[x509.Certificate]:
    """The CAs this box trusts (the system bundle OpenSSL uses by default)."""
    from cryptography import x509

    paths = ssl_module("reading this box's CAs").get_default_verify_paths()
    if not paths.cafile:
        return []
    with contextlib.suppress(OSError, ValueError), warnings.catch_warnings():
        # Some bundled roots are old enough for cryptography to warn about their encoding.
        warnings.simplefilter("ignore")
        with open(paths.cafile, "rb") as f:
            return x509.load_pem_x509_certificates(f.read())
    return []
