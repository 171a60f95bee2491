"""The agent through a real squid: a body limit far below the agent's is found and lived with; a datagram
too large for it is counted, kept and said precisely; a refused CONNECT is said as such and the proxy
password appears nowhere (issue 15, items 1 and 2); a wrong pin is said readably (item 5)."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from flowtunnel.agent.transport import Commit
from flowtunnel.agent.transport.network import local_fingerprint
from flowtunnel.agent.uploader import CURSOR, Uploader
from flowtunnel.datagram import Datagram
from tests.agent.conftest import GatewayFactory, enroll, eventually, journal_of
from tests.agent.squid import Squid
from tests.agent.test_uploader import (
    AGENT,
    assert_exactly_once,
    config,
    datagrams,
    open_spool,
    self_signed,
    uploading,
)
from tests.conftest import require

PASSWORD = "s3cret-Pw0rd"


def everything_said(caplog: pytest.LogCaptureFixture, up: Uploader) -> str:
    """Every log line of the run (formatted, with any exception text) and the status the agent writes."""
    lines = []
    for record in caplog.records:
        lines.append(record.getMessage())
        if record.exc_info:
            lines.append(logging.Formatter().formatException(record.exc_info))
    return "\n".join(lines) + "\n" + json.dumps(up.status(), default=str)


@pytest.mark.parametrize("limit_kb", [64, 8])
async def test_a_squid_body_limit_of_64_kb_is_found_and_lived_with(
    tmp_path: Path, gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture, limit_kb: int
) -> None:
    """Before: the agent halved its limit down to 73,728 bytes, then retried the same batch every 5 minutes
    as "gateway rejected ... HTTP 413", forever. A limit of a few KB (8 KB) is found and lived with too."""
    require("squid")
    caplog.set_level(logging.INFO)
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    # Incompressible: bodies are as large as the raw data.
    sent = datagrams(1500 if limit_kb == 64 else 300, size=1000, seed=21)
    spool = open_spool(tmp_path)
    spool.append(sent)
    with Squid(body_limit_kb=limit_kb) as squid:
        async with gateway_factory(data) as gw:
            cfg = config(tmp_path, gw.url, key, proxy=squid.url)
            async with uploading(cfg, key, spool) as up:
                await eventually(lambda: spool.cursor(CURSOR) == len(sent), "delivered through squid")
                status = up.status()
                limit = status["max_body"]
                assert isinstance(limit, int)
                assert limit <= limit_kb * 1024
                assert status["body_limit_by"] == f"the proxy {squid.url}"
                assert up.stats.failures["http-413"] >= 1
            assert_exactly_once(gw, sent)
        assert "/v1/b " in squid.log_text()
    messages = [r.getMessage() for r in caplog.records]
    assert not any("gateway rejected" in m for m in messages)
    assert any(f"HTTP 413 from the proxy {squid.url}" in m and "lowering the body limit" in m
               for m in messages)
    # Remembered: the next start begins under the limit learned, without a 413.
    assert spool.get_state("body:limit") == limit
    spool.close()


@pytest.mark.parametrize("rungs", [("post",), ("post", "get")])
async def test_a_datagram_larger_than_the_proxy_limit_is_counted_kept_and_said(
    tmp_path: Path, gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture, rungs: tuple[str, ...]
) -> None:
    """POST alone cannot carry it: counted, kept, said precisely. With the GET-only rung, it goes in pieces
    and everything behind it follows."""
    require("squid")
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    before = datagrams(20, size=500, seed=22)
    huge = Datagram(received_ns=1_800_000_000_100_000_000, exporter="127.0.0.1", exporter_port=40000,
                    local_port=2055, payload=random.Random(23).randbytes(65_500))  # sealed: above 65,536
    after = datagrams(10, size=500, seed=26)
    spool = open_spool(tmp_path)
    spool.append(before)
    with Squid(body_limit_kb=64) as squid:
        async with gateway_factory(data) as gw:
            # A small limit already (as learned), so everything before the huge datagram goes in batches.
            cfg = config(tmp_path, gw.url, key, proxy=squid.url, max_body=60_000, reject_backoff=60.0,
                         rungs=rungs)
            async with uploading(cfg, key, spool) as up:
                await eventually(lambda: spool.cursor(CURSOR) == len(before), "the small ones delivered")
                spool.append([huge])
                spool.append(after)
                up.notify()
                await eventually(lambda: up.stats.oversize == 1, "the huge one counted")
                assert up.status()["oversize"] == 1
                if rungs == ("post",):
                    assert up.stats.next_attempt is not None
                else:
                    total = len(before) + 1 + len(after)
                    await eventually(lambda: spool.cursor(CURSOR) == total, "carried by the GET-only rung")
                    status = up.status()
                    assert status["rung"] == "get"
                    states = status["rungs"]
                    assert isinstance(states, dict)
                    assert states["get"] == "good"
                    assert str(states["post"]).startswith("failed: a datagram too large")
            if rungs == ("post",):
                assert_exactly_once(gw, before)
            else:
                assert_exactly_once(gw, [*before, huge, *after])
        if rungs != ("post",):
            assert "GET http://127.0.0.1" in squid.log_text()
    if rungs == ("post",):
        assert spool.stats().entries == 1 + len(after)  # kept
    seq = len(before) + 1
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(f"datagram seq {seq} seals to a body of" in m and f"the proxy {squid.url}" in m
               and "cannot go by POST" in m and "stays in the spool" in m for m in said), said
    spool.close()


async def test_a_proxy_that_refuses_post_gets_get_only_pieces(
    tmp_path: Path, gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Squid denying the POST method (and, by default, stripping Upgrade). On a network it does not know,
    the agent races its rungs: GET-only wins, the log says why the others lost, everything is delivered
    exactly once, the status names the rung. Restarted, it remembers the rung for this network. With a
    known rung that starts failing, it steps down, saying so once per switch."""
    require("squid")
    caplog.set_level(logging.INFO)
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(300, size=300, seed=27)
    spool = open_spool(tmp_path)
    spool.append(sent)
    with Squid(deny_post=True) as squid:
        async with gateway_factory(data) as gw:
            cfg = config(tmp_path, gw.url, key, proxy=squid.url, rungs=("post", "ws", "get"))
            async with uploading(cfg, key, spool) as up:
                await eventually(lambda: spool.cursor(CURSOR) == len(sent), "delivered by GET pieces")
                status = up.status()
                assert status["rung"] == "get"
                states = status["rungs"]
                assert isinstance(states, dict)
                assert states["get"] == "good"
                assert states["post"] == f"failed: the proxy {squid.url} refuses it (http-403)"
                assert "Upgrade stripped" in states["ws"]
            raced = [r.getMessage() for r in caplog.records if "the rungs raced" in r.getMessage()]
            assert len(raced) == 1
            assert "get answered first" in raced[0]
            # Restarted on the same network: the rung is remembered, no race.
            spool.append(more := datagrams(20, size=300, seed=29))
            async with uploading(cfg, key, spool) as up:
                await eventually(lambda: spool.cursor(CURSOR) == len(sent) + 20, "delivered again")
                assert up.status()["rung"] == "get"
            assert len([r for r in caplog.records if "the rungs raced" in r.getMessage()]) == 1
            assert any("using the get rung that worked here before" in r.getMessage() for r in caplog.records)
            # A memory saying POST worked here (the proxy changed its rules since): it steps down, once.
            (tmp_path / "rungs.json").write_text(json.dumps({local_fingerprint(): "post"}))
            spool.append(last := datagrams(20, size=300, seed=30))
            async with uploading(cfg, key, spool) as up:
                await eventually(lambda: spool.cursor(CURSOR) == len(sent) + 40, "delivered once more")
                assert up.status()["rung"] == "get"
                assert up.status()["switches"] == 2
            switches = [r.getMessage() for r in caplog.records if "upload rung" in r.getMessage()]
            assert switches[0] == (f"upload rung post -> ws: the proxy {squid.url} refuses it (http-403); "
                                   "retrying on ws now")
            assert switches[1].startswith("upload rung ws -> get: ")
            assert len(switches) == 2
            assert_exactly_once(gw, [*sent, *more, *last])
        assert "TCP_DENIED/403" in squid.log_text()
    spool.close()


