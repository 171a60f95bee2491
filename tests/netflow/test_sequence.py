"""Sequence tracking: loss, wrap-around at 2^32, late datagrams, restarts counted as resets, unknown sizes."""

from __future__ import annotations

import random

from flowtunnel.netflow.sequence import SequenceStats, SequenceTracker


def tracker() -> SequenceTracker:
    return SequenceTracker(reorder_window=100, max_gap=1000)


def test_in_order_stream_has_no_loss() -> None:
    t = tracker()
    for seq in range(0, 100, 10):
        assert t.update(seq, 10) == (0, False)
    assert t.stats() == SequenceStats(expected=100, received=100, lost=0, resets=0)


def test_gap_is_loss_and_wraps_at_2_32() -> None:
    t = tracker()
    t.update(2**32 - 10, 5)
    assert t.update(2**32 - 5, 5) == (0, False)
    assert t.update(3, 1) == (3, False)  # 0, 1, 2 missing across the wrap
    assert t.stats() == SequenceStats(expected=14, received=11, lost=3, resets=0)


def test_late_datagram_fills_its_gap() -> None:
    t = tracker()
    t.update(0, 10)
    assert t.update(20, 10) == (10, False)
    assert t.update(10, 10) == (0, False)  # arrived late
    assert t.stats() == SequenceStats(expected=30, received=30, lost=0, resets=0)
    assert t.next_expected == 30


def test_big_jumps_and_uptime_going_back_are_resets() -> None:
    t = tracker()
    t.update(5000, 1, uptime_ms=10_000)
    assert t.update(10, 1, uptime_ms=20_000) == (0, True)  # far backwards
    assert t.update(10**6, 1, uptime_ms=30_000) == (0, True)  # beyond max_gap
    assert t.update(10**6 + 1, 1, uptime_ms=5) == (0, True)  # exporter rebooted, numbers continue
    assert t.stats().resets == 3
    assert t.stats().lost == 0
    # The 49.7-day uptime wrap is not a reboot.
    t.update(10**6 + 2, 1, uptime_ms=2**32 - 10)
    assert t.update(10**6 + 3, 1, uptime_ms=20) == (0, False)


def test_unknown_size_resynchronises_without_loss() -> None:
    t = tracker()
    t.update(0, 10)
    assert t.update(10, None) == (0, False)
    assert t.update(500, 3) == (0, False)  # size of the previous datagram unknown: no loss claimed
    assert t.update(503, 3) == (0, False)


def test_convention_after_datagram_is_learnt() -> None:
    t = tracker()
    assert t.update(3, 3) == (0, False)
    assert t.update(8, 5) == (0, False)  # 3 + 5: numbered after this datagram
    assert t.timing == "after"
    assert t.update(9, 1) == (0, False)
    assert t.update(15, 2) == (4, False)


def test_convention_flows_only_is_learnt() -> None:
    t = tracker()
    t.update(0, 5, flow_units=4)  # 4 flows + 1 options record; exporter counts flows only
    assert t.update(4, 2, flow_units=2) == (0, False)
    assert (t.timing, t.unit) == ("before", "flows")
    assert t.next_expected == 6


def test_update_same_accounts_exactly_as_update() -> None:
    # update_same() is update() with its in-order, same-size case decided first: same results and state on
    # in-order runs, gaps, late datagrams, wraps, clock resets, size changes and options-only datagrams.
    rng = random.Random(2026)
    for _ in range(200):
        fast = SequenceTracker(reorder_window=64, max_gap=1 << 20)
        slow = SequenceTracker(reorder_window=64, max_gap=1 << 20)
        seq, uptime = rng.choice([0, (1 << 32) - 3, rng.randrange(1 << 32)]), rng.randrange(1 << 32)
        units = rng.choice([1, 30])
        for _ in range(60):
            step = rng.choice([units, units, units, units, 0, 2, 5, -1, -3, 1 << 31, rng.randrange(1 << 32)])
            seq = (seq + step) % (1 << 32)
            uptime = rng.choice([uptime + 10, uptime + 10, uptime, uptime - 10_000, rng.randrange(1 << 32)])
            uptime %= 1 << 32
            if rng.random() < 0.1:  # a datagram of other units (None: unknown), or of options records only
                other = rng.choice([None, 1, 3, 7])
                flows = rng.choice([other, 0])
                assert fast.update(seq, other, uptime, flows) == slow.update(seq, other, uptime, flows)
            else:
                size = rng.choice([units, units, units, 2])
                assert fast.update_same(seq, size, uptime) == slow.update(seq, size, uptime)
            assert fast.stats() == slow.stats()
            assert fast.next_expected == slow.next_expected
            state = [n for n in SequenceTracker.__slots__ if n != "_same_next"]
            assert [getattr(fast, n) for n in state] == [getattr(slow, n) for n in state]
