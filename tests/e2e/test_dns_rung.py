"""The DNS rung through real recursive resolvers: sealed batches cut into query names go through unbound
(0x20 and QNAME minimisation on) and dnsmasq to the gateway's DNS endpoint and are journaled exactly once, in
order, also with 10 % of the queries lost on the way."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flowtunnel.agent.dnsclient import DnsClient, DnsClientConfig
from flowtunnel.gateway import Gateway
from flowtunnel.gateway.dns import DnsConfig, DnsEndpoint
from flowtunnel.wire import peek_header, verify_ack
from tests.gateway.util import datagrams, enroll, journal_entries, seal, start_gateway
from tests.resolvers import Dnsmasq, LossyRelay, Unbound

AGENT = "site-dns"
ZONE = "t.example.org"


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[Gateway, DnsEndpoint, bytes]]:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    gw = await start_gateway(data)
    assert gw.ingest is not None
    dns = DnsEndpoint(DnsConfig(zone=ZONE, host="127.0.0.1", port=0), gw.ingest)
    await dns.start()
    yield gw, dns, key
    await dns.stop()
    await gw.stop()


async def deliver(client: DnsClient, key: bytes, batches: int, per_batch: int) -> list[bytes]:
    sent: list[bytes] = []
    seq = 1
    for _ in range(batches):
        dgs = datagrams(per_batch, start=seq)
        body = seal(AGENT, key, seq, dgs)
        answer = await client.exchange(body)
        assert answer.kind == "a", answer
        acked = answer.int("acked")
        assert acked == seq + per_batch - 1
        verify_ack(key, agent_id=AGENT, request_nonce=peek_header(body).nonce, acked=acked,
                   tag=answer.fields["tag"])
        sent.extend(d.payload for d in dgs)
        seq += per_batch
    return sent


@pytest.mark.parametrize("resolver", [Unbound, Dnsmasq], ids=["unbound", "dnsmasq"])
@pytest.mark.parametrize("loss", [0.0, 0.1], ids=["clean", "10pct-loss"])
async def test_batches_through_a_real_resolver_arrive_exactly_once(
    gateway: tuple[Gateway, DnsEndpoint, bytes], tmp_path: Path, resolver: type[Unbound | Dnsmasq],
    loss: float,
) -> None:
    gw, dns, key = gateway
    with resolver(tmp_path, zone=ZONE, upstream_port=dns.port) as res:
        async with LossyRelay(res.port, loss=loss) as relay:
            client = DnsClient(DnsClientConfig(zone=ZONE, resolver=("127.0.0.1", relay.port), qps=200,
                                               query_timeout=0.5, retries=8))
            try:
                sent = await deliver(client, key, batches=4, per_batch=150)
            finally:
                client.close()
    entries = journal_entries(gw)
    assert [e.datagram.payload for e in entries] == sent
    assert [e.stream_seq for e in entries] == list(range(1, len(sent) + 1))
    if loss:
        assert relay.dropped > 0
        assert client.stats.retries > 0
    assert dns.counters.get("dns-batches", 0) == 4
    if resolver is Unbound:
        # unbound really randomised the case and walked down the names: the rung survived both.
        assert dns.counters.get("dns-mixed-case", 0) > 0
        assert dns.counters.get("dns-nodata", 0) > 0
