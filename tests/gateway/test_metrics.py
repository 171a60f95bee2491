"""Gateway metrics: the advisory drop header is parsed defensively, label values stay bounded."""

from __future__ import annotations

from flowtunnel.gateway.metrics import GatewayMetrics, parse_dropped_header


def test_dropped_header_parsing_skips_what_it_cannot_trust() -> None:
    assert parse_dropped_header("spool_full=12, malformed-v9=3") == {"spool_full": 12, "malformed-v9": 3}
    assert parse_dropped_header("x=1,=2,Bad=3,y=-4,z=five,{}=1,w") == {"x": 1}
    assert parse_dropped_header("a" * 40 + "=1") == {}
    many = ",".join(f"c{i}=1" for i in range(100))
    assert len(parse_dropped_header(many)) == 16


def test_agent_reported_causes_are_bounded_per_agent() -> None:
    m = GatewayMetrics()
    for i in range(40):
        m.accepted(
            "a",
            now=1.0,
            acked=i,
            accepted=1,
            duplicates=0,
            gap=0,
            http_bytes=10,
            datagram_bytes=30,
            backlog=None,
            dropped={f"cause{i}": i},
        )
    assert len(m.agents["a"].dropped) == 16
    assert m.render().decode().count("flowtunnel_gateway_agent_dropped_datagrams{") == 16
    assert m.agents["a"].as_dict()["compression_ratio"] == 3.0


def test_unknown_agents_share_one_label() -> None:
    m = GatewayMetrics()
    m.reject(None, "unknown-agent")
    m.reject(None, "unknown-agent")
    m.reject("site-a", "revoked")
    text = m.render().decode()
    assert 'flowtunnel_gateway_rejected_requests_total{agent="unknown",cause="unknown-agent"} 2.0' in text
    assert m.rejects_by_cause == {"unknown-agent": 2, "revoked": 1}
    assert m.agents["site-a"].rejected == {"revoked": 1}
