"""Gateway failover without sockets: which gateway carries the next batch, as a transcript of exchanges."""

from __future__ import annotations

import pytest

from flowtunnel.agent.transport import Acked, Rejected, Resync, Retry, TooLarge
from flowtunnel.agent.transport.answers import Answer
from flowtunnel.agent.transport.failover import Failover, Move, gateway_failure

OK = Acked(acked=1, tag="t")
A, B, C = "https://gw-a", "https://gw-b", "https://gw-c"


def fail(cause: str) -> Retry:
    return Retry(cause=cause, detail=f"batch 1..5: {cause}")


@pytest.mark.parametrize("cause", [
    "connection:refused", "connection:lost", "connection:timeout", "connection:connect", "tls:handshake",
    "tls:pin-mismatch", "http-500", "http-502", "http-503", "http-504", "http-408", "ws-close-1001",
    "ws-close-1006", "ws-close-1011",
])
def test_the_gateways_own_failures_move_the_agent(cause: str) -> None:
    fo = Failover(gateways=(A, B))
    move = fo.after(fail(cause), cause, now=0.0)
    assert move == Move(old=A, new=B, reason=f"batch 1..5: {cause}", at_once=True)
    assert fo.current == B
    assert fo.status() == {"gateway": B, "gateways": {A: f"failed: batch 1..5: {cause}", B: "current"},
                           "gateway_moves": 1}


@pytest.mark.parametrize("answer", [
    Rejected(cause="http-401", detail="x", by="gateway"),  # any gateway would refuse the key alike
    Rejected(cause="http-403", detail="x", by="gateway"),
    Rejected(cause="proxy-403", detail="x", by="the proxy http://p:3128"),  # the ladder's business
    fail("http-429"),  # the agent's share of the shared journal: the same on every gateway
    fail("http-407"), fail("captive-portal"), fail("probe-unauthenticated"), fail("bad-ack"),
    fail("bad-response"), fail("connection:cut-mid-body"), fail("get-pending"), fail("dns-no-answer"),
    Resync(detail="x"), TooLarge(detail="x", by="gateway"),
])
def test_answers_any_gateway_or_the_path_would_give_never_move_it(answer: Answer) -> None:
    fo = Failover(gateways=(A, B))
    for i in range(5):
        assert fo.after(answer, getattr(answer, "cause", "x"), now=float(i)) is None
    assert gateway_failure(answer) is None
    assert (fo.current, fo.moves) == (A, 0)


def test_each_gateway_is_tried_at_once_then_the_backoff_between_rounds() -> None:
    fo = Failover(gateways=(A, B, C))
    refused = fail("connection:refused")
    assert fo.after(refused, "connection:refused", now=0.0) == Move(old=A, new=B, reason=refused.detail,
                                                                     at_once=True)
    assert fo.after(refused, "connection:refused", now=0.1) == Move(old=B, new=C, reason=refused.detail,
                                                                     at_once=True)
    # Every gateway failed since the last acknowledgement: wrap round, after the delivery protocol's backoff.
    assert fo.after(refused, "connection:refused", now=0.2) == Move(old=C, new=A, reason=refused.detail,
                                                                     at_once=False, round=1)
    # The next round goes through the others at once again, then waits again.
    move = fo.after(refused, "connection:refused", now=5.0)
    assert move is not None
    assert (move.new, move.at_once, move.round) == (B, True, 1)
    move = fo.after(refused, "connection:refused", now=5.1)
    assert move is not None
    assert (move.new, move.at_once) == (C, True)
    move = fo.after(refused, "connection:refused", now=5.2)
    assert move is not None
    assert (move.new, move.at_once, move.round) == (A, False, 2)
    assert fo.moves == 6


def test_an_acknowledgement_ends_the_round_and_marks_the_gateway_good() -> None:
    fo = Failover(gateways=(A, B))
    fo.after(fail("http-503"), "http-503", now=0.0)
    assert fo.after(OK, None, now=1.0) is None
    assert fo.status()["gateways"] == {A: "failed: batch 1..5: http-503", B: "current"}
    # B fails later: A has not failed since the last acknowledgement, so it is tried at once.
    move = fo.after(fail("connection:lost"), "connection:lost", now=2.0)
    assert move is not None
    assert (move.new, move.at_once, move.round) == (A, True, 0)
    assert fo.after(OK, None, now=3.0) is None
    assert fo.status()["gateways"] == {A: "current", B: "failed: batch 1..5: connection:lost"}


def test_a_200_whose_tag_did_not_verify_is_no_acknowledgement() -> None:
    fo = Failover(gateways=(A, B))
    fo.after(fail("connection:refused"), "connection:refused", now=0.0)
    assert fo.after(OK, "bad-ack", now=1.0) is None
    assert B not in fo.good
    move = fo.after(fail("connection:refused"), "connection:refused", now=2.0)
    assert move is not None
    assert not move.at_once


def test_back_to_the_first_gateway_after_a_while() -> None:
    fo = Failover(gateways=(A, B, C), return_after=600.0)
    assert fo.before(0.0) is None
    fo.after(fail("connection:refused"), "connection:refused", now=0.0)
    fo.after(OK, None, now=1.0)
    assert fo.before(599.0) is None
    fo.after(fail("http-502"), "http-502", now=300.0)  # B -> C: still away from the first since 0
    assert fo.current == C
    assert fo.after(OK, None, now=301.0) is None
    assert fo.before(599.0) is None
    back = fo.before(600.0)
    assert back == Move(old=C, new=A, reason="back to the first gateway after 600 s on https://gw-c",
                        at_once=True, failed=False)
    assert fo.before(2000.0) is None  # on the first: nothing to go back to
    # Still down: away again at once, to B (it has not failed since the last acknowledgement).
    move = fo.after(fail("connection:refused"), "connection:refused", now=601.0)
    assert move is not None
    assert (move.new, move.at_once) == (B, True)
    assert fo.before(1200.0) is None
    assert fo.before(1201.0) is not None


def test_one_gateway_never_moves_but_says_why_it_failed() -> None:
    fo = Failover(gateways=(A,))
    assert fo.after(fail("connection:refused"), "connection:refused", now=0.0) is None
    assert fo.before(10_000.0) is None
    assert fo.status() == {"gateway": A, "gateways": {A: "current"}, "gateway_moves": 0}
    with pytest.raises(ValueError, match="at least one gateway"):
        Failover(gateways=())
