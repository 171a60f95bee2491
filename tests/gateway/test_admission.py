"""Transport-neutral admission (gateway/admission.py): slots bounded in total and per agent id, given back
whatever happens in the ``with`` block; per-source token buckets with a bounded table."""

from __future__ import annotations

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
