"""The uploader's pure rules: backoff with full jitter, Retry-After, bandwidth budgets, batch sizing."""

from __future__ import annotations

import email.utils

import pytest

from flowtunnel.agent.policy import (
    MAX_RETRY_AFTER,
    BatchSizer,
    DailyBudget,
    Outcome,
    TokenBucket,
    backoff_delay,
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
    budget = DailyBudget(limit=1000, day=day, used=1000)
    assert budget.delay(1, now=day * 86400.0 + 3600) == pytest.approx(86400 - 3600)


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
