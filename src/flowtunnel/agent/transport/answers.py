"""What a transport answers for one sealed batch, whatever carried it (POST, WebSocket, GET pieces).

Every rung ends in the gateway's answer to a batch, or in a failure on the way; ``from_http`` maps the HTTP
status and body the gateway (or something on the path) gave to one of five answers, so the delivery protocol
(``flowtunnel.agent.transport.delivery``) never sees HTTP. Each answer says *who* answered: the gateway always
explains a refusal in JSON with an ``error`` field; a proxy's or a portal's answer does not, and a 413 from a
proxy is a body limit on the path, not a refusal by the gateway.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from flowtunnel.agent.policy import parse_retry_after

__all__ = [
    "Acked", "Answer", "Hints", "NoContext", "Rejected", "Resync", "Retry", "TooLarge", "error_text",
    "from_http",
]

GATEWAY = "gateway"
_TITLE_RE = re.compile(r"<title>([^<]{1,200})</title>", re.IGNORECASE)


@dataclass(frozen=True, kw_only=True)
class Hints:
    """What a transport may tell the path besides the sealed batch (headers on HTTP rungs): advisory only,
    the gateway trusts the sealed copies. ``what`` names the batch in messages ("batch 1..200", "resync")."""

    agent_id: str
    backlog: int
    acked: int
    dropped: tuple[tuple[str, int], ...] = ()
    what: str = "batch"


@dataclass(frozen=True, kw_only=True)
class Acked:
    """A 200 with the gateway's acknowledged seq; ``tag`` is still to be verified (it may be forged)."""

    acked: int
    tag: object


@dataclass(frozen=True, kw_only=True)
class Resync:
    """409 ``resync`` (the gateway holds less than this agent saw acknowledged) or ``out-of-order`` (an
    earlier batch is missing there): learn the gateway's mark at once and go on from it."""

    detail: str


@dataclass(frozen=True, kw_only=True)
class NoContext:
    """409 ``unknown-context``: the gateway does not hold the compression context the batch was sealed
    against (it restarted, evicted it, or holds a different one): seal it again without a context, at once
    (docs/protocol.md section 3.3)."""

    detail: str


@dataclass(frozen=True, kw_only=True)
class Retry:
    """Transient: back off (``after`` seconds when the answer said so) and try again. ``cause`` is a counter
    name ("http-503", "connection:TimeoutError", "bad-ack", "cut-mid-body"); ``cut`` is True when the
    connection closed while the body was being sent (a proxy body limit may do that instead of a 413)."""

    cause: str
    detail: str
    after: float | None = None
    cut: bool = False


@dataclass(frozen=True, kw_only=True)
class TooLarge:
    """413: the body was too large for ``by`` ("gateway" or the proxy/server named)."""

    detail: str
    by: str


@dataclass(frozen=True, kw_only=True)
class Rejected:
    """Retrying the same request cannot help (401, 403, 400, ...): log loudly, keep the data, back off long.
    ``by`` is "gateway" when the gateway said so in JSON, otherwise what answered instead."""

    cause: str
    detail: str
    by: str
    code: str | None = None  # the gateway's JSON ``error`` code, when it answered


Answer = Acked | Resync | NoContext | Retry | TooLarge | Rejected


def from_http(
    status: int, payload: bytes, *, what: str, retry_after: str | None = None, proxy_auth: bool = False,
    now: float = 0.0, path: str = "a server on the path",
) -> Answer:
    """Map one HTTP answer to a batch to an ``Answer``. ``proxy_auth``: the answer carried
    ``Proxy-Authenticate``;
    ``path`` names what else than the gateway may have answered (the proxy, masked)."""
    gateway = _is_gateway_error(payload)
    by = GATEWAY if gateway else path
    if status == 401 and (proxy_auth or not gateway):
        # The gateway always explains a 401 in JSON; a bare 401 comes from a proxy that wants a (better)
        # login (tinyproxy answers 401 instead of 407). That is transient from here: retry with backoff.
        status = 407
    if status == 200:
        try:
            doc = json.loads(payload)
            acked = doc["acked"]
            if not isinstance(acked, int) or isinstance(acked, bool) or acked < 0:
                raise TypeError(f"acked {acked!r} is not a non-negative integer")
        except (ValueError, KeyError, TypeError) as exc:
            return Retry(cause="bad-response", detail=f"{what}: 200 with an unreadable body ({exc})")
        return Acked(acked=acked, tag=doc.get("tag"))
    detail = f"{what}: HTTP {status} from {by}: {error_text(payload)}"
    if status == 409 and _error_code(payload) in ("resync", "out-of-order"):
        # out-of-order: an earlier batch is missing at the gateway (refused, or still on another rung).
        return Resync(detail=detail)
    if status == 409 and gateway and _error_code(payload) == "unknown-context":
        return NoContext(detail=detail)
    if status == 413:
        return TooLarge(detail=detail, by=by)
    if status in (407, 408, 425, 429) or status >= 500:
        return Retry(cause=f"http-{status}", detail=detail, after=parse_retry_after(retry_after, now=now))
    code = _error_code(payload) if gateway else None
    return Rejected(cause=f"http-{status}", detail=detail, by=by, code=code)


def _json(payload: bytes) -> object:
    try:
        return json.loads(payload)
    except ValueError:
        return None


def _error_code(payload: bytes) -> str | None:
    """The ``error`` field of a JSON error body, if any."""
    doc = _json(payload)
    code = doc.get("error") if isinstance(doc, dict) else None
    return code if isinstance(code, str) else None


def _is_gateway_error(payload: bytes) -> bool:
    doc = _json(payload)
    return isinstance(doc, dict) and "error" in doc


def error_text(payload: bytes) -> str:
    """The gateway's ``error``/``detail`` from a JSON error body, else a short printable excerpt."""
    doc = _json(payload)
    if isinstance(doc, dict) and "error" in doc:
        return f"{doc.get('error')}: {doc.get('detail', '')}".strip(": ")
    text = payload[:2000].decode("utf-8", "replace")
    title = _TITLE_RE.search(text)
    if title:  # an HTML error page from a proxy
        return title.group(1).strip()
    text = " ".join("".join(c if c.isprintable() else " " for c in text[:200]).split())
    return text or "(empty body)"
