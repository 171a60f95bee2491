"""Finding the way out: which proxies (or none) to try for the gateway URL, in order.

``--proxy auto`` means: the environment (``https_proxy``/``HTTPS_PROXY`` for an https gateway, ``http_proxy``/
``HTTP_PROXY`` for http, then ``all_proxy``; ``NO_PROXY``/``no_proxy`` exclusions), then a PAC file given
with ``--pac URL|FILE``, then WPAD (``http://wpad.<search domain>/wpad.dat`` for each domain of the ``search``
line of /etc/resolv.conf, devolved no further than two labels), then direct. ``find_routes`` returns every
candidate in that order; the transport ladder tries them.

PAC files are untrusted JavaScript: ``evaluate_pac`` runs one in a child process (``_pacworker``) that caps
its own memory and CPU time and is killed after a wall-clock timeout, so a PAC that throws, loops or
allocates without end costs one log line and the search falls through to the next source.

``FLOWTUNNEL_WPAD_URL`` (in the environment given to ``find_routes``) replaces the WPAD URLs derived from
resolv.conf with one URL, or turns WPAD off with ``off``; tests use it to keep WPAD on loopback.

Error handling: ``find_routes`` never raises for a broken environment variable, PAC or WPAD: each costs one
warning and is skipped. ``parse_proxy_url`` raises ``ValueError`` naming the (masked) URL and the rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from flowtunnel.agent.proxy.auth import ProxyCredentials

__all__ = [
    "PAC_MAX_BYTES",
    "PacError",
    "ProxyRoute",
    "env_value",
    "evaluate_pac",
    "find_routes",
    "load_pac",
    "mask_url",
    "no_proxy_matches",
    "parse_pac_result",
    "parse_proxy_url",
    "wpad_urls",
]

log = logging.getLogger(__name__)

PAC_MAX_BYTES = 1 << 20
"""Largest PAC file read (real ones are a few KiB)."""
PAC_TIMEOUT = 3.0
"""Wall-clock seconds for one PAC evaluation (child start included)."""
PAC_MEMORY = 256 << 20
"""Address-space cap of the PAC child (Python + the JS engine need ~40 MiB)."""
PAC_CPU = 2
"""CPU seconds of the PAC child."""
FETCH_TIMEOUT = 3.0
"""Seconds to fetch a PAC or WPAD file."""
_MAX_ROUTES = 16
_MAX_ANSWER = 64 * 1024
_WPAD_ENV = "FLOWTUNNEL_WPAD_URL"
_WORKER = Path(__file__).with_name("_pacworker.py")  # run as a script: imports only the stdlib and dukpy


@dataclass(frozen=True, kw_only=True)
class ProxyRoute:
    """One way out: through ``proxy`` (``http://host:port``, no credentials in it) or DIRECT (``None``).

    ``source`` says where it came from: ``flag``, ``env``, ``pac``, ``wpad`` or ``direct``. ``credentials``
    are those given in the proxy URL itself (flag or environment); the CLI's ``--proxy-user`` applies when
    they are ``None``.
    """

    proxy: str | None
    source: str
    credentials: ProxyCredentials | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.proxy or 'DIRECT'} ({self.source})"


class PacError(Exception):
    """A PAC file could not be fetched, read or evaluated (message says which and why)."""


# ---------------------------------------------------------------------------------------------- URLs


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for every log line, status field and exception)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # an unparsable URL may still hold a password: hide everything after the scheme
        scheme, sep, _ = url.partition("://")
        return f"{scheme}://***" if sep else "***"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}{port}"))


def parse_proxy_url(url: str) -> tuple[str, ProxyCredentials | None]:
    """``"http://u:p@h:3128"`` → ``("http://h:3128", ProxyCredentials(...))``.

    A URL without a scheme is taken as http (``proxy.corp:8080``); the port defaults to 80 (http) or 443
    (https). User and password are percent-decoded; ``DOMAIN\\user`` (or ``DOMAIN%5Cuser``) sets the NTLM
    domain. Raises ``ValueError`` for another scheme, a missing host, a bad port or a path.
    """
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    shown = mask_url(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"proxy {shown!r}: scheme {parts.scheme!r} is not http or https")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"proxy {shown!r}: the port is not a number in 1..65535") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"proxy {shown!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"proxy {shown!r}: a proxy URL has no path or query (http://[user:pass@]host:port)")
    port = port or (443 if parts.scheme == "https" else 80)
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    creds = None
    if parts.username:
        user = unquote(parts.username)
        domain, sep, name = user.partition("\\")
        if not sep:
            domain, name = "", user
        try:
            creds = ProxyCredentials(username=name, password=unquote(parts.password or ""), domain=domain)
        except ValueError as exc:
            raise ValueError(f"proxy {shown!r}: {exc}") from None
    return f"{parts.scheme}://{netloc}", creds


def _read_head(path: Path, limit: int) -> bytes:
    with path.open("rb") as f:
        return f.read(limit)


def _target(target_url: str) -> tuple[str, str, int]:
    parts = urlsplit(target_url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return parts.scheme, host, port or (443 if parts.scheme in ("https", "wss") else 80)


# ---------------------------------------------------------------------------------------------- environment


def no_proxy_matches(no_proxy: str, host: str, port: int) -> bool:
    """True when ``host:port`` is excluded by a ``NO_PROXY`` value.

    Entries are separated by commas or blanks. ``*`` excludes everything; a domain (``example.com``,
    ``.example.com`` or ``*.example.com``) excludes itself and its subdomains; an IP address excludes itself
    and a CIDR block (``10.0.0.0/8``, ``fd00::/8``) its addresses; ``entry:port`` (``[v6]:port``) matches that
    port only.
    """
    host = host.lower().strip("[]").rstrip(".")
    try:
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    for raw in no_proxy.replace(",", " ").split():
        entry = raw.strip().lower()
        if entry == "*":
            return True
        want_port: int | None = None
        if entry.startswith("["):  # [v6] or [v6]:port
            inner, _, rest = entry[1:].partition("]")
            entry = inner
            if rest.startswith(":") and rest[1:].isdigit():
                want_port = int(rest[1:])
        elif entry.count(":") == 1:  # host:port or v4:port (a bare v6 address has several colons)
            name, _, p = entry.partition(":")
            if p.isdigit():
                entry, want_port = name, int(p)
        if want_port is not None and want_port != port:
            continue
        if "/" in entry:
            try:
                net = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                continue
            if addr is not None and addr.version == net.version and addr in net:
                return True
            continue
        try:
            if addr is not None and ipaddress.ip_address(entry) == addr:
                return True
            ipaddress.ip_address(entry)
            continue  # an address that is not ours
        except ValueError:
            pass
        domain = entry.removeprefix("*").lstrip(".").rstrip(".")
        if domain and (host == domain or host.endswith("." + domain)):
            return True
    return False


def env_value(env: Mapping[str, str], name: str) -> str:
    """The lower-case variable first (curl's rule: upper-case HTTP_PROXY is ignored by CGI-safe clients,
    but we accept it as a fallback), then the upper-case one."""
    return (env.get(name.lower()) or env.get(name.upper()) or "").strip()


def _env_route(env: Mapping[str, str], scheme: str, host: str, port: int) -> ProxyRoute | None:
    if no_proxy_matches(env_value(env, "no_proxy"), host, port):
        return ProxyRoute(proxy=None, source="env")
    name = "https_proxy" if scheme in ("https", "wss") else "http_proxy"
    value = env_value(env, name)
    if not value:
        name, value = "all_proxy", env_value(env, "all_proxy")
    if not value:
        return None
    try:
        proxy, creds = parse_proxy_url(value)
    except ValueError as exc:
        log.warning("ignoring %s: %s", name, exc)
        return None
    return ProxyRoute(proxy=proxy, source="env", credentials=creds)


# ---------------------------------------------------------------------------------------------- PAC


def parse_pac_result(text: str, *, source: str = "pac") -> list[ProxyRoute]:
    """``"PROXY a:3128; HTTPS b:443; SOCKS c:1080; DIRECT"`` → routes (SOCKS skipped: not spoken)."""
    routes: list[ProxyRoute] = []
    for item in text.split(";")[:_MAX_ROUTES]:
        words = item.split()
        if not words:
            continue
        kind = words[0].upper()
        if kind == "DIRECT":
            routes.append(ProxyRoute(proxy=None, source=source))
        elif kind in ("PROXY", "HTTP", "HTTPS") and len(words) == 2:
            scheme = "https" if kind == "HTTPS" else "http"
            try:
                proxy, _ = parse_proxy_url(f"{scheme}://{words[1]}")
            except ValueError as exc:
                log.warning("%s: skipping %r: %s", source, item.strip()[:80], exc)
                continue
            routes.append(ProxyRoute(proxy=proxy, source=source))
        else:
            log.info("%s: skipping %r (only PROXY, HTTP, HTTPS and DIRECT are spoken)",
                     source, item.strip()[:80])
    return routes


async def _fetch(url: str, *, seconds: float) -> bytes:
    """GET ``url`` straight (never through a proxy), at most ``PAC_MAX_BYTES``; raises ``PacError``."""
    import aiohttp

    try:
        async with (
            asyncio.timeout(seconds),
            aiohttp.ClientSession(trust_env=False) as session,
            session.get(url, allow_redirects=True, max_redirects=3) as resp,
        ):
            if resp.status != 200:
                raise PacError(f"{mask_url(url)} answered HTTP {resp.status}")
            body = b""
            while len(body) <= PAC_MAX_BYTES and (chunk := await resp.content.read(PAC_MAX_BYTES + 1)):
                body += chunk
    except TimeoutError:
        raise PacError(f"{mask_url(url)} did not answer within {seconds:g} s") from None
    except aiohttp.ClientError as exc:
        raise PacError(f"cannot fetch {mask_url(url)}: {type(exc).__name__}: {exc}") from None
    if len(body) > PAC_MAX_BYTES:
        raise PacError(f"{mask_url(url)} is larger than {PAC_MAX_BYTES} bytes")
    return body


async def load_pac(source: str, *, seconds: float = FETCH_TIMEOUT) -> str:
    """The PAC script from an ``http(s)://`` URL, a ``file://`` URL or a path; raises ``PacError``."""
    if source.startswith(("http://", "https://")):
        body = await _fetch(source, seconds=seconds)
    else:
        path = Path(source.removeprefix("file://"))
        try:
            body = await asyncio.to_thread(_read_head, path, PAC_MAX_BYTES + 1)
        except OSError as exc:
            raise PacError(f"cannot read PAC file {path}: {exc.strerror or exc}") from None
        if len(body) > PAC_MAX_BYTES:
            raise PacError(f"PAC file {path} is larger than {PAC_MAX_BYTES} bytes")
    text = body.decode("utf-8", errors="replace")
    if "FindProxyForURL" not in text:
        raise PacError(f"{mask_url(source)} does not define FindProxyForURL")
    return text


async def evaluate_pac(
    script: str, target_url: str, *, seconds: float = PAC_TIMEOUT, memory: int = PAC_MEMORY,
    cpu: int = PAC_CPU,
) -> str:
    """``FindProxyForURL(target_url, host)`` of ``script``, run in a bounded child; raises ``PacError``.

    Resource handling: the child caps its address space at ``memory`` bytes and its CPU at ``cpu`` seconds,
    and is killed once ``seconds`` have passed; its answer is read up to 64 KiB.
    """
    _, host, _ = _target(target_url)
    request = json.dumps({"pac": script, "url": target_url, "host": host, "memory": memory, "cpu": cpu,
                          "target": host}).encode()
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "TZ")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", str(_WORKER),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env=env,
    )
    try:
        async with asyncio.timeout(seconds):
            assert proc.stdin is not None
            assert proc.stdout is not None
            proc.stdin.write(request)
            with contextlib.suppress(ConnectionError):
                await proc.stdin.drain()
            proc.stdin.close()
            out = b""
            while len(out) <= _MAX_ANSWER and (chunk := await proc.stdout.read(_MAX_ANSWER)):
                out += chunk
            if len(out) > _MAX_ANSWER:
                raise PacError(f"PAC evaluator answered more than {_MAX_ANSWER} bytes")
            await proc.wait()
    except TimeoutError:
        raise PacError(f"PAC evaluation did not finish within {seconds:g} s (killed)") from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    try:
        answer = json.loads(out)
    except ValueError:
        raise PacError(f"PAC evaluation died (exit {proc.returncode}; a CPU limit of {cpu} s or memory limit "
                       f"of {memory >> 20} MiB ends it)") from None
    if not isinstance(answer, dict):
        raise PacError("PAC evaluator answered something that is not an object")
    if "error" in answer:
        raise PacError(f"PAC failed: {answer['error']}")
    return str(answer.get("result", ""))


