"""Cross-batch compression contexts (docs/protocol.md section 3.3) between the uploader and a real gateway:
quiet batches go against the previous acknowledged one, and whatever side loses its half (a restart of either,
a lost acknowledgement, a corrupted context at the gateway), the batch is refused precisely, sealed afresh and
delivered: every datagram exactly once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flowtunnel.agent.config import AgentConfig
from flowtunnel.datagram import Datagram
from flowtunnel.wire import FLAG_CONTEXT
from tests.agent.conftest import GatewayFactory, Opened, enroll, ingest_of, trickle
from tests.agent.test_uploader import AGENT, assert_exactly_once, config, open_spool, uploading, v9_export
from tests.linkemu import Action, Fault, LinkEmulator
from tests.peers import free_tcp_port

QUIET = 3  # datagrams per batch: a quiet site


def ctx_config(tmp_path: Path, gateway: str, key: bytes) -> AgentConfig:
    """These tests are about contexts: without stream compression, which a quiet site uses instead
    (tests/agent/test_stream.py)."""
    return config(tmp_path, gateway, key, stream_compression=False)


async def _until(cond: Callable[[], bool]) -> None:
    from tests.agent.conftest import eventually

    await eventually(cond, "acknowledged")


def _chunks(data: list[Datagram]) -> list[list[Datagram]]:
    return [data[i : i + QUIET] for i in range(0, len(data), QUIET)]


def _with_context(opened: Opened) -> int:
    return sum(1 for _, n, flags, _ in opened if n and flags & FLAG_CONTEXT)


async def test_quiet_batches_go_against_the_previous_acknowledged_one_and_cost_fewer_bytes(
    tmp_path: Path, gateway_factory: GatewayFactory, opened: Opened
) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = v9_export(30)
    spool = open_spool(tmp_path)
    async with gateway_factory(data) as gw:
        async with uploading(ctx_config(tmp_path, gw.url, key), key, spool) as up:
            await trickle(up, spool, _chunks(sent))
            assert up.stats.failures == {}
            assert up.stats.context_batches == up.stats.batches - 1  # all but the first
            with_context = up.stats.body_bytes
        assert _with_context(opened) == len(_chunks(sent)) - 1
        assert_exactly_once(gw, sent)
    # The same stream sealed without contexts (each batch a cold compressor) costs more bytes.
    spool.close()
    cold = tmp_path / "cold"
    key = enroll(cold / "gw", AGENT)
    spool = open_spool(cold)
    async with gateway_factory(cold / "gw") as gw, uploading(ctx_config(cold, gw.url, key), key, spool) as up:
        up._delivery.fresh_context = True
        for chunk in _chunks(sent):
            up._context = None  # as if every batch were the first
            await trickle(up, spool, [chunk])
            up._context = None
        assert up.stats.context_batches <= 1
        # random flow records (test_uploader.v9_export): a few per cent only; real exports repeat far more
        assert with_context < 0.95 * up.stats.body_bytes
    spool.close()


async def test_an_agent_restart_starts_without_a_context(
    tmp_path: Path, gateway_factory: GatewayFactory, opened: Opened
) -> None:
    """kill -9 of the agent: its context lived in memory only; the next process seals its first batch
    without one, whatever the gateway holds."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = v9_export(18)
    spool = open_spool(tmp_path)
    async with gateway_factory(data) as gw:
        async with uploading(ctx_config(tmp_path, gw.url, key), key, spool) as up:
            await trickle(up, spool, _chunks(sent[:9]))
        first_after = len(opened)
        async with uploading(ctx_config(tmp_path, gw.url, key), key, spool) as up:
            await trickle(up, spool, _chunks(sent[9:]))
            assert up.stats.failures == {}
        fresh = [flags for _, n, flags, _ in opened[first_after:] if n]
        assert fresh[0] & FLAG_CONTEXT == 0
        assert all(flags & FLAG_CONTEXT for flags in fresh[1:])
        assert_exactly_once(gw, sent)
    spool.close()


