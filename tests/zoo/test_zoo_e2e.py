"""The agent gets out of every zoo network: started as a user would (the gateway URL, and ``--proxy auto`` or
the proxy's URL with credentials; nothing about rungs), inside a network namespace whose only way out is the
network under test. Each scenario checks that the gateway's journal holds exactly every datagram sent, in
order, that ``status`` names the rung, and records the time to the first acknowledged batch.

Every network here is crossed (a network the agent cannot cross would be marked ``xfail(strict=True)`` with
the capability it waits for, so the marker must go the moment it passes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.linkemu import ThreadedLink
from tests.peers import free_tcp_port
from tests.zoo.agentrun import ZooAgent, run_zoo, status_text
from tests.zoo.certs import self_signed
from tests.zoo.mitm import Mitmdump
from tests.zoo.servers import CaptivePortal, HostileProxy, Origin
from tests.zoo.squid import (
    BASIC,
    BODY_64K,
    NEGOTIATE,
    NO_BATCH_TYPE,
    NO_OCTET,
    NO_POST,
    NTLM_443,
    UPGRADE_ALLOWED,
    UPGRADE_STRIPPED,
    Squid,
    SquidNetwork,
)
from tests.zoo.zoo import SATELLITE, pac_for, require_mitmproxy, require_netns, require_squid

Capture = tuple[Path, list[bytes]]
USER, DOMAIN, PASSWORD = "alice", "CORP", "zoo-pass"
CREDS_URL = f"{DOMAIN}%5C{USER}:{PASSWORD}"



@pytest.fixture(autouse=True)
def _zoo_tools() -> None:
    require_squid()
    require_netns()


def _password_file(tmp_path: Path) -> Path:
    f = tmp_path / "proxy-password"
    f.write_text(PASSWORD + "\n")
    f.chmod(0o600)
    return f


def _through(sq: Squid) -> dict[int, int]:
    """Inside the agent's network, only the proxy's port leads anywhere."""
    return {sq.port: sq.port}


def _logged_in(sq: Squid) -> bool:
    """squid demanded a login (407) and then forwarded requests carrying an accepted one."""
    entries = sq.requests()
    return any(e.status == 407 for e in entries) and any(e.status == 200 and e.user != "-" for e in entries)


def _assert_common(status: dict[str, object], log: str) -> None:
    assert PASSWORD not in log
    assert PASSWORD not in status_text(status)


def test_ntlm_proxy_connect_only_to_443(tmp_path: Path, v9_capture: Capture) -> None:
    with Squid(NTLM_443) as sq:
        result = run_zoo(tmp_path, "ntlm-connect-443", v9_capture, expose=_through(sq),
                         agent_flags=lambda gw: ["--proxy", f"http://{CREDS_URL}@127.0.0.1:{sq.port}"])
        assert result.rung is not None
        assert _logged_in(sq)
    _assert_common(result.status, result.agent_log)


def test_negotiate_proxy_from_the_environment(tmp_path: Path, v9_capture: Capture) -> None:
    pw = _password_file(tmp_path)
    with Squid(NEGOTIATE) as sq:
        result = run_zoo(
            tmp_path, "negotiate", v9_capture, expose=_through(sq),
            env={"HTTP_PROXY": sq.url, "HTTPS_PROXY": sq.url},
            agent_flags=lambda gw: ["--proxy", "auto", "--proxy-user", f"{DOMAIN}\\{USER}",
                                    "--proxy-password-file", str(pw)],
        )
        assert result.rung is not None
        assert _logged_in(sq)
    _assert_common(result.status, result.agent_log)


def test_body_cap_64_kb(tmp_path: Path, v9_capture: Capture) -> None:
    with Squid(BODY_64K) as sq:
        result = run_zoo(tmp_path, "body-64k", v9_capture, expose=_through(sq),
                         agent_flags=lambda gw: ["--proxy", sq.url])
        assert result.rung is not None


def test_octet_stream_refused(tmp_path: Path, v9_capture: Capture) -> None:
    with Squid(NO_OCTET) as sq:
        result = run_zoo(tmp_path, "no-octet-stream", v9_capture, expose=_through(sq),
                         agent_flags=lambda gw: ["--proxy", sq.url])
        assert result.rung is not None
        assert any(e.status == 200 and e.method == "POST" for e in sq.requests())


def test_batch_type_refused_the_agent_relabels_its_posts(tmp_path: Path, v9_capture: Capture) -> None:
    """squid refuses POST bodies of any type but a browser's form types (``req_mime_type``), a POST without a
    type too, but passes GETs: the agent leaves ``/v1/b`` (no type) for ``/v1/batches``, keeps the POST rung
    and labels its batches with the next type the gateway takes, says so once, shows it in status, and
    remembers it for this network."""
    with Squid(NO_BATCH_TYPE) as sq:
        result = run_zoo(tmp_path, "batch-type-refused", v9_capture, expose=_through(sq),
                         agent_flags=lambda gw: ["--proxy", sq.url])
        entries = sq.requests()
    form = "application/x-www-form-urlencoded"
    assert result.rung == "post"
    assert result.status["upload"]["content_type"] == form
    assert sum(e.method == "POST" and e.status == 403 for e in entries) >= 3  # no type, then each refused
    assert any(e.method == "POST" and e.status == 403 and e.url.endswith("/v1/b") for e in entries)
    assert any(e.method == "POST" and e.status == 200 for e in entries)
    assert result.agent_log.count(f"batches go as Content-Type {form}") == 1
    memory = json.loads((tmp_path / "spool" / "rungs.json").read_text())
    assert [v["content_type"] for v in memory.values()] == [form]


def test_post_denied(tmp_path: Path, v9_capture: Capture) -> None:
    with Squid(NO_POST) as sq:
        result = run_zoo(tmp_path, "post-denied", v9_capture, expose=_through(sq),
                         agent_flags=lambda gw: ["--proxy", sq.url])
        assert result.rung is not None
        entries = sq.requests()
        assert not any(e.method == "POST" and e.status == 200 for e in entries)
        assert any(e.method == "GET" and e.status == 200 and "/v1/g/" in e.url for e in entries)


def test_upgrade_stripped(tmp_path: Path, v9_capture: Capture) -> None:
    with Squid(UPGRADE_STRIPPED) as sq:
        result = run_zoo(tmp_path, "upgrade-stripped", v9_capture, expose=_through(sq),
                         agent_flags=lambda gw: ["--proxy", sq.url])
        assert result.rung is not None


def test_upgrade_allowed_post_denied(tmp_path: Path, v9_capture: Capture) -> None:
    with Squid(UPGRADE_ALLOWED) as sq:
        result = run_zoo(tmp_path, "upgrade-allowed", v9_capture, expose=_through(sq),
                         agent_flags=lambda gw: ["--proxy", sq.url])
        assert result.rung is not None
        assert "ws" in result.rung.lower() or "websocket" in result.rung.lower()


def test_captive_portal_opens_after_a_few_seconds(tmp_path: Path, v9_capture: Capture) -> None:
    gw_port = free_tcp_port()
    seen: list[str] = []

    def while_closed(agent: ZooAgent) -> None:
        from tests.agent.chain import wait_until

        wait_until(lambda: "portal" in status_text(agent.status()).lower(), "status names the captive portal",
                   timeout=portal.open_after or 10)
        seen.append(status_text(agent.status()))

    with CaptivePortal(("127.0.0.1", gw_port), open_after=6.0, style="redirect") as portal:
        result = run_zoo(tmp_path, "captive-portal", v9_capture, expose={gw_port: portal.port},
                         gateway_port=gw_port, agent_flags=lambda gw: [], during=while_closed)
        assert seen, "the portal was reported while it was closed"
        assert portal.requests_while_closed, "the agent did meet the portal"
        assert portal.body_bytes_while_closed == 0, "no batch body is sent to a portal"
        assert result.rung is not None
    assert "portal" in result.agent_log.lower()


def test_pac_file_served_on_loopback(tmp_path: Path, v9_capture: Capture) -> None:
    proxy = SquidNetwork(name="pac-proxy")  # no login; CONNECT only to 443
    with Squid(proxy) as sq, Origin(pac_for(sq.port)) as pacs:
        result = run_zoo(tmp_path, "pac", v9_capture, expose={sq.port: sq.port, pacs.port: pacs.port},
                         agent_flags=lambda gw: ["--proxy", "auto", "--pac", f"{pacs.url}/proxy.pac"])
        assert result.rung is not None
        assert any(e.status == 200 for e in sq.requests())


def test_pac_file_whose_first_proxy_is_down(tmp_path: Path, v9_capture: Capture) -> None:
    """``PROXY down; PROXY squid; DIRECT``: the first proxy cannot be connected to, the agent goes through
    the second (before: it used only the first route and never got out)."""
    proxy = SquidNetwork(name="pac-second")
    down = free_tcp_port()
    with Squid(proxy) as sq, Origin(pac_for(sq.port, down=(down,))) as pacs:
        result = run_zoo(tmp_path, "pac-first-down", v9_capture,
                         expose={sq.port: sq.port, pacs.port: pacs.port},
                         agent_flags=lambda gw: ["--proxy", "auto", "--pac", f"{pacs.url}/proxy.pac"])
        assert any(e.status == 200 for e in sq.requests())
    assert f"127.0.0.1:{sq.port}" in str(result.status["upload"]["route"])
    assert f"cannot connect to proxy http://127.0.0.1:{down}" in result.agent_log


def test_wpad_on_loopback(tmp_path: Path, v9_capture: Capture) -> None:
    proxy = SquidNetwork(name="wpad-proxy")
    with Squid(proxy) as sq, Origin(pac_for(sq.port)) as pacs:
        result = run_zoo(tmp_path, "wpad", v9_capture, expose={sq.port: sq.port, pacs.port: pacs.port},
                         env={"FLOWTUNNEL_WPAD_URL": f"{pacs.url}/wpad.dat"},
                         agent_flags=lambda gw: ["--proxy", "auto"])
        assert result.rung is not None
        assert any(e.status == 200 for e in sq.requests())


def test_tls_intercepting_proxy_is_reported_and_crossed(tmp_path: Path, v9_capture: Capture) -> None:
    require_mitmproxy()
    cert = self_signed(tmp_path / "tls")
    with Mitmdump() as mitm:
        # The box trusts the corporate CA (the agent's default trust store holds it); the gateway is pinned.
        result = run_zoo(
            tmp_path, "tls-intercept", v9_capture, expose={mitm.port: mitm.port}, tls=(cert.cert, cert.key),
            env={"SSL_CERT_FILE": str(mitm.ca_pem)},
            agent_flags=lambda gw: ["--proxy", mitm.url, "--pin-sha256", cert.pin_sha256,
                                    "--on-intercept", "allow"],
        )
        text = status_text(result.status).lower()
        assert "intercept" in text
        assert "mitmproxy" in text  # the issuer is named
        assert "mitmproxy" in result.agent_log.lower()
        assert result.rung is not None


def test_satellite_link_to_an_ntlm_proxy(tmp_path: Path, v9_capture: Capture) -> None:
    with Squid(NTLM_443) as sq, ThreadedLink(upstream=("127.0.0.1", sq.port), http=False, up=SATELLITE,
                                             down=SATELLITE, seed=3) as link:
        result = run_zoo(tmp_path, "satellite-ntlm", v9_capture, expose={sq.port: link.port}, deadline=60.0,
                         agent_flags=lambda gw: ["--proxy", f"http://{CREDS_URL}@127.0.0.1:{sq.port}"])
        assert result.rung is not None


def test_basic_proxy_with_credentials_in_the_url(tmp_path: Path, v9_capture: Capture) -> None:
    """The control: the network the agent could always cross."""
    with Squid(BASIC) as sq:
        result = run_zoo(tmp_path, "basic", v9_capture, expose=_through(sq),
                         agent_flags=lambda gw: ["--proxy", f"http://{USER}:{PASSWORD}@127.0.0.1:{sq.port}"])
        assert result.rung is not None
        assert _logged_in(sq)
    _assert_common(result.status, result.agent_log)


@pytest.mark.parametrize("behaviour", HostileProxy.BEHAVIOURS)
def test_hostile_proxy_costs_log_lines_and_retries_never_a_loop_or_a_loss(
    tmp_path: Path, v9_capture: Capture, behaviour: str
) -> None:
    """Bad input: for 5 s the proxy answers garbage 407s, an NTLM handshake that never ends, an HTML 200
    instead of an ack, or a response cut mid-way; then it heals. Everything arrives exactly once (run_zoo
    checks the journal), the agent retried with backoff (no busy loop: a bounded number of requests) and
    said so in a bounded number of log lines, without a traceback."""
    with Squid(BASIC) as sq, HostileProxy(("127.0.0.1", sq.port), behaviour=behaviour, open_after=5.0) as bad:
        result = run_zoo(tmp_path, f"hostile-{behaviour}", v9_capture, expose={sq.port: bad.port},
                         agent_flags=lambda gw: ["--proxy", f"http://{USER}:{PASSWORD}@127.0.0.1:{sq.port}",
                                                 "--backoff-cap", "2s"])  # back soon after it heals
        met = len(bad.requests_while_closed)
        assert met > 0, "the agent met the hostile proxy"
        assert met < 200, f"{met} requests in 5 s: a loop"
    complaints = [line for line in result.agent_log.splitlines() if " WARNING " in line or " ERROR " in line]
    assert len(complaints) < 30, "\n".join(complaints[-30:])
    assert "Traceback" not in result.agent_log
    _assert_common(result.status, result.agent_log)


def test_record_format_is_json_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/ladder.py reads the time-to-first-ack records: one JSON object per scenario."""
    from tests.zoo import agentrun

    record = tmp_path / "zoo.jsonl"
    monkeypatch.setenv("FLOWTUNNEL_ZOO_RECORD", str(record))
    agentrun._record(agentrun.ZooResult(network="n", first_ack_s=1.234, all_acked_s=2.0, datagrams=3,
                                        rung="r", status={}, agent_log=""))
    assert json.loads(record.read_text()) == {"network": "n", "first_ack_s": 1.234, "all_acked_s": 2.0,
                                               "datagrams": 3, "rung": "r"}


