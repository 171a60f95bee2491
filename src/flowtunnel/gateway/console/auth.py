"""Operator access control for the console, ``/metrics`` and ``/v1/status``: the token, sessions, CSRF checks.

One credential, the operator token (``--admin-token-file``; ``flowtunnel admin-token`` writes one), opens
everything an operator sees. Scrapers send it as ``Authorization: Bearer TOKEN``; a browser posts it once to
the console's login form and gets a session cookie instead, so the token is not kept by the browser:

* the session id is 256 random bits, known only to this process (a dict of id → expiry): a forged cookie
  names no session; logout deletes the session, so a replayed cookie is refused; a restart ends them all;
* the cookie is ``HttpOnly`` (scripts cannot read it), ``SameSite=Strict`` (never sent on a request another
  site starts), ``Secure`` when the request came over TLS, ``Path=/console``, and expires with the session;
* requests that change state (login, logout) must come from the console's own origin: ``Origin`` (or, when
  a browser sends none, ``Sec-Fetch-Site``) is checked; data requests are GETs that change nothing, and the
  console's JSON endpoints also refuse ``Sec-Fetch-Site: cross-site``.

Pure of aiohttp: the routes module turns these answers into responses. Secrets never appear in reprs or logs.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from flowtunnel.errors import ConfigError

__all__ = [
    "COOKIE_NAME",
    "MIN_TOKEN_CHARS",
    "OperatorAuth",
    "Sessions",
    "generate_token",
    "read_token_file",
    "same_origin",
]

COOKIE_NAME: Final = "flowtunnel_console"
#: A token shorter than this is refused at start (``flowtunnel admin-token`` writes 43 characters: 256 bits).
MIN_TOKEN_CHARS: Final = 20
MAX_TOKEN_CHARS: Final = 4096
#: Sessions kept at once; the oldest is ended when a new login would exceed it.
MAX_SESSIONS: Final = 1024


def generate_token() -> str:
    """A new operator token: 256 random bits, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def read_token_file(path: Path) -> str:
    """The token in ``path`` (surrounding whitespace stripped). ``ConfigError`` naming the file when it cannot
    be read, is empty, too short or too long, or can be read by others than its owner (group/other bits)."""
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read admin token file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"admin token file {path} is not UTF-8 text") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"admin token file {path} has mode {stat.S_IMODE(st.st_mode):04o}: others may read it; "
            f"chmod 600 {path}"
        )
    if not MIN_TOKEN_CHARS <= len(text) <= MAX_TOKEN_CHARS or any(c.isspace() for c in text):
        raise ConfigError(
            f"admin token file {path} holds {len(text)} characters: a token is one word of "
            f"{MIN_TOKEN_CHARS}..{MAX_TOKEN_CHARS} (flowtunnel admin-token writes one)"
        )
    return text


def write_token_file(path: Path, token: str, *, replace: bool = False) -> None:
    """Write ``token`` to ``path`` with mode 0600 (a new file unless ``replace``)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise ConfigError(f"admin token file {path} exists (use --rotate to replace it)") from None
    except OSError as exc:
        raise ConfigError(f"cannot write admin token file {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, f"{token}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def same_origin(headers: Mapping[str, str], *, scheme: str, host: str | None) -> str | None:
    """``None`` when a state-changing request comes from the console's own origin, else why not.

    ``Origin`` must equal ``scheme://host`` when present; without it, ``Sec-Fetch-Site`` (sent by current
    browsers) must be ``same-origin`` or ``none``. A request with neither comes from a non-browser client,
    which cannot be made to carry a victim's cookie, and passes.
    """
    origin = headers.get("Origin")
    if origin is not None:
        if host is None or origin.lower() != f"{scheme}://{host}".lower():
            return f"cross-origin request refused: Origin {origin[:100]!r} is not this console's"
        return None
    site = headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return f"cross-site request refused (Sec-Fetch-Site {site[:40]!r})"
    return None


@dataclass(slots=True)
class Sessions:
    """Live console sessions: random id → expiry (``clock`` seconds). Bounded by ``MAX_SESSIONS``."""

    ttl: float
    clock: Callable[[], float]
    _live: dict[str, float] = field(default_factory=dict, repr=False)

    def create(self) -> str:
        self._expire()
        while len(self._live) >= MAX_SESSIONS:
            oldest = min(self._live, key=self._live.__getitem__)
            del self._live[oldest]
        sid = secrets.token_urlsafe(32)
        self._live[sid] = self.clock() + self.ttl
        return sid

    def valid(self, sid: str | None) -> bool:
        if not sid or len(sid) > 100:
            return False
        expiry = self._live.get(sid)
        if expiry is None:
            return False
        if expiry <= self.clock():
            del self._live[sid]
            return False
        return True

    def end(self, sid: str | None) -> None:
        if sid:
            self._live.pop(sid, None)

    def __len__(self) -> int:
        self._expire()
        return len(self._live)

    def _expire(self) -> None:
        now = self.clock()
        for sid in [s for s, e in self._live.items() if e <= now]:
            del self._live[sid]


class OperatorAuth:
    """Checks the operator credential: the bearer token or a console session.

    ``token`` None: no operator token is configured (then nothing can log in; see ``docs/security.md``).
    """

    def __init__(self, token: str | None, *, session_ttl: float, clock: Callable[[], float]) -> None:
        self._token = token.encode() if token is not None else None
        self.sessions = Sessions(ttl=session_ttl, clock=clock)

    def __repr__(self) -> str:
        return f"OperatorAuth(token={'set' if self._token else 'unset'}, sessions={len(self.sessions)})"

    @property
    def configured(self) -> bool:
        return self._token is not None

    def token_ok(self, candidate: str | None) -> bool:
        """Constant-time comparison of ``candidate`` with the operator token."""
        if self._token is None or candidate is None:
            return False
        return hmac.compare_digest(candidate.strip().encode(), self._token)

    def bearer_ok(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, value = authorization.partition(" ")
        return scheme.lower() == "bearer" and self.token_ok(value)
