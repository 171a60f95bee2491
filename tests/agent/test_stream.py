"""Stream compression (docs/protocol.md section 3.4) between the uploader and a real gateway: a quiet site's
batches go as frames of one LZMA2 stream; whatever breaks it (a restart of either side, a lost
acknowledgement, a stream the gateway no longer holds, a body limit, a gateway too old for it), the batch is
refused precisely or sealed in a new stream and delivered: every datagram exactly once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import flowtunnel.wire.batch as batch_module
from flowtunnel.agent.config import AgentConfig
from flowtunnel.agent.policy import ArrivalRate
from flowtunnel.agent.uploader import Uploader
from flowtunnel.datagram import Datagram
from flowtunnel.log import DurableLog
from flowtunnel.wire import (
    FLAG_CONTEXT,
    FLAG_STREAM,
    FLAG_STREAM_START,
    OpenStream,
    lzstream,
    peek_header,
)
from tests.agent.conftest import GatewayFactory, Opened, enroll, eventually, ingest_of, trickle
from tests.agent.test_uploader import AGENT, assert_exactly_once, config, open_spool, v9_export
from tests.agent.test_uploader import uploading as _uploading
from tests.linkemu import Action, Fault, LinkEmulator
from tests.peers import free_tcp_port

pytestmark = pytest.mark.skipif(not lzstream.SUPPORTED, reason="liblzma not loadable")

QUIET = 3  # datagrams per batch: a quiet site
START = FLAG_STREAM | FLAG_STREAM_START

@asynccontextmanager
async def uploading(cfg: AgentConfig, key: bytes, spool: DurableLog) -> AsyncIterator[Uploader]:
    """``test_uploader.uploading`` at a quiet site, where batches go as stream frames: its arrival rate
    (~1.4 KB/s) as if measured for long, since ``trickle`` appends far faster than a quiet site's exporters
    send (and the datagrams' receive times say 1,000 a second), which the uploader would otherwise measure."""
    async with _uploading(cfg, key, spool) as up:
        up.arrival = ArrivalRate(datagrams=1.0, mean_size=1400.0, last_seq=up._last_seq, stamp=up._clock())
        yield up


def chunks(data: list[Datagram], size: int = QUIET) -> list[list[Datagram]]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def kinds(opened: Opened, after: int = 0) -> list[str]:
    """'start', 'cont' or 'plain' for each batch with datagrams the gateway opened (from ``after``)."""
    out = []
    for _, n, flags, _ in opened[after:]:
        if n:
            out.append("start" if flags & FLAG_STREAM_START else "cont" if flags & FLAG_STREAM else "plain")
    return out


async def test_quiet_batches_continue_one_stream_and_cost_fewer_bytes_than_without(
    tmp_path: Path, gateway_factory: GatewayFactory, opened: Opened
) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = v9_export(36)
    spool = open_spool(tmp_path)
    async with gateway_factory(data) as gw:
        async with uploading(config(tmp_path, gw.url, key), key, spool) as up:
            await trickle(up, spool, chunks(sent))
            assert up.stats.failures == {}
            assert up.stats.stream_batches == up.stats.batches == len(chunks(sent))
            assert up.stats.streams == 1
            assert up.status()["stream_batches"] == up.stats.batches
            streamed = up.stats.body_bytes
        assert kinds(opened) == ["start"] + ["cont"] * (len(chunks(sent)) - 1)
        positions = [dict_id & 0xFFFF for _, n, _, dict_id in opened if n]
        assert positions == list(range(len(chunks(sent))))
        held = ingest_of(gw).streams.held(AGENT)
        assert held is not None
        assert held.position == len(chunks(sent))
        assert_exactly_once(gw, sent)
    spool.close()
    # The same datagrams, each batch in a new stream (a cold compressor every time) cost more bytes.
    cold = tmp_path / "cold"
    key = enroll(cold / "gw", AGENT)
    spool = open_spool(cold)
    async with gateway_factory(cold / "gw") as gw:
        async with uploading(config(cold, gw.url, key), key, spool) as up:
            for chunk in chunks(sent):
                up._stream = None
                await trickle(up, spool, [chunk])
            assert up.stats.streams == up.stats.batches
        assert_exactly_once(gw, sent)
    # random flow records (test_uploader.v9_export): real exports repeat far more (docs/benchmarks.md)
    assert streamed < 0.9 * up.stats.body_bytes
    spool.close()


async def test_the_move_to_ws_for_bytes_keeps_the_stream(
    tmp_path: Path, gateway_factory: GatewayFactory, opened: Opened
) -> None:
    """The ladder's bytes preference moves a quiet agent from POST to ws after its first batch (issue 14);
    nothing failed and the gateway holds the stream up to that batch, so the next frame continues it over
    ws (after the resync, an empty batch that leaves the stream alone). Before, the move started a new
    stream: a frame without history, ~0.006 of raw UDP bytes more in bench/wire.py's 2/s row."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = v9_export(18)
    spool = open_spool(tmp_path)
    async with gateway_factory(data) as gw:
        async with uploading(config(tmp_path, gw.url, key, rungs=("post", "ws", "get")), key, spool) as up:
            await trickle(up, spool, chunks(sent))
            status = up.status()
            assert status["rung"] == "ws"
            assert status["rung_for_bytes"] is True
            assert status["switches"] == 1
            assert up.stats.failures == {}
            assert up.stats.streams == 1
            assert up.stats.stream_batches == up.stats.batches == len(chunks(sent))
        assert kinds(opened) == ["start"] + ["cont"] * (len(chunks(sent)) - 1)
        assert gw.metrics.rungs["post"]["acked"] >= 1
        assert gw.metrics.rungs["ws"]["acked"] >= 2
        assert_exactly_once(gw, sent)
    spool.close()


async def test_an_agent_restart_starts_a_new_stream(
    tmp_path: Path, gateway_factory: GatewayFactory, opened: Opened
) -> None:
    """kill -9 of the agent: its stream lived in memory only; the next process starts a new one, which
    replaces the one the gateway holds."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = v9_export(18)
    spool = open_spool(tmp_path)
    async with gateway_factory(data) as gw:
        async with uploading(config(tmp_path, gw.url, key), key, spool) as up:
            await trickle(up, spool, chunks(sent[:9]))
        first_after = len(opened)
        async with uploading(config(tmp_path, gw.url, key), key, spool) as up:
            await trickle(up, spool, chunks(sent[9:]))
            assert up.stats.failures == {}
        assert kinds(opened, first_after) == ["start", "cont", "cont"]
        assert_exactly_once(gw, sent)
    spool.close()


@pytest.mark.parametrize("step", ["after-ack", "before-ack"])
async def test_a_gateway_restart_refuses_the_unknown_stream_and_the_agent_resends_in_a_new_one(
    tmp_path: Path, gateway_factory: GatewayFactory, opened: Opened, step: str
) -> None:
    """kill -9 of the gateway: its streams lived in memory only. ``after-ack``: restarted between two
    batches: the next continuation is refused (``unknown-context``), the same datagrams go at once as the
    start frame of a new stream. ``before-ack``: the batch was journaled but its answer never reached the
    agent: that frame was not acknowledged, so the agent starts a new stream after its resync, and the new
    gateway process takes it without a refusal. Either way nothing is lost or doubled."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = v9_export(24)
    spool = open_spool(tmp_path)
    port = free_tcp_port()
    async with (
        gateway_factory(data, port=port) as gw,
        LinkEmulator(upstream=("127.0.0.1", port)) as link,
        uploading(config(tmp_path, link.url, key), key, spool) as up,
    ):
        await trickle(up, spool, chunks(sent[:12]))
        if step == "before-ack":
            link.add_fault(Fault(action=Action.ABORT_RESPONSE, match="POST /v1/b"))
            spool.append(sent[12:15])
            up.notify()
            await eventually(lambda: link.pending_faults() == 0, "the answer cut")
        await gw.stop()
        restarted = len(opened)
        async with gateway_factory(data, port=port) as gw2:
            rest = sent[15:] if step == "before-ack" else sent[12:]
            await trickle(up, spool, chunks(rest))
            if step == "after-ack":
                assert up.stats.failures["unknown-context"] == 1
                assert kinds(opened, restarted) == ["cont", "start", "cont", "cont", "cont"]
            else:
                assert "unknown-context" not in up.stats.failures
                assert kinds(opened, restarted)[0] == "start"
            assert up.stats.streams == 2
            assert_exactly_once(gw2, sent)
    spool.close()


async def test_a_stream_the_gateway_no_longer_holds_at_that_position_is_refused_then_started_afresh(
    tmp_path: Path, gateway_factory: GatewayFactory, opened: Opened
) -> None:
    """The gateway holds another stream of the agent, or the right one at another position (evicted and
    refilled, a frame of it decoded elsewhere): ``unknown-context``, never a decode against the wrong
    history; the agent starts a new stream at once."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = v9_export(18)
    spool = open_spool(tmp_path)
    async with gateway_factory(data) as gw:
        async with uploading(config(tmp_path, gw.url, key), key, spool) as up:
            await trickle(up, spool, chunks(sent[:9]))
            streams = ingest_of(gw).streams
            held = streams.held(AGENT)
            assert held is not None
            held.decoder.position += 1  # the gateway believes it is one frame further
            await trickle(up, spool, chunks(sent[9:12]))
            assert up.stats.failures["unknown-context"] == 1
            other = OpenStream(held.stream_id ^ 0x5A5A)  # another stream of this agent
            streams.keep(AGENT, other, start=True)
            await trickle(up, spool, chunks(sent[12:]))
            assert up.stats.failures["unknown-context"] == 2
            assert up.stats.streams == 3
        assert kinds(opened) == ["start", "cont", "cont", "cont", "start", "cont", "start", "cont"]
        assert_exactly_once(gw, sent)
    spool.close()


async def test_a_lost_ack_starts_a_new_stream_and_the_gateway_keeps_only_acknowledged_ones(
    tmp_path: Path, gateway_factory: GatewayFactory, opened: Opened
) -> None:
    """The gateway took a frame and kept its stream, but the answer was lost: the agent, not knowing, never
    continues past an unacknowledged frame; after its resync it seals the next batch as a start frame,
    which replaces the gateway's stream: no refusal, nothing doubled."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = v9_export(15)
    spool = open_spool(tmp_path)
    port = free_tcp_port()
    async with (
        gateway_factory(data, port=port) as gw,
        LinkEmulator(upstream=("127.0.0.1", port)) as link,
        uploading(config(tmp_path, link.url, key), key, spool) as up,
    ):
        await trickle(up, spool, chunks(sent[:9]))
        link.add_fault(Fault(action=Action.ABORT_RESPONSE, match="POST /v1/b"))
        await trickle(up, spool, chunks(sent[9:]))
        assert "unknown-context" not in up.stats.failures
        assert up.stats.streams == 2
        assert kinds(opened) == ["start", "cont", "cont", "cont", "start"]
        held = ingest_of(gw).streams.held(AGENT)
        assert held is not None
        assert held.position == 1
        assert_exactly_once(gw, sent)
    spool.close()


async def test_a_frame_refused_after_decoding_drops_the_gateways_stream(
    tmp_path: Path, gateway_factory: GatewayFactory, opened: Opened, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal refuses a decoded frame's batch (here: full, 503): the agent was not acknowledged and will
    start a new stream; the gateway must not keep the stream that frame advanced."""
    from flowtunnel.gateway.ingest import Rejected

    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = v9_export(12)
    spool = open_spool(tmp_path)
    async with gateway_factory(data) as gw:
        ingest = ingest_of(gw)
        real = ingest._commit
        refusals = [1]

        async def full_once(*args: Any, **kwargs: Any) -> Any:
            if refusals and args[0].first_seq == 7:
                refusals.pop()
                assert ingest.streams.held(AGENT) is None  # taken while it decodes and commits
                raise Rejected("journal-full", "journal cannot take it (test)", agent=AGENT, retry_after=0)
            return await real(*args, **kwargs)

        monkeypatch.setattr(ingest, "_commit", full_once)
        async with uploading(config(tmp_path, gw.url, key), key, spool) as up:
            await trickle(up, spool, chunks(sent[:6]))
            spool.append(sent[6:9])
            up.notify()
            await eventually(lambda: not refusals, "the refusal")
            assert ingest.streams.held(AGENT) is None
            await trickle(up, spool, chunks(sent[9:]))
            assert up.stats.failures["http-503"] == 1
        seen = kinds(opened)
        assert seen[:4] == ["start", "cont", "cont", "start"]  # the refused frame's datagrams: a new stream
        assert set(seen[4:]) <= {"cont"}
        assert_exactly_once(gw, sent)
    spool.close()


def test_a_frame_over_the_body_limit_is_not_sent_and_the_halves_start_a_new_stream(tmp_path: Path) -> None:
    """A frame too large for the body limit is sealed again in halves: the stream that frame advanced
    cannot go on (the gateway never sees that frame), so the half goes as the start of a new stream."""
    from flowtunnel.wire import SealStream, format_key

    key = bytes(range(32))
    spool = open_spool(tmp_path)
    spool.append(v9_export(12))
    up = Uploader(config(tmp_path, "http://127.0.0.1:9", key), key, spool)
    up._last_seq = spool.last_seq()
    entries = spool.read(after=0, limit=100, max_bytes=1 << 20)
    up._stream, up._stream_clean = SealStream(99), True
    up._stream.encoder.frame(b"what the gateway acknowledged")
    whole = len(up._seal(entries[:2])[0])
    up._stream_clean = True  # as if acknowledged
    up._sizer.max_body = 3 * whole
    body, batch = up._seal(entries)
    header = peek_header(body)
    assert len(batch) < len(entries)
    # The half has more spooled behind it: a backlog batch, sealed the throughput way (not a frame); the
    # stream the unsent frame advanced is gone, so the next quiet batch starts a new one.
    assert header.flags & FLAG_STREAM == 0
    assert up._stream is None
    up._last_seq = batch[-1].seq  # caught up: a quiet batch again
    header = peek_header(up._seal(entries[len(batch) : len(batch) + 1])[0])
    assert header.flags == START
    assert header.dict_id >> 16 != 99
    assert format_key(key)
    spool.close()


async def test_a_gateway_older_than_streams_is_remembered_and_gets_the_older_ways(
    tmp_path: Path, gateway_factory: GatewayFactory, opened: Opened, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway before stream compression refuses the flags (400 malformed-header): the agent says so once,
    sends the same datagrams again at once without a stream, and never tries a stream there again."""
    monkeypatch.setattr(batch_module, "_KNOWN_FLAGS", FLAG_CONTEXT)  # what such a gateway accepts
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = v9_export(15)
    spool = open_spool(tmp_path)
    async with gateway_factory(data) as gw:
        async with uploading(config(tmp_path, gw.url, key), key, spool) as up:
            await trickle(up, spool, chunks(sent))
            assert up.stats.failures == {"no-stream": 1}
            assert up.stats.stream_batches == 0
            assert up.stats.consecutive_failures == 0
        assert set(kinds(opened)) == {"plain"}  # (the refused start frame never got past its header)
        assert_exactly_once(gw, sent)
    spool.close()


async def test_stream_compression_off_sends_no_frame(
    tmp_path: Path, gateway_factory: GatewayFactory, opened: Opened
) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = v9_export(9)
    spool = open_spool(tmp_path)
    async with gateway_factory(data) as gw:
        async with uploading(config(tmp_path, gw.url, key, stream_compression=False), key, spool) as up:
            await trickle(up, spool, chunks(sent))
        assert set(kinds(opened)) == {"plain"}
        assert_exactly_once(gw, sent)
    spool.close()


async def test_continuations_refused_again_and_again_pause_streams_for_a_while(
    tmp_path: Path, gateway_factory: GatewayFactory, opened: Opened
) -> None:
    """A gateway that keeps losing the stream (a per-request balancer over gateways, a cache too small): after
    STREAM_MISSES refusals in a row the agent sends start frames only, which always open: no more resends."""
    from flowtunnel.agent.uploader import STREAM_MISSES

    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = v9_export(3 * (STREAM_MISSES + 3))
    spool = open_spool(tmp_path)
    async with gateway_factory(data) as gw:
        streams = ingest_of(gw).streams
        async with uploading(config(tmp_path, gw.url, key), key, spool) as up:
            parts = chunks(sent)
            await trickle(up, spool, parts[:1])
            for part in parts[1 : STREAM_MISSES + 1]:
                streams.forget(AGENT)
                await trickle(up, spool, [part])
            assert up.stats.failures["unknown-context"] == STREAM_MISSES
            await trickle(up, spool, parts[STREAM_MISSES + 1 :])
            assert up.stats.failures["unknown-context"] == STREAM_MISSES
        assert kinds(opened) == ["start"] + ["cont", "start"] * STREAM_MISSES + ["start", "start"]
        assert_exactly_once(gw, sent)
    spool.close()


def test_a_batch_that_is_not_quiet_lets_the_streams_encoder_go(tmp_path: Path) -> None:
    """A busy spell (a backlog, a burst) seals the throughput ways; the stream's encoder (~2 MB of liblzma
    tables once warm) is not kept meanwhile: the next quiet batch starts a new stream."""
    from flowtunnel.agent.policy import DEFAULT

    key = bytes(range(32))
    spool = open_spool(tmp_path)
    spool.append(v9_export(4))
    up = Uploader(config(tmp_path, "http://127.0.0.1:9", key), key, spool)
    up._last_seq = spool.last_seq()
    up.arrival = ArrivalRate(datagrams=1.0, mean_size=1400.0, last_seq=up._last_seq, stamp=up._clock())
    entries = spool.read(after=0, limit=100, max_bytes=1 << 20)

    def seal_one(i: int) -> int:
        up._last_seq = entries[i].seq  # caught up: nothing spooled behind it
        return peek_header(up._seal(entries[i : i + 1])[0]).flags

    assert seal_one(0) == START
    assert up._stream is not None
    up._stream_clean = True  # as if acknowledged
    up.codec_choice = lambda *, big: DEFAULT  # type: ignore[method-assign]
    assert seal_one(1) == 0
    assert up._stream is None
    del up.codec_choice
    assert seal_one(2) == START
    spool.close()


async def test_a_drain_at_shutdown_resends_at_once_a_frame_the_restarted_gateway_does_not_know(
    tmp_path: Path, gateway_factory: GatewayFactory, opened: Opened
) -> None:
    """The gateway restarted (its streams gone) and the agent stops before its next batch: the shutdown's
    drain seals a continuation, is refused ``unknown-context`` and sends the same datagrams again at once in
    a new stream, instead of leaving them spooled (which it did: the drain stopped at the first failure)."""
    from flowtunnel.runtime import TaskSet

    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    sent = v9_export(12)
    spool = open_spool(tmp_path)
    port = free_tcp_port()
    up = Uploader(config(tmp_path, f"http://127.0.0.1:{port}", key), key, spool)
    await up.open()
    try:
        async with gateway_factory(data, port=port) as gw:
            up.arrival = ArrivalRate(datagrams=1.0, mean_size=1400.0, last_seq=0, stamp=up._clock())
            tasks = TaskSet()
            tasks.spawn(up.run(), name="upload")
            await trickle(up, spool, chunks(sent[:6]))
            await tasks.close()  # the agent is stopping...
            await gw.stop()
        async with gateway_factory(data, port=port) as gw2:  # ... just after the gateway restarted
            spool.append(sent[6:])
            assert await up.drain()
            assert up.stats.failures["unknown-context"] == 1
            assert kinds(opened)[-2:] == ["cont", "start"]
            assert_exactly_once(gw2, sent)
    finally:
        await up.close()
        spool.close()
