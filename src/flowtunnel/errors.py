"""Errors shared by every part of flowtunnel.

    FlowtunnelError
    ├── ConfigError            bad flag, env var or config file value (the caller's fault)
    └── (per boundary)         netflow.ProtocolError, wire.WireError, log.LogError, ...
"""

from __future__ import annotations

__all__ = ["ConfigError", "FlowtunnelError"]


class FlowtunnelError(Exception):
    """Base of every error flowtunnel raises on purpose."""


class ConfigError(FlowtunnelError):
    """A configuration value is missing or invalid; the message names the key, the value and the rule."""
