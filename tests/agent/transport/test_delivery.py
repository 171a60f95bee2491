"""The delivery protocol without sockets: each test is a transcript of what went out, what came back, and
what the state machine says to do."""

from __future__ import annotations

import logging
import os

import pytest

from flowtunnel.agent.transport import (
    Acked,
    Commit,
    Delivery,
    NoContext,
    Rejected,
    Resync,
    Retry,
    Sent,
    TooLarge,
    Wait,
    from_http,
    plan_resync,
)
from flowtunnel.wire import ack_tag
from flowtunnel.wire.keys import generate_key

AGENT = "site-a"
KEY = generate_key()


def machine(**overrides: object) -> Delivery:
    settings: dict[str, object] = {
        "agent_id": AGENT, "key": KEY, "max_body": 1 << 20, "min_body": 4096, "backoff_base": 0.5,
        "backoff_cap": 60.0, "reject_backoff": 300.0,
    }
    settings.update(overrides)
    return Delivery(**settings)  # type: ignore[arg-type]


def batch(first: int, last: int, size: int) -> Sent:
    return Sent(nonce=os.urandom(12), size=size, first=first, last=last, datagrams=last - first + 1)


def resync() -> Sent:
    return Sent(nonce=os.urandom(12), size=80)


def ack(sent: Sent, acked: int) -> Acked:
    """The gateway's genuine answer to ``sent``."""
    return Acked(acked=acked, tag=ack_tag(KEY, agent_id=AGENT, request_nonce=sent.nonce, acked=acked))


def test_resync_then_batches_commit_what_the_gateway_acknowledged() -> None:
    d = machine()
    assert d.wants_resync
    first = resync()
    assert d.answer(first, ack(first, 0), draw=0.5) == Commit(acked=0, resync=True)
    assert not d.wants_resync
    sent = batch(1, 100, 50_000)
    assert d.answer(sent, ack(sent, 100), draw=0.5) == Commit(acked=100, resync=False)
    assert d.failures == {}
    assert d.last_result == "ok"


def test_a_forged_ack_trims_nothing_and_backs_off() -> None:
    d = machine(wants_resync=False)
    sent = batch(1, 10, 5000)
    other = batch(1, 10, 5000)  # the genuine tag of another request: a replayed answer
    for answer in (Acked(acked=10**6, tag=None), ack(other, 10)):
        action = d.answer(sent, answer, draw=1.0)
        assert isinstance(action, Wait)
        assert action.cause == "bad-ack"
    assert d.failures["bad-ack"] == 2
    assert d.wants_resync


def test_an_ack_behind_the_batch_asks_for_a_resync_once() -> None:
    d = machine(wants_resync=False)
    sent = batch(1, 10, 5000)
    action = d.answer(sent, ack(sent, 5), draw=0.5)
    assert isinstance(action, Commit)
    assert action.acked == 5
    assert [n.once for n in action.notes] == ["ack-behind"]
    assert d.wants_resync


def test_409_resyncs_at_once_then_with_backoff_if_it_keeps_coming() -> None:
    d = machine(wants_resync=False)
    delays = []
    lines = []
    for _ in range(3):
        sent = batch(1, 10, 5000)
        action = d.answer(sent, Resync(detail="batch 1..10: HTTP 409"), draw=1.0)
        assert isinstance(action, Wait)
        delays.append(action.delay)
        lines.append(action.notes[0].line)
        assert d.wants_resync
        r = resync()
        d.answer(r, ack(r, 0), draw=1.0)
    assert delays == [0.0, 0.5, 1.0]
    # The line says the wait it is followed by (before: "resynchronising" after a backoff too).
    assert lines == [f"batch 1..10: HTTP 409; resynchronising {w}" for w in ("now", "in 0.5 s", "in 1.0 s")]
    sent = batch(1, 10, 5000)
    d.answer(sent, ack(sent, 10), draw=1.0)
    assert d.resync_streak == 0


def test_transient_failures_back_off_exponentially_or_as_told() -> None:
    d = machine(wants_resync=False)
    sent = batch(1, 10, 5000)
    delays = [d.answer(sent, Retry(cause="http-503", detail="x"), draw=1.0) for _ in range(4)]
    assert [a.delay for a in delays if isinstance(a, Wait)] == [0.5, 1.0, 2.0, 4.0]
    told = d.answer(sent, Retry(cause="http-503", detail="x", after=7.0), draw=1.0)
    assert isinstance(told, Wait)
    assert told.delay == 7.0
    assert d.failures["http-503"] == 5
    # A resync that succeeds does not end the episode (nor reset the backoff); an acknowledged batch does,
    # and one line says so.
    r = resync()
    assert d.answer(r, ack(r, 0), draw=1.0, now=50.0).notes == ()
    assert d.consecutive_failures == 5
    sent = batch(1, 10, 5000)
    action = d.answer(sent, ack(sent, 10), draw=1.0, now=60.0)
    assert [n.text for n in action.notes] == [
        "gateway acknowledging data again after 5 failed attempts (60 s without an ack)"]
    assert d.consecutive_failures == 0
    assert d.unacked_since is None
    assert d.last_ack == 60.0


