"""The DNS rung through real recursive resolvers: sealed batches cut into query names go through unbound
(0x20 and QNAME minimisation on) and dnsmasq to the gateway's DNS endpoint and are journaled exactly once, in
order, also with 10 % of the queries lost on the way."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flowtunnel.agent.dnsclient import DnsClient, DnsClientConfig
from flowtunnel.gateway import Gateway
from flowtunnel.gateway.dns import DnsEndpoint
from flowtunnel.wire import peek_header, verify_ack
from tests.gateway.util import datagrams, journal_entries, seal
from tests.resolvers import Dnsmasq, LossyRelay, Unbound, dns_gateway, free_dns_port

AGENT = "site-dns"
ZONE = "t.example.org"


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[Gateway, DnsEndpoint, bytes]]:
    async with dns_gateway(tmp_path / "gw", agent=AGENT, zone=ZONE) as env:
        yield env


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


async def test_gateway_process_killed_mid_stream_loses_and_doubles_nothing(tmp_path: Path) -> None:
    """``flowtunnel gateway --dns-zone`` as a user runs it, dnsmasq in front; the gateway is kill -9'd while
    batches are in flight and restarted; the client re-sends what was not acknowledged (as the agent's
    delivery protocol does) and the journal holds every datagram once, in order."""
    import asyncio
    import contextlib

    from flowtunnel.agent.dnsclient import DnsTransportError
    from flowtunnel.wire import parse_key
    from tests.agent.chain import GatewayProc, enroll_agent, journal, wait_until

    data = tmp_path / "gw"
    key = parse_key(enroll_agent(data, AGENT))
    dns_port = free_dns_port()
    gw = GatewayProc(data, extra=["--dns-zone", ZONE, "--dns-listen", f"udp://127.0.0.1:{dns_port}"])
    with gw, Dnsmasq(tmp_path, zone=ZONE, upstream_port=dns_port) as res:
        gw.start()
        wait_until(lambda: bool(gw.status()), "gateway status.json")
        status = gw.status()
        assert f"dns://127.0.0.1:{dns_port}/{ZONE}" in status.get("listen", [])
        client = DnsClient(DnsClientConfig(zone=ZONE, resolver=("127.0.0.1", res.port), qps=500,
                                           query_timeout=0.3, retries=3))
        sent: list[bytes] = []
        seq, killed, failures = 1, False, 0
        try:
            while seq <= 1200:
                dgs = datagrams(100, start=seq)
                body = seal(AGENT, key, seq, dgs)
                if seq == 401 and not killed:
                    killed = True
                    # The gateway dies while this batch's fragments are on their way.
                    task = asyncio.create_task(client.exchange(body))
                    await asyncio.sleep(0.02)
                    gw.kill9()
                    with contextlib.suppress(DnsTransportError):
                        await task
                    gw.start()
                try:
                    answer = await client.exchange(body)
                except DnsTransportError:
                    failures += 1
                    assert failures < 20
                    continue
                assert answer.kind == "a", answer
                assert answer.int("acked") == seq + 99
                sent.extend(d.payload for d in dgs)
                seq += 100
        finally:
            client.close()
        assert gw.stop() == 0
    got = journal(data, AGENT)
    assert [s for s, _ in got] == list(range(1, 1201))
    assert [d.payload for _, d in got] == sent
