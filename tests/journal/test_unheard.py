"""``retry_unheard``: "no response from stream" (nothing stored) is retried; everything else is not."""

from __future__ import annotations

import pytest
from nats.js.errors import NoStreamResponseError

from flowtunnel.journal.jetstream import retry_unheard


async def test_a_stream_not_yet_heard_is_asked_again_until_it_answers() -> None:
    """A fresh R3 stream or bucket answered "no response from stream" for a moment (its interest had not yet
    crossed the cluster's routes): an enrolment or an append failed at once in CI."""
    calls = []

    async def make() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise NoStreamResponseError
        return "stored"

    assert await retry_unheard(make, within=5.0) == "stored"
    assert len(calls) == 3


async def test_other_errors_are_not_retried() -> None:
    calls = []

    async def make() -> str:
        calls.append(1)
        raise ValueError("wrong last sequence")

    with pytest.raises(ValueError, match="wrong last sequence"):
        await retry_unheard(make, within=5.0)
    assert len(calls) == 1


async def test_a_stream_never_heard_fails_after_the_bound() -> None:
    calls = []

    async def make() -> str:
        calls.append(1)
        raise NoStreamResponseError

    with pytest.raises(NoStreamResponseError):
        await retry_unheard(make, within=0.3)
    assert 2 <= len(calls) <= 10
