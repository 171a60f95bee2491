"""Shared pieces of the zoo: skip rules, the satellite link profile, and the PAC file naming a proxy."""

from __future__ import annotations

import shutil

import pytest

from tests.linkemu import Shape
from tests.zoo import netns
from tests.zoo.squid import squid_binary

__all__ = ["SATELLITE", "pac_for", "require_mitmproxy", "require_netns", "require_squid"]

SATELLITE = Shape(latency=0.3, jitter=0.03, rate_bps=1_000_000, burst=16_000)
"""One direction of a geostationary satellite hop: ~600 ms RTT with jitter, 1 Mbit/s."""


def require_squid() -> None:
    if squid_binary() is None:
        pytest.skip("squid is not installed (tools/setup-dev.sh installs it)")


def require_mitmproxy() -> None:
    if shutil.which("mitmdump") is None:
        pytest.skip("mitmproxy is not installed (tools/setup-dev.sh installs it)")


def require_netns() -> None:
    why = netns.available()
    if why is not None:
        pytest.skip(f"the zoo's isolated networks need network namespaces: {why}")


def pac_for(proxy_port: int, *, down: tuple[int, ...] = ()) -> dict[str, tuple[str, bytes]]:
    """Files for ``Origin``: /proxy.pac and /wpad.dat sending everything through 127.0.0.1:``proxy_port``
    (plain host names and the PAC server itself direct, as corporate PAC files do); ``down``: proxies named
    before it, on ports where nothing listens."""
    first = "".join(f"PROXY 127.0.0.1:{port}; " for port in down)
    pac = (
        "function FindProxyForURL(url, host) {\n"
        "  if (isPlainHostName(host) || dnsDomainIs(host, '.corp.invalid')) return 'DIRECT';\n"
        f"  return '{first}PROXY 127.0.0.1:{proxy_port}; DIRECT';\n"
        "}\n"
    ).encode()
    ctype = "application/x-ns-proxy-autoconfig"
    return {"/proxy.pac": (ctype, pac), "/wpad.dat": (ctype, pac)}
