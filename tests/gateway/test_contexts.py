"""The gateway's compression contexts per agent (docs/protocol.md section 3.3): the last few per agent, a
bound on the total, least recently used agent out first."""

from __future__ import annotations

import pytest

from flowtunnel.gateway.contexts import ContextCache
from flowtunnel.wire import context_id


def test_the_last_few_contexts_per_agent_are_kept_by_id() -> None:
    cache = ContextCache(per_agent=2, total_bytes=1 << 20)
    for n in range(3):
        cache.remember("a", bytes([n]) * 100)
    held = cache.of("a")
    assert set(held) == {context_id(b"\x01" * 100), context_id(b"\x02" * 100)}
    assert cache.size == 200
    cache.remember("a", b"")  # an empty batch leaves nothing
    assert cache.size == 200
    cache.remember("a", b"\x02" * 100)  # the same again: kept once
    assert cache.size == 200
    assert cache.of("b") == {}


def test_the_total_is_bounded_least_recently_used_agent_out_first() -> None:
    cache = ContextCache(per_agent=4, total_bytes=250)
    cache.remember("a", b"a" * 100)
    cache.remember("b", b"b" * 100)
    cache.remember("a", b"A" * 100)  # a is the most recent now: b goes first
    assert cache.of("b") == {}
    assert len(cache.of("a")) == 2
    assert cache.size == 200
    cache.forget("a")
    assert cache.size == 0


def test_a_copy_is_handed_out() -> None:
    cache = ContextCache()
    cache.remember("a", b"x" * 10)
    cache.of("a").clear()
    assert len(cache.of("a")) == 1
    with pytest.raises(ValueError, match="per_agent 0"):
        ContextCache(per_agent=0)


def test_a_context_is_hashed_only_when_a_batch_names_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every acknowledged batch leaves a context and most agents never use one: hashing each (BLAKE2b of up
    to 32 KiB) as it came was per-request work for nothing (issue 16). It is hashed once, when asked for."""
    from flowtunnel.gateway import contexts

    hashed: list[int] = []

    def counting(context: bytes) -> int:
        hashed.append(len(context))
        return context_id(context)

    monkeypatch.setattr(contexts, "context_id", counting)
    cache = ContextCache(per_agent=2, total_bytes=1 << 20)
    for n in range(10):
        cache.remember("a", bytes([n]) * 100)
    assert hashed == []
    assert set(cache.of("a")) == {context_id(b"\x08" * 100), context_id(b"\x09" * 100)}
    assert len(hashed) == 2
    cache.of("a")
    assert len(hashed) == 2  # once each
