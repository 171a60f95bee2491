"""The HTTP POST rung: one sealed batch per ``POST <gateway>/v1/b``, over the agent's HTTP/1.1 client.

``/v1/b`` is ``/v1/batches`` with the smallest heads both ways (docs/protocol.md section 7): the request
carries ``Host`` and ``Content-Length`` only (the batch names its agent), the gateway's 200 is 24 bytes
(``wire.compact_ack``) after a status line, ``Content-Length`` and ``Date``: ~200 bytes less per request
than the JSON exchange. A gateway without that route (older, or behind a reverse proxy that routes only
``/v1/batches``) answers 404 or 405, a proxy that wants a content type 400, 403 or 415 (none of them the
gateway's JSON): the transport goes back to ``/v1/batches`` and sends the batch again at once (nothing of it
was taken). The uploader remembers that per network, with when it was learned (``network.RungMemory``,
``batch_path``), so after a restart on such a network the first batch goes to ``/v1/batches`` without a
refused request. Not for good: the refusal may have come from a gateway since upgraded rather than from the
network's proxy, so every ``COMPACT_REPROBE`` seconds on ``/v1/batches`` one batch tries ``/v1/b`` again
(refused again: that batch goes to ``/v1/batches`` at once, as the first time), like the ladder re-probes
higher rungs.

``make_client`` picks the route from the agent's settings (explicit ``proxy``, else ``HTTP(S)_PROXY`` and
``NO_PROXY`` from the environment, else direct) and builds the TLS context (custom CA; a pin alone replaces
CA checks, for self-signed gateways). ``PostTransport.exchange`` maps every failure of the client to an
``Answer`` whose text names what failed and who answered, with credentials masked.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from flowtunnel.agent.config import AgentConfig, mask_url
from flowtunnel.agent.proxy.auth import ProxyCredentials
from flowtunnel.agent.proxy.discover import (
    ProxyRoute,
    env_value,
    find_routes,
    no_proxy_matches,
    parse_proxy_url,
)
from flowtunnel.agent.transport.answers import Acked, Answer, Hints, Rejected, Retry, error_text, from_http
from flowtunnel.agent.transport.http11 import (
    ConnectFailed,
    ConnectionLost,
    HttpClient,
    HttpError,
    PhaseTimeout,
    PinMismatch,
    ProxyRefused,
    Response,
    Routes,
    Timeouts,
    TlsFailed,
)
from flowtunnel.agent.transport.labels import REFUSAL_STATUSES, ContentTypes
from flowtunnel.agent.transport.ladder import REPROBE_AFTER
from flowtunnel.errors import ConfigError
from flowtunnel.tls import ssl_module
from flowtunnel.wire import COMPACT_ACK_BYTES, CONTENT_TYPE, AuthenticationFailed, parse_compact_ack
from flowtunnel.wire.probe import encode_b64url, verify_probe

if TYPE_CHECKING:
    import ssl  # (at run time from flowtunnel.tls.ssl_module: an agent without TLS has none)

__all__ = [
    "CLASSIC_PATH", "COMPACT_PATH", "CONTENT_TYPE", "PostTransport", "choose_proxy", "find_route",
    "make_client",
]

logger = logging.getLogger(__name__)

# After the gateway proved itself (a probe, or an acknowledgement) on a route, new connections on it go
# without a probe for this long: proxies that close every connection would otherwise double the requests
# (and meet the gateway's probe rate limit).
TRUST_AFTER_ACK = 60.0
#: the batch route with the smallest heads both ways (docs/protocol.md section 7)
COMPACT_PATH = "/v1/b"
#: the batch route every gateway has, with a content type and the agent id in the head
CLASSIC_PATH = "/v1/batches"
#: answers to ``/v1/b`` not from the gateway (no JSON ``error``) after which the agent uses ``/v1/batches``
_CLASSIC_AFTER = frozenset({400, 403, 404, 405, 415, 501})
#: seconds on ``/v1/batches`` after which one batch tries ``/v1/b`` again (the ladder's re-probe interval)
COMPACT_REPROBE = REPROBE_AFTER


def choose_proxy(gateway: str, explicit: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The proxy URL (with any credentials) for ``gateway``: ``explicit``, else the environment's
    ``HTTPS_PROXY``/``HTTP_PROXY`` for the gateway's scheme (then ``ALL_PROXY``; lower-case names first)
    unless ``NO_PROXY`` names its host; else None. The environment is read by ``proxy.discover``'s rules,
    the same as every route search's (not ``urllib.request``'s, whose import brings ``http.client`` and
    ``email``)."""
    if explicit:
        return explicit
    env = os.environ if env is None else env
    parts = urlsplit(gateway)
    proxy = env_value(env, f"{parts.scheme}_proxy") or env_value(env, "all_proxy")
    if not proxy:
        return None
    # One reading of NO_PROXY for every route search (discover's: domains, addresses, CIDR blocks, ports).
    try:
        port = parts.port
    except ValueError:
        port = None
    if no_proxy_matches(env_value(env, "no_proxy"), parts.hostname or "",
                        port or (443 if parts.scheme == "https" else 80)):
        return None
    return proxy


