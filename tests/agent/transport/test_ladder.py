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
