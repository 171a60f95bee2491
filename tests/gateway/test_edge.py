"""The HTTP edge (gateway/edge.py): one table maps every cause code to its status, for POST, GET pieces and
WebSocket answers alike, and every rung's requests, batches and bytes are counted."""

from __future__ import annotations

import random
import re
from pathlib import Path

import aiohttp

from flowtunnel import wire
from flowtunnel.gateway.edge import HTTP_STATUS, http_response, http_status, spread_retry_after, ws_answer
from flowtunnel.gateway.ingest import Ack, Refusal
from tests.gateway.util import datagrams, enroll, post_batch, seal, start_gateway

SRC = Path(__file__).resolve().parents[2] / "src" / "flowtunnel"


def _subclasses(cls: type[wire.WireError]) -> list[type[wire.WireError]]:
    out: list[type[wire.WireError]] = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def test_every_wire_error_code_has_its_status_in_the_edge_table() -> None:
    classes: list[type[wire.WireError]] = [wire.WireError, *_subclasses(wire.WireError)]
    want = {"authentication-failed": 401, "limit-exceeded": 413, "unknown-context": 409}
    for cls in classes:
        assert HTTP_STATUS[cls.code] == want.get(cls.code, 400), cls
        assert not hasattr(cls, "http_status")  # no transport status inside wire/


def test_every_refusal_raised_in_the_gateway_has_a_status_in_the_edge_table() -> None:
    found = 0
    for path in [*(SRC / "gateway").glob("*.py"), *(SRC / "gateway").glob("*/*.py")]:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"Rejected\(\s*\d", text), (
            f"{path.name}: Rejected(...) takes no HTTP status: give the code only and map it in "
            "gateway/edge.py HTTP_STATUS (statuses live only at the edge)"
        )
        for m in re.finditer(r'Rejected\(\s*"([a-z-]+)"', text):
            found += 1
            assert m.group(1) in HTTP_STATUS, (path.name, m.group(1))
    assert found > 20
    assert http_status("resync") == 409
    assert http_status("busy") == 503


def test_websocket_answers_are_the_post_json_plus_status() -> None:
    ack = Ack(agent="a", acked=5, accepted=2, duplicates=0, tag="t" * 22)
    assert ws_answer(ack) == {"status": 200, "agent": "a", "acked": 5, "accepted": 2, "duplicates": 0,
                              "tag": "t" * 22}
    busy = Refusal(code="busy", detail="2 in progress", retry_after=5)
    assert ws_answer(busy, draw=lambda: 0.0) == {
        "status": 503, "error": "busy", "detail": "2 in progress", "retry_after": 5,
    }
    resync = Refusal(code="resync", detail="lost", extra={"acked": 3})
    assert ws_answer(resync) == {"status": 409, "error": "resync", "detail": "lost", "acked": 3}


async def test_post_requests_batches_and_bytes_are_counted_per_rung(tmp_path: Path) -> None:
    key = enroll(tmp_path, "site-a")
    gw = await start_gateway(tmp_path)
    try:
        body = seal("site-a", key, 1, datagrams(3))
        async with aiohttp.ClientSession() as session:
            status, _, _ = await post_batch(session, gw.url, body, agent="site-a")
            assert status == 200
            status, _, _ = await post_batch(session, gw.url, b"garbage", agent="site-a")
            assert status == 400
        post = gw.metrics.rungs["post"]
        assert post["requests"] == 2
        assert (post["acked"], post["refused"]) == (1, 0)  # garbage never reached ingest
        assert post["bytes_in"] > len(body) + len(b"garbage") + 2 * 100
        assert post["bytes_out"] > 200
        text = gw.metrics.render().decode()
        assert 'flowtunnel_gateway_rung_batches_total{outcome="acked",rung="post"} 1.0' in text
        assert 'flowtunnel_gateway_rung_bytes_total{direction="in",rung="post"}' in text
    finally:
        await gw.stop()


def test_status_shows_each_rung_with_its_batches_and_bytes() -> None:
    from flowtunnel.gateway.status import render

    text = render({"kind": "gateway", "rungs": {
        "ws": {"requests": 12, "acked": 10, "refused": 1, "bytes_in": 20480, "bytes_out": 900},
        "get": {"requests": 40, "acked": 2, "refused": 0, "bytes_in": 81920, "bytes_out": 3000},
    }}, now=0.0)
    lines = text.splitlines()
    head = lines.index("rungs (since start)")
    assert lines[head + 1].split() == ["rung", "requests", "acked", "refused", "in", "out"]
    assert lines[head + 2].split()[:4] == ["get", "40", "2", "0"]
    assert lines[head + 3].split()[:4] == ["ws", "12", "10", "1"]


def test_a_503_spreads_its_retry_after_so_a_refused_herd_does_not_return_at_once() -> None:
    # Every agent refused with 503 at the same moment (the gateway busy or restarting) was told the same
    # Retry-After and came back in the same second.
    busy = Refusal(code="busy", detail="every slot taken", retry_after=5)
    rng = random.Random(16)
    values = [int(http_response(busy, draw=rng.random).headers["Retry-After"]) for _ in range(200)]
    assert set(values) == set(range(5, 11))  # [r, 2r], each second used
    assert {ws_answer(busy, draw=rng.random)["retry_after"] for _ in range(200)} == set(range(5, 11))
    assert spread_retry_after(busy, lambda: 0.999999) == 10
    # A 429 says when the agent's own budget refills: kept as is.
    over = Refusal(code="agent-rate", detail="over budget", retry_after=3)
    assert {http_response(over, draw=rng.random).headers["Retry-After"] for _ in range(50)} == {"3"}
