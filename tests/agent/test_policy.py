"""The uploader's pure rules: backoff with full jitter, Retry-After, bandwidth budgets, batch sizing, the
link estimate and the codec choice."""

from __future__ import annotations

import email.utils

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowtunnel.agent.policy import (
    BUDGET_DAYS,
    CPU_SHARE,
    DEFAULT,
    FAST,
    LEAN,
    LEAN_SHARE,
    MAX_RETRY_AFTER,
    SMALL,
    TIGHT,
    TIGHT_SHARE,
    ArrivalRate,
    BatchSizer,
    CodecChoice,
    DailyBudget,
    LinkEstimate,
    Outcome,
    TokenBucket,
    backoff_delay,
    choose_codec,
    classify_status,
    parse_retry_after,
)


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    ceilings = [backoff_delay(n, base=0.5, cap=60.0, draw=1.0) for n in range(10)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]


def test_backoff_is_full_jitter_over_the_ceiling() -> None:
    assert backoff_delay(3, base=0.5, cap=60.0, draw=0.0) == 0.0
    assert backoff_delay(3, base=0.5, cap=60.0, draw=0.25) == 1.0


def test_backoff_survives_endless_failures() -> None:
    assert backoff_delay(10_000, base=0.5, cap=60.0, draw=0.5) == 30.0


@pytest.mark.parametrize(("attempt", "draw"), [(-1, 0.5), (0, 1.5), (0, -0.1)])
def test_backoff_rejects_misuse(attempt: int, draw: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        backoff_delay(attempt, base=0.5, cap=60.0, draw=draw)


def test_retry_after_in_seconds() -> None:
    assert parse_retry_after("7", now=1000.0) == 7.0
    assert parse_retry_after(" 0 ", now=1000.0) == 0.0


def test_retry_after_as_http_date() -> None:
    now = 1_800_000_000.0
    text = email.utils.formatdate(now + 42, usegmt=True)
    assert parse_retry_after(text, now=now) == pytest.approx(42.0)


def test_retry_after_in_the_past_means_now() -> None:
    now = 1_800_000_000.0
    assert parse_retry_after(email.utils.formatdate(now - 100, usegmt=True), now=now) == 0.0


def test_retry_after_is_capped() -> None:
    assert parse_retry_after("99999999", now=0.0) == MAX_RETRY_AFTER


@pytest.mark.parametrize("text", [None, "", "soon", "-5", "1.5", "Mon, 99 Foo 2026 25:00:00 GMT"])
def test_retry_after_unreadable_falls_back(text: str | None) -> None:
    assert parse_retry_after(text, now=0.0) is None


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.OK),
        (413, Outcome.TOO_LARGE),
        (407, Outcome.RETRY), (408, Outcome.RETRY), (429, Outcome.RETRY),
        (500, Outcome.RETRY), (502, Outcome.RETRY), (503, Outcome.RETRY), (504, Outcome.RETRY),
        (400, Outcome.REJECTED), (401, Outcome.REJECTED), (403, Outcome.REJECTED), (404, Outcome.REJECTED),
        (411, Outcome.REJECTED), (415, Outcome.REJECTED),
    ],
)
def test_status_classes(status: int, outcome: Outcome) -> None:
    assert classify_status(status) is outcome


def test_token_bucket_starts_full_then_paces_at_the_rate() -> None:
    bucket = TokenBucket(rate=1000.0, burst=2000.0)
    assert bucket.delay(2000, now=0.0) == 0.0
    bucket.spend(2000, now=0.0)
    assert bucket.delay(500, now=0.0) == pytest.approx(0.5)
    assert bucket.delay(500, now=0.5) == 0.0


def test_token_bucket_lets_an_oversized_request_go_when_full_and_charges_it() -> None:
    bucket = TokenBucket(rate=1000.0, burst=1000.0)
    assert bucket.delay(5000, now=0.0) == 0.0
    bucket.spend(5000, now=0.0)
    # 4000 bytes of debt plus 1000 for the next request: 5 seconds at 1000 B/s.
    assert bucket.delay(1000, now=0.0) == pytest.approx(5.0)


