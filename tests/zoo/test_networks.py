"""Self-tests of the zoo: each hostile network behaves as it claims, checked with curl (and, for the proxy
logins, with the agent's ``ProxyAuthenticator`` against squid's own helpers) before any agent is put in it."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
import spnego

from flowtunnel.agent.proxy.auth import AuthFailed, ProxyAuthenticator, ProxyCredentials
from flowtunnel.agent.proxy.discover import evaluate_pac
from tests.linkemu import ThreadedLink
from tests.zoo import netns
from tests.zoo.certs import self_signed
from tests.zoo.mitm import Mitmdump
from tests.zoo.rawhttp import request_via_proxy
from tests.zoo.servers import CaptivePortal, HostileProxy, Origin
from tests.zoo.squid import (
    BASIC,
    BODY_64K,
    HELPERS,
    NEGOTIATE,
    NO_BATCH_TYPE,
    NO_OCTET,
    NO_POST,
    NTLM_443,
    UPGRADE_ALLOWED,
    UPGRADE_STRIPPED,
    Squid,
    SquidNetwork,
    squid_binary,
)
from tests.zoo.zoo import SATELLITE, pac_for, require_mitmproxy, require_netns, require_squid

CREDS = ProxyCredentials(username="alice", password="zoo-pass", domain="CORP")


def curl(*args: str, prefix: Sequence[str] = ()) -> tuple[int, str]:
    """``curl -s -o /dev/null -w '%{http_code} %{http_connect}'`` → (exit code, 'code connect')."""
    out = subprocess.run([*prefix, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{http_connect}",
                          "--max-time", "20", *args], capture_output=True, text=True, timeout=60, check=False)
    return out.returncode, out.stdout.strip()


def curl_body(*args: str) -> dict[str, object]:
    out = subprocess.run(["curl", "-s", "--max-time", "20", *args], capture_output=True, text=True,
                         timeout=60, check=True)
    doc: dict[str, object] = json.loads(out.stdout)
    return doc


@pytest.fixture(autouse=True)
def _squid_installed() -> None:
    require_squid()


def test_squid_helpers_are_where_the_profiles_say() -> None:
    assert squid_binary() is not None
    for helper in ("ntlm_fake_auth", "basic_fake_auth", "negotiate_wrapper_auth", "negotiate_kerberos_auth"):
        assert (HELPERS / helper).exists(), HELPERS / helper


def test_ntlm_proxy_refuses_anonymous_accepts_ntlm_and_connect_only_to_443() -> None:
    with Origin() as origin, Squid(NTLM_443) as sq:
        assert curl("-x", sq.url, f"{origin.url}/x") == (0, "407 000")
        login = ("--proxy-ntlm", "-U", "CORP\\alice:zoo-pass")
        assert curl("-x", sq.url, *login, f"{origin.url}/x") == (0, "200 000")
        code, text = curl("-p", "-x", sq.url, "--proxy-ntlm", "-U", "alice:pw", f"{origin.url}/x")
        assert code != 0
        assert text.endswith("403"), text  # CONNECT to a port other than 443 refused after the login
        # the agent's authenticator does the same handshake on one connection
        reply = request_via_proxy(sq.port, f"{origin.url}/x", ProxyAuthenticator(CREDS, proxy_host="sq"))
        assert (reply.status, reply.rounds) == (200, 2)
        assert "NTLM" in sq.access_log() or "alice" in sq.access_log()


def test_negotiate_proxy_takes_raw_ntlm_in_negotiate_and_refuses_spnego_wrapped() -> None:
    with Origin() as origin, Squid(NEGOTIATE) as sq:
        anon = request_via_proxy(sq.port, f"{origin.url}/x", None)
        assert anon.status == 407
        assert anon.header("Proxy-Authenticate") == ["Negotiate"]
        auth = ProxyAuthenticator(CREDS, proxy_host="sq")
        reply = request_via_proxy(sq.port, f"{origin.url}/x", auth)
        assert (reply.status, reply.rounds, auth.scheme) == (200, 2, "negotiate")
        # Why raw NTLM: an SPNEGO-wrapped token (what pyspnego's "negotiate" starts with) goes to the Kerberos
        # helper, which has no keytab here, and is refused.
        wrapped = spnego.client("alice", "zoo-pass", hostname="127.0.0.1", service="HTTP",
                                protocol="negotiate")
        value = "Negotiate " + base64.b64encode(wrapped.step() or b"").decode()
        refused = request_via_proxy(sq.port, f"{origin.url}/x", None, headers={"Proxy-Authorization": value})
        assert refused.status == 407
        assert refused.header("Proxy-Authenticate") == ["Negotiate"]


def test_basic_proxy_and_refused_login_raise_instead_of_looping() -> None:
    with Origin() as origin, Squid(BASIC) as sq:
        assert curl("-x", sq.url, f"{origin.url}/x") == (0, "407 000")
        reply = request_via_proxy(sq.port, f"{origin.url}/x", ProxyAuthenticator(CREDS, proxy_host="sq"))
        assert reply.status == 200
    # squid's fake helpers accept everyone; a proxy that keeps answering 407 is the NTLM squid asked for Basic
    with Origin() as origin, Squid(NTLM_443) as sq:
        auth = ProxyAuthenticator(CREDS, proxy_host="sq", prefer="basic")
        with pytest.raises(AuthFailed):
            request_via_proxy(sq.port, f"{origin.url}/x", auth)


def test_body_cap_answers_413_above_64_kb() -> None:
    with Origin() as origin, Squid(BODY_64K) as sq:
        small, big = "x" * 10_000, "x" * 100_000
        assert curl("-x", sq.url, "--data-binary", small, f"{origin.url}/p") == (0, "200 000")
        assert curl("-x", sq.url, "--data-binary", big, f"{origin.url}/p") == (0, "413 000")


def test_octet_stream_refused_other_types_pass() -> None:
    with Origin() as origin, Squid(NO_OCTET) as sq:
        octet = ("-H", "Content-Type: application/octet-stream")
        assert curl("-x", sq.url, *octet, "--data-binary", "abc", f"{origin.url}/p") == (0, "403 000")
        assert curl("-x", sq.url, "--data-binary", "abc", f"{origin.url}/p") == (0, "200 000")


def test_batch_type_and_octet_stream_refused_a_form_passes() -> None:
    with Origin() as origin, Squid(NO_BATCH_TYPE) as sq:
        for ctype in ("application/vnd.flowtunnel.batch", "application/octet-stream"):
            label = ("-H", f"Content-Type: {ctype}")
            assert curl("-x", sq.url, *label, "--data-binary", "abc", f"{origin.url}/p") == (0, "403 000")
        assert curl("-x", sq.url, "--data-binary", "abc", f"{origin.url}/p") == (0, "200 000")  # a form
        assert curl("-x", sq.url, f"{origin.url}/g") == (0, "200 000")


def test_post_denied_get_passes() -> None:
    with Origin() as origin, Squid(NO_POST) as sq:
        assert curl("-x", sq.url, "--data-binary", "abc", f"{origin.url}/p") == (0, "403 000")
        assert curl("-x", sq.url, f"{origin.url}/g") == (0, "200 000")


@pytest.mark.parametrize(("network", "passed"), [(UPGRADE_STRIPPED, False), (UPGRADE_ALLOWED, True)])
def test_upgrade_stripped_or_passed(network: SquidNetwork, passed: bool) -> None:
    upgrade = ("-H", "Connection: Upgrade", "-H", "Upgrade: websocket", "-H", "Sec-WebSocket-Version: 13",
               "-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")
    with Origin() as origin, Squid(network) as sq:
        echo = curl_body("-x", sq.url, *upgrade, f"{origin.url}/v1/ws")
        headers = echo["headers"]
        assert isinstance(headers, dict)
        assert (headers.get("upgrade") == "websocket") is passed


def test_captive_portal_redirects_until_it_opens() -> None:
    with Origin() as origin, CaptivePortal(("127.0.0.1", origin.port), style="redirect") as portal:
        assert curl(f"{portal.url}/v1/probe?nonce=x") == (0, "302 000")
        assert curl("--data-binary", "batch", f"{portal.url}/v1/batches") == (0, "302 000")
        assert curl(f"{portal.url}/login") == (0, "200 000")
        assert portal.body_bytes_while_closed == len("batch")
        portal.open()
        assert curl_body(f"{portal.url}/v1/probe?nonce=x")["path"] == "/v1/probe?nonce=x"


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    # curl 47: it gave up the NTLM handshake that never ends; 18: transfer closed with data outstanding
    [("garbage-407", (0, "407 000")), ("endless-407", (47, "407 000")), ("not-an-ack", (0, "200 000")),
     ("cut", (18, "200 000"))],
)
def test_hostile_proxy_misbehaves_then_heals(behaviour: str, expected: tuple[int, str]) -> None:
    with Origin() as origin, Squid(BASIC) as sq, \
            HostileProxy(("127.0.0.1", sq.port), behaviour=behaviour) as hostile:
        login = ("-U", "alice:pw", "--proxy-anyauth") if behaviour == "endless-407" else ("-U", "alice:pw")
        assert curl("-x", hostile.url, *login, f"{origin.url}/x") == expected
        assert hostile.requests_while_closed
        hostile.open()
        assert curl("-x", hostile.url, "-U", "alice:pw", f"{origin.url}/x") == (0, "200 000")


def test_pac_served_on_loopback_names_the_proxy() -> None:
    with Squid(BASIC) as sq, Origin(pac_for(sq.port)) as pacs:
        out = subprocess.run(["curl", "-s", f"{pacs.url}/proxy.pac"], capture_output=True, text=True,
                             check=True)
        assert f"127.0.0.1:{sq.port}" in out.stdout
        result = asyncio.run(evaluate_pac(out.stdout, "http://127.0.0.1:9/v1/batches"))
        assert result.startswith(f"PROXY 127.0.0.1:{sq.port}")


def test_tls_intercepting_proxy_resigns_with_its_own_ca(tmp_path: Path) -> None:
    require_mitmproxy()
    cert = self_signed(tmp_path)
    with Origin(tls=(cert.cert, cert.key)) as origin, Mitmdump() as mitm:
        # the real certificate verifies directly, and through the proxy only with the proxy's CA
        assert curl("--cacert", str(cert.cert), f"{origin.url}/x") == (0, "200 000")
        assert curl("-x", mitm.url, "--cacert", str(cert.cert), f"{origin.url}/x")[0] == 60  # bad cert
        out = subprocess.run(["curl", "-sv", "-o", "/dev/null", "-x", mitm.url, "--cacert", str(mitm.ca_pem),
                              f"{origin.url}/x"], capture_output=True, text=True, timeout=60, check=True)
        assert "issuer: CN=mitmproxy" in out.stderr


def test_isolated_network_reaches_only_what_is_exposed() -> None:
    require_netns()
    with Origin() as origin, Squid(BASIC) as sq, \
            netns.IsolatedNet(expose={sq.port: sq.port}) as net:
        code, _ = curl(f"{origin.url}/x", prefix=net.command([]))
        assert code == 7  # connection refused: nothing listens on the origin's port inside
        assert curl("-x", sq.url, "-U", "a:b", f"{origin.url}/x", prefix=net.command([])) == (0, "200 000")


def test_satellite_link_in_front_of_a_proxy_still_carries_requests() -> None:
    with Origin() as origin, Squid(BASIC) as sq, \
            ThreadedLink(upstream=("127.0.0.1", sq.port), http=False, up=SATELLITE, down=SATELLITE) as link:
        assert curl("-x", link.url, "-U", "a:b", f"{origin.url}/x") == (0, "200 000")
        assert link.stats().bytes_to_server > 0
