"""The ladder without sockets: which rung carries the next batch, as a transcript of exchanges."""

from __future__ import annotations

from flowtunnel.agent.transport import Acked, Rejected, Retry, TooLarge
from flowtunnel.agent.transport.ladder import Ladder, Switch

OK = Acked(acked=1, tag="t")


def test_a_rung_is_good_only_after_an_acknowledgement() -> None:
    ladder = Ladder(rungs=("post", "get"))
    assert ladder.status()["rungs"] == {"post": "untried", "get": "untried"}
    assert ladder.after(Retry(cause="http-503", detail="x"), "http-503", now=0.0) is None
    assert ladder.after(OK, "bad-ack", now=1.0) is None  # a 200 whose tag did not verify proves nothing
    assert ladder.status()["rungs"] == {"post": "untried", "get": "untried"}
    assert ladder.after(OK, None, now=2.0) is None
    assert ladder.status()["rungs"] == {"post": "good", "get": "untried"}


def test_a_refusal_by_the_path_steps_down_once_and_a_refusal_by_the_gateway_does_not() -> None:
    ladder = Ladder(rungs=("post", "get"))
    assert ladder.after(Rejected(cause="http-401", detail="x", by="gateway"), "http-401", now=0.0) is None
    switch = ladder.after(Rejected(cause="http-403", detail="x", by="the proxy http://p:3128"), "http-403",
                          now=1.0)
    assert switch == Switch(old="post", new="get", reason="the proxy http://p:3128 refuses it (http-403)")
    assert ladder.current == "get"
    # On the last rung: nowhere lower to go, no switch.
    assert ladder.after(Rejected(cause="http-403", detail="x", by="the proxy"), "http-403", now=2.0) is None
    assert ladder.switches == 1


def test_failures_every_rung_shares_never_move_it() -> None:
    ladder = Ladder(rungs=("post", "get"))
    for cause in ("connection:refused", "connection:timeout", "captive-portal", "http-503", "resync"):
        for _ in range(5):
            assert ladder.after(Retry(cause=cause, detail="x"), cause, now=0.0) is None
    assert ladder.current == "post"


def test_oversize_and_repeated_cuts_step_down() -> None:
    ladder = Ladder(rungs=("post", "get"))
    assert ladder.after(TooLarge(detail="x", by="proxy"), "oversize", now=0.0) is not None
    ladder = Ladder(rungs=("post", "get"))
    cut = Retry(cause="connection:cut-mid-body", detail="x", cut=True)
    assert ladder.after(cut, "connection:cut-mid-body", now=0.0) is None
    assert ladder.after(cut, "connection:cut-mid-body", now=0.0) is None
    switch = ladder.after(cut, "connection:cut-mid-body", now=0.0)
    assert switch is not None
    assert switch.reason == "connection:cut-mid-body 3 times in a row"


def test_it_climbs_back_periodically_and_steps_down_again_if_the_top_still_fails() -> None:
    ladder = Ladder(rungs=("post", "get"), reprobe_after=600.0)
    ladder.after(Rejected(cause="http-405", detail="x", by="proxy"), "http-405", now=0.0)
    ladder.after(OK, None, now=1.0)
    assert ladder.before(now=300.0) is None
    up = ladder.before(now=601.0)
    assert up == Switch(old="get", new="post", reason="re-probing post after 600 s on get")
    down = ladder.after(Rejected(cause="http-405", detail="x", by="proxy"), "http-405", now=602.0)
    assert down is not None
    assert ladder.current == "get"
    assert ladder.before(now=900.0) is None  # the clock restarts at each step down
    assert ladder.before(now=1203.0) is not None
    ladder.after(OK, None, now=1204.0)
    assert ladder.current == "post"
    assert ladder.status()["rungs"] == {"post": "good", "get": "good"}


def test_the_rung_and_its_switches_are_metrics() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from flowtunnel.agent.metrics import StatusCollector

    ladder = Ladder(rungs=("post", "ws", "get"))
    ladder.after(Rejected(cause="http-403", detail="x", by="the proxy"), "http-403", now=0.0)
    doc = {"agent_id": "site-a", "upload": {**ladder.status(), "oversize": 1}}
    registry = CollectorRegistry()
    registry.register(StatusCollector(lambda: doc))
    text = generate_latest(registry).decode()
    assert 'flowtunnel_agent_upload_rung{agent="site-a",rung="ws"} 1.0' in text
    assert 'flowtunnel_agent_upload_rung{agent="site-a",rung="post"} 0.0' in text
    assert 'flowtunnel_agent_upload_rung_switches_total{agent="site-a"} 1.0' in text
    assert 'flowtunnel_agent_upload_oversize_datagrams_total{agent="site-a"} 1.0' in text
    assert 'flowtunnel_agent_upload_rung_for_bytes{agent="site-a"} 0.0' in text