def test_token_bucket_does_not_save_beyond_the_burst() -> None:
    bucket = TokenBucket(rate=1000.0, burst=1000.0)
    bucket.spend(1000, now=0.0)
    assert bucket.delay(1000, now=100.0) == 0.0
    bucket.spend(1000, now=100.0)
    assert bucket.delay(1000, now=100.0) == pytest.approx(1.0)


def test_token_bucket_unlimited() -> None:
    bucket = TokenBucket(rate=0.0, burst=0.0)
    bucket.spend(10**9, now=0.0)
    assert bucket.delay(10**9, now=0.0) == 0.0


def test_daily_budget_waits_for_utc_midnight() -> None:
    day = 20_000 * 86400.0
    budget = DailyBudget(limit=1000)
    assert budget.delay(600, now=day + 10) == 0.0
    budget.spend(600, now=day + 10)
    assert budget.delay(300, now=day + 20) == 0.0
    budget.spend(300, now=day + 20)
    assert budget.delay(300, now=day + 30) == pytest.approx(86400 - 30)
    assert budget.delay(300, now=day + 86400) == 0.0


def test_daily_budget_first_request_of_a_day_always_goes() -> None:
    budget = DailyBudget(limit=100)
    assert budget.delay(5000, now=0.0) == 0.0


def test_daily_budget_resumes_from_persisted_numbers() -> None:
    day = 20_000
    budget = DailyBudget(limit=1000, spent={day: 1000})
    assert budget.delay(1, now=day * 86400.0 + 3600) == pytest.approx(86400 - 3600)


def test_daily_budget_survives_a_clock_that_goes_forward_a_day_and_back() -> None:
    """Issue 17.10: day D sent 75.4 KiB against 60k after the clock went to D+1 and back."""
    day = 20_000 * 86400.0
    budget = DailyBudget(limit=60_000)
    budget.spend(55_000, now=day + 3600)
    assert budget.delay(10_000, now=day + 3700) > 0  # day D is spent
    budget.spend(10_000, now=day + 86400 + 10)  # the clock jumps to D+1: a new day, this goes
    # ... and back to D: what D already spent still counts.
    assert budget.delay(10_000, now=day + 3800) == pytest.approx(86400 - 3800)
    assert budget.used(day + 3800) == 55_000
    assert budget.used(day + 86400 + 20) == 10_000


