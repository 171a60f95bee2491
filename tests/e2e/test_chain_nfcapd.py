"""The full chain with real peers: softflowd → agent → tinyproxy (Basic auth) → gateway → nfcapd.

The flows nfdump reads back at the end of the chain must equal those nfcapd stores when softflowd exports
to it directly: the tunnel is invisible to the collector.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from tests.agent.chain import AgentProc, GatewayProc, enroll_agent, wait_until
from tests.conftest import require
from tests.peers import Nfcapd, Tinyproxy, TraceSummary, free_udp_port, run_softflowd

AGENT = "site-a"


def flow_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["src"], row["dst"], row["sport"], row["dport"], row["proto"], row["bytes"], row["packets"])


def test_softflowd_agent_tinyproxy_gateway_nfcapd(tmp_path: Path, trace: TraceSummary) -> None:
    require("softflowd", "nfcapd", "nfdump", "tinyproxy")
    with Nfcapd(tmp_path / "reference") as ref:
        run_softflowd(trace.path, version=9, dest=ref.addr)
        expected = ref.records()
    assert len(expected) >= trace.flows  # the reference itself is complete

    data = tmp_path / "gw"
    key = enroll_agent(data, AGENT)
    with (
        Nfcapd(tmp_path / "chain") as nf,
        Tinyproxy(tmp_path, auth=("flow", "s3cret")) as proxy,
        GatewayProc(data, forward=[nf.url]).start() as gw,
        AgentProc(tmp_path / "spool", gateway=gw.url, agent_id=AGENT, key=key, port=free_udp_port(),
                  extra=["--proxy", proxy.proxy_url]).start() as agent,
    ):
        sent = run_softflowd(trace.path, version=9, dest=("127.0.0.1", agent.port))
        wait_until(lambda: gw.acked(AGENT) == sent.datagrams, f"gateway acknowledged {sent.datagrams}")
        wait_until(gw.sinks_done, "udp-forward caught up")
        accepted = gw.status()["agents"][AGENT]
        assert agent.stop() == 0
        assert gw.stop() == 0
        got = nf.records()
        assert "/v1/b " in proxy.log_text()
        status = agent.status()

    assert Counter(map(flow_key, got)) == Counter(map(flow_key, expected))
    assert len({row["exporter"] for row in got}) == 1
    # Every datagram crossed exactly once (the forward sink trimmed the journal behind it).
    assert accepted["datagrams"] == sent.datagrams
    assert accepted["duplicates"] == 0
    assert accepted["gap"] == 0
    assert status is not None
    assert status["drops"] == {"spool_full": 0}
    assert status["upload"]["failures"] == {}
    # softflowd's export sequence numbers show no loss between it and the agent.
    assert status["upstream_loss"]
    assert all(v["lost"] == 0 for v in status["upstream_loss"].values())
    assert key not in agent.log_text()
    assert "s3cret" not in agent.log_text()
