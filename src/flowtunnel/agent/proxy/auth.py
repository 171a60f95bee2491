"""Proxy authentication for the agent's own HTTP client: Basic, NTLM and Negotiate, sans-I/O.

aiohttp speaks only Basic to proxies; corporate proxies want NTLM or Negotiate, whose handshakes are bound to
one TCP connection. ``ProxyAuthenticator`` is a pure object the client feeds with the ``Proxy-Authenticate``
values of each 407 and asks for the next ``Proxy-Authorization`` value; the client does the I/O (and must do
the handshake on a request without a body, then keep that connection alive).

Scheme choice, from what the proxy offers: NTLM, then Negotiate, then Basic. The NTLM and SPNEGO messages come
from pyspnego (its own NTLM implementation, forced with ``use_ntlm``, so no system GSSAPI is needed).
Negotiate is answered with NTLM: the NTLM messages are carried raw in the ``Negotiate`` scheme, as Windows
does when it has no Kerberos ticket for the proxy. squid's ``negotiate_wrapper_auth`` recognises them
(by their ``NTLMSSP`` signature) and hands them to its NTLM helper, whereas an SPNEGO-wrapped NTLM token
goes to its Kerberos helper, is refused, and poisons the connection for any retry (seen with squid 5.7).
Kerberos itself is not offered: it needs a system GSSAPI library, a ticket and a KDC, none of which the
agent's networks give it.

Error handling: every failure is a ``ProxyAuthError``; the tree::

    ProxyAuthError
     +-- AuthUnsupported   no scheme we speak, or the proxy wants a login and no credentials are configured
     +-- AuthFailed        credentials refused, a handshake that does not end (407 loop), garbage challenges

Messages name the proxy, the scheme and the user, never the password or a token. Hostile header values are
cut to a few dozen characters before they appear in a message.

Resource handling: at most ``MAX_CHALLENGE_CHARS`` of challenge text is parsed per 407, and a handshake gets
at most ``MAX_ROUNDS`` answers before it is declared a loop; an authenticator restarts a completed handshake
at most ``MAX_HANDSHAKES`` times (one per connection is the normal case).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAX_CHALLENGE_CHARS",
    "MAX_HANDSHAKES",
    "MAX_ROUNDS",
    "AuthFailed",
    "AuthUnsupported",
    "Challenge",
    "ProxyAuthError",
    "ProxyAuthenticator",
    "ProxyCredentials",
    "parse_challenges",
]

MAX_CHALLENGE_CHARS = 16 * 1024
"""Challenge text parsed per 407 (all ``Proxy-Authenticate`` values together); the rest is ignored."""
MAX_ROUNDS = 3
"""407 answers per handshake: NTLM needs 2 (bare challenge, then the server's challenge token)."""
MAX_HANDSHAKES = 3
"""Handshakes per authenticator (per connection); more means the proxy keeps forgetting us: a loop."""
_MAX_CHALLENGES = 32
_SCHEMES = ("ntlm", "negotiate", "basic")  # preference order
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


@dataclass(frozen=True, kw_only=True)
class ProxyCredentials:
    """A proxy login. ``domain`` is the NTLM domain (also accepted as ``DOMAIN\\user`` in ``username``)."""

    username: str
    password: str = field(repr=False)
    domain: str = ""

    def __post_init__(self) -> None:
        if not self.username:
            raise ValueError("proxy username is empty")
        for name, value in (("username", self.username), ("domain", self.domain)):
            if any(ord(c) < 32 or c == ":" for c in value):
                raise ValueError(f"proxy {name} {value!r} contains ':' or a control character")
        if any(c in self.password for c in "\r\n\0"):
            raise ValueError("proxy password contains CR, LF or NUL")

    def __repr__(self) -> str:
        dom = f", domain={self.domain!r}" if self.domain else ""
        return f"ProxyCredentials(username={self.username!r}, password='***'{dom})"

    @property
    def account(self) -> str:
        """``DOMAIN\\user`` (or ``user``), as NTLM wants it and messages show it."""
        if self.domain and "\\" not in self.username:
            return f"{self.domain}\\{self.username}"
        return self.username


class ProxyAuthError(Exception):
    """The proxy's authentication could not be satisfied (base of the tree in the module docstring)."""


class AuthUnsupported(ProxyAuthError):
    """The proxy offers no scheme we speak, or asks for a login and none is configured."""


class AuthFailed(ProxyAuthError):
    """The proxy refused the credentials, loops on 407, or sent challenges we cannot use."""


@dataclass(frozen=True, kw_only=True)
class Challenge:
    """One parsed challenge: ``scheme`` lower-cased, a ``token`` (token68: an NTLM message) or ``params``."""

    scheme: str
    token: str | None = None
    params: tuple[tuple[str, str], ...] = ()


def _cut(text: str, limit: int = 40) -> str:
    clean = "".join(c if 32 <= ord(c) < 127 else "?" for c in text[:limit])
    return clean + ("..." if len(text) > limit else "")


def _split_commas(text: str) -> list[str]:
    """Split on commas outside double quotes (RFC 7235 list syntax), dropping empty elements."""
    parts: list[str] = []
    buf: list[str] = []
    quoted = escaped = False
    for ch in text:
        if escaped:
            buf.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            buf.append(ch)
            escaped = True
        elif ch == '"':
            buf.append(ch)
            quoted = not quoted
        elif ch == "," and not quoted:
            parts.append("".join(buf).strip())
            buf = []
        else:
            buf.append(ch)
    parts.append("".join(buf).strip())
    return [p for p in parts if p]


def _param(text: str) -> tuple[str, str] | None:
    name, eq, value = text.partition("=")
    name = name.strip()
    if not eq or not _TOKEN_RE.match(name):
        return None
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = re.sub(r"\\(.)", r"\1", value[1:-1])
    return name.lower(), value


def parse_challenges(values: Sequence[str]) -> list[Challenge]:
    """Parse ``Proxy-Authenticate`` header values (each may hold several challenges) into ``Challenge``s.

    Lenient: an element that is neither a challenge nor an auth-param is skipped; at most
    ``MAX_CHALLENGE_CHARS`` characters and 32 challenges are looked at. Never raises.
    """
    out: list[Challenge] = []
    budget = MAX_CHALLENGE_CHARS
    for raw in values:
        if budget <= 0 or len(out) >= _MAX_CHALLENGES:
            break
        text = raw[:budget]
        budget -= len(text)
        current: dict[str, Any] | None = None
        for element in _split_commas(text):
            head, _, rest = element.partition(" ")
            rest = rest.strip()
            starts_challenge = _TOKEN_RE.match(head) is not None and "=" not in head
            if starts_challenge:
                if current is not None:
                    out.append(Challenge(**current))
                current = {"scheme": head.lower(), "token": None, "params": ()}
                if rest:
                    param = _param(rest)
                    if param is not None and not re.fullmatch(r"[A-Za-z0-9._~+/-]+=*", rest):
                        current["params"] = (param,)
                    elif re.fullmatch(r"[A-Za-z0-9._~+/-]+=*", rest):
                        current["token"] = rest
                    else:
                        current = None  # garbage after the scheme name: skip this challenge
            elif current is not None:
                param = _param(element)
                if param is not None:
                    current["params"] = (*current["params"], param)
            if len(out) >= _MAX_CHALLENGES:
                break
        if current is not None and len(out) < _MAX_CHALLENGES:
            out.append(Challenge(**current))
    return out


class ProxyAuthenticator:
    """Answers a proxy's 407 challenges on ONE connection (NTLM and Negotiate are connection-bound).

    Use: send ``initial()`` (if not None) as ``Proxy-Authorization`` on the first request; on each 407 call
    ``respond(values)`` with the response's ``Proxy-Authenticate`` values and resend the (bodiless) request
    with the returned value on the SAME connection; on the first answer that is not a 407 call ``done()``.
    After ``done()``, ``initial()`` returns the value every further request on that connection must carry
    (Basic sends it each time; NTLM/Negotiate need nothing more: the connection is authenticated).

    ``prefer`` names a scheme already known to work with this proxy (learned on an earlier connection): with
    ``"basic"``, ``initial()`` sends the credentials at once and saves a round trip.

    Error handling: ``respond`` raises ``AuthUnsupported`` or ``AuthFailed`` (see the module docstring); it
    never loops: a refused answer, a handshake longer than ``MAX_ROUNDS`` or more than ``MAX_HANDSHAKES``
    handshakes raise.
    """

    def __init__(
        self, credentials: ProxyCredentials | None, *, proxy_host: str, prefer: str | None = None
    ) -> None:
        self._creds = credentials
        self._host = proxy_host
        self.scheme: str | None = None
        self._rounds = 0
        self._handshakes = 0
        self._complete = False
        self._ctx: Any = None  # a pyspnego NTLM context while an NTLM/Negotiate handshake runs
        if prefer is not None and prefer not in _SCHEMES:
            raise ValueError(f"prefer={prefer!r}: not one of {', '.join(_SCHEMES)}")
        self._prefer = prefer if credentials is not None else None

    def __repr__(self) -> str:
        return (f"ProxyAuthenticator(proxy_host={self._host!r}, scheme={self.scheme!r}, "
                f"user={self._creds.account if self._creds else None!r}, complete={self._complete})")

    # ------------------------------------------------------------------------------------------ public

    def initial(self) -> str | None:
        """The ``Proxy-Authorization`` value for the next request before any 407 (None: send none)."""
        if self._creds is None:
            return None
        if self.scheme == "basic" and self._complete:
            return self._basic()
        if self.scheme is None and self._prefer == "basic":
            self.scheme = "basic"
            self._handshakes = 1
            self._rounds = 1
            return self._basic()
        return None

    def respond(self, challenges: Sequence[str]) -> str:
        """The next ``Proxy-Authorization`` value for a 407 carrying these ``Proxy-Authenticate`` values."""
        parsed = parse_challenges(challenges)
        offered = [c.scheme for c in parsed]
        offer_text = ", ".join(dict.fromkeys(_cut(s, 20) for s in offered)) or "nothing"
        if self._creds is None:
            raise AuthUnsupported(
                f"proxy {self._host} requires authentication (offers {offer_text}) and no credentials are "
                "configured: give them in the proxy URL or with --proxy-user and --proxy-password-file"
            )
        if self._complete:  # the proxy asks again on an authenticated connection: start over (bounded)
            self._complete = False
            self._rounds = 0
            self._ctx = None
            if self.scheme == "basic":
                raise AuthFailed(f"proxy {self._host} refused Basic credentials for user "
                                 f"'{self._creds.account}' (407 after they were accepted)")
        if self.scheme is None or self._rounds == 0:
            self._handshakes += 1
            if self._handshakes > MAX_HANDSHAKES:
                raise AuthFailed(f"proxy {self._host} asked for {self.scheme or 'authentication'} "
                                 f"{self._handshakes} times on one connection (limit {MAX_HANDSHAKES}): "
                                 "a 407 loop")
        if self.scheme is None:
            self.scheme = self._choose(offered, offer_text)
        self._rounds += 1
        if self._rounds > MAX_ROUNDS:
            raise AuthFailed(f"proxy {self._host} still answers 407 after {MAX_ROUNDS} rounds of "
                             f"{self.scheme} for user '{self._creds.account}': a 407 loop")
        mine = [c for c in parsed if c.scheme == self.scheme]
        if not mine:
            raise AuthFailed(f"proxy {self._host} stopped offering {self.scheme} mid-handshake "
                             f"(now offers {offer_text})")
        if self.scheme == "basic":
            if self._rounds > 1:
                raise AuthFailed(f"proxy {self._host} refused Basic credentials for user "
                                 f"'{self._creds.account}'")
            return self._basic()
        return self._step(mine)

    def done(self) -> None:
        """A non-407 answer arrived on this connection: the handshake (if any) is complete."""
        if self.scheme is not None:
            self._complete = True
            self._rounds = 0
            self._ctx = None

    # ------------------------------------------------------------------------------------------ private

    def _choose(self, offered: list[str], offer_text: str) -> str:
        if self._prefer in offered:
            return str(self._prefer)
        for scheme in _SCHEMES:
            if scheme in offered:
                return scheme
        raise AuthUnsupported(f"proxy {self._host} offers only {offer_text}; "
                              "supported: NTLM, Negotiate, Basic")

    def _basic(self) -> str:
        assert self._creds is not None
        raw = f"{self._creds.account}:{self._creds.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def _label(self) -> str:
        return "NTLM" if self.scheme == "ntlm" else "Negotiate"

    def _new_context(self) -> Any:
        import spnego  # imported here: only NTLM/Negotiate proxies pay for it

        assert self._creds is not None
        return spnego.client(self._creds.account, self._creds.password, hostname=self._host,
                             service="HTTP", protocol="ntlm", options=spnego.NegotiateOptions.use_ntlm)

    def _step(self, mine: list[Challenge]) -> str:
        from spnego.exceptions import SpnegoError

        assert self._creds is not None
        token_text = next((c.token for c in mine if c.token), None)
        label = self._label()
        try:
            if token_text is None:
                if self._ctx is not None:  # a bare challenge after we sent a token: refused
                    raise AuthFailed(f"proxy {self._host} refused {label} credentials for user "
                                     f"'{self._creds.account}'")
                self._ctx = self._new_context()
                out = self._ctx.step()
            else:
                if self._ctx is None:
                    raise AuthFailed(f"proxy {self._host} sent a {label} challenge token before we started "
                                     f"the handshake ({len(token_text)} characters)")
                if self._ctx.complete:
                    raise AuthFailed(f"proxy {self._host} sent another {label} token after the handshake "
                                     f"completed: credentials for user '{self._creds.account}' refused")
                try:
                    in_token = base64.b64decode(token_text, validate=True)
                except (binascii.Error, ValueError):
                    raise AuthFailed(f"proxy {self._host} sent a {label} challenge that is not base64: "
                                     f"{_cut(token_text)!r}") from None
                out = self._ctx.step(in_token)
        except SpnegoError as exc:
            raise AuthFailed(f"proxy {self._host}: {label} message rejected by pyspnego: "
                             f"{_cut(str(exc), 120)}") from None
        except (ValueError, IndexError, KeyError, TypeError, OverflowError) as exc:
            # pyspnego's NTLM parser raises plain errors on truncated or malformed messages
            raise AuthFailed(f"proxy {self._host} sent a malformed {label} challenge "
                             f"({type(exc).__name__}: {_cut(str(exc), 80)})") from None
        if not out:
            raise AuthFailed(f"proxy {self._host}: {label} handshake produced no token to send")
        return f"{label} " + base64.b64encode(out).decode("ascii")