@pytest.mark.parametrize("step", ["after-ack", "before-ack"])
async def test_a_gateway_restart_refuses_the_unknown_context_and_the_agent_resends_fresh(
    tmp_path: Path, gateway_factory: GatewayFactory, opened: Opened, step: str
) -> None:
    """kill -9 of the gateway: its contexts lived in memory only. ``after-ack``: restarted between two
    batches; ``before-ack``: the batch was journaled but its answer never reached the agent (the restart
    lands between journal and answer), so the agent re-sends it against the context the new process lacks.
    Either way: one ``unknown-context`` refusal, the batch sealed afresh, nothing lost or doubled."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = v9_export(24)
    spool = open_spool(tmp_path)
    port = free_tcp_port()
    async with gateway_factory(data, port=port) as gw, LinkEmulator(upstream=("127.0.0.1", port)) as link:
        cfg = ctx_config(tmp_path, link.url, key)
        async with uploading(cfg, key, spool) as up:
            await trickle(up, spool, _chunks(sent[:12]))
            assert up.stats.context_batches >= 3
            if step == "before-ack":
                link.add_fault(Fault(action=Action.ABORT_RESPONSE, match="POST /v1/b"))
                spool.append(sent[12:15])
                up.notify()
                await _until(lambda: link.pending_faults() == 0)
            await gw.stop()
            async with gateway_factory(data, port=port) as gw2:
                rest = sent[15:] if step == "before-ack" else sent[12:]
                await trickle(up, spool, _chunks(rest))
                assert up.stats.failures["unknown-context"] == 1
                assert up.stats.context_batches >= up.stats.batches - 6
                assert_exactly_once(gw2, sent)
    spool.close()


async def test_a_lost_ack_is_resent_against_the_context_the_gateway_still_holds(
    tmp_path: Path, gateway_factory: GatewayFactory, opened: Opened
) -> None:
    """The gateway took a batch and remembered its context, but the answer was lost: the agent resynchronises
    and seals its next batch against its older context (the last one it saw acknowledged), which the gateway
    still holds (the last few per agent): no refusal, nothing doubled."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = v9_export(15)
    spool = open_spool(tmp_path)
    port = free_tcp_port()
    async with (
        gateway_factory(data, port=port) as gw,
        LinkEmulator(upstream=("127.0.0.1", port)) as link,
        uploading(ctx_config(tmp_path, link.url, key), key, spool) as up,
    ):
        await trickle(up, spool, _chunks(sent[:9]))
        link.add_fault(Fault(action=Action.ABORT_RESPONSE, match="POST /v1/b"))
        await trickle(up, spool, _chunks(sent[9:]))
        assert "unknown-context" not in up.stats.failures
        assert up.stats.context_batches == up.stats.batches - 1
        assert [flags for first, n, flags, _ in opened if first == 13 and n] == [FLAG_CONTEXT]
        assert_exactly_once(gw, sent)
    spool.close()


