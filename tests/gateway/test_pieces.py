"""GET-only rung (docs/protocol.md 7.5): pieces in any order and repeated reassemble to the batch, which goes
through the same ingest as POST; hostile pieces (forged agents, random data, floods) are refused or held
within fixed bounds, counted, logged once per cause, and never reach the journal."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from flowtunnel.gateway import Gateway
from flowtunnel.gateway.ingest import Ack, Refusal
from flowtunnel.gateway.pieces import PIECE_OVERHEAD, Complete, Incomplete, PieceBuffer, PieceSettings
from flowtunnel.wire import peek_header, verify_ack
from tests.gateway.util import datagrams, enroll, journal_entries, seal, start_gateway

AGENT = "site-a"
DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def b64(body: bytes) -> str:
    return base64.urlsafe_b64encode(body).rstrip(b"=").decode()


def cut(text: str, n: int) -> list[str]:
    size = -(-len(text) // n)
    return [text[k * size : (k + 1) * size] for k in range(n)]


# -- the reassembly, without sockets ------------------------------------------------------------------------


def test_pieces_in_any_order_and_repeated_complete_the_batch_exactly_once() -> None:
    body = os.urandom(3001)
    pieces = cut(b64(body), 7)
    buf = PieceBuffer(PieceSettings(max_body=1 << 20))
    order = [5, 3, 3, 0, 6, 1, 0, 4, 5]  # shuffled, with repeats, piece 2 held back
    missing = 2
    got = [buf.add(AGENT, "00112233445566ff", i, 7, pieces[i], 0.0) for i in order]
    assert all(isinstance(g, Incomplete) and g.of == 7 for g in got)
    done = buf.add(AGENT, "00112233445566ff", missing, 7, pieces[missing], 1.0)
    assert done == Complete(body)
    assert (len(buf), buf.cost) == (0, 0)
    assert buf.add(AGENT, "00112233445566ff", 0, 7, pieces[0], 1.5) == Incomplete(7, 7)  # being delivered
    ack = Ack(agent=AGENT, acked=3, accepted=3, duplicates=0, tag="t")
    buf.finish(AGENT, "00112233445566ff", ack, 2.0)
    assert buf.add(AGENT, "00112233445566ff", 4, 7, pieces[4], 3.0) is ack  # a lost answer is re-served


def test_a_retryable_refusal_is_not_re_served_so_the_batch_can_be_re_sent_under_its_id() -> None:
    buf = PieceBuffer(PieceSettings(max_body=1 << 20))
    assert isinstance(buf.add(AGENT, "0" * 16, 0, 1, b64(b"abc"), 0.0), Complete)
    buf.finish(AGENT, "0" * 16, Refusal(code="journal-full", detail="full", retry_after=5), 0.0)
    assert isinstance(buf.add(AGENT, "0" * 16, 0, 1, b64(b"abc"), 1.0), Complete)


def test_malformed_sets_of_pieces_are_refused() -> None:
    buf = PieceBuffer(PieceSettings(max_body=1024))
    assert buf.add(AGENT, "1" * 16, 0, 2, "AAAA", 0.0) == Incomplete(1, 2)
    got = buf.add(AGENT, "1" * 16, 1, 3, "AAAA", 0.0)
    assert isinstance(got, Refusal)
    assert got.code == "bad-piece"
    assert "says 3 pieces, earlier pieces said 2" in got.detail
    bad = buf.add(AGENT, "2" * 16, 0, 1, "AAAAA", 0.0)  # 5 characters: not base64
    assert isinstance(bad, Refusal)
    assert bad.code == "bad-piece"
    big = [buf.add(AGENT, "3" * 16, i, 3, "A" * 700, 0.0) for i in range(2)]  # 1400 > 1366 characters
    assert isinstance(big[-1], Refusal)
    assert big[-1].code == "too-large"
    assert "exceeds max_body 1024" in big[-1].detail
    assert len(buf) == 1  # the too-large batch was dropped; "1"*16 is still pending


def test_pending_batches_are_bounded_per_agent_and_in_bytes_and_expire() -> None:
    expired: list[tuple[str, int, int]] = []
    settings = PieceSettings(max_body=4096, pending_per_agent=2, pending_bytes=3 * (100 + PIECE_OVERHEAD),
                             max_age=10.0)
    buf = PieceBuffer(settings, on_expired=lambda *a: expired.append(a))
    assert buf.add(AGENT, "a" * 16, 0, 5, "A" * 100, 0.0) == Incomplete(1, 5)
    assert buf.add(AGENT, "b" * 16, 0, 5, "A" * 100, 1.0) == Incomplete(1, 5)
    third = buf.add(AGENT, "c" * 16, 0, 5, "A" * 100, 2.0)
    assert isinstance(third, Refusal)
    assert (third.code, third.retry_after) == ("busy", 5)
    assert buf.add("site-b", "d" * 16, 0, 5, "A" * 100, 3.0) == Incomplete(1, 5)
    full = buf.add("site-c", "e" * 16, 0, 5, "A" * 100, 4.0)
    assert isinstance(full, Refusal)
    assert "get_pending_bytes" in full.detail
    again = buf.add(AGENT, "a" * 16, 1, 5, "A" * 100, 5.0)
    assert isinstance(again, Refusal)
    assert again.code == "busy"
    assert buf.cost <= settings.pending_bytes
    assert buf.add("site-c", "e" * 16, 0, 5, "A" * 100, 10.5) == Incomplete(1, 5)  # "a" expired
    assert expired == [(AGENT, 1, 5)]
    assert buf.expired == 1
    buf.expire(100.0)
    assert (len(buf), buf.cost, buf.expired) == (0, 0, 4)


# -- over a real socket ------------------------------------------------------------------------------------


async def get_piece(
    session: aiohttp.ClientSession, gw: Gateway, path: str, cookie: str | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Cookie": f"ft={cookie}"} if cookie is not None else {}
    async with session.get(gw.url + path, headers=headers, allow_redirects=False) as resp:
        return resp.status, await resp.json(content_type=None), dict(resp.headers)


def doc_vector() -> list[tuple[str, str | None]]:
    text = DOC.read_text(encoding="utf-8")
    block = text[text.index("GET-only vector") :]
    requests = re.findall(r"^GET (/v1/g/\S+)$", block[: block.index("(the second piece")], re.M)
    cookie = re.search(r"`GET (/v1/g/\S+)` with\s+`Cookie: ft=(\S+)`", block)
    assert cookie is not None
    return [(requests[0], None), (requests[1], None), (cookie.group(1), cookie.group(2))]


async def test_the_documented_vector_is_what_the_gateway_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("flowtunnel.gateway.registry.generate_key", lambda: bytes(range(32)))
    enroll(tmp_path, AGENT)
    gw = await start_gateway(tmp_path)
    first, second, second_with_cookie = doc_vector()
    try:
        async with aiohttp.ClientSession() as session:
            status, doc, headers = await get_piece(session, gw, first[0])
            assert (status, doc) == (200, {"have": 1, "of": 2})
            assert headers["Cache-Control"] == "no-store"
            status, doc, _ = await get_piece(session, gw, second[0])
            assert (status, doc["acked"], doc["accepted"]) == (200, 0, 0)
            nonce = bytes.fromhex("ffeeddccbbaa998877665544")
            verify_ack(bytes(range(32)), agent_id=AGENT, request_nonce=nonce, acked=0, tag=doc["tag"])
            # the same batch again under another id, its second piece split between the path and the cookie
            other = [p.replace("00112233445566ff", "00112233445566fe")
                     for p, _ in (first, second_with_cookie)]
            assert (await get_piece(session, gw, other[1], second_with_cookie[1]))[1] == {"have": 1, "of": 2}
            status, doc, _ = await get_piece(session, gw, other[0])
            assert (status, doc["acked"]) == (200, 0)
    finally:
        await gw.stop()


async def test_a_batch_in_shuffled_repeated_pieces_is_journaled_once_and_acked(tmp_path: Path) -> None:
    key = enroll(tmp_path, AGENT)
    gw = await start_gateway(tmp_path)
    try:
        body = seal(AGENT, key, 1, datagrams(40))
        pieces = cut(b64(body), 5)
        order = [4, 2, 2, 0, 3, 0]
        async with aiohttp.ClientSession() as session:
            for i in order:
                path = f"/v1/g/{AGENT}/0123456789abcdef/{i}/5/{pieces[i]}"
                status, doc, _ = await get_piece(session, gw, path)
                assert status == 200
                assert "acked" not in doc
            # the last piece comes half in the URL, half in the cookie, concurrently with a repeat
            half = len(pieces[1]) // 2
            last = get_piece(session, gw, f"/v1/g/{AGENT}/0123456789abcdef/1/5/{pieces[1][:half]}",
                             pieces[1][half:])
            again = get_piece(session, gw, f"/v1/g/{AGENT}/0123456789abcdef/1/5/{pieces[1]}")
            answers = await asyncio.gather(last, again)
            acks = [doc for _, doc, _ in answers if "acked" in doc]
            assert acks
            for doc in acks:
                nonce = peek_header(body).nonce
                verify_ack(key, agent_id=AGENT, request_nonce=nonce, acked=40, tag=doc["tag"])
            status, doc, _ = await get_piece(session, gw, f"/v1/g/{AGENT}/0123456789abcdef/3/5/{pieces[3]}")
            assert (status, doc["acked"]) == (200, 40)  # the answer again, not a new pending batch
        assert [e.datagram for e in journal_entries(gw)] == datagrams(40)
        get = gw.metrics.rungs["get"]
        assert (get["acked"], get["refused"]) == (1, 0)
        assert get["requests"] == 9
        assert get["bytes_in"] > len(b64(body))
    finally:
        await gw.stop()


async def test_hostile_pieces_are_refused_or_bounded_counted_logged_once_and_never_journaled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = enroll(tmp_path, AGENT)
    gw = await start_gateway(tmp_path, get_pending_per_agent=2, get_pending_bytes=1 << 20, max_body=2048)
    bad_forms = [
        f"/v1/g/{AGENT}/0123456789ABCDEF/0/1/AAAA",  # upper-case batch id
        f"/v1/g/{AGENT}/0123456789abcde/0/1/AAAA",
        f"/v1/g/{AGENT}/0123456789abcdef/1/1/AAAA",  # i >= n
        f"/v1/g/{AGENT}/0123456789abcdef/0/01/AAAA",
        f"/v1/g/{AGENT}/0123456789abcdef/0/5000/AAAA",  # over get_max_pieces
        f"/v1/g/{AGENT}/0123456789abcdef/-1/2/AAAA",
        f"/v1/g/{AGENT}/0123456789abcdef/0/1/AA%2BA",  # "+" is not base64url
        "/v1/g/..%2Fetc/0123456789abcdef/0/1/AAAA",
    ]
    try:
        with caplog.at_level(logging.DEBUG, logger="flowtunnel.gateway"):
            async with aiohttp.ClientSession() as session:
                for path in bad_forms:
                    status, doc, _ = await get_piece(session, gw, path)
                    assert (status, doc["error"]) == (400, "bad-piece"), path
                status, doc, _ = await get_piece(session, gw, "/v1/g/nobody/0123456789abcdef/0/2/AAAA")
                assert (status, doc["error"]) == (401, "unknown-agent")
                # random data forming a complete batch: refused as what it is
                for _ in range(3):
                    path = f"/v1/g/{AGENT}/{os.urandom(8).hex()}/0/1/{b64(os.urandom(300))}"
                    status, doc, _ = await get_piece(session, gw, path)
                    assert (status, doc["error"]) == (400, "bad-magic")
                # more than max_body (2 KiB: 2,731 characters) in pieces
                big = b64(os.urandom(2100))
                path = f"/v1/g/{AGENT}/00000000000000aa/%d/2/%s"
                assert (await get_piece(session, gw, path % (0, big[:1500])))[0] == 200
                status, doc, _ = await get_piece(session, gw, path % (1, big[1500:]))
                assert (status, doc["error"]) == (413, "too-large")
                # a flood of random pieces naming the enrolled agent: two batches held, the rest 503
                statuses = []
                for _ in range(30):
                    path = f"/v1/g/{AGENT}/{os.urandom(8).hex()}/0/9/{b64(os.urandom(900))}"
                    statuses.append((await get_piece(session, gw, path))[0])
                assert statuses.count(200) == 2
                assert statuses.count(503) == 28
                async with session.get(gw.url + "/metrics") as resp:
                    metrics = await resp.text()
                held = re.search(r"^flowtunnel_gateway_get_pending_bytes (\S+)$", metrics, re.M)
                assert held is not None
                assert float(held.group(1)) <= 2 * (1200 + PIECE_OVERHEAD)  # the two held pieces, no more
                body = seal(AGENT, key, 1, datagrams(2))
                path = f"/v1/g/{AGENT}/00000000000000bb/0/1/{b64(body)}"
                status, doc, _ = await get_piece(session, gw, path)
                assert status == 503  # so is a real batch, until the flood's batches expire (get_max_age)
        assert journal_entries(gw) == []
        causes = gw.metrics.rejects_by_cause
        assert causes["bad-piece"] == len(bad_forms)
        assert causes["unknown-agent"] == 1
        assert (causes["bad-magic"], causes["too-large"], causes["busy"]) == (3, 1, 29)
        warned = [r.message for r in caplog.records if r.levelno >= logging.WARNING]
        assert sum("(bad-piece," in m for m in warned) == 1
        assert sum("(busy," in m for m in warned) == 1
    finally:
        await gw.stop()


async def test_expired_batches_are_dropped_counted_and_make_room(tmp_path: Path) -> None:
    key = enroll(tmp_path, AGENT)
    gw = await start_gateway(tmp_path, get_pending_per_agent=1, get_max_age=1.0)
    try:
        async with aiohttp.ClientSession() as session:
            assert (await get_piece(session, gw, f"/v1/g/{AGENT}/{'1' * 16}/0/2/AAAA"))[0] == 200
            body = seal(AGENT, key, 1, datagrams(1))
            path = f"/v1/g/{AGENT}/{'2' * 16}/0/1/{b64(body)}"
            assert (await get_piece(session, gw, path))[0] == 503
            await asyncio.sleep(1.2)
            status, doc, _ = await get_piece(session, gw, path)
            assert (status, doc["acked"]) == (200, 1)
            async with session.get(gw.url + "/metrics") as resp:
                text = await resp.text()
        assert "flowtunnel_gateway_get_expired_batches_total 1.0" in text
        assert [e.datagram for e in journal_entries(gw)] == datagrams(1)
    finally:
        await gw.stop()