def test_daily_budget_forgets_only_the_least_recently_spent_days() -> None:
    budget = DailyBudget(limit=100)
    for d in range(BUDGET_DAYS + 5):
        budget.spend(100, now=d * 86400.0)
    assert len(budget.spent) == BUDGET_DAYS
    assert budget.used(4 * 86400.0) == 0
    assert budget.used(5 * 86400.0) == 100


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(min_value=1_000, max_value=60_000),
    walk=st.lists(
        st.tuples(
            st.integers(min_value=-3 * 86400, max_value=3 * 86400),  # clock step, seconds (either way)
            st.integers(min_value=1, max_value=1_000),  # request size as a fraction of the limit, per mille
        ),
        min_size=1, max_size=80,
    ),
)
def test_daily_budget_never_exceeds_the_cap_of_any_day_whatever_the_clock_does(
    limit: int, walk: list[tuple[int, int]]
) -> None:
    """A random walk of the clock (jumps forward and back by up to three days) with requests of up to the
    limit: every request that ``delay`` lets go is spent on its day, and no day ever totals more than the
    limit."""
    budget = DailyBudget(limit=limit)
    now = 20_000 * 86400.0
    per_day: dict[int, int] = {}
    for step, permille in walk:
        now += step
        n = max(1, limit * permille // 1000)
        if budget.delay(n, now) == 0.0:
            budget.spend(n, now)
            per_day[int(now // 86400)] = per_day.get(int(now // 86400), 0) + n
    assert all(total <= limit for total in per_day.values()), per_day


def test_batch_sizer_starts_without_assuming_compression() -> None:
    sizer = BatchSizer(max_body=100_000)
    assert sizer.raw_target() == 85_000


def test_batch_sizer_learns_the_ratio_slowly_up_and_at_once_down() -> None:
    sizer = BatchSizer(max_body=100_000)
    sizer.observe(raw_bytes=50_000, body_bytes=10_000)  # ratio 5
    assert sizer.ratio == pytest.approx(1.8)
    for _ in range(50):
        sizer.observe(raw_bytes=50_000, body_bytes=10_000)
    assert sizer.ratio == pytest.approx(5.0, rel=0.01)
    sizer.observe(raw_bytes=20_000, body_bytes=10_000)
    assert sizer.ratio == 2.0
    assert sizer.raw_target() == 170_000


def test_batch_sizer_shrinks_to_a_floor_after_413() -> None:
    sizer = BatchSizer(max_body=1_000_000)
    assert sizer.shrink(300_000)
    assert sizer.max_body == 500_000
    assert sizer.shrink(300_000)
    assert sizer.max_body == 300_000
    assert not sizer.shrink(300_000)


def test_the_link_estimate_follows_the_uploads_weighted_by_bytes() -> None:
    """After slow small requests (round trips), one big fast one dominates; slow big ones bring it down."""
    link = LinkEstimate()
    assert link.body_rate is None
    assert link.default_ratio is None
    for _ in range(20):
        link.observe(25_000, 5_000, 0.1)  # 50 kB/s: round-trip bound
    assert link.body_rate == pytest.approx(50_000)
    assert link.default_ratio == pytest.approx(0.2)
    link.observe(5_000_000, 1_000_000, 0.1)
    assert (link.body_rate or 0) > 2_000_000
    for _ in range(5):
        link.observe(500_000, 1_000_000, 10.0)  # 100 kB/s, incompressible
    assert (link.body_rate or 0) < 150_000
    assert (link.default_ratio or 0) > 1


def test_the_link_estimate_knows_the_datas_compressibility_whatever_codec_measured_it() -> None:
    fast, small = LinkEstimate(), LinkEstimate()
    fast.observe(1_000_000, int(1_000_000 * FAST.body), 0.1, FAST)
    small.observe(1_000_000, int(1_000_000 * SMALL.body), 0.1, SMALL)
    assert fast.default_ratio == pytest.approx(DEFAULT.body)
    assert small.default_ratio == pytest.approx(DEFAULT.body)


def test_the_round_trip_of_empty_requests_is_not_link_time_up_to_half_a_request() -> None:
    """A 1 MB batch in 1.0 s over a link with a 0.4 s round trip: 1.67 MB/s, not 1 MB/s; but a round trip
    that may include connection set-up never makes a link look more than twice as fast as measured."""
    link = LinkEstimate()
    link.observe_round_trip(0.8)
    link.observe_round_trip(0.4)  # the quickest counts
    link.observe_round_trip(float("nan"))
    assert link.round_trip == 0.4
    link.observe(5_000_000, 1_000_000, 1.0)
    assert link.body_rate == pytest.approx(1e6 / 0.6)
    short = LinkEstimate(round_trip=0.4)
    short.observe(500_000, 100_000, 0.5)
    assert short.body_rate == pytest.approx(100_000 / 0.25)


def test_the_link_estimate_ignores_nonsense_and_survives_a_zero_duration() -> None:
    link = LinkEstimate()
    link.observe(0, 1000, 1.0)
    link.observe(1000, 0, 1.0)
    link.observe(1000, 1000, -1.0)
    link.observe(1000, 1000, float("nan"))
    assert link.body_rate is None
    link.observe(1000, 1000, 0.0)
    assert link.body_rate == pytest.approx(1e9)


def _measured(body_rate: float | None, ratio: float = 0.2) -> LinkEstimate:
    """A link measured at ``body_rate`` with data that compresses to ``ratio`` with DEFAULT."""
    link = LinkEstimate()
    if body_rate is not None:
        link.observe(int(1e6 / ratio), 1_000_000, 1e6 / body_rate)
    return link


@pytest.mark.parametrize(
    ("body_rate", "arrival", "big", "bandwidth", "daily", "expected"),
    [
        (None, 0.0, True, 0, 0, SMALL),  # nothing measured yet: bytes-lean
        (None, 0.0, False, 0, 0, TIGHT),  # nothing arriving yet: CPU costs nothing
        # issue 14: a fast measured link no longer picks FAST while the CPU share allows a leaner seal
        (50e6, 350_000.0, True, 0, 0, SMALL),  # 250 datagrams/s, something spooled behind: 13 % of a core
        (50e6, 350_000.0, False, 0, 0, LEAN),  # 2.1 % of a core
        (50e6, 700_000.0, False, 0, 0, LEAN),  # 500 datagrams/s (bench/wire.py's "fast"): 4.2 %
        (50e6, 3_000.0, False, 0, 0, TIGHT),  # a quiet site: zstd level 15 or codec 5, 0.3 % of a core
        (50e6, 3_000.0, False, 0, 1, TIGHT),  # ... with a budget too
        (50e6, 3_000.0, True, 0, 0, SMALL),  # a backlog there: LZMA (big batches)
        (50e6, 17_000.0, False, 0, 0, LEAN),  # above TIGHT_SHARE: codec 5 at preset 1, 0.1 % of a core
        (50e6, 1.2e6, False, 0, 0, DEFAULT),  # above LEAN_SHARE: zstd, as before
        (200e3, 350_000.0, True, 0, 0, SMALL),  # a slow link: the same
        (50e6, 2e6, True, 0, 0, DEFAULT),  # SMALL would take 76 % of a core to drain the backlog as fast
        (50e6, 5e6, False, 0, 0, DEFAULT),  # 18 % for DEFAULT
        (50e6, 10e6, False, 0, 0, FAST),  # DEFAULT over the share, FAST within
        (50e6, 40e6, False, 0, 0, FAST),  # nothing within the share, the link decides: loopback-fast
        (200e3, 40e6, True, 0, 0, SMALL),  # ... a slow link: bytes are the bottleneck
        (50e6, 40e6, True, 100_000, 0, SMALL),  # the cap, not the measured link, is what bytes wait for
        (None, 40e6, True, 0, 0, FAST),  # CPU-bound, link unknown: the cheapest seal
        (50e6, 40e6, True, 0, 1, SMALL),  # a daily budget: bytes count whatever the CPU and link
        (50e6, 40e6, False, 0, 1, LEAN),
    ],
)
def test_the_codec_is_the_leanest_within_the_cpu_share(
    body_rate: float | None, arrival: float, big: bool, bandwidth: int, daily: int,
    expected: CodecChoice,
) -> None:
    got = choose_codec(_measured(body_rate, 0.2), big=big, bandwidth=bandwidth, daily_bytes=daily,
                       arrival=arrival)
    assert got is expected


def test_the_cpu_share_thresholds_are_where_the_docstring_says() -> None:
    """SMALL for big batches up to ~0.65 MB/s arriving, DEFAULT up to ~7 MB/s, FAST up to 25 MB/s: each the
    point where its sealing CPU reaches CPU_SHARE of a core; then the race (FAST above ~6 MB/s of body)."""
    def pick(rate: float, big: bool, body_rate: float = 50e6) -> CodecChoice:
        return choose_codec(_measured(body_rate, DEFAULT.body), big=big, bandwidth=0, daily_bytes=0,
                            arrival=rate)

    assert CPU_SHARE == 0.25
    assert TIGHT_SHARE == 0.015
    assert pick(14.5e3, big=False) is TIGHT  # ~10 datagrams/s of 1,400 bytes
    assert pick(15.5e3, big=False) is LEAN
    assert LEAN_SHARE == 0.05
    assert pick(0.83e6, big=False) is LEAN  # ~600 datagrams/s of 1,400 bytes
    assert pick(0.84e6, big=False) is DEFAULT
    assert pick(0.6e6, big=True) is SMALL
    assert pick(0.7e6, big=True) is DEFAULT
    assert pick(3.4e6, big=True) is DEFAULT
    assert pick(3.7e6, big=True) is FAST
    assert pick(7.0e6, big=False) is DEFAULT
    assert pick(7.3e6, big=False) is FAST
    assert pick(30e6, big=True, body_rate=7e6) is FAST
    assert pick(30e6, big=True, body_rate=5e6) is DEFAULT
    assert pick(30e6, big=True, body_rate=300e3) is SMALL


def test_the_arrival_rate_follows_the_spool_and_fades() -> None:
    rate = ArrivalRate(tau=10.0)
    rate.observe(last_seq=5000, raw_bytes=100_000, count=100, now=0.0)  # a backlog found at start: no rate
    assert rate.bytes_per_second == 0
    for t in range(1, 200):
        rate.observe(last_seq=5000 + 10 * t, raw_bytes=10_000, count=10, now=float(t))  # 10 datagrams/s
    assert 9_000 < rate.bytes_per_second < 11_000
    rate.observe(last_seq=6990, raw_bytes=0, count=0, now=300.0)
    faded = rate.bytes_per_second
    assert faded < 1
    rate.observe(last_seq=7000, raw_bytes=0, count=0, now=250.0)  # a clock stepping back: no time passed
    assert rate.bytes_per_second == pytest.approx(faded + 1000)
    rate.observe(last_seq=3, raw_bytes=0, count=0, now=301.0)  # the spool renumbered: nothing arrived
    assert rate.bytes_per_second <= faded + 1000


def test_the_arrival_rate_reads_a_steady_rate_from_the_second_observation() -> None:
    """issue 14: the decayed sum starts empty; undivided, a busy agent's first seconds read as a quiet site's
    (36 datagrams/s of 1,400 bytes read 5 KB/s after 1 s, 13 KB/s after 4 s) and were sealed TIGHT."""
    def steady(per_second: int, seconds: int) -> list[float]:
        rate = ArrivalRate(tau=10.0)
        out = []
        for t in range(seconds):
            rate.observe(last_seq=100 + per_second * t, raw_bytes=per_second * 1400, count=per_second, now=t)
            out.append(rate.bytes_per_second)
        return out

    readings = steady(36, 200)
    assert readings[-1] == pytest.approx(36 * 1400, rel=0.06)  # one observation a second: ~5 % high
    for reading in readings[1:5]:
        assert reading == pytest.approx(readings[-1], rel=1e-9)
        assert choose_codec(LinkEstimate(), big=False, bandwidth=0, daily_bytes=0,
                            arrival=reading) is not TIGHT
    quiet = steady(2, 6)  # a quiet site still reads quiet: 2 datagrams/s
    assert quiet[-1] == pytest.approx(steady(2, 200)[-1], rel=1e-9)
    assert choose_codec(LinkEstimate(), big=False, bandwidth=0, daily_bytes=0, arrival=quiet[-1]) is TIGHT


def test_batches_sealed_back_to_back_at_start_do_not_read_as_a_flood() -> None:
    """A backlog found at start is sealed batch after batch, milliseconds apart: the few datagrams arriving
    between them count over at least ``MIN_WINDOW``, not as thousands a second."""
    from flowtunnel.agent.policy import MIN_WINDOW

    rate = ArrivalRate(tau=10.0)
    rate.observe(last_seq=5000, raw_bytes=100_000, count=100, now=0.0)
    rate.observe(last_seq=5002, raw_bytes=100_000, count=100, now=0.005)  # 2 datagrams in 5 ms
    assert rate.bytes_per_second == pytest.approx(2 / MIN_WINDOW * 1000, rel=0.06)


def test_a_daily_budget_lengthens_the_latency_so_the_request_overhead_fits() -> None:
    """issue 14: with ``--daily-bytes`` the agent batches longer when ~600 bytes per request would not fit."""
    from flowtunnel.agent.policy import MAX_BUDGET_LATENCY, REQUEST_OVERHEAD, budget_latency

    day = 86400.0 * 20_000
    # 10 MB/day with 60 body bytes/s (5.2 MB/day of data): 56 bytes/s left for overhead → 600/56 ≈ 10.7 s
    got = budget_latency(daily_bytes=10_000_000, used_today=0, now=day, body_rate=60.0, configured=1.0)
    assert got == pytest.approx(REQUEST_OVERHEAD / (10_000_000 / 86400 - 60), rel=1e-6)
    assert 10 < got < 11
    # a generous budget: the user's latency
    assert budget_latency(daily_bytes=10**9, used_today=0, now=day, body_rate=60.0, configured=1.0) == 1.0
    # the user's longer latency is honoured as is
    assert budget_latency(daily_bytes=10_000_000, used_today=0, now=day, body_rate=60.0,
                          configured=120.0) == 120.0
    # the data alone exceeds what is left: the longest latency, and the budget stops uploads
    assert budget_latency(daily_bytes=10_000_000, used_today=9_999_000, now=day + 3600, body_rate=60.0,
                          configured=1.0) == MAX_BUDGET_LATENCY
    # no budget
    assert budget_latency(daily_bytes=0, used_today=0, now=day, body_rate=1e9, configured=2.0) == 2.0