def test_on_ws_for_bytes_the_metrics_and_the_status_line_say_so() -> None:
    """Before: nothing said why the agent was on ws (a path refusal, or fewer bytes)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from flowtunnel.agent.metrics import StatusCollector
    from flowtunnel.agent.status import _rung

    ladder = Ladder(rungs=("post", "ws", "get"))
    ladder.after(OK, None, now=0.0, batch=True)
    ladder.before(now=1.0)
    doc = {"agent_id": "site-a", "upload": ladder.status()}
    registry = CollectorRegistry()
    registry.register(StatusCollector(lambda: doc))
    assert 'flowtunnel_agent_upload_rung_for_bytes{agent="site-a"} 1.0' in generate_latest(registry).decode()
    assert _rung(doc) == "ws, fewer bytes per batch than post; post good"


# -- the bytes preference: ws once post carried a batch (issue 14) -------------------------------------------

STRIPPED = Rejected(cause="ws-upgrade-stripped", detail="x", by="the proxy (Upgrade stripped)")


def on_ws_by_preference(reprobe_after: float = 600.0) -> Ladder:
    """A ladder that moved to ws for bytes at t=10 and had a batch acknowledged there."""
    ladder = Ladder(rungs=("post", "ws", "get"), reprobe_after=reprobe_after)
    ladder.after(OK, None, now=0.0, batch=True)
    assert ladder.before(now=10.0) is not None
    ladder.after(OK, None, now=11.0, batch=True)
    return ladder


def test_once_post_carried_a_batch_the_next_goes_by_ws_for_fewer_bytes() -> None:
    """Before: the ladder stayed on post (the reach order) whatever ws would save."""
    ladder = Ladder(rungs=("post", "ws", "get"))
    assert ladder.before(now=0.0) is None
    ladder.after(OK, None, now=0.0, batch=False)  # a resync: post answered, but carried no batch yet
    assert ladder.before(now=1.0) is None  # the first batch goes by the reach order
    ladder.after(OK, None, now=1.0, batch=True)
    switch = ladder.before(now=2.0)
    assert switch == Switch(old="post", new="ws", reason="fewer bytes per batch than post (no HTTP heads per "
                            "batch)", for_bytes=True)
    assert ladder.current == "ws"
    status = ladder.status()
    assert status["rung_for_bytes"] is True
    assert status["rung_why"] == "fewer bytes per batch than post"
    assert status["switches"] == 1
    assert ladder.before(now=3.0) is None  # returned once


def test_on_ws_by_preference_it_stays_and_never_re_probes_post() -> None:
    """Before: no move to ws at all; and a ladder on ws climbed back to post every reprobe_after seconds."""
    ladder = on_ws_by_preference(reprobe_after=600.0)
    for now in (100.0, 700.0, 5000.0):
        assert ladder.before(now=now) is None
        ladder.after(OK, None, now=now, batch=True)
    assert ladder.current == "ws"
    assert ladder.status()["rungs"] == {"post": "good", "ws": "good", "get": "untried"}
    # The same on ws reached otherwise (remembered for this network): post would hand batches back to ws.
    ladder = Ladder(rungs=("post", "ws", "get"), reprobe_after=600.0)
    ladder.use("ws", now=0.0, why="it worked on this network before")
    assert ladder.before(now=5000.0) is None
    assert ladder.status()["rung_why"] == "it worked on this network before"
    assert ladder.status()["rung_for_bytes"] is False


def test_a_ws_failure_of_its_own_goes_back_to_post_and_ws_is_tried_again_after_reprobe_after() -> None:
    """Before: off ws, the ladder went down to get (and never preferred ws)."""
    ladder = on_ws_by_preference(reprobe_after=600.0)
    back = ladder.after(STRIPPED, "ws-upgrade-stripped", now=20.0)
    assert back == Switch(old="ws", new="post", reason="the proxy (Upgrade stripped) refuses it "
                          "(ws-upgrade-stripped); ws again in 600 s")
    assert ladder.current == "post"
    assert ladder.status()["rungs"] == {"post": "good", "ws": "failed: the proxy (Upgrade stripped) refuses "
                                        "it (ws-upgrade-stripped)", "get": "untried"}
    assert str(ladder.status()["rung_why"]).startswith("ws failed: the proxy")
    ladder.after(OK, None, now=21.0, batch=True)
    assert ladder.before(now=300.0) is None  # not before reprobe_after
    again = ladder.before(now=621.0)
    assert again is not None
    assert again.new == "ws"
    assert again.reason.endswith("; it failed 601 s ago (the proxy (Upgrade stripped) refuses it "
                                 "(ws-upgrade-stripped))")
    # Refused again: back to post again, the clock restarted.
    assert ladder.after(STRIPPED, "ws-upgrade-stripped", now=622.0) is not None
    assert ladder.current == "post"
    assert ladder.before(now=1000.0) is None
    assert ladder.before(now=1223.0) is not None
    # A refusal by the gateway on a try (no WebSocket endpoint there) goes back too.
    refused = Rejected(cause="http-404", detail="x", by="gateway")
    assert ladder.after(refused, "http-404", now=1224.0) is not None
    assert ladder.current == "post"
    assert ladder.switches == 6


def test_failures_every_rung_shares_never_move_it_off_ws() -> None:
    ladder = on_ws_by_preference()
    for cause in ("connection:refused", "connection:timeout", "captive-portal", "http-503", "resync"):
        for _ in range(5):
            assert ladder.after(Retry(cause=cause, detail="x"), cause, now=30.0) is None
    assert ladder.current == "ws"


def test_cuts_mid_body_repeated_on_ws_go_back_to_post_and_a_post_failure_then_steps_down_past_ws() -> None:
    """ws stays off for reprobe_after: a path refusing post then sends batches to get, not to the ws that
    just failed (before: post -> ws -> get, one more failed exchange)."""
    ladder = on_ws_by_preference(reprobe_after=600.0)
    cut = Retry(cause="connection:cut-mid-body", detail="x", cut=True)
    assert ladder.after(cut, "connection:cut-mid-body", now=20.0) is None
    assert ladder.after(cut, "connection:cut-mid-body", now=21.0) is None
    back = ladder.after(cut, "connection:cut-mid-body", now=22.0)
    assert back is not None
    assert (back.new, ladder.current) == ("post", "post")
    down = ladder.after(Rejected(cause="http-403", detail="x", by="the proxy"), "http-403", now=23.0)
    assert down == Switch(old="post", new="get", reason="the proxy refuses it (http-403)")
    # On get: the re-probe of post after reprobe_after; post still refused, ws (failed long ago) is next.
    ladder.after(OK, None, now=24.0, batch=True)
    assert ladder.before(now=624.0) is not None
    assert ladder.current == "post"
    down = ladder.after(Rejected(cause="http-403", detail="x", by="the proxy"), "http-403", now=625.0)
    assert down is not None
    assert down.new == "ws"


def test_a_lean_try_that_never_gets_an_answer_goes_back_to_post() -> None:
    """A path that lets the upgrade through and then nothing: post is known to work, batches do not wait on
    ws. Once ws was acknowledged, connection failures are the shared kind again."""
    ladder = Ladder(rungs=("post", "ws", "get"))
    ladder.after(OK, None, now=0.0, batch=True)
    assert ladder.before(now=1.0) is not None
    lost = Retry(cause="connection:timeout", detail="x")
    assert ladder.after(lost, "connection:timeout", now=2.0) is None
    assert ladder.after(lost, "connection:timeout", now=3.0) is None
    back = ladder.after(lost, "connection:timeout", now=4.0)
    assert back is not None
    assert back.reason == "no acknowledgement in 3 tries (connection:timeout); ws again in 600 s"
    assert ladder.current == "post"


def test_no_preference_without_ws_or_with_ws_first() -> None:
    for rungs in (("post", "get"), ("post",), ("get", "post", "dns")):
        ladder = Ladder(rungs=rungs)
        ladder.use("post", now=0.0)
        ladder.after(OK, None, now=0.0, batch=True)
        assert ladder.before(now=1.0) is None, rungs
        assert ladder.current == "post"
    # ws first by the user's order: the reach order already puts it first; on post after it failed, the
    # periodic re-probe of the top climbs back to it (as before), not the preference.
    ladder = Ladder(rungs=("ws", "post"), reprobe_after=600.0)
    ladder.after(STRIPPED, "ws-upgrade-stripped", now=0.0)
    ladder.after(OK, None, now=1.0, batch=True)
    assert ladder.before(now=2.0) is None
    up = ladder.before(now=601.0)
    assert up is not None
    assert not up.for_bytes


def test_a_ws_failure_when_post_failed_lately_steps_down_as_before() -> None:
    """Reached ws because a proxy refuses post: off ws, down to get (post failed less than reprobe_after
    ago); and without a lower rung, nowhere to go."""
    ladder = Ladder(rungs=("post", "ws", "get"))
    ladder.after(Rejected(cause="http-403", detail="x", by="the proxy"), "http-403", now=0.0)
    assert ladder.current == "ws"
    assert ladder.status()["rung_for_bytes"] is False
    down = ladder.after(STRIPPED, "ws-upgrade-stripped", now=1.0)
    assert down is not None
    assert down.new == "get"
    ladder = Ladder(rungs=("post", "ws"))
    ladder.after(Rejected(cause="http-403", detail="x", by="the proxy"), "http-403", now=0.0)
    assert ladder.after(STRIPPED, "ws-upgrade-stripped", now=1.0) is None
    assert ladder.current == "ws"
    # ... but with post's failure older than reprobe_after, back to post (a re-probe of it, in effect).
    ladder = Ladder(rungs=("post", "ws", "get"), reprobe_after=600.0)
    ladder.after(Rejected(cause="http-403", detail="x", by="the proxy"), "http-403", now=0.0)
    back = ladder.after(STRIPPED, "ws-upgrade-stripped", now=700.0)
    assert back is not None
    assert back.new == "post"


def test_a_new_network_starts_by_the_reach_order_again() -> None:
    ladder = Ladder(rungs=("post", "ws", "get"))
    ladder.after(OK, None, now=0.0, batch=True)
    ladder.use("post", now=1.0, why="it answered first on this new network")
    assert ladder.before(now=2.0) is None
    ladder.after(OK, None, now=2.0, batch=True)
    assert ladder.before(now=3.0) is not None
