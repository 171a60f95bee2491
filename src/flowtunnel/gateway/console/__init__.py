"""The operator's console served by the gateway at ``/console``, and operator access to ``/metrics`` and
``/v1/status`` (docs/console.md, docs/security.md "Operator console").

``auth`` holds the token, sessions and CSRF checks; ``data`` builds the answers (gateway status + the store's
query path); ``routes`` the aiohttp handlers; ``static/`` the pages, scripts and the vendored uPlot.
"""

from __future__ import annotations

from flowtunnel.gateway.console.auth import OperatorAuth, generate_token, read_token_file, write_token_file
from flowtunnel.gateway.console.data import AgentThresholds, ConsoleData, RateHistory
from flowtunnel.gateway.console.routes import (
    Console,
    GuardSettings,
    add_console,
    guard_middleware,
    operator_access,
)

__all__ = [
    "AgentThresholds",
    "Console",
    "ConsoleData",
    "GuardSettings",
    "OperatorAuth",
    "RateHistory",
    "add_console",
    "generate_token",
    "guard_middleware",
    "operator_access",
    "read_token_file",
    "write_token_file",
]