async def find_route(config: AgentConfig) -> list[ProxyRoute]:
    """The ways out for ``config``, best first (the client falls back along them when one cannot be connected
    to): ``--proxy`` URL, ``none``, ``auto`` (environment, ``--pac`` (each of its routes, in order), WPAD,
    direct), or unset (the environment's ``HTTP(S)_PROXY``/``NO_PROXY``, then direct; no WPAD). Proxies
    without credentials of their own get ``--proxy-user``'s."""
    setting = config.proxy or "auto"
    try:
        routes = await find_routes(setting, config.gateway, pac=config.pac, wpad=config.proxy == "auto")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not routes:
        routes = [ProxyRoute(proxy=None, source="direct")]
    if config.proxy_user is None or all(r.proxy is None or r.credentials is not None for r in routes):
        return routes
    creds = _credentials(config)
    return [ProxyRoute(proxy=r.proxy, source=r.source, credentials=creds)
            if r.proxy is not None and r.credentials is None else r for r in routes]


def _credentials(config: AgentConfig) -> ProxyCredentials:
    """``--proxy-user`` and ``--proxy-password-file`` (``ConfigError`` when unreadable or invalid)."""
    assert config.proxy_user is not None
    password = ""
    if config.proxy_password_file is not None:
        try:
            password = config.proxy_password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"cannot read proxy-password-file {config.proxy_password_file}: "
                              f"{exc.strerror}") from None
    user = config.proxy_user
    domain, sep, name = user.partition("\\")
    try:
        return ProxyCredentials(username=name if sep else user, password=password,
                                domain=domain if sep else "")
    except ValueError as exc:
        raise ConfigError(f"proxy-user: {exc}") from None


def make_client(config: AgentConfig, route: ProxyRoute | Routes | None = None) -> HttpClient:
    """The HTTP client for the gateway as ``config`` says, through ``route`` (``Routes``: the one in use,
    then the others when it cannot be connected to, shared with the other rungs' clients; default: the proxy
    setting read synchronously: an explicit URL or the environment); ``ConfigError`` for an unreadable CA
    file."""
    context: ssl.SSLContext | None = None
    if urlsplit(config.gateway).scheme == "https" or config.ca_file is not None:
        # A CA file given for an http:// gateway is still read, so a typo shows at start, not at a switch.
        ssl = ssl_module("an https:// gateway" if config.ca_file is None else "--ca-file")
        try:
            context = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load CA file {config.ca_file}: {exc}") from None
        if config.pin_sha256 is not None and config.ca_file is None:
            # The pin alone replaces CA verification (a self-signed gateway); checked after the handshake.
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    routes = route if isinstance(route, Routes) else None
    if isinstance(route, ProxyRoute):
        bare, credentials = route.proxy, route.credentials
    elif routes is not None:
        bare, credentials = None, None
    else:
        explicit = None if config.proxy in ("auto", "none") else config.proxy
        proxy = None if config.proxy == "none" else choose_proxy(config.gateway, explicit)
        bare, credentials = parse_proxy_url(proxy) if proxy else (None, None)
    timeouts = Timeouts(connect=config.connect_timeout, read=config.read_timeout, total=config.total_timeout)
    prefix = urlsplit(config.gateway).path.rstrip("/")

    def probe() -> str:  # a real probe, so the gateway counts no bad request for a proxy handshake
        nonce = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
        return f"{prefix}/v1/probe?agent={config.agent_id}&nonce={nonce}"

    return HttpClient(config.gateway, proxy=bare, credentials=credentials, ssl_context=context,
                      pin_sha256=config.pin_sha256, timeouts=timeouts, probe=probe,
                      on_intercept=config.on_intercept, routes=routes)


