"""Long outages: the gateway is down for the whole capture (softflowd → agent), then starts; the agent drains
its spool and nothing is lost. With a spool quota too small for the capture, the policy applies and the
drop counter says exactly how many datagrams were dropped."""

from __future__ import annotations

from pathlib import Path

from tests.agent.chain import AgentProc, GatewayProc, enroll_agent, journal, v9_sequence, wait_until
from tests.conftest import require
from tests.peers import TraceSummary, free_udp_port, make_trace, run_softflowd

AGENT = "site-o"


def test_gateway_down_for_the_whole_capture_then_started(tmp_path: Path, trace: TraceSummary) -> None:
    require("softflowd")
    data = tmp_path / "gw"
    key = enroll_agent(data, AGENT)
    gw = GatewayProc(data)  # port reserved, not started
    port = free_udp_port()
    with AgentProc(tmp_path / "spool", gateway=gw.url, agent_id=AGENT, key=key, port=port).start() as agent:
        total = run_softflowd(trace.path, version=9, dest=("127.0.0.1", port)).datagrams
        wait_until(lambda: agent.spooled_last_seq() == total, "capture spooled")
        wait_until(lambda: (agent.status() or {}).get("upload", {}).get("consecutive_failures", 0) >= 2,
                   "the agent keeps trying")
        status = agent.status()
        assert status is not None
        assert status["backlog"]["datagrams"] == total
        with gw.start():
            wait_until(lambda: gw.acked(AGENT) == total, "backlog drained")
            wait_until(lambda: (agent.status() or {}).get("backlog", {}).get("datagrams") == 0, "spool empty")
            assert agent.stop() == 0
            assert gw.stop() == 0
    entries = journal(data, AGENT)
    assert [seq for seq, _ in entries] == list(range(1, total + 1))
    assert [v9_sequence(d.payload) for _, d in entries] == list(range(1, total + 1))


def test_spool_quota_drops_oldest_and_counts_them(tmp_path: Path) -> None:
    require("softflowd")
    # The smallest quota (512 KiB of disk, every file of the spool included) holds a few thousand flows:
    # a capture of 16,000 overflows it.
    trace = make_trace(tmp_path / "big.pcap", flows=16_000, seed=7)
    data = tmp_path / "gw"
    key = enroll_agent(data, AGENT)
    gw = GatewayProc(data)
    port = free_udp_port()
    spool = tmp_path / "spool"
    with AgentProc(spool, gateway=gw.url, agent_id=AGENT, key=key, port=port,
                   extra=["--spool-quota", "512KiB", "--full-policy", "drop-oldest"]).start() as agent:
        total = run_softflowd(trace.path, version=9, dest=("127.0.0.1", port)).datagrams
        wait_until(lambda: agent.received() == total, "capture received")
        wait_until(lambda: agent.spooled_last_seq() == total, "capture spooled")
        status = agent.status()
        assert status is not None
        dropped = status["drops"]["spool_full"]
        assert 0 < dropped < total
        assert status["backlog"]["datagrams"] == total - dropped
        with gw.start():
            wait_until(lambda: gw.acked(AGENT) == total, "what the quota kept is delivered")
            # status.json may be built between the journal commit and the metrics update of one batch (the
            # hwm comes from the journal, the gap from the metrics): wait for the write that has both.
            wait_until(lambda: bool(gw.status()["agents"][AGENT].get("gap")), "the gap reported")
            agent_doc = gw.status()["agents"][AGENT]
            assert agent.stop() == 0
            assert gw.stop() == 0
    # The newest datagrams survived, in order; the gap is the counted drop, seen by the gateway too.
    entries = journal(data, AGENT)
    assert [seq for seq, _ in entries] == list(range(dropped + 1, total + 1))
    assert [v9_sequence(d.payload) for _, d in entries] == list(range(dropped + 1, total + 1))
    assert agent_doc["gap"] == dropped
    assert agent_doc["dropped"] == {"spool_full": dropped}
