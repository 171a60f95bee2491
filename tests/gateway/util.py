"""Helpers for gateway tests: datagrams, sealed batches, enrolment, and a gateway started in-process."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from flowtunnel.datagram import Datagram
from flowtunnel.gateway import Gateway, GatewayConfig, Registry
from flowtunnel.gateway.app import BATCH_CONTENT_TYPE
from flowtunnel.log import DurableLog, Entry, LogConfig
from flowtunnel.wire import seal_batch

__all__ = [
    "BATCH_CONTENT_TYPE",
    "datagrams",
    "drained",
    "enroll",
    "journal_entries",
    "post_batch",
    "seal",
    "self_signed_cert",
    "start_gateway",
]


def datagrams(n: int, *, start: int = 0, exporter: str = "127.0.0.1", port: int = 40000) -> list[Datagram]:
    """``n`` distinct datagrams whose payload names their index (payload b"dg-<i>")."""
    return [
        Datagram(
            received_ns=1_700_000_000_000_000_000 + i,
            exporter=exporter,
            exporter_port=port,
            local_port=2055,
            payload=f"dg-{i}".encode(),
        )
        for i in range(start, start + n)
    ]


def seal(agent: str, key: bytes, first_seq: int, dgs: Sequence[Datagram]) -> bytes:
    return seal_batch(agent_id=agent, key=key, first_seq=first_seq, datagrams=dgs, nonce=os.urandom(12))


def enroll(data: Path, name: str) -> bytes:
    with Registry(data) as reg:
        return reg.enroll(name).key


async def start_gateway(data: Path, **overrides: Any) -> Gateway:
    settings: dict[str, Any] = {"listen": "127.0.0.1:0", "data": data, "store": False, "status_interval": 0.2}
    settings.update(overrides)
    gw = Gateway(GatewayConfig(**settings))
    await gw.start()
    return gw


async def post_batch(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    *,
    agent: str | None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    h = {"Content-Type": BATCH_CONTENT_TYPE}
    if agent is not None:
        h["X-Flowtunnel-Agent"] = agent
    h.update(headers or {})
    async with session.post(url + "/v1/batches", data=body, headers=h) as resp:
        doc = await resp.json(content_type=None)
        return resp.status, doc, dict(resp.headers)


async def drained(gw: Gateway, sink: str = "udp-forward") -> None:
    """Wait (20 s at most) until ``sink`` has committed its cursor up to the journal's last entry."""
    assert gw.journal is not None
    async with asyncio.timeout(20):
        while gw.journal.cursor(sink) < gw.journal.last_seq():  # noqa: ASYNC110 - state in another task's DB
            await asyncio.sleep(0.02)


def journal_entries(gw_or_path: Gateway | Path) -> list[Entry]:
    """Every entry of a gateway's journal (open one, or read a closed one from its data directory)."""
    if isinstance(gw_or_path, Gateway):
        assert gw_or_path.journal is not None
        return gw_or_path.journal.read(after=0, limit=1_000_000, max_bytes=1 << 30)
    with DurableLog(LogConfig(path=gw_or_path / "journal.sqlite")) as log:
        return log.read(after=0, limit=1_000_000, max_bytes=1 << 30)


def self_signed_cert(tmp_path: Path, *, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for ``host`` (an IP address) and its key, as PEM files in ``tmp_path``."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flowtunnel test gateway")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "gw.pem", tmp_path / "gw.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path
