"""The gateway's DNS endpoint over real UDP/TCP sockets: batches cut into query names come out journaled once,
answered in TXT records; resolvers' intermediate names get NODATA; garbage and strangers cost a counter."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from flowtunnel.gateway import Gateway
from flowtunnel.gateway.dns import DnsEndpoint
from flowtunnel.wire import peek_header, verify_ack
from flowtunnel.wire.dns import Answer, FragmentQuery, Kind, decode_answer, encode_name, split_batch
from tests.gateway.util import datagrams, journal_entries, seal
from tests.resolvers import dns_gateway

AGENT = "site-dns"
ZONE = "t.example.org"


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Gateway, DnsEndpoint, bytes]]:
    async with dns_gateway(tmp_path / "gw", agent=AGENT, zone=ZONE) as env:
        yield env


async def ask(port: int, name: str, qtype: str = "TXT", *, tcp: bool = False) -> DNSRecord:
    query = DNSRecord.question(name, qtype)
    packet = query.pack()
    loop = asyncio.get_running_loop()
    if tcp:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(struct.pack(">H", len(packet)) + packet)
        (length,) = struct.unpack(">H", await reader.readexactly(2))
        data = await reader.readexactly(length)
        writer.close()
        return DNSRecord.parse(data)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        await loop.sock_sendto(sock, packet, ("127.0.0.1", port))
        async with asyncio.timeout(5):
            data = await loop.sock_recv(sock, 4096)
    finally:
        sock.close()
    return DNSRecord.parse(data)


def txt(reply: DNSRecord) -> Answer:
    assert reply.header.rcode == RCODE.NOERROR
    assert len(reply.rr) == 1
    assert reply.rr[0].ttl == 0
    return decode_answer(b"".join(reply.rr[0].rdata.data).decode("ascii"))


async def send_batch(port: int, body: bytes, *, session: int, batch: int, shuffle: bool = False) -> Answer:
    pieces = split_batch(body, ZONE)
    order = list(range(len(pieces)))
    if shuffle:
        random.Random(3).shuffle(order)
    last: Answer | None = None
    for i in order:
        q = FragmentQuery(kind=Kind.FRAGMENT, session=session, batch=batch, index=i, count=len(pieces),
                          salt=random.getrandbits(4), data=pieces[i])
        last = txt(await ask(port, encode_name(q, ZONE)))
    assert last is not None
    return last


async def test_a_batch_in_fragments_is_journaled_once_and_acked_with_a_tag(
    env: tuple[Gateway, DnsEndpoint, bytes],
) -> None:
    gw, dns, key = env
    dgs = datagrams(300)
    body = seal(AGENT, key, 1, dgs)
    assert len(split_batch(body, ZONE)) > 2
    answer = await send_batch(dns.port, body, session=11, batch=1, shuffle=True)
    assert answer.kind == "a"
    assert answer.int("acked") == 300
    nonce = peek_header(body).nonce
    verify_ack(key, agent_id=AGENT, request_nonce=nonce, acked=300, tag=answer.fields["tag"])
    assert [e.datagram for e in journal_entries(gw)] == dgs
    # The resolver retries the last fragment (its answer was lost): the cached answer, no second ingest.
    again = await send_batch(dns.port, body, session=11, batch=1)
    assert again == answer
    poll = FragmentQuery(kind=Kind.POLL, session=11, batch=1, index=0, count=0, salt=5)
    assert txt(await ask(dns.port, encode_name(poll, ZONE))) == answer
    assert len(journal_entries(gw)) == 300
    assert dns.counters["dns-batches"] == 1


async def test_tcp_carries_the_same_answers(env: tuple[Gateway, DnsEndpoint, bytes]) -> None:
    _, dns, key = env
    body = seal(AGENT, key, 1, datagrams(2))
    pieces = split_batch(body, ZONE)
    answer = None
    for i, piece in enumerate(pieces):
        q = FragmentQuery(kind=Kind.FRAGMENT, session=12, batch=1, index=i, count=len(pieces), salt=i,
                          data=piece)
        answer = txt(await ask(dns.port, encode_name(q, ZONE), tcp=True))
    assert answer is not None
    assert answer.kind == "a"
    assert answer.int("acked") == 2


async def test_resolver_walks_and_other_types_get_nodata_not_nxdomain(
    env: tuple[Gateway, DnsEndpoint, bytes],
) -> None:
    _, dns, key = env
    body = seal(AGENT, key, 1, datagrams(1))
    name = encode_name(FragmentQuery(kind=Kind.FRAGMENT, session=1, batch=1, index=0, count=2, salt=1,
                                     data=body[:50]), ZONE)
    labels = name.split(".")
    for qname, qtype in [(ZONE, "A"), (".".join(labels[-4:]), "A"), (".".join(labels[-5:]), "A"), (name, "A"),
                         (name, "AAAA"), ("www." + ZONE, "TXT")]:
        reply = await ask(dns.port, qname, qtype)
        assert reply.header.rcode == RCODE.NOERROR, (qname, qtype)
        assert reply.rr == []
        assert reply.auth[0].rtype == QTYPE.SOA
    soa = await ask(dns.port, ZONE, "SOA")
    assert soa.rr[0].rtype == QTYPE.SOA
    outside = await ask(dns.port, "example.com", "TXT")
    assert outside.header.rcode == RCODE.REFUSED


async def test_unknown_agents_and_garbage_cost_only_counters(env: tuple[Gateway, DnsEndpoint, bytes]) -> None:
    gw, dns, _ = env
    stranger = seal("stranger", bytes(32), 1, datagrams(300))
    answer = await send_batch(dns.port, stranger, session=77, batch=1)
    assert answer.kind == "e"
    assert answer.fields["code"] == "unknown-agent"
    assert dns.counters["dns-unknown-agent"] == 1
    assert dns.counters["dns-bad-session"] >= 1
    assert dns.reassembler.pending_batches == 0
    meta = encode_name(FragmentQuery(kind=Kind.POLL, session=1, batch=1, index=0, count=1, salt=0),
                       ZONE).split(".")[0]
    bad = txt(await ask(dns.port, f"zzzz0000.{meta}.{ZONE}"))
    assert bad.kind == "e"
    assert dns.counters["dns-bad-name"] == 1
    other_version = txt(await ask(dns.port, "zzzz." + "a" * 20 + "." + ZONE))
    assert other_version.fields["code"] == "dns-bad-version"
    # Not DNS at all, and a response instead of a query: no answer, counted, the endpoint keeps serving.
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.sendto(b"\x00garbage", ("127.0.0.1", dns.port))
    sock.close()
    await asyncio.sleep(0.1)
    assert dns.counters["dns-malformed"] == 1
    assert journal_entries(gw) == []
    soa = await ask(dns.port, ZONE, "SOA")
    assert soa.header.rcode == RCODE.NOERROR


async def test_a_forged_batch_is_refused_by_ingest_after_reassembly(
    env: tuple[Gateway, DnsEndpoint, bytes],
) -> None:
    gw, dns, key = env
    body = bytearray(seal(AGENT, key, 1, datagrams(3)))
    body[-1] ^= 1
    answer = await send_batch(dns.port, bytes(body), session=5, batch=9)
    assert answer.kind == "e"
    assert (answer.fields["st"], answer.fields["code"]) == ("401", "authentication-failed")
    assert journal_entries(gw) == []


async def test_status_names_the_dns_rung_and_its_counters(env: tuple[Gateway, DnsEndpoint, bytes]) -> None:
    from flowtunnel.gateway.status import render

    gw, dns, key = env
    gw.dns = dns  # as Gateway.start does for --dns-zone
    await send_batch(dns.port, seal(AGENT, key, 1, datagrams(5)), session=3, batch=1)
    doc = gw.status()
    assert isinstance(doc["dns"], dict)
    assert doc["dns"]["zone"] == ZONE
    text = render(doc)
    assert f"dns rung  zone {ZONE} on udp+tcp port {dns.port}" in text
    assert "dns-batches=1" in text
    gw.dns = None