async def _pac_routes(source: str, label: str, target_url: str) -> list[ProxyRoute]:
    try:
        script = await load_pac(source)
        result = await evaluate_pac(script, target_url)
    except PacError as exc:
        log.warning("%s %s skipped: %s", label, mask_url(source), exc)
        return []
    routes = parse_pac_result(result, source=label)
    log.info("%s %s: %r -> %s", label, mask_url(source), result[:200],
             ", ".join(map(str, routes)) or "nothing")
    return routes


# ---------------------------------------------------------------------------------------------- WPAD


def wpad_urls(resolv_conf: str) -> list[str]:
    """The WPAD URLs for the ``search`` (or ``domain``) names of a resolv.conf text, most specific first.

    ``search a.corp.example.com`` → ``wpad.a.corp.example.com``, ``wpad.corp.example.com``,
    ``wpad.example.com``; never ``wpad.<TLD>`` (whoever owns that name would be our proxy).
    """
    domains: list[str] = []
    for line in resolv_conf.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and words[0] in ("search", "domain"):
            domains.extend(w.lower().rstrip(".") for w in words[1:])
    urls: list[str] = []
    for domain in domains:
        labels = [x for x in domain.split(".") if x]
        while len(labels) >= 2:
            url = f"http://wpad.{'.'.join(labels)}/wpad.dat"
            if url not in urls:
                urls.append(url)
            labels = labels[1:]
    return urls[:8]


