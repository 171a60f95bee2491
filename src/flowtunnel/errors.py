"""Errors shared by every part of flowtunnel.

    FlowtunnelError
    ├── ConfigError            bad flag, env var or config file value (the caller's fault)
    └── (per boundary)         netflow.ProtocolError, wire.WireError, log.LogError, ...
"""

from __future__ import annotations

__all__ = ["ConfigError", "FlowtunnelError", "describe_failure", "describe_os_error"]


class FlowtunnelError(Exception):
    """Base of every error flowtunnel raises on purpose."""


class ConfigError(FlowtunnelError):
    """A configuration value is missing or invalid; the message names the key, the value and the rule."""


def describe_os_error(exc: OSError) -> str:
    """``OSError`` as one line for an operator: ``/var/lib/x/agent.lock: Read-only file system`` (no errno
    number, no Python quoting), or the message alone when there is no file name."""
    text = exc.strerror or str(exc) or type(exc).__name__
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    return f"{' -> '.join(names)}: {text}" if names else text


def describe_failure(exc: BaseException) -> tuple[str, bool]:
    """``(one line, expected)`` for a failure to log: an ``OSError`` (a path, a disk, a name that does not
    resolve) or an error flowtunnel raised on purpose is expected, said in one line, and needs no traceback;
    anything else is a bug, and its traceback is what a report needs."""
    if isinstance(exc, OSError):
        return describe_os_error(exc), True
    if isinstance(exc, FlowtunnelError):
        return str(exc), True
    return f"{type(exc).__name__}: {exc}", False