def test_a_refusal_waits_reject_backoff_and_names_who_refused() -> None:
    d = machine(wants_resync=False)
    sent = batch(1, 10, 5000)
    by_gateway = d.answer(sent, Rejected(cause="http-401", detail="batch 1..10: HTTP 401", by="gateway"),
                          draw=0.1)
    assert isinstance(by_gateway, Wait)
    assert by_gateway.delay == 300.0
    assert by_gateway.notes[0].level == logging.ERROR
    assert by_gateway.notes[0].text.startswith("gateway rejected batch 1..10")
    by_proxy = d.answer(sent, Rejected(cause="proxy-403", detail="the proxy refused CONNECT to port 9443",
                                       by="the proxy http://127.0.0.1:3128"), draw=0.1)
    assert by_proxy.notes[0].text.startswith("the proxy refused CONNECT to port 9443; refused by the proxy "
                                             "http://127.0.0.1:3128, not by the gateway")


def test_413_from_a_proxy_lowers_the_body_limit_down_to_what_passes() -> None:
    """Squid with ``request_body_max_size 64 KB``: every body above 65,536 bytes gets 413. The limit comes
    down from 1 MiB in a few immediate retries, stays there, and every refusal names the proxy."""
    d = machine(wants_resync=False)
    proxy = "the proxy http://127.0.0.1:3128"
    size = 900_000
    steps = 0
    while size > 65_536:
        action = d.answer(batch(1, 1000, size), TooLarge(detail="HTTP 413 from proxy", by=proxy), draw=0.5)
        assert isinstance(action, Wait)
        assert action.delay == 0.0
        assert proxy in action.notes[0].text
        size = int(d.max_body * 0.9)  # the next batch is sealed under the new limit
        steps += 1
    assert steps <= 5
    assert 4096 <= d.max_body <= 65_536
    assert d.limit_by == proxy
    sent = batch(1, 80, size)
    assert isinstance(d.answer(sent, ack(sent, 80), draw=0.5), Commit)


def test_the_body_limit_never_goes_below_the_floor() -> None:
    d = machine(wants_resync=False, min_body=4096)
    for _ in range(20):
        d.answer(batch(1, 50, max(d.max_body, 4096)), TooLarge(detail="413", by="gateway"), draw=0.5)
    assert d.max_body == 4096


def test_a_single_datagram_too_large_even_alone_is_counted_once_kept_and_said_precisely() -> None:
    d = machine(wants_resync=False, max_body=60_000)
    sent = batch(7, 7, 65_100)
    for _ in range(3):
        refused = TooLarge(detail="batch 7..7: HTTP 413", by="the proxy http://p:3128")
        action = d.answer(sent, refused, draw=0.5)
        assert isinstance(action, Wait)
        assert action.cause == "oversize"
        assert action.delay == 300.0
    assert d.oversize == 1  # the same datagram, counted once
    assert d.failures["oversize"] == 3
    assert d.max_body == 60_000  # a batch of one cannot be split: the limit stays
    text = action.notes[0].text
    assert "datagram seq 7 seals to a body of 65100 bytes" in text
    assert "the proxy http://p:3128" in text
    assert "cannot go by POST" in text


def test_a_connection_cut_twice_mid_body_counts_as_a_body_limit() -> None:
    d = machine(wants_resync=False)
    cut = Retry(cause="connection:cut-mid-body", detail="cut", cut=True)
    first = d.answer(batch(1, 500, 400_000), cut, draw=1.0)
    assert isinstance(first, Wait)
    assert first.cause == "connection:cut-mid-body"
    assert d.max_body == 1 << 20
    second = d.answer(batch(1, 500, 400_000), cut, draw=1.0)
    assert isinstance(second, Wait)
    assert second.cause == "http-413"
    assert d.max_body == 200_000
    assert d.limit_by == "the path (connection cut mid-body)"


def test_a_resync_cut_mid_way_is_only_a_transient_failure() -> None:
    d = machine()
    cut = Retry(cause="connection:cut-mid-body", detail="cut", cut=True)
    for _ in range(3):
        action = d.answer(resync(), cut, draw=1.0)
        assert isinstance(action, Wait)
        assert action.cause == "connection:cut-mid-body"
    assert d.max_body == 1 << 20