async def _wpad_routes(env: Mapping[str, str], target_url: str, resolv_conf: Path) -> list[ProxyRoute]:
    override = env.get(_WPAD_ENV)
    if override is not None:
        if override.strip().lower() in ("", "off", "none"):
            return []
        candidates = [override.strip()]
    else:
        try:
            text = await asyncio.to_thread(_read_head, resolv_conf, 64 * 1024)
            candidates = wpad_urls(text.decode(errors="replace"))
        except OSError:
            candidates = []
    for url in candidates:
        routes = await _pac_routes(url, "wpad", target_url)
        if routes:
            return routes
    return []


# ---------------------------------------------------------------------------------------------- routes


async def find_routes(
    setting: str,
    target_url: str,
    *,
    pac: str | None = None,
    env: Mapping[str, str] | None = None,
    wpad: bool = True,
    resolv_conf: Path = Path("/etc/resolv.conf"),
) -> list[ProxyRoute]:
    """The routes to try towards ``target_url``, best first, for a ``--proxy`` setting.

    ``none``: DIRECT only. A proxy URL: that proxy only (its credentials on the route). ``auto``: the
    environment's proxy (or DIRECT when ``NO_PROXY`` excludes the target), then the routes of ``pac``, then,
    when neither the environment nor ``pac`` named a proxy, WPAD's, then DIRECT; duplicates removed.

    Error handling: a bad environment value, PAC or WPAD file costs one warning and is skipped; only a
    malformed explicit proxy URL raises ``ValueError``.
    """
    env = os.environ if env is None else env
    choice = setting.strip()
    if choice.lower() == "none":
        return [ProxyRoute(proxy=None, source="direct")]
    if choice.lower() != "auto":
        proxy, creds = parse_proxy_url(choice)
        return [ProxyRoute(proxy=proxy, source="flag", credentials=creds)]
    scheme, host, port = _target(target_url)
    routes: list[ProxyRoute] = []
    env_route = _env_route(env, scheme, host, port)
    if env_route is not None:
        routes.append(env_route)
    if pac:
        routes.extend(await _pac_routes(pac, "pac", target_url))
    elif wpad and env_route is None:
        routes.extend(await _wpad_routes(env, target_url, resolv_conf))
    routes.append(ProxyRoute(proxy=None, source="direct"))
    seen: set[str | None] = set()
    unique: list[ProxyRoute] = []
    for route in routes:
        if route.proxy not in seen:
            seen.add(route.proxy)
            unique.append(route)
    return unique
