"""The HTTP POST rung: one sealed batch per ``POST <gateway>/v1/batches``, over the agent's HTTP/1.1 client.

``make_client`` picks the route from the agent's settings (explicit ``proxy``, else ``HTTP(S)_PROXY`` and
``NO_PROXY`` from the environment, else direct) and builds the TLS context (custom CA; a pin alone replaces
CA checks, for self-signed gateways). ``PostTransport.exchange`` maps every failure of the client to an
``Answer`` whose text names what failed and who answered, with credentials masked.
"""

from __future__ import annotations

import base64
import logging
import os
import ssl
import time
import urllib.request
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from flowtunnel.agent.config import AgentConfig, mask_url
from flowtunnel.agent.proxy.discover import parse_proxy_url
from flowtunnel.agent.transport.answers import Answer, Hints, Rejected, Retry, from_http
from flowtunnel.agent.transport.http11 import (
    ConnectFailed,
    ConnectionLost,
    HttpClient,
    HttpError,
    PhaseTimeout,
    PinMismatch,
    ProxyRefused,
    Timeouts,
    TlsFailed,
)
from flowtunnel.errors import ConfigError

__all__ = ["CONTENT_TYPE", "PostTransport", "choose_proxy", "make_client"]

logger = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.flowtunnel.batch"


def choose_proxy(gateway: str, explicit: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The proxy URL (with any credentials) for ``gateway``: ``explicit``, else the environment's
    ``HTTPS_PROXY``/``HTTP_PROXY`` for the gateway's scheme unless ``NO_PROXY`` names its host; else None."""
    if explicit:
        return explicit
    proxies = (urllib.request.getproxies_environment() if env is None else
               {k.lower().removesuffix("_proxy"): v for k, v in env.items() if k.lower().endswith("_proxy")})
    parts = urlsplit(gateway)
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy:
        return None
    if _bypassed(parts.hostname or "", proxies.get("no", "")):
        return None
    return proxy


def _bypassed(host: str, no_proxy: str) -> bool:
    """``NO_PROXY`` as curl reads it: ``*``, or host names / domain suffixes, ports ignored."""
    host = host.lower().strip("[]")
    for entry in no_proxy.split(","):
        name = entry.strip().lower()
        if not name:
            continue
        if name == "*":
            return True
        if name.startswith("[") or name.count(":") == 1:
            name = name.rsplit(":", 1)[0] if not name.startswith("[") else name[1:].split("]")[0]
        name = name.lstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


def make_client(config: AgentConfig) -> HttpClient:
    """The HTTP client for the gateway as ``config`` says; ``ConfigError`` for an unreadable CA file."""
    context: ssl.SSLContext | None = None
    if urlsplit(config.gateway).scheme == "https":
        try:
            context = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load CA file {config.ca_file}: {exc}") from None
        if config.pin_sha256 is not None and config.ca_file is None:
            # The pin alone replaces CA verification (a self-signed gateway); checked after the handshake.
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    proxy = choose_proxy(config.gateway, config.proxy)
    bare, credentials = parse_proxy_url(proxy) if proxy else (None, None)
    timeouts = Timeouts(connect=config.connect_timeout, read=config.read_timeout, total=config.total_timeout)
    prefix = urlsplit(config.gateway).path.rstrip("/")

    def probe() -> str:  # a real probe, so the gateway counts no bad request for a proxy handshake
        nonce = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
        return f"{prefix}/v1/probe?agent={config.agent_id}&nonce={nonce}"

    return HttpClient(config.gateway, proxy=bare, credentials=credentials, ssl_context=context,
                      pin_sha256=config.pin_sha256, timeouts=timeouts, probe=probe,
                      on_intercept=config.on_intercept)


class PostTransport:
    """POST each sealed batch to ``<gateway>/v1/batches`` (see the module docstring)."""

    name = "post"

    def __init__(self, client: HttpClient, gateway: str, *, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self._path = (urlsplit(gateway).path.rstrip("/") or "") + "/v1/batches"
        self._clock = clock

    @property
    def intercepted(self) -> str | None:
        """The issuer of an intercepting certificate, once seen (allowed or refused)."""
        return self.client.intercepted

    async def close(self) -> None:
        await self.client.close()

    async def exchange(self, batch: bytes, hints: Hints) -> Answer:
        headers = [
            ("Content-Type", CONTENT_TYPE),
            ("X-Flowtunnel-Agent", hints.agent_id),
            # What will still wait once this batch is acknowledged.
            ("X-Flowtunnel-Backlog", str(hints.backlog)),
            # Also sealed in the batch (agent info "acked"), which the gateway prefers: this copy is for
            # proxies and logs.
            ("X-Flowtunnel-Acked", str(hints.acked)),
        ]
        if hints.dropped:
            headers.append(("X-Flowtunnel-Dropped", ",".join(f"{k}={v}" for k, v in hints.dropped)))
        what = hints.what
        try:
            resp = await self.client.request("POST", self._path, body=batch, headers=headers)
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
        path = f"the proxy {mask_url(self.client.proxy_text)}" if self.client.proxy_text else (
            "a server on the path (not the gateway: its answer has no JSON error)")
        return from_http(resp.status, resp.body, what=what, retry_after=resp.header("retry-after"),
                         proxy_auth=resp.header("proxy-authenticate") is not None, now=self._clock(),
                         path=path)
