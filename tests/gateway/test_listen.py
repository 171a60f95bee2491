"""``gateway --listen [http://|https://]HOST:PORT``, repeatable: one gateway on plain HTTP and on TLS at once
(a self-signed certificate made here), as a flag, a config key and an env var, with one-line errors."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from flowtunnel.config import load_settings
from flowtunnel.errors import ConfigError
from flowtunnel.gateway.config import GatewayConfig, ListenAddress, parse_listen
from flowtunnel.wire import verify_probe
from flowtunnel.wire.probe import encode_b64url
from tests.gateway.util import (
    datagrams,
    enroll,
    journal_entries,
    post_batch,
    seal,
    self_signed_cert,
    start_gateway,
)

AGENT = "site-a"


def load(tmp_path: Path, *, toml: str = "", env: dict[str, str] | None = None, **flags: Any) -> GatewayConfig:
    cfg_file = None
    if toml:
        cfg_file = tmp_path / "gw.toml"
        cfg_file.write_text(toml)
    return load_settings(GatewayConfig, section="gateway", config_file=cfg_file, env=env or {}, flags=flags)


def test_listen_addresses_take_a_scheme_and_default_to_tls_only_with_a_certificate(tmp_path: Path) -> None:
    assert parse_listen("127.0.0.1:80", tls=False) == ListenAddress(scheme="http", host="127.0.0.1", port=80)
    assert parse_listen("[::1]:443", tls=True) == ListenAddress(scheme="https", host="::1", port=443)
    assert parse_listen("HTTP://127.0.0.1:8080/", tls=True) == ListenAddress(scheme="http", host="127.0.0.1",
                                                                           port=8080)
    assert str(parse_listen("https://[::1]:8443", tls=True)) == "https://[::1]:8443"
    cert, key = self_signed_cert(tmp_path)
    cfg = load(tmp_path, data="d", env={"FLOWTUNNEL_GATEWAY_LISTEN": "http://127.0.0.1:0, https://127.0.0.1:0"},
               tls_cert=str(cert), tls_key=str(key))
    assert [str(a) for a in cfg.listen_addresses] == ["http://127.0.0.1:0", "https://127.0.0.1:0"]
    cfg = load(tmp_path, toml=f'[gateway]\ndata = "d"\ntls-cert = "{cert}"\ntls-key = "{key}"\n'
               'listen = ["127.0.0.1:8443", "http://[::1]:8080"]\n')
    assert [str(a) for a in cfg.listen_addresses] == ["https://127.0.0.1:8443", "http://[::1]:8080"]
    assert cfg.listen_host_port == ("127.0.0.1", 8443)
    assert load(tmp_path, data="d", listen=("http://127.0.0.1:1", "http://127.0.0.1:2")).listens == (
        "http://127.0.0.1:1", "http://127.0.0.1:2")


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        (("https://127.0.0.1:8443",), "is HTTPS: give tls_cert and tls_key"),
        (("ftp://127.0.0.1:21",), "scheme 'ftp' is not http or https"),
        (("http://localhost",), "listen address 'localhost' is not HOST:PORT"),
        (("http://127.0.0.1:1", "127.0.0.1:1"), "name one address twice"),
        ((), "at least one listen address is required"),
    ],
)
def test_bad_listen_addresses_are_one_line_errors(
    tmp_path: Path, listen: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(tmp_path, data="d", listen=listen)


async def test_one_gateway_serves_plain_http_and_tls_side_by_side(tmp_path: Path) -> None:
    cert, tls_key = self_signed_cert(tmp_path)
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    gw = await start_gateway(data, listen=("http://127.0.0.1:0", "https://127.0.0.1:0"), tls_cert=cert,
                             tls_key=tls_key)
    try:
        plain, tls = gw.urls
        assert plain.startswith("http://127.0.0.1:")
        assert tls.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
            status, doc, _ = await post_batch(session, plain, seal(AGENT, key, 1, datagrams(2)), agent=AGENT)
            assert (status, doc["acked"]) == (200, 2)
            body = seal(AGENT, key, 3, datagrams(1, start=2))
            status, doc, _ = await post_batch(session, tls, body, agent=AGENT)
            assert (status, doc["acked"]) == (200, 3)
            nonce = os.urandom(16)
            async with session.get(f"{tls}/v1/probe?agent={AGENT}&nonce={encode_b64url(nonce)}") as resp:
                verify_probe(key, AGENT, nonce, (await resp.json())["mac"])
            wss = tls.replace("https", "wss") + "/v1/ws"
            headers = {"X-Flowtunnel-Agent": AGENT}
            async with session.ws_connect(wss, protocols=("flowtunnel.v1",), headers=headers) as ws:
                await ws.send_bytes(seal(AGENT, key, 4, datagrams(1, start=3)))
                msg = await ws.receive(timeout=10)
                assert '"acked":4' in msg.data
            with pytest.raises(aiohttp.ClientError):  # plain HTTP spoken to the TLS port
                await post_batch(session, tls.replace("https", "http"), seal(AGENT, key, 5, datagrams(1)),
                                 agent=AGENT)
        assert [e.datagram for e in journal_entries(gw)] == datagrams(4)
    finally:
        await gw.stop()


async def test_the_command_listens_on_every_address_given(tmp_path: Path) -> None:
    cert, tls_key = self_signed_cert(tmp_path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flowtunnel", "gateway", "--data", str(tmp_path / "gw"), "--no-store",
        "--listen", "http://127.0.0.1:0", "--listen", "https://127.0.0.1:0",
        "--tls-cert", str(cert), "--tls-key", str(tls_key),
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(60):
            while b"listening on" not in (line := await proc.stderr.readline()):
                assert line, "gateway exited before listening"
        urls = re.findall(r"(https?://127\.0\.0\.1:\d+)", line.decode())
        assert [u.split(":")[0] for u in urls] == ["http", "https"]
        ctx = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
            for url in urls:
                async with session.get(url + "/healthz") as resp:
                    assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await proc.communicate()
    assert proc.returncode == 0
