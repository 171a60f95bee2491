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


def _prometheus_values() -> int:
    import gc

    from prometheus_client.values import MutexValue

    gc.collect()  # earlier tests' garbage, collected during the test, would otherwise lower the count
    return sum(1 for o in gc.get_objects() if isinstance(o, MutexValue))


def test_per_agent_series_cost_no_metric_objects_and_are_made_at_scrape() -> None:
    """A fleet of 2,000 agents: ~10 prometheus children (a value and a lock each) per agent were most of
    what the collector walked, and a labels() look-up per series and request ~5 % of the gateway's CPU
    (issue 16). Requests only add to the agent's figures; the scrape turns them into the same series."""
    m = GatewayMetrics()
    before = _prometheus_values()
    for i in range(50):
        agent = f"site-{i:02d}"
        m.accepted(agent, now=100.0 + i, acked=7, accepted=3, duplicates=1, gap=2, http_bytes=40,
                   datagram_bytes=120, backlog=5, dropped={"spool_full": 4})
        m.held(agent, 900)
        m.clock_sample(agent, -2.0)
        m.clock_sample(agent, -4.0)
        m.rung_request("post", bytes_in=300)
        m.rung_traffic("post", bytes_out=100)
        m.rung_batch("post", "acked")
    m.replay("site-00")
    m.nonce_reuse("site-01")
    m.restore_last_seen("quiet", 50.0)
    assert _prometheus_values() == before
    text = m.render().decode()
    for line in (
        'flowtunnel_gateway_datagrams_total{agent="site-03"} 3.0',
        'flowtunnel_gateway_duplicate_datagrams_total{agent="site-03"} 1.0',
        'flowtunnel_gateway_agent_gap_datagrams_total{agent="site-03"} 2.0',
        'flowtunnel_gateway_journal_lost_datagrams_total{agent="site-03"} 0.0',
        'flowtunnel_gateway_http_body_bytes_total{agent="site-03"} 40.0',
        'flowtunnel_gateway_datagram_bytes_total{agent="site-03"} 120.0',
        'flowtunnel_gateway_compression_ratio{agent="site-03"} 3.0',
        'flowtunnel_gateway_agent_backlog_datagrams{agent="site-03"} 5.0',
        'flowtunnel_gateway_agent_dropped_datagrams{agent="site-03",cause="spool_full"} 4.0',
        'flowtunnel_gateway_agent_last_seen_timestamp_seconds{agent="site-03"} 103.0',
        'flowtunnel_gateway_agent_acked_seq{agent="site-03"} 7.0',
        'flowtunnel_gateway_agent_clock_skew_seconds{agent="site-03"} -3.0',
        'flowtunnel_gateway_agent_journal_bytes{agent="site-03"} 900.0',
        'flowtunnel_gateway_replayed_requests_total{agent="site-00"} 1.0',
        'flowtunnel_gateway_nonce_reuse_total{agent="site-01"} 1.0',
        'flowtunnel_gateway_agent_last_seen_timestamp_seconds{agent="quiet"} 50.0',
        'flowtunnel_gateway_rung_requests_total{rung="post"} 50.0',
        'flowtunnel_gateway_rung_batches_total{outcome="acked",rung="post"} 50.0',
        'flowtunnel_gateway_rung_bytes_total{direction="in",rung="post"} 15000.0',
        'flowtunnel_gateway_rung_bytes_total{direction="out",rung="post"} 5000.0',
    ):
        assert line in text, line
    # an agent only restored from the last status has no acked figure of this gateway's, and no traffic
    assert 'agent_acked_seq{agent="quiet"}' not in text
    assert 'datagrams_total{agent="quiet"}' not in text
    assert 'replayed_requests_total{agent="site-02"}' not in text