@pytest.mark.parametrize(
    ("status", "payload", "kind", "by"),
    [
        (413, b'{"error": "too-large", "detail": "body exceeds max_body"}', TooLarge, "gateway"),
        (413, b"<html><title>ERROR: The requested URL could not be retrieved</title>", TooLarge, "proxy"),
        (403, b'{"error": "revoked"}', Rejected, "gateway"),
        (403, b"<html><title>Access Denied</title>", Rejected, "proxy"),
        (409, b'{"error": "resync", "acked": 4}', Resync, None),
        (409, b'{"error": "unknown-context", "detail": "context 0x1 not held"}', NoContext, None),
        (409, b"<html>conflict</html>", Rejected, "proxy"),
        (401, b"<html>login</html>", Retry, None),  # a proxy wanting a login, in 401's clothing
        (503, b"", Retry, None),
        (200, b"<html>portal</html>", Retry, None),
    ],
)
def test_http_answers_say_who_answered(status: int, payload: bytes, kind: type, by: str | None) -> None:
    answer = from_http(status, payload, what="batch 1..2", path="proxy")
    assert isinstance(answer, kind)
    if by is not None:
        assert isinstance(answer, TooLarge | Rejected)
        assert answer.by == by
        assert (f"from {by}" in answer.detail) or by == "gateway"


def test_unknown_context_seals_afresh_at_once_and_only_for_a_context_batch() -> None:
    """409 unknown-context (docs/protocol.md section 3.3): the next batch goes without a context, at once and
    without backoff; the same answer to a batch sealed without a context is an ordinary failure."""
    d = machine(wants_resync=False)
    sent = Sent(nonce=os.urandom(12), size=900, first=5, last=7, datagrams=3, context=True)
    action = d.answer(sent, NoContext(detail="batch 5..7: context 0x1 not held"), draw=0.5)
    assert isinstance(action, Wait)
    assert (action.delay, action.cause) == (0.0, "unknown-context")
    assert d.fresh_context
    assert not d.wants_resync
    assert d.consecutive_failures == 0
    again = Sent(nonce=os.urandom(12), size=1100, first=5, last=7, datagrams=3)
    action = d.answer(again, NoContext(detail="batch 5..7: context 0x1 not held"), draw=0.5)
    assert isinstance(action, Wait)
    assert action.delay > 0
    assert d.wants_resync


def test_unknown_context_to_a_continued_stream_frame_resends_at_once_in_a_new_stream() -> None:
    """409 unknown-context to a continuation frame (docs/protocol.md section 3.4): at once, no backoff, no
    context dropped (the uploader starts a new stream: the frame was not acknowledged); the same answer to a
    start frame (which always opens) is not the gateway's truth: an ordinary failure."""
    d = machine(wants_resync=False)
    cont = Sent(nonce=os.urandom(12), size=300, first=5, last=6, datagrams=2, stream=True, continued=True)
    action = d.answer(cont, NoContext(detail="batch 5..6: stream 7 not held at position 3"), draw=0.5)
    assert isinstance(action, Wait)
    assert (action.delay, action.cause) == (0.0, "unknown-context")
    assert "new compression stream" in action.notes[0].text
    assert not d.fresh_context
    assert not d.wants_resync
    start = Sent(nonce=os.urandom(12), size=300, first=5, last=6, datagrams=2, stream=True)
    action = d.answer(start, NoContext(detail="batch 5..6: ?"), draw=0.5)
    assert isinstance(action, Wait)
    assert action.delay > 0


def test_a_gateway_refusing_the_stream_header_means_no_streams_there_and_a_resend_at_once() -> None:
    """A gateway older than stream compression answers 400 malformed-header to a stream frame: remembered
    (``no_streams``), the same datagrams again at once; a malformed-header to any other batch, or a 400 not
    from the gateway, is the usual long refusal."""
    d = machine(wants_resync=False)
    start = Sent(nonce=os.urandom(12), size=300, first=5, last=6, datagrams=2, stream=True)
    old = from_http(400, b'{"error":"malformed-header","detail":"header flags 0x06 has unknown bits set"}',
                    what="batch 5..6")
    action = d.answer(start, old, draw=0.5)
    assert isinstance(action, Wait)
    assert (action.delay, action.cause) == (0.0, "no-stream")
    assert d.no_streams
    d.no_streams = False
    plain = Sent(nonce=os.urandom(12), size=300, first=5, last=6, datagrams=2)
    action = d.answer(plain, old, draw=0.5)
    assert isinstance(action, Wait)
    assert (action.delay, action.cause) == (300.0, "http-400")  # reject_backoff
    assert not d.no_streams
    proxy = from_http(400, b"<html>bad request</html>", what="batch 5..6", path="proxy")
    action = d.answer(start, proxy, draw=0.5)
    assert isinstance(action, Wait)
    assert action.cause == "http-400"
    assert not d.no_streams


def test_plan_resync_covers_loss_restore_and_new_spools() -> None:
    assert plan_resync(acked=100, known=100, last=150, first_stored=101, agent_id=AGENT).notes == ()
    lost = plan_resync(acked=0, known=100, last=140, first_stored=101, agent_id=AGENT)
    assert lost.lost == 100
    assert not lost.renumber
    assert not lost.advance
    assert plan_resync(acked=200, known=0, last=50, first_stored=1, agent_id=AGENT).renumber
    assert plan_resync(acked=200, known=100, last=150, first_stored=101, agent_id=AGENT).advance
