"""Getting through proxies: discovery (environment, PAC, WPAD) and authentication (Basic, NTLM, Negotiate).

Both halves are small and mostly pure so the agent's transports can use them without sockets in tests:
``auth`` answers 407 challenges, ``discover`` lists the routes to try for a gateway URL.
"""

from flowtunnel.agent.proxy.auth import (
    AuthFailed,
    AuthUnsupported,
    ProxyAuthenticator,
    ProxyAuthError,
    ProxyCredentials,
)
from flowtunnel.agent.proxy.discover import (
    PacError,
    ProxyRoute,
    evaluate_pac,
    find_routes,
    mask_url,
    parse_proxy_url,
)

__all__ = [
    "AuthFailed",
    "AuthUnsupported",
    "PacError",
    "ProxyAuthError",
    "ProxyAuthenticator",
    "ProxyCredentials",
    "ProxyRoute",
    "evaluate_pac",
    "find_routes",
    "mask_url",
    "parse_proxy_url",
]
