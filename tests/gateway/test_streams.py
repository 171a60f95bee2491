"""The gateway's compression streams per agent (docs/protocol.md section 3.4): one per agent, taken out while
a frame decodes (a second frame of that stream meanwhile finds none), kept only once acknowledged, bounded in
total with the least recently used agent out first, forgotten on revoke."""

from __future__ import annotations

import pytest

from flowtunnel.gateway.streams import StreamCache
from flowtunnel.wire import OpenStream, lzstream, stream_dict_id

pytestmark = pytest.mark.skipif(not lzstream.SUPPORTED, reason="liblzma not loadable")


def stream(stream_id: int, position: int = 0) -> OpenStream:
    s = OpenStream(stream_id)
    s.decoder.position = position
    return s


def test_a_frame_takes_the_stream_only_at_its_id_and_position_and_a_second_frame_finds_none() -> None:
    cache = StreamCache()
    held = stream(7, 3)
    cache.keep("a", held, start=True)
    assert cache.take("a", stream_dict_id(7, 2)) is None
    assert cache.take("a", stream_dict_id(8, 3)) is None
    assert cache.take("b", stream_dict_id(7, 3)) is None
    assert cache.held("a") is held  # a miss leaves it
    assert cache.take("a", stream_dict_id(7, 3)) is held
    assert cache.take("a", stream_dict_id(7, 3)) is None  # decoding elsewhere: refused, never shared
    held.decoder.position = 4
    cache.keep("a", held, start=False)
    assert cache.held("a") is held


def test_a_start_frame_kept_meanwhile_wins_over_a_continuation_kept_later() -> None:
    cache = StreamCache()
    old = stream(7, 3)
    cache.keep("a", old, start=True)
    taken = cache.take("a", stream_dict_id(7, 3))
    assert taken is old
    new = stream(9, 1)
    cache.keep("a", new, start=True)
    old.decoder.position = 4
    cache.keep("a", old, start=False)  # its batch committed after the start frame's: dropped
    assert cache.held("a") is new


def test_a_failed_frame_gives_the_stream_back_only_if_it_never_reached_the_decoder() -> None:
    cache = StreamCache()
    untouched = stream(7, 3)
    cache.give_back("a", untouched, position=3)
    assert cache.held("a") is untouched
    advanced = cache.take("a", stream_dict_id(7, 3))
    assert advanced is not None
    advanced.decoder.position = 4
    cache.give_back("a", advanced, position=3)
    assert cache.held("a") is None
    broken = stream(7, 3)
    broken.decoder.broken = True
    cache.give_back("a", broken, position=3)
    assert cache.held("a") is None


def test_the_total_is_bounded_least_recently_used_agent_out_first_and_revoked_agents_are_forgotten() -> None:
    per = lzstream.decoder_memory()
    cache = StreamCache(total_bytes=2 * per)
    cache.keep("a", stream(1), start=True)
    cache.keep("b", stream(2), start=True)
    taken = cache.take("a", stream_dict_id(1, 0))
    assert taken is not None
    cache.keep("a", taken, start=False)  # a is the most recent now: b goes first
    cache.keep("c", stream(3), start=True)
    assert cache.held("b") is None
    assert cache.held("a") is not None
    assert cache.held("c") is not None
    assert (len(cache), cache.size, cache.evicted) == (2, 2 * per, 1)  # (the gateway counts it in a metric)
    cache.forget("a")
    assert cache.held("a") is None
    assert len(cache) == 1