class PostTransport:
    """POST each sealed batch to ``<gateway>/v1/b`` (or ``/v1/batches``; see the module docstring).

    Captive portals: before the first body on each new connection, ``GET /v1/probe`` with a fresh nonce
    (docs/protocol.md 7.3); only an answer carrying the gateway's MAC over it lets the body go, on that same
    connection. Anything else that is not the gateway (a redirect, a login page, a wrong MAC) is a portal:
    ``Retry("captive-portal")`` (backoff, no body sent), logged once, shown in ``portal`` until a probe
    passes again.
    """

    name = "post"

    def __init__(
        self, client: HttpClient, gateway: str, *, agent_id: str, key: bytes,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self._gateway = gateway
        self._prefix = urlsplit(gateway).path.rstrip("/")
        self._path = self._prefix + COMPACT_PATH
        # On /v1/batches: since when (this clock), for the re-probe of /v1/b; and whether this batch is one.
        self._classic_since = float("-inf")
        self._reprobing = False
        self._agent_id = agent_id
        self._key = key
        self._clock = clock
        self.portal: str | None = None  # "captive portal at http://..., login page" while one answers
        self._trusted_until = 0.0  # until then a new connection on this route needs no probe
        self.types = ContentTypes()  # the batch's label (the POST rung; the other rungs send no body type)

    @property
    def intercepted(self) -> str | None:
        """The issuer of an intercepting certificate, once seen (allowed or refused)."""
        return self.client.intercepted

    async def close(self) -> None:
        await self.client.close()

    async def exchange(self, batch: bytes, hints: Hints) -> Answer:
        what = hints.what
        try:
            return await self._carry(batch, hints)
        except ProxyRefused as exc:
            if exc.auth:
                return Retry(cause="http-407", detail=f"{what}: {exc}")
            return Rejected(cause=f"proxy-{exc.status}", detail=f"{what}: {exc}",
                            by=f"the proxy {self.client.proxy_text}")
        except PinMismatch as exc:
            if exc.intercepted:
                self.client.intercepted = exc.issuer
            return Retry(cause="tls:pin-mismatch", detail=f"{what}: {exc}")
        except TlsFailed as exc:
            return Retry(cause="tls:handshake", detail=f"{what}: {exc}")
        except ConnectionLost as exc:
            cause = "connection:cut-mid-body" if exc.mid_body else "connection:lost"
            return Retry(cause=cause, detail=f"{what}: {exc}", cut=exc.mid_body)
        except PhaseTimeout as exc:
            return Retry(cause="connection:timeout", detail=f"{what}: {exc}")
        except ConnectFailed as exc:
            return Retry(cause="connection:refused", detail=f"{what}: {exc}")
        except HttpError as exc:
            return Retry(cause=f"connection:{exc.phase}", detail=f"{what}: {exc}")

    async def _verified(self, what: str) -> tuple[Answer | None, bool]:
        """Before a body on a new connection (or route), the probe: (an answer to give instead, whether the
        next request must go on the connection just verified)."""
        if self.client.live or self._clock() < self._trusted_until:
            return None, False
        refused = await self._probe(what)
        if refused is not None:
            return refused, False
        self._trusted_until = self._clock() + TRUST_AFTER_ACK
        if self.client.forward:
            # Through a forward proxy the gateway is reached on the proxy's own upstream connections, so
            # this connection proves nothing more than the route; and some proxies close every connection
            # after one answer (tinyproxy), without saying so: let that close arrive before reusing it.
            await asyncio.sleep(0.01)
            return None, False
        return None, True

    async def _carry(self, batch: bytes, hints: Hints) -> Answer:
        """The rung's own way to carry one batch (raises ``HttpError``)."""
        refused, verified = await self._verified(hints.what)
        if refused is not None:
            return refused
        now = self._clock()
        self._classic_since = min(self._classic_since, now)  # a clock set back must not defer it for long
        if not self.compact and now - self._classic_since >= COMPACT_REPROBE:
            # Long enough on /v1/batches: does /v1/b pass now (a gateway upgraded since it was refused)?
            logger.debug("trying %s again after %.0f s on %s", self._prefix + COMPACT_PATH,
                         now - self._classic_since, self._path)
            self._path = self._prefix + COMPACT_PATH
            self._reprobing = True
        if self.compact:
            # The smallest head (issue 14): Host and Content-Length (the client's) alone; the batch names its
            # agent. The backlog, the acked mark and the drops travel sealed in the batch (agent info).
            resp = await self.client.request("POST", self._path, body=batch, headers=[], reuse_only=verified)
            if resp.status not in _CLASSIC_AFTER or _gateway_error(resp.body):
                if self._reprobing:
                    logger.info("%s is answered by the gateway again: batches go there from now on",
                                self._path)
                    self._reprobing = False
                return self._answer(resp, hints.what, compact=True)
            # No /v1/b there (an older gateway, a reverse proxy that routes /v1/batches only), or a path that
            # refuses a POST without a content type: nothing was taken; the classic route (with its labels,
            # below) for COMPACT_REPROBE seconds, this batch at once.
            logger.log(logging.DEBUG if self._reprobing else logging.INFO,
                       "%s answers HTTP %d to %s: using %s/v1/batches (trying %s again in %.0f s)",
                       self._path_name(), resp.status, self._path, self._prefix, COMPACT_PATH,
                       COMPACT_REPROBE)
            self._path = self._prefix + CLASSIC_PATH
            self._classic_since = self._clock()
            self._reprobing = False
            verified = False
        # On /v1/batches: Host and Content-Length (the client's), the content type and the agent id.
        # The label changes when the path refuses one (``labels``): the same sealed body goes again at once
        # under the next type, until one passes or every type was refused (then the path refuses POST).
        while True:
            label = self.types.current  # "": no Content-Type at all (``labels.ContentTypes``)
            headers = [("Content-Type", label)] if label else []
            headers.append(("X-Flowtunnel-Agent", hints.agent_id))
            resp = await self.client.request("POST", self._path, body=batch, headers=headers,
                                             reuse_only=verified)
            verified = False
            if resp.status not in REFUSAL_STATUSES or _gateway_error(resp.body):
                break
            if self._clock() >= self._trusted_until:  # does a GET reach the gateway on this path now?
                refused = await self._probe(hints.what)
                if refused is not None:
                    return refused
                self._trusted_until = self._clock() + TRUST_AFTER_ACK
            refused_as = self.types.current
            following = self.types.refused_by_path(resp.status,
                                                   why=f"HTTP {resp.status} from {self._path_name()}")
            if following is None:
                break
            logger.debug("%s refuses Content-Type %s (HTTP %d) while the probe passes: trying %s",
                         self._path_name(), refused_as, resp.status, following)
        answer = self._answer(resp, hints.what)
        if isinstance(answer, Acked) and (news := self.types.acked()) is not None:
            logger.info("%s: %s", self.client.route, news)
        return answer

    @property
    def compact(self) -> bool:
        """Whether batches go to ``/v1/b`` (the default) rather than ``/v1/batches``."""
        return self._path.endswith(COMPACT_PATH)

    @property
    def batch_route(self) -> str:
        """What carries a batch on this rung, for the log: ``POST /v1/b`` (with the gateway URL's path)."""
        return f"POST {self._path}"

    @property
    def batch_path(self) -> str:
        """``COMPACT_PATH`` or ``CLASSIC_PATH``: where batches go now (after the gateway URL's path)."""
        return COMPACT_PATH if self.compact else CLASSIC_PATH

    @property
    def classic_since(self) -> float | None:
        """When (this transport's clock) batches went to ``/v1/batches`` because ``/v1/b`` was refused; None
        on ``/v1/b``."""
        return None if self.compact else self._classic_since

    def use_path(self, path: str | None, *, since: float | None = None) -> None:
        """Send batches to ``path`` (``CLASSIC_PATH``: what worked on this network before, when ``/v1/b``
        was refused there ``since`` then; unknown: ``/v1/b`` is tried again at the next batch) or, for None
        or anything else, to ``/v1/b``."""
        self._path = self._prefix + (CLASSIC_PATH if path == CLASSIC_PATH else COMPACT_PATH)
        self._classic_since = float("-inf") if since is None else since
        self._reprobing = False

    def _answer(self, resp: Response, what: str, *, compact: bool = False) -> Answer:
        answer: Answer | None = None
        if compact and resp.status == 200 and len(resp.body) == COMPACT_ACK_BYTES:
            acked, tag = parse_compact_ack(resp.body)  # verified by the caller, as any answer
            answer = Acked(acked=acked, tag=tag)
        if answer is None:
            answer = from_http(resp.status, resp.body, what=what, retry_after=resp.header("retry-after"),
                               proxy_auth=resp.header("proxy-authenticate") is not None, now=self._clock(),
                               path=self._path_name())
        # The gateway answered on this route just now: a new connection (a proxy that closes each one)
        # need not be probed again for a while. Anything else: probe the next new connection.
        self._trusted_until = self._clock() + TRUST_AFTER_ACK if isinstance(answer, Acked) else 0.0
        return answer

    async def _probe(self, what: str) -> Answer | None:
        """Probe the gateway on a new connection: None when it proved itself, else the answer to give."""
        nonce = os.urandom(16)
        target = f"{self._prefix}/v1/probe?agent={self._agent_id}&nonce={encode_b64url(nonce)}"
        resp = await self.client.request("GET", target)
        portal = self._portal(resp, nonce)
        if portal is None:
            if resp.status != 200:
                gateway = _gateway_error(resp.body)
                if not gateway:  # a proxy or server on the path refused the probe: say what it answered
                    return from_http(resp.status, resp.body, what=f"{what} (probe)",
                                     retry_after=resp.header("retry-after"),
                                     proxy_auth=resp.header("proxy-authenticate") is not None,
                                     now=self._clock(), path=self._path_name())
            if self.portal is not None:
                logger.info("the gateway answers the probe again: %s is open", self.portal)
                self.portal = None
            return None
        self.portal = portal
        await self.client.close()  # nothing more goes on a connection that a portal answers
        cause = "captive-portal" if portal.startswith("captive portal") else "probe-unauthenticated"
        return Retry(cause=cause,
                     detail=f"{what}: {portal}; no batch is sent to it, probing with backoff")

    def _portal(self, resp: Response, nonce: bytes) -> str | None:
        """What the probe's answer says about a portal: None for the gateway (or its refusal), else a text."""
        if 300 <= resp.status < 400:
            location = mask_url(resp.header("location")) or "(no Location)"
            return f"captive portal at {location}, login page (HTTP {resp.status} redirect)"
        if resp.status != 200:
            return None
        try:
            doc = json.loads(resp.body)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            try:
                verify_probe(self._key, self._agent_id, nonce, doc.get("mac"))
            except (AuthenticationFailed, ValueError):
                return (f"an answer to the probe at {self._gateway} that fails authentication (not the MAC "
                        "this agent's key gives): an impostor, or this agent's key is not the one enrolled")
            return None
        title = error_text(resp.body)
        return f"captive portal at {self._gateway}, login page ({title})"

    def _path_name(self) -> str:
        if self.client.proxy_text:
            return f"the proxy {self.client.proxy_text}"
        return "a server on the path (not the gateway: its answer has no JSON error)"


def _gateway_error(payload: bytes) -> bool:
    try:
        doc = json.loads(payload)
    except ValueError:
        return False
    return isinstance(doc, dict) and "error" in doc
