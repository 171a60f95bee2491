"""TLS in an agent's process: Python's ``ssl`` module where the process may use it, and the rule that leaves
it out where nothing can (issue 14).

``ssl`` and OpenSSL's libssl cost an agent ~3.4 MB of its ~32 MB (libcrypto stays: ``hashlib`` and ``hmac``
load it), and asyncio imports ``ssl`` at import whatever the gateway URL. Yet an agent uses TLS only towards
an https:// gateway (proxies are spoken to in plain HTTP, an https gateway through them with CONNECT). So
``flowtunnel agent`` hides ``ssl`` (``sys.modules["ssl"] = None``: asyncio, written for Pythons built
without ``ssl``, then does without it) before asyncio loads, when ``tls_reason`` finds nothing in the command
line, the environment or the ``--config`` file that could load it: no https:// or wss:// anywhere in them,
no CA file, no pin, no proxy (a PAC file or WPAD could be fetched over https; pyspnego, for a proxy's NTLM or
Negotiate, imports ``ssl``; so do the proxy variables of the environment unless ``proxy = none``) and no
metrics endpoint (prometheus_client imports ``ssl``). The scan reads every source, whichever wins, so it errs
towards loading ``ssl``. If TLS is needed all the same, ``ssl_module`` says so in one line
(``TlsUnavailable``): restart the agent. ``FLOWTUNNEL_SSL=load`` keeps ``ssl`` in every case.

Light on purpose (``sys``, ``os``, ``tomllib`` only): it runs before the agent's modules are imported.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from flowtunnel.errors import ConfigError

__all__ = ["TlsUnavailable", "leave_out_ssl", "ssl_module", "tls_reason"]

#: agent settings that may load ``ssl`` whatever their value (``proxy`` unless ``none``)
TLS_SETTINGS = ("ca_file", "pin_sha256", "pac", "metrics_listen")
#: the environment's proxy variables, which an agent without ``proxy = none`` reads
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy")
_URL_MARKS = ("https:", "wss:")
_ENV_PREFIX = "FLOWTUNNEL_AGENT_"


class TlsUnavailable(ConfigError):
    """TLS is needed in a process started without ``ssl`` (``leave_out_ssl``)."""


def ssl_module(why: str) -> ModuleType:
    """The ``ssl`` module, for ``why`` (e.g. "the TLS handshake with gw.example.net"); ``TlsUnavailable`` in
    a process that left it out."""
    if sys.modules.get("ssl", False) is None:
        raise TlsUnavailable(
            f"{why} needs TLS, but this agent started without it (nothing in its command line, environment "
            "or config file named an https:// URL, a CA file, a pin or a proxy): restart it, or set "
            "FLOWTUNNEL_SSL=load"
        )
    import ssl

    return ssl


def leave_out_ssl() -> bool:
    """Hide ``ssl`` from this process (before asyncio is imported); False if it is too late for that."""
    if "ssl" in sys.modules or "asyncio" in sys.modules:
        return False
    sys.modules["ssl"] = None  # type: ignore[assignment]  # (what importing a missing module finds)
    return True


def tls_reason(words: Sequence[str], environ: Mapping[str, str]) -> str | None:
    """Why the ``flowtunnel agent`` command ``words`` (its arguments) with ``environ`` may use TLS, or
    ``None`` when nothing in them can."""
    if environ.get("FLOWTUNNEL_SSL") == "load":
        return "FLOWTUNNEL_SSL=load"
    for word in words:
        if any(mark in word.lower() for mark in _URL_MARKS):
            return f"{word!r} on the command line"
    config: str | None = None
    proxies: list[str] = []  # every proxy setting seen: flags, environment, config file
    for i, word in enumerate(words):
        flag, eq, value = word.partition("=")
        if len(flag) < 4 or not flag.startswith("--"):
            continue
        if not eq:  # the value is the next word
            value = words[i + 1] if i + 1 < len(words) else ""
        # argparse takes a unique prefix of a flag for the flag: any prefix counts
        for name in TLS_SETTINGS:
            if f"--{name.replace('_', '-')}".startswith(flag):
                return f"--{name.replace('_', '-')} on the command line"
        if "--proxy".startswith(flag):
            proxies.append(value)
        if "--config".startswith(flag):
            config = value
    for var, value in environ.items():
        if not var.startswith(_ENV_PREFIX):
            continue
        name = var[len(_ENV_PREFIX):].lower()
        if name in TLS_SETTINGS or any(mark in value.lower() for mark in _URL_MARKS):
            return f"environment variable {var}"
        if name == "proxy":
            proxies.append(value)
    if config is not None:
        reason = _config_reason(config, proxies)
        if reason is not None:
            return reason
    if any(p.strip().lower() != "none" for p in proxies):
        return "a proxy setting"
    if not proxies and any(var.lower() in PROXY_VARS and value for var, value in environ.items()):
        return "the environment's proxy variables"
    return None


def _config_reason(path: str, proxies: list[str]) -> str | None:
    """Why the ``[agent]`` table of config file ``path`` may load ``ssl``; its proxy setting goes in
    ``proxies``."""
    import tomllib

    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return f"config file {path} (not read here)"
    agent = doc.get("agent", {})
    if not isinstance(agent, dict):
        return f"config file {path} (no [agent] table)"
    for key, value in agent.items():
        name = key.replace("-", "_")
        if name in TLS_SETTINGS or any(mark in t.lower() for t in _texts(value) for mark in _URL_MARKS):
            return f"config file {path} [agent] {key}"
        if name == "proxy":
            proxies.append(str(value))
    return None


def _texts(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [t for v in value for t in _texts(v)]
    return [str(value)]

