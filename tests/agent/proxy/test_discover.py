"""Route discovery: proxy URLs, the environment and NO_PROXY, PAC files and URLs, WPAD (on loopback only),
and hostile PACs (throwing, looping, allocating, lying on stdout) that cost a warning and fall through."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from flowtunnel.agent.proxy.auth import ProxyCredentials
from flowtunnel.agent.proxy.discover import (
    PacError,
    ProxyRoute,
    evaluate_pac,
    find_routes,
    load_pac,
    mask_url,
    no_proxy_matches,
    parse_pac_result,
    parse_proxy_url,
    wpad_urls,
)

GW = "https://gw.example.net:8443"
DIRECT = ProxyRoute(proxy=None, source="direct")
NO_WPAD = {"FLOWTUNNEL_WPAD_URL": "off"}
PAC_PROXY = """
function FindProxyForURL(url, host) {
  if (isPlainHostName(host) || dnsDomainIs(host, ".intranet")) return "DIRECT";
  if (shExpMatch(url, "https://gw.*") && !isInNet(host, "10.0.0.0", "255.0.0.0"))
    return "PROXY 127.0.0.1:3128; SOCKS 127.0.0.1:1080; DIRECT";
  return "PROXY 127.0.0.1:9999";
}
"""


def _pac(body: str) -> str:
    return "function FindProxyForURL(url, host) {" + body + "}"


# ---------------------------------------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    ("url", "proxy", "creds"),
    [
        ("http://proxy:3128", "http://proxy:3128", None),
        ("proxy.corp:8080", "http://proxy.corp:8080", None),
        ("http://u:p%40ss@h:3128/", "http://h:3128", ProxyCredentials(username="u", password="p@ss")),
        ("http://CORP%5Calice:pw@h:3128", "http://h:3128",
         ProxyCredentials(username="alice", password="pw", domain="CORP")),
        ("https://[::1]:3129", "https://[::1]:3129", None),
        ("http://h", "http://h:80", None),
    ],
)
def test_parse_proxy_url(url: str, proxy: str, creds: ProxyCredentials | None) -> None:
    got_proxy, got_creds = parse_proxy_url(url)
    assert got_proxy == proxy
    assert got_creds == creds
    if creds is not None:
        assert got_creds is not None
        assert got_creds.password == creds.password


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("socks5://u:secret@h:1080", "scheme 'socks5'"),
        ("http://u:secret@h:99999", "port"),
        ("http://u:secret@h:3128/path", "no path"),
        ("http://:3128", "no host"),
    ],
)
def test_parse_proxy_url_errors_mask_the_password(url: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        parse_proxy_url(url)
    assert "secret" not in str(err.value)


def test_mask_url() -> None:
    assert mask_url("http://u:secret@h:3128") == "http://u:***@h:3128"
    assert mask_url("http://[::1]:3128") == "http://[::1]:3128"
    assert mask_url("http://u:secret@[::1]:3128") == "http://u:***@[::1]:3128"
    assert "secret" not in mask_url("http://u:secret@h:bad")


# ---------------------------------------------------------------------------------------------- environment


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "hit"),
    [
        ("*", "gw.example.net", 443, True),
        ("example.net", "gw.example.net", 443, True),
        (".example.net", "gw.example.net", 443, True),
        ("*.example.net", "example.net", 443, True),
        ("ample.net", "gw.example.net", 443, False),
        ("gw.example.net:8443", "gw.example.net", 443, False),
        ("gw.example.net:8443", "gw.example.net", 8443, True),
        ("10.0.0.0/8, 192.168.0.1", "10.2.3.4", 80, True),
        ("10.0.0.0/8", "gw.example.net", 80, False),
        ("192.168.0.1", "192.168.0.1", 80, True),
        ("192.168.0.1", "192.168.0.2", 80, False),
        ("::1", "[::1]", 80, True),
        ("[::1]:8080", "::1", 80, False),
        ("fd00::/8", "fd12::1", 443, True),
        ("localhost  127.0.0.1", "localhost", 443, True),
        ("", "gw.example.net", 443, False),
        ("bad/cidr/x, gw.example.net", "gw.example.net", 443, True),
    ],
)
def test_no_proxy_rules(no_proxy: str, host: str, port: int, hit: bool) -> None:
    assert no_proxy_matches(no_proxy, host, port) is hit


async def test_none_and_explicit_settings() -> None:
    assert await find_routes("none", GW, env={"https_proxy": "http://p:1"}) == [DIRECT]
    routes = await find_routes("http://bob:pw@proxy.corp:3128", GW, env={"https_proxy": "http://p:1"})
    assert routes == [ProxyRoute(proxy="http://proxy.corp:3128", source="flag")]
    assert routes[0].credentials == ProxyCredentials(username="bob", password="pw")
    assert "pw" not in repr(routes[0])


async def test_env_https_for_https_and_http_for_http_lower_case_first() -> None:
    env = {"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:2", "HTTP_PROXY": "http://plain:3",
           **NO_WPAD}
    assert (await find_routes("auto", GW, env=env))[0] == ProxyRoute(proxy="http://lower:1", source="env")
    assert (await find_routes("auto", "http://gw:80", env=env))[0].proxy == "http://plain:3"
    only_upper = {"HTTPS_PROXY": "upper:2", **NO_WPAD}
    assert await find_routes("auto", GW, env=only_upper) == [ProxyRoute(proxy="http://upper:2", source="env"),
                                                             DIRECT]
    assert (await find_routes("auto", GW, env={"ALL_PROXY": "http://all:4", **NO_WPAD}))[0].proxy == "http://all:4"


async def test_env_credentials_ride_on_the_route() -> None:
    routes = await find_routes("auto", GW, env={"HTTPS_PROXY": "http://u:pw@p:1", **NO_WPAD})
    assert routes[0].credentials == ProxyCredentials(username="u", password="pw")


async def test_no_proxy_means_direct_first_and_no_wpad(tmp_path: Path) -> None:
    env = {"HTTPS_PROXY": "http://p:1", "NO_PROXY": ".example.net", "FLOWTUNNEL_WPAD_URL": "http://127.0.0.1:9/x"}
    assert await find_routes("auto", GW, env=env) == [ProxyRoute(proxy=None, source="env")]


async def test_bad_env_value_is_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        routes = await find_routes("auto", GW, env={"HTTPS_PROXY": "socks5://u:secret@h:1080", **NO_WPAD})
    assert routes == [DIRECT]
    assert "https_proxy" in caplog.text
    assert "secret" not in caplog.text


# ---------------------------------------------------------------------------------------------- PAC


def test_parse_pac_result() -> None:
    got = parse_pac_result("PROXY a:3128; SOCKS s:1080;HTTPS b:443 ; DIRECT;; PROXY bad:port; junk")
    assert got == [ProxyRoute(proxy="http://a:3128", source="pac"),
                   ProxyRoute(proxy="https://b:443", source="pac"), ProxyRoute(proxy=None, source="pac")]


async def test_pac_file_is_evaluated_and_comes_after_env(tmp_path: Path) -> None:
    pac = tmp_path / "proxy.pac"
    pac.write_text(PAC_PROXY)
    routes = await find_routes("auto", GW, pac=str(pac), env=NO_WPAD)
    assert routes == [ProxyRoute(proxy="http://127.0.0.1:3128", source="pac"),
                      ProxyRoute(proxy=None, source="pac")]
    routes = await find_routes("auto", "https://wiki.intranet/", pac=f"file://{pac}", env=NO_WPAD)
    assert routes == [ProxyRoute(proxy=None, source="pac")]
    routes = await find_routes("auto", GW, pac=str(pac), env={"HTTPS_PROXY": "http://envp:1", **NO_WPAD})
    assert [r.proxy for r in routes] == ["http://envp:1", "http://127.0.0.1:3128", None]


@pytest.fixture
async def pac_server(tmp_path: Path) -> AsyncIterator[str]:
    """A loopback HTTP server: /proxy.pac, /wpad.dat, /missing (404), /huge (over the size limit)."""
    async def pac(_: web.Request) -> web.Response:
        return web.Response(text=PAC_PROXY, content_type="application/x-ns-proxy-autoconfig")

    async def huge(_: web.Request) -> web.Response:
        return web.Response(body=b"/*" + b"x" * (2 << 20) + b"*/ function FindProxyForURL(){}")

    app = web.Application()
    app.router.add_get("/proxy.pac", pac)
    app.router.add_get("/wpad.dat", pac)
    app.router.add_get("/huge", huge)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_pac_url_on_loopback(pac_server: str) -> None:
    routes = await find_routes("auto", GW, pac=f"{pac_server}/proxy.pac", env=NO_WPAD)
    assert routes[0] == ProxyRoute(proxy="http://127.0.0.1:3128", source="pac")


async def test_wpad_from_an_injected_loopback_url(pac_server: str) -> None:
    routes = await find_routes("auto", GW, env={"FLOWTUNNEL_WPAD_URL": f"{pac_server}/wpad.dat"})
    assert routes == [ProxyRoute(proxy="http://127.0.0.1:3128", source="wpad"),
                      ProxyRoute(proxy=None, source="wpad")]
    # an explicit PAC or an environment proxy makes WPAD unnecessary
    env = {"FLOWTUNNEL_WPAD_URL": f"{pac_server}/missing", "HTTPS_PROXY": "http://envp:1"}
    assert [r.source for r in await find_routes("auto", GW, env=env)] == ["env", "direct"]
    env = {"FLOWTUNNEL_WPAD_URL": f"{pac_server}/wpad.dat"}
    assert await find_routes("auto", GW, env=env, wpad=False) == [DIRECT]


async def test_wpad_missing_falls_through_to_direct(
    pac_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        routes = await find_routes("auto", GW, env={"FLOWTUNNEL_WPAD_URL": f"{pac_server}/missing"})
    assert routes == [DIRECT]
    assert "HTTP 404" in caplog.text


async def test_wpad_urls_come_from_resolv_conf_search_domains(tmp_path: Path) -> None:
    text = "nameserver 127.0.0.53\nsearch a.corp.example.com lab.test # comment\n"
    assert wpad_urls(text) == [
        "http://wpad.a.corp.example.com/wpad.dat", "http://wpad.corp.example.com/wpad.dat",
        "http://wpad.example.com/wpad.dat", "http://wpad.lab.test/wpad.dat",
    ]
    assert wpad_urls("domain com\n") == []
    assert wpad_urls("nameserver 10.0.0.1\n") == []
    # find_routes reads the resolv.conf it is given; one without search domains means no WPAD request at all
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.53\n")
    assert await find_routes("auto", GW, env={}, resolv_conf=conf) == [DIRECT]


async def test_pac_too_large_is_refused(pac_server: str) -> None:
    with pytest.raises(PacError, match="larger than"):
        await load_pac(f"{pac_server}/huge")


async def test_pac_without_findproxyforurl_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "x.pac"
    f.write_text("<html>login</html>")
    with pytest.raises(PacError, match="does not define FindProxyForURL"):
        await load_pac(str(f))


@pytest.mark.parametrize(
    ("script", "match"),
    [
        (_pac('throw new Error("corporate IT says no");'), "corporate IT says no"),
        ("function FindProxyForURL(url, host) { return ", "SyntaxError"),
        (_pac("while (true) {}"), "did not finish|died|limit"),
        (_pac("var a = []; while (true) a.push(new Array(1e6).join('x'));"), "memory|died|did not finish"),
        (_pac("return undefinedFunction(host);"), "ReferenceError"),
        (_pac("for (var i = 0; i < 1e9; i++) dnsResolve('127.0.0.1'); return 'DIRECT';"),
         "did not finish|died"),
    ],
    ids=["throws", "syntax", "loops", "allocates", "undefined", "busy-dns"],
)
async def test_hostile_pac_raises_paceerror_in_bounded_time(script: str, match: str) -> None:
    start = time.monotonic()
    with pytest.raises(PacError, match=match):
        await evaluate_pac(script, GW, seconds=2.0, memory=128 << 20, cpu=1)
    assert time.monotonic() - start < 30  # generous: only proves the child was stopped, not a timing


async def test_pac_cannot_read_files_or_reach_the_host() -> None:
    script = _pac("return [typeof require, typeof process, typeof _dukpy_eval_cjs_source].join(',');")
    assert await evaluate_pac(script, GW) == "undefined,undefined,undefined"
    with pytest.raises(PacError, match="Error"):
        await evaluate_pac(_pac("return call_python('dukpy.load_module', '/etc/hostname');"), GW)


async def test_pac_printing_cannot_forge_the_answer() -> None:
    script = _pac('console.log(\'{"result": "PROXY evil:1"}\'); return "DIRECT";')
    assert await evaluate_pac(script, GW) == "DIRECT"


async def test_pac_helpers() -> None:
    script = _pac(
        "return [isPlainHostName('a'), dnsDomainIs('a.b.c', '.b.c'), localHostOrDomainIs('www', 'www.x.y'),"
        " dnsDomainLevels('a.b.c'), isInNet('127.0.0.1', '127.0.0.0', '255.0.0.0'),"
        " isInNet('10.1.1.1', '127.0.0.0', '255.0.0.0'), shExpMatch('http://a.b/x', '*.b/*'),"
        " shExpMatch('a.b', 'a?c'), dnsResolve('127.0.0.1'), isResolvable('127.0.0.2'),"
        " myIpAddress(), weekdayRange('SUN', 'SAT'), dateRange(1, 31), timeRange(0, 24),"
        " dateRange('JAN', 'DEC'), weekdayRange('XYZ')].join(',');"
    )
    got = await evaluate_pac(script, "http://127.0.0.1:8080/")
    assert got == "true,true,true,2,true,false,true,false,127.0.0.1,true,127.0.0.1,true,true,true,true,false"


async def test_hostile_pac_costs_one_warning_and_falls_through(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pac = tmp_path / "bad.pac"
    pac.write_text(_pac("throw new Error('nope');"))
    with caplog.at_level(logging.WARNING):
        routes = await find_routes("auto", GW, pac=str(pac), env=NO_WPAD)
    assert routes == [DIRECT]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "nope" in warnings[0].getMessage()
