"""kill -9 in the middle of the stream, on either side: softflowd → agent → gateway, the journal must end
with every datagram exactly once and in order.

The agent is paced (a bandwidth cap and small batches) so the kill lands while batches are in flight.
softflowd numbers its v9 export packets 1, 2, 3, ... per run, which lets the journal prove order and
uniqueness without knowing the bytes in advance.
"""

from __future__ import annotations

from pathlib import Path

from tests.agent.chain import AgentProc, GatewayProc, enroll_agent, journal, v9_sequence, wait_until
from tests.conftest import require
from tests.peers import free_udp_port, make_trace, run_softflowd

AGENT = "site-k"
PACED = ["--bandwidth", "6k", "--max-batch-datagrams", "4"]


def test_kill_9_agent_mid_stream(tmp_path: Path) -> None:
    require("softflowd")
    first = make_trace(tmp_path / "first.pcap", flows=800, seed=11)
    second = make_trace(tmp_path / "second.pcap", flows=500, seed=12)
    data = tmp_path / "gw"
    key = enroll_agent(data, AGENT)
    spool = tmp_path / "spool"
    port = free_udp_port()
    with GatewayProc(data).start() as gw:
        agent = AgentProc(spool, gateway=gw.url, agent_id=AGENT, key=key, port=port, extra=PACED).start()
        with agent:
            part1 = run_softflowd(first.path, version=9, dest=("127.0.0.1", port)).datagrams
            wait_until(lambda: agent.spooled_last_seq() == part1, "first part spooled")
            wait_until(lambda: gw.acked(AGENT) > 0, "upload under way")
            agent.kill9()
        acked_at_kill = gw.acked(AGENT)
        assert acked_at_kill < part1, "the kill must land mid-stream"
        # The exporter pauses while the agent is down (UDP to a dead port is lost before us), then resumes.
        with AgentProc(spool, gateway=gw.url, agent_id=AGENT, key=key, port=port).start() as agent:
            part2 = run_softflowd(second.path, version=9, dest=("127.0.0.1", port)).datagrams
            wait_until(lambda: gw.acked(AGENT) == part1 + part2, "both parts acknowledged")
            assert agent.stop() == 0
        assert gw.stop() == 0
    entries = journal(data, AGENT)
    assert [seq for seq, _ in entries] == list(range(1, part1 + part2 + 1))
    sequences = [v9_sequence(d.payload) for _, d in entries]
    assert sequences == list(range(1, part1 + 1)) + list(range(1, part2 + 1))
    assert len({d.exporter_port for _, d in entries[:part1]}) == 1
    assert len({d.exporter_port for _, d in entries[part1:]}) == 1


def test_kill_9_gateway_mid_stream(tmp_path: Path) -> None:
    require("softflowd")
    trace = make_trace(tmp_path / "trace.pcap", flows=800, seed=13)
    data = tmp_path / "gw"
    key = enroll_agent(data, AGENT)
    port = free_udp_port()
    gw = GatewayProc(data).start()
    with gw, AgentProc(tmp_path / "spool", gateway=gw.url, agent_id=AGENT, key=key, port=port,
                       extra=PACED).start() as agent:
        total = run_softflowd(trace.path, version=9, dest=("127.0.0.1", port)).datagrams
        wait_until(lambda: gw.acked(AGENT) > 0, "upload under way")
        gw.kill9()
        acked_at_kill = max((seq for seq, _ in journal(data, AGENT)), default=0)
        assert 0 < acked_at_kill < total, "the kill must land mid-stream"
        gw.start()  # same port, same data directory
        wait_until(lambda: gw.acked(AGENT) == total, "everything acknowledged after the restart")
        assert agent.stop() == 0
        assert gw.stop() == 0
    entries = journal(data, AGENT)
    assert [seq for seq, _ in entries] == list(range(1, total + 1))
    assert [v9_sequence(d.payload) for _, d in entries] == list(range(1, total + 1))
