"""Transport-neutral admission (gateway/admission.py): slots bounded in total and per agent id, given back
whatever happens in the ``with`` block; per-source token buckets with a bounded table."""

from __future__ import annotations

import asyncio

import pytest

from flowtunnel.gateway.admission import Admission, Busy, SourceRate


def test_slots_are_bounded_per_agent_and_in_total_and_always_given_back() -> None:
    seen: list[int] = []
    adm = Admission(max_inflight=3, max_inflight_per_agent=2, on_change=seen.append)
    with adm.slot("a") as s1, adm.slot("a") as s2:
        assert s1 is None
        assert s2 is None
        with adm.slot("a") as s3:
            assert s3 == Busy(total=2, for_agent=2, agent="a")
            assert s3.detail() == "2 batches in progress (2 for agent a)"
        with adm.slot("b") as s4:
            assert s4 is None
            with adm.slot("c") as s5:
                assert isinstance(s5, Busy)
                assert s5.total == 3
    assert (adm.busy, adm.in_use("a")) == (0, 0)
    held: list[int] = []

    def failing_ingest() -> None:
        with adm.slot("a"):
            held.append(adm.busy)
            raise RuntimeError("ingest failed")

    with pytest.raises(RuntimeError, match="ingest failed"):
        failing_ingest()
    assert held == [1]
    assert adm.busy == 0
    assert max(seen) == 3
    assert seen[-1] == 0


def test_admission_refuses_impossible_bounds() -> None:
    with pytest.raises(ValueError, match=r"max_inflight_per_agent 3 is outside 1 \.\. max_inflight \(2\)"):
        Admission(max_inflight=2, max_inflight_per_agent=3)


def test_source_rate_allows_bursts_then_the_rate_and_keeps_a_bounded_table() -> None:
    now = [0.0]
    rate = SourceRate(rate=2.0, burst=3, max_sources=2, clock=lambda: now[0])
    assert [rate.take("x") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rate.take("x") == pytest.approx(0.5)
    now[0] += 0.5
    assert rate.take("x") == 0.0
    assert rate.take("y") == 0.0
    assert rate.take("z") == 0.0
    assert len(rate) == 2  # "x" (least recently used) dropped


async def test_when_every_slot_is_taken_requests_wait_in_arrival_order_instead_of_a_503() -> None:
    # A fleet of thousands against a journal that is the bottleneck: refusing at once made admission a
    # lottery some agents lost for minutes in a row (bench/fleet.py); waiting in line serves them in turn.
    adm = Admission(max_inflight=1, max_inflight_per_agent=1, max_waiting=2)
    order: list[str] = []
    release = asyncio.Event()

    async def request(agent: str) -> Busy | None:
        async with adm.queued(agent, wait=5.0) as busy:
            if busy is None:
                order.append(agent)
                await release.wait()
            return busy

    first = asyncio.create_task(request("a"))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(request(agent)) for agent in ("b", "c")]
    await asyncio.sleep(0)
    assert adm.waiting == 2
    async with adm.queued("d", wait=5.0) as busy:  # the line is full: refused at once
        assert busy == Busy(total=1, for_agent=0, agent="d")
    async with adm.queued("a", wait=5.0) as busy:  # the per-agent bound still refuses at once
        assert busy is not None
        assert busy.for_agent == 1
    with adm.slot("e") as busy:  # the synchronous edges do not overtake the line either
        assert busy is not None
    release.set()
    assert await asyncio.gather(first, *waiting) == [None, None, None]
    assert order == ["a", "b", "c"]
    assert (adm.busy, adm.waiting, adm.in_use("b")) == (0, 0, 0)


async def test_a_wait_that_times_out_or_is_cancelled_holds_nothing() -> None:
    seen: list[int] = []
    adm = Admission(max_inflight=1, max_inflight_per_agent=1, max_waiting=4, on_change=seen.append)
    async with adm.queued("a", wait=5.0) as held:
        assert held is None
        async with adm.queued("b", wait=0.05) as busy:
            assert busy == Busy(total=1, for_agent=0, agent="b")
        assert (adm.waiting, adm.in_use("b")) == (0, 0)
        async with adm.queued("c", wait=0) as busy:  # no wait allowed: the old immediate 503
            assert busy is not None

        async def wait_for_c() -> None:
            async with adm.queued("c", wait=5.0):
                raise AssertionError("never granted")

        task = asyncio.create_task(wait_for_c())
        await asyncio.sleep(0.01)
        assert adm.waiting == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (adm.waiting, adm.in_use("c")) == (0, 0)
    assert (adm.busy, seen[-1]) == (0, 0)
    async with adm.queued("d", wait=0) as free:  # a freed slot with nobody waiting is simply free
        assert free is None