async def test_a_corrupted_context_at_the_gateway_is_refused_and_the_agent_resends_fresh(
    tmp_path: Path, gateway_factory: GatewayFactory, opened: Opened
) -> None:
    """A context the gateway holds under the right id but with other bytes: the frame's checksum fails, the
    gateway refuses with ``unknown-context`` (never decodes other bytes), the agent seals afresh."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = v9_export(12)
    spool = open_spool(tmp_path)
    async with gateway_factory(data) as gw:
        async with uploading(ctx_config(tmp_path, gw.url, key), key, spool) as up:
            await trickle(up, spool, _chunks(sent[:6]))
            ingest = ingest_of(gw)
            ingest.contexts.of(AGENT)  # their ids computed (lazily), so the altered bytes keep the right ids
            for item in ingest.contexts._agents[AGENT]:
                item.context = bytes(b ^ 0x5A for b in item.context)
            await trickle(up, spool, _chunks(sent[6:]))
            assert up.stats.failures["unknown-context"] == 1
        refused_then_fresh = [flags for first, n, flags, _ in opened if first == 7 and n]
        assert [f & FLAG_CONTEXT for f in refused_then_fresh] == [FLAG_CONTEXT, 0]
        assert_exactly_once(gw, sent)
    spool.close()


async def test_requests_and_answers_carry_the_smallest_heads(
    tmp_path: Path, gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14: a batch's POST goes to ``/v1/b`` with no header besides what the client adds (Host,
    Content-Length): the agent id is the batch's, backlog, acked mark and drops travel sealed; the gateway
    answers 24 bytes (acked and tag) with a status line, Content-Length and Date only. ``/v1/batches`` keeps
    its JSON answer for other clients."""
    import json

    import aiohttp

    from flowtunnel.agent.transport.http11 import HttpClient, Response
    from flowtunnel.wire import CONTENT_TYPE, parse_compact_ack, seal_batch, verify_ack

    sent_heads: list[tuple[str, list[tuple[str, str]]]] = []
    answers: list[Response] = []
    real = HttpClient.request

    async def spy(self: HttpClient, method: str, path: str, **kwargs: Any) -> Any:
        sent_heads.append((path, list(kwargs.get("headers") or [])))
        resp = await real(self, method, path, **kwargs)
        if method == "POST":
            answers.append(resp)
        return resp

    monkeypatch.setattr(HttpClient, "request", spy)
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    spool = open_spool(tmp_path)
    async with gateway_factory(data) as gw:
        async with uploading(config(tmp_path, gw.url, key), key, spool) as up:
            await trickle(up, spool, _chunks(v9_export(6)))
        posts = [headers for path, headers in sent_heads if path == "/v1/b"]
        assert len(posts) == len(sent_heads) - 1  # all but the probe
        assert all(headers == [] for headers in posts)
        assert answers
        assert all(r.status == 200 and len(r.body) == 24 for r in answers)
        assert all(sorted(name.lower() for name, _ in r.headers) == ["content-length", "date"]
                   for r in answers)
        body = seal_batch(agent_id=AGENT, key=key, first_seq=7, datagrams=[], nonce=bytes(12),
                          agent_info={"acked": 6})
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{gw.url}/v1/b", data=body) as resp:
                raw = await resp.read()
                assert resp.status == 200
                acked, tag = parse_compact_ack(raw)
                assert acked == 6
                verify_ack(key, agent_id=AGENT, request_nonce=bytes(12), acked=6, tag=tag)
            async with session.post(
                f"{gw.url}/v1/batches", data=body,
                headers={"Content-Type": CONTENT_TYPE, "X-Flowtunnel-Agent": AGENT},
            ) as resp:
                raw = await resp.read()
                assert resp.status == 200
                assert resp.headers["Content-Type"] == "application/json"
                assert resp.headers["Server"] == "flowtunnel"
                assert b" " not in raw
                assert json.loads(raw)["acked"] == 6
    spool.close()


async def test_a_quiet_site_tries_codec_5_on_batches_of_a_few_datagrams(
    tmp_path: Path, gateway_factory: GatewayFactory, opened: Opened
) -> None:
    """issue 14: at a quiet site (``policy.TIGHT``) a batch of ``TIGHT_DELTAS_FROM`` datagrams or more is also
    sealed with codec 5 (field deltas + LZMA2) and the smaller kept; flow records compress better that way, so
    some batches go as codec 5, and every datagram arrives once."""
    from flowtunnel.agent.uploader import TIGHT_DELTAS_FROM
    from flowtunnel.wire import Codec

    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = v9_export(8 * TIGHT_DELTAS_FROM)
    spool = open_spool(tmp_path)
    async with gateway_factory(data) as gw, uploading(ctx_config(tmp_path, gw.url, key), key, spool) as up:
        chunks = [sent[i : i + 2 * TIGHT_DELTAS_FROM] for i in range(0, len(sent), 2 * TIGHT_DELTAS_FROM)]
        await trickle(up, spool, chunks)
        assert up.stats.failures == {}
        assert up.stats.codecs[int(Codec.DELTA_LZMA)] >= 1, up.stats.codecs
        assert_exactly_once(gw, sent)
    spool.close()
