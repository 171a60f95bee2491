"""The gateway's HTTP ingest, over a real socket: accepted batches are journaled once, bad ones get a precise
4xx and write nothing, and the process keeps serving."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import ipaddress
import json
import logging
import os
import sqlite3
import ssl
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from flowtunnel.datagram import Datagram
from flowtunnel.gateway import Gateway, Registry
from flowtunnel.gateway.ingest import SMALL_BODY
from flowtunnel.journal import SqliteAgentJournal
from flowtunnel.log import DurableLog
from flowtunnel.wire import (
    CONTENT_TYPES,
    HEADER,
    AuthenticationFailed,
    parse_compact_ack,
    peek_header,
    seal_batch,
    verify_ack,
)
from tests.gateway.util import (
    BATCH_CONTENT_TYPE,
    datagrams,
    enroll,
    journal_entries,
    post_batch,
    seal,
    start_gateway,
)

AGENT = "site-a"


def verified(doc: dict[str, object], key: bytes, body: bytes) -> dict[str, object]:
    """``doc`` without its ``tag``, after checking the tag answers the batch ``body`` (protocol.md §7.1)."""
    rest = dict(doc)
    acked = rest["acked"]
    assert isinstance(acked, int)
    verify_ack(key, agent_id=AGENT, request_nonce=peek_header(body).nonce, acked=acked, tag=rest.pop("tag"))
    return rest


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Gateway, bytes, aiohttp.ClientSession]]:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    gw = await start_gateway(data, max_body=64 << 10, body_timeout=1.0)
    async with aiohttp.ClientSession() as session:
        yield gw, key, session
    await gw.stop()


async def test_batch_is_journaled_with_agent_seqs_and_acked(
    env: tuple[Gateway, bytes, aiohttp.ClientSession],
) -> None:
    gw, key, session = env
    dgs = datagrams(5)
    body = seal(AGENT, key, 1, dgs)
    status, doc, _ = await post_batch(
        session,
        gw.url,
        body,
        agent=AGENT,
        headers={"X-Flowtunnel-Backlog": "7", "X-Flowtunnel-Dropped": "spool_full=3"},
    )
    assert status == 200
    assert verified(doc, key, body) == {"agent": AGENT, "acked": 5, "accepted": 5, "duplicates": 0}
    entries = journal_entries(gw)
    assert [e.datagram for e in entries] == dgs
    assert [(e.stream, e.stream_seq) for e in entries] == [(AGENT, i) for i in range(1, 6)]
    assert gw.journal is not None
    assert gw.journal.get_state(f"hwm:{AGENT}") == 5
    stats = gw.metrics.agents[AGENT]
    assert (stats.backlog, stats.dropped) == (7, {"spool_full": 3})


async def test_every_listed_content_type_carries_a_batch_read_as_sealed_whatever_the_label(
    env: tuple[Gateway, bytes, aiohttp.ClientSession],
) -> None:
    """A proxy may refuse the batch type (squid's ``req_mime_type``): the agent then labels the same sealed
    body with another type from the short list (docs/protocol.md 7). The label is never parsed as its
    format: a form-urlencoded label with a body of binary and ``%`` bytes is still read as a sealed batch."""
    gw, key, session = env
    odd = b"%zz&=%" + bytes(range(256))
    dgs = [dataclasses.replace(d, payload=odd) for d in datagrams(len(CONTENT_TYPES))]
    for i, ctype in enumerate(CONTENT_TYPES):
        body = seal(AGENT, key, i + 1, [dgs[i]])
        label = ctype + ("; charset=utf-8" if ctype.endswith("urlencoded") else "")
        status, doc, _ = await post_batch(session, gw.url, body, agent=AGENT, headers={"Content-Type": label})
        assert status == 200, (ctype, doc)
        assert verified(doc, key, body)["accepted"] == 1
    assert [e.datagram for e in journal_entries(gw)] == dgs
    assert CONTENT_TYPES[0] == BATCH_CONTENT_TYPE


async def test_exact_replay_is_acknowledged_without_effect(
    env: tuple[Gateway, bytes, aiohttp.ClientSession],
) -> None:
    gw, key, session = env
    body = seal(AGENT, key, 1, datagrams(3))
    assert (await post_batch(session, gw.url, body, agent=AGENT))[0] == 200
    status, doc, _ = await post_batch(session, gw.url, body, agent=AGENT)
    assert status == 200
    assert verified(doc, key, body) == {"agent": AGENT, "acked": 3, "accepted": 0, "duplicates": 3}
    assert len(journal_entries(gw)) == 3


async def test_partial_overlap_journals_only_the_new_part(
    env: tuple[Gateway, bytes, aiohttp.ClientSession],
) -> None:
    gw, key, session = env
    dgs = datagrams(10)
    assert (await post_batch(session, gw.url, seal(AGENT, key, 1, dgs[:4]), agent=AGENT))[0] == 200
    body = seal(AGENT, key, 3, dgs[2:10])
    status, doc, _ = await post_batch(session, gw.url, body, agent=AGENT)
    assert status == 200
    assert verified(doc, key, body) == {"agent": AGENT, "acked": 10, "accepted": 6, "duplicates": 2}
    entries = journal_entries(gw)
    assert [e.datagram for e in entries] == dgs
    assert [e.stream_seq for e in entries] == list(range(1, 11))


async def test_gap_above_the_mark_is_accepted_and_counted(
    env: tuple[Gateway, bytes, aiohttp.ClientSession],
) -> None:
    gw, key, session = env
    assert (await post_batch(session, gw.url, seal(AGENT, key, 1, datagrams(2)), agent=AGENT))[0] == 200
    status, doc, _ = await post_batch(
        session, gw.url, seal(AGENT, key, 10, datagrams(2, start=9)), agent=AGENT
    )
    assert (status, doc["acked"], doc["accepted"]) == (200, 11, 2)
    assert [e.stream_seq for e in journal_entries(gw)] == [1, 2, 10, 11]
    assert gw.metrics.agents[AGENT].gap == 7
    assert 'flowtunnel_gateway_agent_gap_datagrams_total{agent="site-a"} 7.0' in gw.metrics.render().decode()


async def test_concurrent_retries_of_one_batch_are_journaled_once(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    gw = await start_gateway(data, max_inflight_per_agent=8)
    try:
        body = seal(AGENT, key, 1, datagrams(50))
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(
                *(post_batch(session, gw.url, body, agent=AGENT) for _ in range(8))
            )
        assert all(status == 200 for status, _, _ in results)
        assert sum(doc["accepted"] for _, doc, _ in results) == 50
        assert len(journal_entries(gw)) == 50
    finally:
        await gw.stop()


async def test_one_agent_id_cannot_take_every_slot(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    key_b = enroll(data, "site-b")
    gw = await start_gateway(data, max_inflight=4, max_inflight_per_agent=2)
    try:
        host, port = gw.url.removeprefix("http://").split(":")
        body = seal(AGENT, key, 1, datagrams(2))
        held = HEADER.size + len(AGENT)
        head = (
            f"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Type: {BATCH_CONTENT_TYPE}\r\n"
            f"X-Flowtunnel-Agent: {AGENT}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        writers = []
        for _ in range(2):  # someone claiming site-a's id, sending its header and then nothing
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(head + body[:held])
            writers.append(writer)
        async with asyncio.timeout(10):
            while gw.metrics.registry.get_sample_value("flowtunnel_gateway_inflight_requests") != 2:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        async with aiohttp.ClientSession() as session:
            status, doc, _ = await post_batch(session, gw.url, body, agent=AGENT)
            assert (status, doc["error"]) == (503, "busy")
            status, doc, _ = await post_batch(
                session, gw.url, seal("site-b", key_b, 1, datagrams(2)), agent="site-b"
            )
            assert (status, doc["accepted"]) == (200, 2)
        for writer in writers:
            writer.close()
            await writer.wait_closed()
    finally:
        await gw.stop()


async def test_empty_batch_resynchronises_and_state_endpoint_answers(
    env: tuple[Gateway, bytes, aiohttp.ClientSession],
) -> None:
    gw, key, session = env
    await post_batch(session, gw.url, seal(AGENT, key, 1, datagrams(4)), agent=AGENT)
    status, doc, _ = await post_batch(session, gw.url, seal(AGENT, key, 0, []), agent=AGENT)
    assert (status, doc["acked"], doc["accepted"]) == (200, 4, 0)
    empty = seal(AGENT, key, 0, [])
    token = base64.urlsafe_b64encode(empty).decode().rstrip("=")
    async with session.get(
        f"{gw.url}/v1/agents/{AGENT}/state", headers={"X-Flowtunnel-Token": token}
    ) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert verified(answer, key, empty) == {"agent": AGENT, "acked": 4}
    # The tag binds the answer to its request: it does not verify for another request's nonce, nor for
    # another acked value.
    with pytest.raises(AuthenticationFailed):
        verified(answer, key, seal(AGENT, key, 0, []))
    with pytest.raises(AuthenticationFailed):
        verified({**answer, "acked": 5}, key, empty)
    async with session.get(f"{gw.url}/v1/agents/{AGENT}/state") as resp:
        assert resp.status == 401
    other = os.urandom(32)
    bad = base64.urlsafe_b64encode(seal(AGENT, other, 0, [])).decode()
    async with session.get(f"{gw.url}/v1/agents/{AGENT}/state", headers={"X-Flowtunnel-Token": bad}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "authentication-failed"
    assert len(journal_entries(gw)) == 4


def _tamper(body: bytes) -> bytes:
    b = bytearray(body)
    b[-5] ^= 0x40
    return bytes(b)


@pytest.mark.parametrize(
    ("case", "expected_status", "expected_error"),
    [
        ("unknown agent", 401, "unknown-agent"),
        ("wrong key", 401, "authentication-failed"),
        ("tampered ciphertext", 401, "authentication-failed"),
        ("tampered header", 401, "authentication-failed"),
        ("truncated body", 400, "truncated"),
        ("garbage", 400, "bad-magic"),
        ("agent header mismatch", 400, "agent-mismatch"),
        ("agent header missing", 400, "no-agent-header"),
        ("wrong content type", 415, "content-type"),
        ("oversized declared length", 413, "too-large"),
        ("hostile agent id header", 400, "bad-magic"),
    ],
)
async def test_bad_requests_get_a_precise_4xx_and_write_nothing(
    env: tuple[Gateway, bytes, aiohttp.ClientSession], case: str, expected_status: int, expected_error: str
) -> None:
    gw, key, session = env
    good = seal(AGENT, key, 1, datagrams(3))
    agent: str | None = AGENT
    headers: dict[str, str] = {}
    if case == "unknown agent":
        body, agent = seal("stranger", key, 1, datagrams(3)), "stranger"
    elif case == "wrong key":
        body = seal(AGENT, os.urandom(32), 1, datagrams(3))
    elif case == "tampered ciphertext":
        body = _tamper(good)
    elif case == "tampered header":
        b = bytearray(good)
        b[19] ^= 0x02  # first_seq 1 -> 3: the header is authenticated as associated data
        body = bytes(b)
    elif case == "truncated body":
        body = good[: len(good) - 10]
    elif case == "garbage":
        body = os.urandom(300)
    elif case == "agent header mismatch":
        body, agent = good, "site-b"
    elif case == "agent header missing":
        body, agent = good, None
    elif case == "wrong content type":
        body, headers = good, {"Content-Type": "application/json"}
    elif case == "oversized declared length":
        body = os.urandom(65 << 10)
    else:
        body, agent = os.urandom(64), "../../etc/passwd" + "x" * 3000
    status, doc, _ = await post_batch(session, gw.url, body, agent=agent, headers=headers)
    assert (status, doc["error"]) == (expected_status, expected_error), doc
    assert doc["detail"]
    assert journal_entries(gw) == []
    assert gw.metrics.rejects_by_cause.get(expected_error) == 1
    # The gateway still serves, and the good batch still goes through.
    status, doc, _ = await post_batch(session, gw.url, good, agent=AGENT)
    assert (status, doc["accepted"]) == (200, 3)


async def test_rejections_are_counted_with_bounded_labels(
    env: tuple[Gateway, bytes, aiohttp.ClientSession],
) -> None:
    gw, key, session = env
    for i in range(5):
        await post_batch(session, gw.url, seal(f"nobody-{i}", key, 1, datagrams(1)), agent=f"nobody-{i}")
    await post_batch(session, gw.url, seal(AGENT, os.urandom(32), 1, datagrams(1)), agent=AGENT)
    text = gw.metrics.render().decode()
    assert 'flowtunnel_gateway_rejected_requests_total{agent="unknown",cause="unknown-agent"} 5.0' in text
    assert (
        'flowtunnel_gateway_rejected_requests_total{agent="site-a",cause="authentication-failed"} 1.0' in text
    )
    assert "nobody-" not in text


async def test_missing_content_length_gets_411(env: tuple[Gateway, bytes, aiohttp.ClientSession]) -> None:
    gw, key, session = env

    async def chunks() -> AsyncIterator[bytes]:
        yield seal(AGENT, key, 1, datagrams(2))

    headers = {"Content-Type": BATCH_CONTENT_TYPE, "X-Flowtunnel-Agent": AGENT}
    async with session.post(gw.url + "/v1/batches", data=chunks(), headers=headers) as resp:
        assert resp.status == 411
        assert (await resp.json())["error"] == "no-length"
    assert journal_entries(gw) == []


async def test_slow_body_is_cut_off_with_408(env: tuple[Gateway, bytes, aiohttp.ClientSession]) -> None:
    gw, key, _ = env
    host, port = gw.url.removeprefix("http://").split(":")
    body = seal(AGENT, key, 1, datagrams(2))
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (
        f"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Type: {BATCH_CONTENT_TYPE}\r\n"
        f"X-Flowtunnel-Agent: {AGENT}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    writer.write(head + body[:10])  # then never the rest (body_timeout is 1 s in this fixture)
    await writer.drain()
    async with asyncio.timeout(30):
        answer = await reader.read(4096)
    writer.close()
    await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 408")
    assert journal_entries(gw) == []


async def _exchange_raw(gw: Gateway, parts: list[bytes], pause: float = 0.0) -> bytes:
    """Send ``parts`` on one connection (``pause`` s apart) and return the start of the answer."""
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    for i, part in enumerate(parts):
        if i:
            await asyncio.sleep(pause)
        writer.write(part)
        await writer.drain()
    async with asyncio.timeout(30):
        answer = await reader.read(4096)
    writer.close()
    await writer.wait_closed()
    return answer


def _post_head(body: bytes) -> bytes:
    return (
        f"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Type: {BATCH_CONTENT_TYPE}\r\n"
        f"X-Flowtunnel-Agent: {AGENT}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()


async def test_a_body_that_came_with_its_headers_is_taken_without_timers(
    env: tuple[Gateway, bytes, aiohttp.ClientSession], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Per-request CPU (issue 16): a small batch usually arrives whole with its headers; reading it took
    two timers (header, body) and several waits. What is already there is taken at once; only a body
    still on its way is read under the timeouts (test_slow_body_is_cut_off_with_408)."""
    gw, key, _ = env
    timers: list[str] = []
    for name in ("timeout", "timeout_at"):
        real = getattr(asyncio, name)

        def counting(when: float | None, _real: Any = real, _name: str = name) -> Any:
            if sys._getframe(1).f_code.co_filename.endswith(os.path.join("gateway", "app.py")):
                timers.append(_name)
            return _real(when)

        monkeypatch.setattr(asyncio, name, counting)
    body = seal(AGENT, key, 1, datagrams(3))
    assert (await _exchange_raw(gw, [_post_head(body) + body])).startswith(b"HTTP/1.1 200")
    assert timers == []
    assert [e.stream_seq for e in journal_entries(gw)] == [1, 2, 3]
    # the same in pieces: header cut in two, then the rest of the body, each after a pause
    body = seal(AGENT, key, 4, datagrams(2))
    parts = [_post_head(body) + body[:20], body[20:40], body[40:]]
    assert (await _exchange_raw(gw, parts, pause=0.05)).startswith(b"HTTP/1.1 200")
    assert "timeout_at" in timers
    assert [e.stream_seq for e in journal_entries(gw)] == [1, 2, 3, 4, 5]


async def test_revoked_then_rotated_agent_without_restart(
    env: tuple[Gateway, bytes, aiohttp.ClientSession],
) -> None:
    gw, key, session = env
    assert (await post_batch(session, gw.url, seal(AGENT, key, 1, datagrams(1)), agent=AGENT))[0] == 200
    with Registry(gw.data_dir) as reg:
        reg.revoke(AGENT)
    await asyncio.sleep(0.15)  # the registry file is checked at most once per 0.1 s (AgentKeys)
    status, doc, _ = await post_batch(
        session, gw.url, seal(AGENT, key, 2, datagrams(1, start=1)), agent=AGENT
    )
    assert (status, doc["error"]) == (403, "revoked")
    with Registry(gw.data_dir) as reg:
        new_key = reg.enroll(AGENT, rotate=True).key
    # The new key works at once (an authentication failure re-reads the registry) ...
    status, doc, _ = await post_batch(
        session, gw.url, seal(AGENT, new_key, 2, datagrams(1, start=1)), agent=AGENT
    )
    assert (status, doc["acked"]) == (200, 2)
    # ... and the old one is refused.
    status, doc, _ = await post_batch(
        session, gw.url, seal(AGENT, key, 3, datagrams(1, start=2)), agent=AGENT
    )
    assert (status, doc["error"]) == (401, "authentication-failed")
    assert [e.stream_seq for e in journal_entries(gw)] == [1, 2]


async def test_newly_enrolled_agent_is_accepted_without_restart(
    env: tuple[Gateway, bytes, aiohttp.ClientSession],
) -> None:
    gw, _, session = env
    key_b = enroll(gw.data_dir, "site-b")
    status, doc, _ = await post_batch(session, gw.url, seal("site-b", key_b, 1, datagrams(2)), agent="site-b")
    assert (status, doc["accepted"]) == (200, 2)


async def test_journal_full_gives_503_with_retry_after_and_acks_nothing(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    gw = await start_gateway(data, journal_quota=1 << 20, journal_agent_share=1.0)
    try:
        big = [d for d in datagrams(40)]
        big = [
            type(d)(
                received_ns=d.received_ns,
                exporter=d.exporter,
                exporter_port=d.exporter_port,
                local_port=d.local_port,
                payload=os.urandom(30_000),
            )
            for d in big
        ]
        async with aiohttp.ClientSession() as session:
            status, doc, _ = await post_batch(session, gw.url, seal(AGENT, key, 1, big[:20]), agent=AGENT)
            assert status == 200
            status, doc, headers = await post_batch(
                session, gw.url, seal(AGENT, key, 21, big[20:]), agent=AGENT
            )
            assert (status, doc["error"]) == (503, "journal-full")
            assert 5 <= int(headers["Retry-After"]) <= 10  # retry_after 5, spread over [5, 10]
        assert len(journal_entries(gw)) == 20
        assert gw.journal is not None
        assert gw.journal.get_state(f"hwm:{AGENT}") == 20
    finally:
        await gw.stop()


async def test_health_metrics_and_status_endpoints(env: tuple[Gateway, bytes, aiohttp.ClientSession]) -> None:
    gw, key, session = env
    body = seal(AGENT, key, 1, datagrams(20))
    await post_batch(session, gw.url, body, agent=AGENT, headers={"X-Flowtunnel-Backlog": "12"})
    async with session.get(gw.url + "/healthz") as resp:
        assert (resp.status, await resp.json()) == (200, {"status": "ok"})
    async with session.get(gw.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    raw = sum(len(d.payload) for d in datagrams(20))
    assert 'flowtunnel_gateway_datagrams_total{agent="site-a"} 20.0' in text
    assert f'flowtunnel_gateway_http_body_bytes_total{{agent="site-a"}} {float(len(body))}' in text
    assert f'flowtunnel_gateway_datagram_bytes_total{{agent="site-a"}} {float(raw)}' in text
    assert 'flowtunnel_gateway_agent_backlog_datagrams{agent="site-a"} 12.0' in text
    assert 'flowtunnel_gateway_agent_last_seen_timestamp_seconds{agent="site-a"}' in text
    assert "flowtunnel_gateway_compression_ratio" in text
    async with session.get(gw.url + "/v1/status") as resp:
        doc = await resp.json()
    assert doc["agents"][AGENT]["acked"] == 20
    assert doc["journal"]["entries"] == 20


async def test_shutting_down_gateway_answers_503(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    gw = await start_gateway(data)
    assert gw.ingest is not None
    gw.ingest.closing = True
    async with aiohttp.ClientSession() as session:
        status, doc, headers = await post_batch(
            session, gw.url, seal(AGENT, key, 1, datagrams(1)), agent=AGENT
        )
    await gw.stop()
    assert (status, doc["error"]) == (503, "shutting-down")
    assert 5 <= int(headers["Retry-After"]) <= 10
    assert journal_entries(data) == []


async def test_hwm_survives_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    gw = await start_gateway(data)
    async with aiohttp.ClientSession() as session:
        await post_batch(session, gw.url, seal(AGENT, key, 1, datagrams(5)), agent=AGENT)
    await gw.stop()
    gw = await start_gateway(data)
    assert gw.metrics.agents[AGENT].last_seen is not None  # carried over from the last status.json
    try:
        async with aiohttp.ClientSession() as session:
            status, doc, _ = await post_batch(session, gw.url, seal(AGENT, key, 1, datagrams(6)), agent=AGENT)
        assert (status, doc["acked"], doc["accepted"], doc["duplicates"]) == (200, 6, 1, 5)
        assert [e.stream_seq for e in journal_entries(gw)] == [1, 2, 3, 4, 5, 6]
    finally:
        await gw.stop()


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import datetime as dt

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
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
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


async def test_serves_https_with_the_configured_certificate(tmp_path: Path) -> None:
    cert, key_file = _self_signed(tmp_path)
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    gw = await start_gateway(data, tls_cert=cert, tls_key=key_file)
    try:
        assert gw.url.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
            status, doc, _ = await post_batch(session, gw.url, seal(AGENT, key, 1, datagrams(2)), agent=AGENT)
            assert (status, doc["accepted"]) == (200, 2)
        async with aiohttp.ClientSession() as session:  # default trust store: the self-signed cert fails
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await post_batch(session, gw.url, seal(AGENT, key, 3, datagrams(1)), agent=AGENT)
    finally:
        await gw.stop()


async def test_decompression_bomb_is_refused_before_inflating(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    gw = await start_gateway(data, max_body=64 << 10, max_raw=256 << 10)
    try:
        zeros = [
            Datagram(
                received_ns=1, exporter="127.0.0.1", exporter_port=1, local_port=2055, payload=bytes(8000)
            )
            for _ in range(200)
        ]
        body = seal(AGENT, key, 1, zeros)
        assert len(body) < 64 << 10  # small on the wire, 1.6 MB inside
        async with aiohttp.ClientSession() as session:
            status, doc, _ = await post_batch(session, gw.url, body, agent=AGENT)
        assert (status, doc["error"]) == (413, "limit-exceeded")
        assert "exceeds max_raw 262144" in doc["detail"]
        assert journal_entries(gw) == []
    finally:
        await gw.stop()


async def test_requests_beyond_max_inflight_get_503_busy(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    gw = await start_gateway(data, max_inflight=1, max_inflight_per_agent=1, body_timeout=5.0)
    try:
        host, port = gw.url.removeprefix("http://").split(":")
        body = seal(AGENT, key, 1, datagrams(2))
        reader, writer = await asyncio.open_connection(host, int(port))
        head = (
            f"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Type: {BATCH_CONTENT_TYPE}\r\n"
            f"X-Flowtunnel-Agent: {AGENT}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        held = HEADER.size + len(AGENT)  # the batch header: enough to take a slot
        writer.write(head + body[:held])  # holds the only slot while its body trickles in
        await writer.drain()
        async with asyncio.timeout(10):
            while not gw.metrics.registry.get_sample_value("flowtunnel_gateway_inflight_requests"):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        async with aiohttp.ClientSession() as session:
            status, doc, headers = await post_batch(session, gw.url, body, agent=AGENT)
            assert (status, doc["error"]) == (503, "busy")
            assert 5 <= int(headers["Retry-After"]) <= 10
            writer.write(body[held:])
            await writer.drain()
            answer = await reader.read(4096)
            assert answer.startswith(b"HTTP/1.1 200")
            status, doc, _ = await post_batch(session, gw.url, body, agent=AGENT)
            assert (status, doc["duplicates"]) == (200, 2)
        writer.close()
        await writer.wait_closed()
    finally:
        await gw.stop()


async def test_unparseable_requests_are_counted_and_logged_once(
    env: tuple[Gateway, bytes, aiohttp.ClientSession], caplog: pytest.LogCaptureFixture
) -> None:
    gw, _, _ = env
    host, port = gw.url.removeprefix("http://").split(":")
    for _ in range(10):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING and "Content-Length" in r.getMessage()]
    assert len(noisy) == 1
    assert noisy[0].exc_info is None
    assert gw.metrics.rejects_by_cause["bad-http"] == 10


async def test_agent_that_saw_more_acknowledged_than_the_journal_holds_must_resync(tmp_path: Path) -> None:
    """The journal lost acknowledged datagrams (restored from an old backup): the agent's next batch is
    refused with 409 and the real mark, and once resynchronised its gap is counted as lost here."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    gw = await start_gateway(data)
    try:
        async with aiohttp.ClientSession() as session:
            await post_batch(session, gw.url, seal(AGENT, key, 1, datagrams(3)), agent=AGENT)
            # The agent last saw 8 acknowledged (sealed in its agent info); this journal only holds 3.
            batch = seal_info(key, 9, datagrams(2, start=8), {"acked": 8})
            status, doc, _ = await post_batch(session, gw.url, batch, agent=AGENT)
            assert (status, doc["error"], doc["acked"]) == (409, "resync", 3)
            assert len(journal_entries(gw)) == 3
            # Resynchronised, the agent now knows 3 is the mark and sends what it still has.
            batch = seal_info(key, 9, datagrams(2, start=8), {"acked": 3})
            status, doc, _ = await post_batch(session, gw.url, batch, agent=AGENT)
            assert (status, doc["acked"], doc["accepted"]) == (200, 10, 2)
            # An agent that says nothing about what it saw keeps the old behaviour.
            status, doc, _ = await post_batch(
                session, gw.url, seal(AGENT, key, 11, datagrams(1)), agent=AGENT
            )
            assert status == 200
        stats = gw.metrics.agents[AGENT]
        assert (stats.lost, stats.gap) == (5, 0)
        text = gw.metrics.render().decode()
        assert 'flowtunnel_gateway_journal_lost_datagrams_total{agent="site-a"} 5.0' in text
    finally:
        await gw.stop()


async def test_stream_frames_continue_over_http_and_a_revoked_agents_stream_is_forgotten(
    env: tuple[Gateway, bytes, aiohttp.ClientSession],
) -> None:
    """docs/protocol.md section 3.4: a start frame then its continuations are acknowledged; the stream is held
    per agent; revoking the agent drops it (its memory and any state a later key could meet)."""
    from prometheus_client import generate_latest

    from flowtunnel.wire import SealStream, seal_stream_batch

    gw, key, session = env
    sealer = SealStream(0x1234)
    for first in (1, 3, 5):
        dgs = datagrams(2, start=first - 1)
        body = seal_stream_batch(agent_id=AGENT, key=key, first_seq=first, datagrams=dgs,
                                 nonce=os.urandom(12), stream=sealer)
        status, doc, _ = await post_batch(session, gw.url, body, agent=AGENT)
        assert (status, doc["acked"]) == (200, first + 1)
    assert gw.ingest is not None
    held = gw.ingest.streams.held(AGENT)
    assert held is not None
    assert (held.stream_id, held.position) == (0x1234, 3)
    assert b"flowtunnel_gateway_compression_streams 1.0" in generate_latest(gw.metrics.registry)
    with Registry(gw.data_dir) as reg:
        reg.revoke(AGENT)
    await asyncio.sleep(0.15)  # the registry file is checked at most once per 0.1 s (AgentKeys)
    body = seal_stream_batch(agent_id=AGENT, key=key, first_seq=7, datagrams=datagrams(1, start=6),
                             nonce=os.urandom(12), stream=sealer)
    status, doc, _ = await post_batch(session, gw.url, body, agent=AGENT)
    assert (status, doc["error"]) == (403, "revoked")
    assert gw.ingest.streams.held(AGENT) is None
    assert b"flowtunnel_gateway_compression_streams 0.0" in generate_latest(gw.metrics.registry)
    assert [e.stream_seq for e in journal_entries(gw)] == list(range(1, 7))


async def test_two_frames_continuing_one_stream_at_once_decode_one_at_most(
    env: tuple[Gateway, bytes, aiohttp.ClientSession], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two frames at the same position of the agent's stream arrive together (one batch on two rungs, or a
    broken client), each large enough to be decoded in a worker thread: the stream is out of the cache while
    one decodes, so the other is refused (``unknown-context``) instead of sharing the decoder; one batch is
    journaled."""
    from flowtunnel.wire import SealStream, seal_stream_batch

    gw, key, session = env
    nonce = os.urandom(12)
    twins = [SealStream(0x77), SealStream(0x77)]  # the same history: the same first frame
    first = [seal_stream_batch(agent_id=AGENT, key=key, first_seq=1, datagrams=datagrams(1), nonce=nonce,
                               stream=s) for s in twins]
    assert first[0] == first[1]
    assert (await post_batch(session, gw.url, first[0], agent=AGENT))[0] == 200
    bodies = []
    for i, s in enumerate(twins):
        noise = [dataclasses.replace(d, payload=os.urandom(1400)) for d in datagrams(20, start=1 + 20 * i)]
        bodies.append(seal_stream_batch(agent_id=AGENT, key=key, first_seq=2, datagrams=noise,
                                        nonce=os.urandom(12), stream=s))
        assert len(bodies[-1]) > 16 << 10  # past ingest's inline limit: decoded in a thread
    # Both are opened at the same time: each waits in its worker thread until the other got there too.
    import flowtunnel.gateway.ingest as ingest_module

    real = getattr(ingest_module, "open_batch")  # noqa: B009 (not re-exported)
    together = threading.Barrier(2, timeout=10)

    def open_together(body: bytes, **kwargs: Any) -> Any:
        together.wait()
        return real(body, **kwargs)

    monkeypatch.setattr(ingest_module, "open_batch", open_together)
    answers = await asyncio.gather(*(post_batch(session, gw.url, b, agent=AGENT) for b in bodies))
    assert sorted((status, doc.get("error")) for status, doc, _ in answers) == [(200, None),
                                                                                 (409, "unknown-context")]
    assert [e.stream_seq for e in journal_entries(gw)] == list(range(1, 22))


def seal_info(key: bytes, first_seq: int, dgs: list[Datagram], info: dict[str, int]) -> bytes:
    """A batch of ``AGENT`` carrying sealed agent info (what the agent authenticates: acked, drops, ...)."""
    return seal_batch(agent_id=AGENT, key=key, first_seq=first_seq, datagrams=dgs, nonce=os.urandom(12),
                      agent_info=info)


async def test_clear_text_acked_header_cannot_force_a_resync(tmp_path: Path) -> None:
    """Anyone on the path can add ``X-Flowtunnel-Acked``: it must not force a 409 nor leave a lost-data hint
    (issue 17.4); only the sealed ``acked`` can."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    gw = await start_gateway(data)
    try:
        async with aiohttp.ClientSession() as session:
            await post_batch(session, gw.url, seal(AGENT, key, 1, datagrams(3)), agent=AGENT)
            # A batch without sealed "acked", and a forged header claiming far more was acknowledged.
            status, doc, _ = await post_batch(
                session, gw.url, seal(AGENT, key, 4, datagrams(2, start=3)), agent=AGENT,
                headers={"X-Flowtunnel-Acked": "1000"},
            )
            assert (status, doc["acked"], doc["accepted"]) == (200, 5, 2)
            # A header disagreeing with the sealed value loses too.
            status, doc, _ = await post_batch(
                session, gw.url, seal_info(key, 6, datagrams(1, start=5), {"acked": 5}), agent=AGENT,
                headers={"X-Flowtunnel-Acked": "1000"},
            )
            assert (status, doc["acked"]) == (200, 6)
            # No bogus lost-data hint left behind: a later gap is the agent's own, not "lost here".
            status, doc, _ = await post_batch(
                session, gw.url, seal(AGENT, key, 10, datagrams(1, start=9)), agent=AGENT
            )
            assert status == 200
        stats = gw.metrics.agents[AGENT]
        assert (stats.lost, stats.gap, stats.rejected) == (0, 3, {})
    finally:
        await gw.stop()


async def test_a_stalled_body_loses_its_slot_after_one_window(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    # 60 KiB at the minimum rate of 1 KiB/s would have a minute; stalling, it is cut after one 1 s window.
    gw = await start_gateway(data, max_body=64 << 10, body_timeout=1.0, max_inflight_per_agent=1)
    try:
        host, port = gw.url.removeprefix("http://").split(":")
        body = seal(AGENT, os.urandom(32), 1, datagrams(1))
        head = (
            f"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Type: {BATCH_CONTENT_TYPE}\r\n"
            f"X-Flowtunnel-Agent: {AGENT}\r\nContent-Length: {60 << 10}\r\n\r\n"
        ).encode()
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(head + body[:-16])  # names the enrolled agent, then stalls
        await writer.drain()
        async with asyncio.timeout(15):
            answer = await reader.read(4096)
        writer.close()
        await writer.wait_closed()
        assert answer.startswith(b"HTTP/1.1 408")
        async with aiohttp.ClientSession() as session:
            status, doc, _ = await post_batch(session, gw.url, seal(AGENT, key, 1, datagrams(1)), agent=AGENT)
        assert (status, doc["accepted"]) == (200, 1)
    finally:
        await gw.stop()


async def test_a_batch_finding_every_slot_taken_waits_its_turn_instead_of_a_503(tmp_path: Path) -> None:
    # Thousands of agents against one gateway (bench/fleet.py): with an immediate 503 busy, admission was a
    # lottery that some agents lost for minutes in a row; now a batch waits (up to slot_wait) in line. (Small
    # batches here: without their own lane, which has its own line.)
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    key_b = enroll(data, "site-b")
    gw = await start_gateway(data, max_inflight=1, max_inflight_per_agent=1, slot_wait=10.0,
                             max_inflight_small=0)
    try:
        host, port = gw.url.removeprefix("http://").split(":")
        body = seal(AGENT, key, 1, datagrams(2))
        reader, writer = await asyncio.open_connection(host, int(port))
        head = (
            f"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Type: {BATCH_CONTENT_TYPE}\r\n"
            f"X-Flowtunnel-Agent: {AGENT}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        held = HEADER.size + len(AGENT)
        writer.write(head + body[:held])  # takes the only slot, its body still to come
        await writer.drain()
        async with asyncio.timeout(10):
            while not gw.metrics.registry.get_sample_value("flowtunnel_gateway_inflight_requests"):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        async with aiohttp.ClientSession() as session:
            other = asyncio.create_task(post_batch(session, gw.url, seal("site-b", key_b, 1, datagrams(2)),
                                                   agent="site-b"))
            await asyncio.sleep(0.3)
            assert not other.done()  # waiting for the slot, not refused
            writer.write(body[held:])
            await writer.drain()
            assert (await reader.read(4096)).startswith(b"HTTP/1.1 200")
            status, doc, _ = await other
            assert (status, doc["accepted"]) == (200, 2)
        writer.close()
        await writer.wait_closed()
    finally:
        await gw.stop()


async def test_a_small_batch_does_not_wait_behind_large_ones_for_a_slot(tmp_path: Path) -> None:
    # 2,000 agents (bench/fleet.py): every slot is held until the journal commits, and the slowest requests,
    # nearly all of 0-2 datagrams, spent their time waiting for one; small batches have a lane of their own.
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    key_b = enroll(data, "site-b")
    gw = await start_gateway(data, max_inflight=1, max_inflight_per_agent=1, slot_wait=10.0)
    try:
        host, port = gw.url.removeprefix("http://").split(":")
        big = [dataclasses.replace(d, payload=os.urandom(1400)) for d in datagrams(20)]  # 28 KB, random
        body = seal(AGENT, key, 1, big)
        assert len(body) > SMALL_BODY
        reader, writer = await asyncio.open_connection(host, int(port))
        head = (
            f"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Type: {BATCH_CONTENT_TYPE}\r\n"
            f"X-Flowtunnel-Agent: {AGENT}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        held = HEADER.size + len(AGENT)
        writer.write(head + body[:held])  # takes the only slot for large batches, its body still to come
        await writer.drain()
        async with asyncio.timeout(10):
            while not gw.metrics.registry.get_sample_value("flowtunnel_gateway_inflight_requests"):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        async with aiohttp.ClientSession() as session:
            status, doc, _ = await post_batch(session, gw.url, seal("site-b", key_b, 1, datagrams(2)),
                                              agent="site-b")
            assert (status, doc["accepted"]) == (200, 2)  # answered while the large one still holds its slot
            writer.write(body[held:])
            await writer.drain()
            assert (await reader.read(4096)).startswith(b"HTTP/1.1 200")
        writer.close()
        await writer.wait_closed()
    finally:
        await gw.stop()


async def test_metrics_render_off_the_event_loop(
    env: tuple[Gateway, bytes, aiohttp.ClientSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    # With 2,000 agents /metrics is ~36,000 series and ~0.5 s to render (bench/fleet.py): rendered on the
    # event loop, every scrape stalled every agent's request.
    gw, _, session = env
    loop_thread = threading.get_ident()
    threads: list[int] = []
    render = gw.metrics.render

    def spy() -> bytes:
        threads.append(threading.get_ident())
        return render()

    monkeypatch.setattr(gw.metrics, "render", spy)
    async with session.get(gw.url + "/metrics") as resp:
        assert resp.status == 200
        assert b"flowtunnel_gateway" in await resp.read()
    assert len(threads) == 1
    assert threads[0] != loop_thread


async def test_the_compact_route_takes_a_bare_post_and_answers_24_bytes(
    env: tuple[Gateway, bytes, aiohttp.ClientSession],
) -> None:
    """``POST /v1/b`` (issue 14): no header but Content-Length (the batch names its agent, no content type is
    looked at); the 200 is ``wire.compact_ack`` with no ``Server`` and no ``Content-Type``; journaled like a
    ``/v1/batches`` body, and a replay of it adds nothing."""
    gw, key, session = env
    dgs = datagrams(4)
    body = seal(AGENT, key, 1, dgs)
    for _ in range(2):  # the second time an exact replay
        async with session.post(gw.url + "/v1/b", data=body, skip_auto_headers=["Content-Type"]) as resp:
            raw = await resp.read()
            assert resp.status == 200
            assert "Server" not in resp.headers
            assert "Content-Type" not in resp.headers
            assert set(resp.headers) == {"Content-Length", "Date"}
        acked, tag = parse_compact_ack(raw)
        assert acked == 4
        verify_ack(key, agent_id=AGENT, request_nonce=peek_header(body).nonce, acked=acked, tag=tag)
    assert [e.datagram for e in journal_entries(gw)] == dgs


@pytest.mark.parametrize(
    ("headers", "body_of", "status", "code"),
    [
        ({"X-Flowtunnel-Agent": "site-b"}, AGENT, 400, "agent-mismatch"),  # a header, when sent, must match
        ({}, "site-z", 401, "unknown-agent"),
        ({}, None, 400, "bad-magic"),
    ],
)
async def test_the_compact_route_refuses_in_json_like_the_classic_one(
    env: tuple[Gateway, bytes, aiohttp.ClientSession], headers: dict[str, str], body_of: str | None,
    status: int, code: str,
) -> None:
    gw, key, session = env
    body = b"not a batch at all" if body_of is None else seal(body_of, key, 1, datagrams(2))
    async with session.post(gw.url + "/v1/b", data=body, headers=headers) as resp:
        doc = await resp.json(content_type=None)
        assert (resp.status, doc["error"]) == (status, code)
        assert resp.headers["Content-Type"] == "application/json"
    assert journal_entries(gw) == []


async def test_batches_of_many_agents_share_journal_commits(tmp_path: Path) -> None:
    # One commit (one fsync) per batch held a 2-core gateway at ~350 batches/s: 2,000 agents waited 5 s
    # (bench/fleet.py). Batches waiting for the journal at the same time now share one commit.
    data = tmp_path / "gw"
    keys = {f"site-{i}": enroll(data, f"site-{i}") for i in range(30)}
    gw = await start_gateway(data)
    try:
        async with aiohttp.ClientSession() as session:
            answers = await asyncio.gather(*(
                post_batch(session, gw.url, seal(agent, key, 1, datagrams(3, start=10 * i)), agent=agent)
                for i, (agent, key) in enumerate(keys.items())
            ))
            assert [(status, doc["acked"]) for status, doc, _ in answers] == [(200, 3)] * 30
            async with session.get(gw.url + "/metrics") as resp:
                text = await resp.text()
        figures = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                   if line.startswith("flowtunnel_gateway_journal_commit")}
        commits = figures["flowtunnel_gateway_journal_commits_total"]
        assert figures["flowtunnel_gateway_journal_commit_batches_total"] == 30
        assert commits < 30
        assert gw.journal is not None
        assert gw.journal.stats().commits == commits
        by_agent: dict[str, list[int | None]] = {e.stream: [] for e in journal_entries(gw)}
        for e in journal_entries(gw):
            by_agent[e.stream].append(e.stream_seq)
        assert by_agent == {agent: [1, 2, 3] for agent in keys}
    finally:
        await gw.stop()


async def test_the_journal_commits_and_folds_its_wal_back_in_threads_of_its_own_stopped_with_the_gateway(
    tmp_path: Path,
) -> None:
    """The fleet's tail (issue 16): commits waited for the default executor and for the event loop to start
    them, and about once a second one of them also copied the WAL into the database."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)

    def threads() -> Counter[str]:
        names = ("journal-commit", "checkpoint journal.sqlite")
        return Counter(t.name for t in threading.enumerate() if t.name in names)

    before = threads()
    gw = await start_gateway(data)
    try:
        assert gw.journal is not None
        assert gw.journal.config.background_checkpoint
        async with aiohttp.ClientSession() as session:
            status, doc, _ = await post_batch(session, gw.url, seal(AGENT, key, 1, datagrams(3)), agent=AGENT)
        assert (status, doc["acked"]) == (200, 3)
        assert threads() - before == Counter({"journal-commit": 1, "checkpoint journal.sqlite": 1})
    finally:
        await gw.stop()
    assert threads() == before


async def test_a_restarted_gateway_answers_known_agents_while_its_default_executor_is_taken(
    tmp_path: Path,
) -> None:
    """At start-up each of 2,000 agents' first request read its mark through a worker thread, queueing with
    the commits; the marks are now read all at once when the journal opens."""
    data = tmp_path / "gw"
    keys = {f"site-{i}": enroll(data, f"site-{i}") for i in range(3)}
    gw = await start_gateway(data)
    try:
        async with aiohttp.ClientSession() as session:
            for agent, key in keys.items():
                body = seal(agent, key, 1, datagrams(2))
                status, _, _ = await post_batch(session, gw.url, body, agent=agent)
                assert status == 200
    finally:
        await gw.stop()
    gw = await start_gateway(data)
    loop = asyncio.get_running_loop()
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=1))
    free = threading.Event()
    taken = loop.run_in_executor(None, free.wait, 30)
    try:
        async with aiohttp.ClientSession() as session, asyncio.timeout(10):
            for agent, key in keys.items():
                body = seal(agent, key, 2, datagrams(2))
                status, doc, _ = await post_batch(session, gw.url, body, agent=agent)
                assert (status, doc["acked"], doc["accepted"]) == (200, 3, 1)
    finally:
        free.set()
        await taken
        await gw.stop()


async def test_a_failed_group_commit_answers_503_to_every_batch_it_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "gw"
    keys = {f"site-{i}": enroll(data, f"site-{i}") for i in range(6)}
    gw = await start_gateway(data)
    assert gw.journal is not None
    assert isinstance(gw.agent_journal, SqliteAgentJournal)
    journal, group = gw.journal, gw.agent_journal.group
    release = threading.Event()
    calls = 0
    real = journal.append_group

    def append_group(parts: list[Any]) -> Any:
        # The first commit waits until the five other batches queue behind it; the second, holding them
        # all, fails inside its transaction (SQLite's disk I/O error) after writing some of its rows.
        nonlocal calls
        calls += 1
        if calls == 1:
            assert release.wait(20)
            return real(parts)
        with pytest.MonkeyPatch.context() as mp:
            real_rows = DurableLog._rows
            rows = 0

            def failing(*args: Any) -> Any:
                nonlocal rows
                rows += 1
                if rows == 3:
                    raise sqlite3.OperationalError("disk I/O error")
                return real_rows(*args)

            mp.setattr(journal, "_rows", failing)
            return real(parts)

    monkeypatch.setattr(journal, "append_group", append_group)
    try:
        async with aiohttp.ClientSession() as session:
            agents = list(keys)
            first = asyncio.ensure_future(post_batch(
                session, gw.url, seal(agents[0], keys[agents[0]], 1, datagrams(2)), agent=agents[0]))
            while calls < 1:  # noqa: ASYNC110 - the commit runs in a worker thread
                await asyncio.sleep(0.005)
            rest = [
                asyncio.ensure_future(post_batch(
                    session, gw.url, seal(agent, keys[agent], 1, datagrams(2, start=10 * i)), agent=agent))
                for i, agent in enumerate(agents[1:], 1)
            ]
            while group.waiting < 6:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            release.set()
            status, doc, _ = await first
            assert (status, doc["acked"]) == (200, 2)
            for status, doc, headers in await asyncio.gather(*rest):
                assert (status, doc["error"]) == (503, "journal-error")
                assert "acked" not in doc
                assert 5 <= int(headers["Retry-After"]) <= 10
            assert calls == 2
            assert [e.stream for e in journal_entries(gw)] == [agents[0]] * 2
            assert all(journal.get_state(f"hwm:{agent}") is None for agent in agents[1:])
            # Nothing is left half-done: the agents' retries are journaled once each.
            for i, agent in enumerate(agents[1:], 1):
                status, doc, _ = await post_batch(
                    session, gw.url, seal(agent, keys[agent], 1, datagrams(2, start=10 * i)), agent=agent)
                assert (status, doc["acked"]) == (200, 2)
        assert sorted(e.stream for e in journal_entries(gw)) == sorted(a for a in agents for _ in (1, 2))
    finally:
        await gw.stop()


async def test_status_file_is_built_and_written_off_the_event_loop(
    env: tuple[Gateway, bytes, aiohttp.ClientSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    # With 2,000 agents status.json is 1.2 MB; built on the event loop every status_interval, it stalled
    # every agent's request (and waited there for the journal's lock behind a commit).
    gw, key, session = env
    assert (await post_batch(session, gw.url, seal(AGENT, key, 1, datagrams(2)), agent=AGENT))[0] == 200
    loop_thread = threading.get_ident()
    threads: list[int] = []
    status = gw.status

    def spy(parts: dict[str, object] | None = None) -> dict[str, object]:
        threads.append(threading.get_ident())
        return status(parts)

    monkeypatch.setattr(gw, "status", spy)
    (gw.data_dir / "status.json").unlink(missing_ok=True)
    async with asyncio.timeout(20):
        while not threads or not (gw.data_dir / "status.json").exists():  # noqa: ASYNC110 - housekeeping
            await asyncio.sleep(0.02)
    assert loop_thread not in threads
    doc = json.loads((gw.data_dir / "status.json").read_text())
    assert doc["agents"][AGENT]["acked"] == 2