async def test_small_batches_have_a_lane_of_their_own_and_the_per_agent_bound_counts_both() -> None:
    # 2,000 agents (bench/fleet.py): slots are held until the journal commits, so 16 of them capped a commit
    # at 16 batches and the slowest requests, nearly all of 0-2 datagrams, spent their time waiting for one.
    seen: list[int] = []
    adm = Admission(max_inflight=2, max_inflight_per_agent=2, max_waiting=4, max_small=2,
                    on_change=seen.append)
    release = asyncio.Event()
    granted: list[str] = []

    async def request(agent: str, *, small: bool) -> Busy | None:
        async with adm.queued(agent, wait=5.0, small=small) as busy:
            if busy is None:
                granted.append(agent)
                await release.wait()
            return busy

    large = [asyncio.create_task(request(agent, small=False)) for agent in ("a", "x")]
    await asyncio.sleep(0)
    waiting = asyncio.create_task(request("b", small=False))  # both large slots are taken: it waits
    await asyncio.sleep(0)
    smalls = [asyncio.create_task(request(agent, small=True)) for agent in ("c", "a")]
    await asyncio.sleep(0)
    assert granted == ["a", "x", "c", "a"]  # small batches do not wait behind large ones
    assert (adm.busy, adm.waiting, seen[-1]) == (4, 1, 4)
    async with adm.queued("a", wait=5.0, small=True) as busy:  # a's two slots, one in each lane
        assert busy is not None
        assert busy.for_agent == 2
    async with adm.queued("d", wait=0, small=True) as busy:  # the small lane is full too
        assert busy == Busy(total=2, for_agent=0, agent="d")
    late = asyncio.create_task(request("d", small=True))  # ... so a small batch waits in its own line
    await asyncio.sleep(0)
    assert adm.waiting == 2
    release.set()
    assert await asyncio.gather(*large, waiting, *smalls, late) == [None] * 6
    assert sorted(granted) == ["a", "a", "b", "c", "d", "x"]
    assert (adm.busy, adm.waiting, adm.in_use("a"), seen[-1]) == (0, 0, 0, 0)


async def test_without_a_small_lane_small_batches_share_the_slots() -> None:
    adm = Admission(max_inflight=1, max_inflight_per_agent=1, max_waiting=4)
    async with adm.queued("a", wait=5.0, small=True) as held:
        assert held is None
        async with adm.queued("b", wait=0, small=True) as busy:
            assert busy == Busy(total=1, for_agent=0, agent="b")


async def test_take_now_is_queueds_fast_path_and_never_overtakes_the_line() -> None:
    """A free slot is taken without a context manager (per request CPU, issue 16), under the same bounds:
    per agent, per lane, and never ahead of a request already waiting; its release hands the slot on."""
    seen: list[int] = []
    adm = Admission(max_inflight=1, max_inflight_per_agent=1, max_waiting=4, max_small=2,
                    on_change=seen.append)
    lane = adm.take_now("a")
    assert lane is not None
    assert adm.busy == 1
    assert adm.take_now("a", small=True) is None  # a's one slot is held
    assert adm.take_now("b") is None  # the main lane is full
    small = adm.take_now("b", small=True)
    assert small is not None
    assert adm.busy == 2
    adm.release("b", small)

    async def waits() -> Busy | None:
        async with adm.queued("c", wait=5.0) as busy:
            return busy

    waiting = asyncio.create_task(waits())
    await asyncio.sleep(0)
    assert adm.waiting == 1
    adm.release("a", lane)  # handed to c, not freed
    assert adm.take_now("d") is None
    assert await waiting is None
    assert (adm.busy, adm.waiting, adm.in_use("a"), adm.in_use("c")) == (0, 0, 0, 0)
    assert seen[-1] == 0