async def test_a_refused_connect_is_said_and_the_password_appears_nowhere(
    tmp_path: Path, gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Squid's default ``http_access deny CONNECT !SSL_ports`` and a gateway on another port than 443.
    Before: ``upload failed (resync: 403, message='Forbidden', url='http://fieldbox:s3cret@127.0.0.1:3128')``."""
    require("squid")
    caplog.set_level(logging.DEBUG)
    cert, cert_key, _ = self_signed(tmp_path)
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    spool = open_spool(tmp_path)
    spool.append(datagrams(5))
    with Squid(auth=True) as squid:
        async with gateway_factory(data, tls_cert=cert, tls_key=cert_key) as gw:
            port = int(gw.url.rsplit(":", 1)[1])
            cfg = config(tmp_path, gw.url, key, proxy=squid.url_with("fieldbox", PASSWORD), ca_file=cert,
                         reject_backoff=1.0)
            async with uploading(cfg, key, spool) as up:
                await eventually(lambda: up.stats.failures["proxy-403"] >= 2, "CONNECT refused, twice")
                said = everything_said(caplog, up)
            assert journal_of(gw, AGENT) == []
        assert "TCP_DENIED/403" in squid.log_text()
    assert PASSWORD not in said
    assert f"the proxy http://127.0.0.1:{squid.port} refused CONNECT to port {port} (HTTP 403" in said
    assert "not by the gateway" in said
    assert spool.stats().entries == 5
    spool.close()


async def test_wrong_password_and_dead_proxies_never_print_the_password(
    tmp_path: Path, gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Every failure a proxy URL with credentials can meet: a proxy that is not there, one that refuses the
    login (407 loops), a plain-http gateway behind it that is down."""
    require("squid")
    caplog.set_level(logging.DEBUG)
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    spool = open_spool(tmp_path)
    spool.append(datagrams(5))
    from tests.peers import free_tcp_port

    said = []
    dead_proxy = f"http://fieldbox:{PASSWORD}@127.0.0.1:{free_tcp_port()}"
    with Squid(auth=True) as squid:
        for proxy, gateway in (
            (dead_proxy, "http://127.0.0.1:9"),
            (squid.url_with("fieldbox", PASSWORD), f"http://127.0.0.1:{free_tcp_port()}"),
        ):
            cfg = config(tmp_path, gateway, key, proxy=proxy)
            async with uploading(cfg, key, spool) as up:
                await eventually(lambda up=up: up.stats.consecutive_failures >= 2, "failures")  # type: ignore[misc]
                said.append(everything_said(caplog, up))
                said.append(repr(cfg))
    text = "\n".join(said)
    assert PASSWORD not in text
    assert "fieldbox:***@" in text
    spool.close()


async def test_a_wrong_pin_is_said_readably(
    tmp_path: Path, gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    cert, cert_key, pin = self_signed(tmp_path)
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    spool = open_spool(tmp_path)
    spool.append(datagrams(5))
    wrong = "73cb" + "0" * 60
    async with gateway_factory(data, tls_cert=cert, tls_key=cert_key) as gw:
        cfg = config(tmp_path, gw.url, key, pin_sha256=wrong)
        async with uploading(cfg, key, spool) as up:
            await eventually(lambda: up.stats.failures["tls:pin-mismatch"] >= 1, "pin refused")
            assert up.status()["intercepted_by"] is None  # a self-signed certificate: no CA the box trusts
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert f"gateway certificate sha256 {pin[:4]}… does not match --pin-sha256 73cb…" in said
    assert "issuer CN=flowtunnel test gateway" in said
    spool.close()


def intercepting_ca(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A corporate CA (PEM), and a certificate for 127.0.0.1 it signed with its key: what a TLS-intercepting
    proxy presents instead of the gateway's."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corp Interception CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = tmp_path / "corp-ca.pem", tmp_path / "mitm.crt", tmp_path / "mitm.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    return ca_path, cert_path, key_path


@pytest.mark.parametrize("policy", ["allow", "refuse"])
async def test_tls_interception_is_named_and_allowed_or_refused(
    tmp_path: Path, gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch, policy: str,
) -> None:
    """The agent pins the gateway's own certificate; the path presents one signed by a CA this box trusts
    (here: the only CA in SSL_CERT_FILE). Reported with the issuer either way; ``refuse`` sends nothing."""
    from flowtunnel.agent.transport import http11

    ca, mitm_cert, mitm_key = intercepting_ca(tmp_path)
    _, _, real_pin = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    http11._box_roots.cache_clear()
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(10, seed=24)
    spool = open_spool(tmp_path)
    spool.append(sent)
    try:
        async with gateway_factory(data, tls_cert=mitm_cert, tls_key=mitm_key) as gw:
            cfg = config(tmp_path, gw.url, key, pin_sha256=real_pin, on_intercept=policy)
            async with uploading(cfg, key, spool) as up:
                if policy == "allow":
                    await eventually(lambda: spool.cursor(CURSOR) == len(sent), "delivered, intercepted")
                else:
                    await eventually(lambda: up.stats.failures["tls:pin-mismatch"] >= 1, "refused")
                issuer = up.status()["intercepted_by"]
                assert isinstance(issuer, str)
                assert "Corp Interception CA" in issuer
            if policy == "allow":
                assert_exactly_once(gw, sent)
            else:
                assert journal_of(gw, AGENT) == []
    finally:
        http11._box_roots.cache_clear()
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert f"does not match --pin-sha256 {real_pin[:4]}…: TLS interception by CN=Corp Interception CA" in said
    spool.close()


@pytest.mark.parametrize("portal", ["login-page", "redirect"])
async def test_a_captive_portal_gets_no_batch_and_everything_goes_once_it_opens(
    tmp_path: Path, gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture, portal: str
) -> None:
    """The hotel Wi-Fi answers every request itself until someone logs in. The agent reports it once (log
    and status), sends it no batch body, keeps probing with backoff and delivers everything once it opens."""
    from tests.linkemu import Action, Fault, LinkEmulator

    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(40, seed=25)
    spool = open_spool(tmp_path)
    spool.append(sent)
    if portal == "login-page":
        answer = Fault(action=Action.ANSWER, status=200, match="GET /v1/probe", count=None,
                       body=b"<html><head><title>Hotel Wi-Fi login</title></head></html>",
                       content_type="text/html")
    else:
        answer = Fault(action=Action.ANSWER, status=302, match="GET /v1/probe", count=None,
                       body=b"", content_type="text/html")
    async with gateway_factory(data) as gw:
        host, port = gw.url.removeprefix("http://").rsplit(":", 1)
        async with LinkEmulator(upstream=(host, int(port))) as link:
            link.add_fault(answer)
            # Any batch body would be seen here (and swallowed): there must be none while the portal is up.
            link.add_fault(Fault(action=Action.ABORT_REQUEST, match="POST", count=None))
            cfg = config(tmp_path, link.url, key)
            async with uploading(cfg, key, spool) as up:
                await eventually(lambda: up.stats.failures["captive-portal"] >= 3, "probing with backoff")
                shown = up.status()["captive_portal"]
                assert isinstance(shown, str)
                assert shown.startswith("captive portal at ")
                if portal == "login-page":
                    assert shown == f"captive portal at {link.url}, login page (Hotel Wi-Fi login)"
                assert link.stats().faults.get("abort-request", 0) == 0
                assert journal_of(gw, AGENT) == []
                link.clear_faults()  # someone logged in
                await eventually(lambda: spool.cursor(CURSOR) == len(sent), "delivered once it opened")
                assert up.status()["captive_portal"] is None
            assert_exactly_once(gw, sent)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "captive portal at" in r.getMessage()]
    assert len(warnings) == 1, warnings
    spool.close()


@pytest.mark.parametrize("via", ["direct", "squid-upgrade", "older-gateway"])
async def test_the_websocket_rung_delivers_exactly_once(
    tmp_path: Path, gateway_factory: GatewayFactory, via: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches as messages on one connection: directly, and through squid allowing the WebSocket upgrade
    (``http_upgrade_request_protocols websocket allow all``), acknowledged in 26 bytes each
    (``flowtunnel.v2``); a gateway that knows only ``flowtunnel.v1`` answers in JSON, read as before."""
    if via == "older-gateway":
        import flowtunnel.gateway.ws as gateway_ws

        monkeypatch.setattr(gateway_ws, "_PROTOCOLS", ("flowtunnel.v1",))
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(500, size=300, seed=28)
    spool = open_spool(tmp_path)
    spool.append(sent[:300])
    squid = Squid(upgrade=True) if via != "direct" else None
    if squid is not None:
        require("squid")
        squid.__enter__()
    try:
        async with gateway_factory(data) as gw:
            cfg = config(tmp_path, gw.url, key, rungs=("ws",), max_batch_datagrams=50,
                         proxy=squid.url if squid is not None else None)
            async with uploading(cfg, key, spool) as up:
                await eventually(lambda: spool.cursor(CURSOR) == 300, "backlog delivered over WebSocket")
                spool.append(sent[300:])
                up.notify()
                await eventually(lambda: spool.cursor(CURSOR) == len(sent), "the rest delivered")
                assert up.status()["rung"] == "ws"
                assert up.stats.failures == {}
                assert up.stats.batches >= 10
            ws = gw.metrics.rungs["ws"]
            answers = ws["requests"] - 1  # the upgrade's 101 (< 300 bytes) and one answer per batch
            if via == "older-gateway":
                assert ws["bytes_out"] > 90 * answers, ws
            else:
                assert ws["bytes_out"] <= 300 + 26 * answers, ws
            assert_exactly_once(gw, sent)
    finally:
        if squid is not None:
            squid.__exit__(None, None, None)
    spool.close()


async def test_the_websocket_reconnects_at_once_after_the_gateway_closed_an_idle_one(
    tmp_path: Path, gateway_factory: GatewayFactory
) -> None:
    """The gateway closes a connection idle for ``ws_idle_timeout``; the next batch opens a new one at once.
    Before: within 60 s of the last probe the route counted as proven, no probe opened a connection, and the
    upgrade failed with "no live connection to hand over" until that trust ran out."""
    import asyncio

    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(40, size=300, seed=30)
    spool = open_spool(tmp_path)
    spool.append(sent[:20])
    async with gateway_factory(data, ws_idle_timeout=1.0) as gw:
        cfg = config(tmp_path, gw.url, key, rungs=("ws",))
        async with uploading(cfg, key, spool) as up:
            await eventually(lambda: spool.cursor(CURSOR) == 20, "first part delivered")
            await asyncio.sleep(1.5)  # the gateway closes the idle connection
            spool.append(sent[20:])
            up.notify()
            await eventually(lambda: spool.cursor(CURSOR) == len(sent), "second part on a new connection",
                             within=10.0)
        assert_exactly_once(gw, sent)
    spool.close()


async def test_a_binary_websocket_answer_that_is_not_an_ack_costs_a_retry_on_a_new_connection(
    tmp_path: Path, gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A binary answer of the wrong length (something on the path, or a broken gateway) is not trusted: the
    connection is dropped (later answers could not be matched to batches), the batch goes again on a new one,
    and everything arrives once."""
    import flowtunnel.gateway.ws as gateway_ws
    from flowtunnel.wire import compact_ack

    real = compact_ack
    calls = []

    def garbled(acked: int, tag: str) -> bytes:
        calls.append(acked)
        return real(acked, tag) + b"??" if len(calls) == 2 else real(acked, tag)

    monkeypatch.setattr(gateway_ws, "compact_ack", garbled)
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(200, size=300, seed=29)
    spool = open_spool(tmp_path)
    spool.append(sent)
    async with gateway_factory(data) as gw:
        cfg = config(tmp_path, gw.url, key, rungs=("ws",), max_batch_datagrams=50)
        async with uploading(cfg, key, spool) as up:
            await eventually(lambda: spool.cursor(CURSOR) == len(sent), "delivered after the bad answer")
            assert up.stats.failures == {"bad-response": 1}
        assert_exactly_once(gw, sent)
    spool.close()


async def test_one_batch_in_flight_on_three_rungs_is_stored_once(
    tmp_path: Path, gateway_factory: GatewayFactory
) -> None:
    """The same sealed batch goes at once by POST, WebSocket and GET pieces (what a switch while a batch is
    in flight amounts to): every rung gets an authentic acknowledgement, the journal holds it once."""
    import asyncio
    import os

    from flowtunnel.agent.transport import Delivery, Hints, Sent
    from flowtunnel.agent.transport.get import GetTransport
    from flowtunnel.agent.transport.post import PostTransport, make_client
    from flowtunnel.agent.transport.ws import WsTransport
    from flowtunnel.wire import seal_batch

    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = datagrams(50, seed=31)
    body = seal_batch(agent_id=AGENT, key=key, first_seq=1, datagrams=sent, nonce=os.urandom(12),
                      agent_info={"acked": 0, "spool_first": 1})
    async with gateway_factory(data, max_inflight_per_agent=3) as gw:  # all three at once
        cfg = config(tmp_path, gw.url, key)
        rungs = [kind(make_client(cfg), gw.url, agent_id=AGENT, key=key)
                 for kind in (PostTransport, WsTransport, GetTransport)]
        hints = Hints(agent_id=AGENT, backlog=0, acked=0, what="batch 1..50")
        try:
            answers = await asyncio.gather(*(rung.exchange(body, hints) for rung in rungs))
        finally:
            for rung in rungs:
                await rung.close()
        delivery = Delivery(agent_id=AGENT, key=key, max_body=1 << 20, min_body=4000, backoff_base=0.1,
                            backoff_cap=1.0, reject_backoff=60.0, wants_resync=False)
        for answer in answers:
            action = delivery.answer(Sent(nonce=body[32:44], size=len(body), first=1, last=50, datagrams=50),
                                     answer, draw=0.5)
            assert action == Commit(acked=50, resync=False), (answer, action)
        assert_exactly_once(gw, sent)
        assert gw.metrics.agents[AGENT].replayed == 2  # the two later copies: exact replays, not stored
