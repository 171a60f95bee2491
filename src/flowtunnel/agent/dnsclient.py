"""The agent's side of the DNS rung: one sealed batch out as paced TXT queries through a recursive
resolver.

The resolver is whatever the network offers (the first ``nameserver`` of ``/etc/resolv.conf``) or
``--dns-resolver HOST:PORT``. Names and answers are ``wire.dns``'s. Every query carries a fresh salt, so a
retry is a new name no cache can answer; replies are matched by DNS id and by the question name compared
exactly (resolvers with 0x20 randomisation check the case themselves; a reply that is not for our name is
dropped).

Flow: fragments go out with at most ``window`` queries outstanding (the gateway's ``win`` hint lowers it) and
at least ``1 / qps`` seconds apart (the gateway's ``gap`` hint raises it). A fragment whose answer does not
come within ``query_timeout`` is re-sent (new salt) up to ``retries`` times; a truncated answer is asked again
over TCP. The batch is done when any answer is the gateway's verdict (``a`` acked, ``e`` error); when every
fragment was acknowledged as progress but no verdict came (it was lost on the way back), a poll fetches it,
and a poll the gateway cannot answer (``u``) means the whole batch is sent again.

Error handling: ``DnsTransportError`` when the resolver does not answer at all, or every retry of a fragment
failed; the caller backs off as for any connection error. Answers that are not the gateway's (a resolver or
portal rewriting them) count as a failed attempt of that fragment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from dnslib import EDNS0, QTYPE, RCODE, DNSError, DNSRecord

from flowtunnel.errors import FlowtunnelError
from flowtunnel.wire.dns import (
    Answer,
    DnsNameError,
    FragmentQuery,
    Kind,
    decode_answer,
    encode_name,
    normalise_zone,
    split_batch,
)

__all__ = ["DnsClient", "DnsClientConfig", "DnsStats", "DnsTransportError", "system_resolver"]

log = logging.getLogger("flowtunnel.agent.dns")

_TCP_LEN = struct.Struct(">H")


class DnsTransportError(FlowtunnelError):
    """The DNS rung could not deliver this batch now (no answers, or only answers that are not ours)."""


def system_resolver(resolv_conf: Path = Path("/etc/resolv.conf")) -> tuple[str, int]:
    """The first ``nameserver`` of resolv.conf, port 53; ``DnsTransportError`` when there is none."""
    try:
        text = resolv_conf.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DnsTransportError(f"cannot read {resolv_conf}: {exc.strerror}") from None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            return parts[1], 53
    raise DnsTransportError(f"{resolv_conf} names no nameserver: give --dns-resolver HOST:PORT")


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsClientConfig:
    zone: str
    resolver: tuple[str, int]
    qps: float = 20.0  # queries per second at most (``--dns-qps``)
    window: int = 8  # outstanding queries at most
    query_timeout: float = 2.0
    retries: int = 5  # per fragment
    # No EDNS0 OPT record on the way to the resolver by default: answers fit 512 bytes (a 253-character name
    # and one short TXT), and the OPT costs 11 bytes each way per query. Set 1232 for resolvers that want it.
    edns_payload: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "zone", normalise_zone(self.zone))
        if not 0.1 <= self.qps <= 10_000:
            raise ValueError(f"DNS query rate {self.qps} is outside 0.1..10000 queries/s")
        if not 1 <= self.window <= 256:
            raise ValueError(f"DNS window {self.window} is outside 1..256")
        if not 0.05 <= self.query_timeout <= 60:
            raise ValueError(f"DNS query timeout {self.query_timeout} s is outside 0.05..60 s")


@dataclass(slots=True)
class DnsStats:
    """What the rung cost: queries and bytes both ways (DNS messages; add 28 per UDP packet for IP+UDP)."""

    queries: int = 0
    retries: int = 0
    polls: int = 0
    tcp_fallbacks: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    udp_packets_out: int = 0
    udp_packets_in: int = 0
    bad_answers: int = 0
    batches: int = 0
    fragments: int = 0


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, client: DnsClient) -> None:
        self.client = client

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.client._reply(data)

    def error_received(self, exc: Exception) -> None:
        log.debug("DNS rung: UDP error %s", exc)


class DnsClient:
    """``await open()``, ``await exchange(body) -> Answer``, ``close()``. One exchange at a time."""

    def __init__(self, config: DnsClientConfig, *, rng: random.Random | None = None) -> None:
        self.config = config
        self._rng = rng or random.SystemRandom()
        self.session = self._rng.getrandbits(32)
        self._batch = self._rng.getrandbits(16)
        self.stats = DnsStats()
        self._transport: asyncio.DatagramTransport | None = None
        self._waiting: dict[int, tuple[str, asyncio.Future[DNSRecord]]] = {}
        self._gap = 1.0 / config.qps
        self._window = config.window
        self._next_send = 0.0

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.config.resolver
        transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), remote_addr=(host, port))
        self._transport = transport

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        for _, future in self._waiting.values():
            future.cancel()
        self._waiting.clear()

    # -- one batch ------------------------------------------------------------------------------------------

    async def exchange(self, body: bytes) -> Answer:
        """Send one sealed batch; the gateway's verdict (``a`` or ``e``)."""
        if self._transport is None:
            await self.open()
        self._batch = (self._batch + 1) & 0xFFFF
        pieces = split_batch(body, self.config.zone)
        self.stats.batches += 1
        self.stats.fragments += len(pieces)
        for _attempt in range(2):
            verdict = await self._send_all(pieces)
            if verdict is not None:
                return verdict
            self.stats.polls += 1
            poll = FragmentQuery(kind=Kind.POLL, session=self.session, batch=self._batch, index=0,
                                 count=len(pieces), salt=0)
            answer = await self._ask(poll)
            if answer.kind in ("a", "e"):
                return answer
        raise DnsTransportError(f"batch {self._batch} of session {self.session:08x}: every fragment was "
                                "answered but no verdict came back")

    async def _send_all(self, pieces: list[bytes]) -> Answer | None:
        verdict: Answer | None = None
        pending = list(range(len(pieces)))
        running: set[asyncio.Task[Answer]] = set()
        try:
            while pending or running:
                while pending and len(running) < self._window and verdict is None:
                    i = pending.pop(0)
                    q = FragmentQuery(kind=Kind.FRAGMENT, session=self.session, batch=self._batch, index=i,
                                      count=len(pieces), salt=0, data=pieces[i])
                    running.add(asyncio.create_task(self._ask(q), name=f"dns-fragment-{i}"))
                if not running:
                    break
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    answer = task.result()  # DnsTransportError propagates: the batch failed this time
                    if answer.kind in ("a", "e"):
                        verdict = answer
                    elif answer.kind == "u":
                        raise DnsTransportError("the gateway lost this batch's fragments")
                if verdict is not None:
                    pending.clear()
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        return verdict

    async def _ask(self, query: FragmentQuery) -> Answer:
        """One fragment or poll, retried with a fresh name until the gateway answers."""
        last: Exception | None = None
        for attempt in range(self.config.retries + 1):
            if attempt:
                self.stats.retries += 1
            q = FragmentQuery(kind=query.kind, session=query.session, batch=query.batch, index=query.index,
                              count=query.count, salt=self._rng.getrandbits(4), data=query.data)
            name = encode_name(q, self.config.zone)
            await self._pace()
            try:
                reply = await self._query(name)
                answer = self._answer(reply, name)
            except (TimeoutError, DnsNameError, DnsTransportError, OSError) as exc:
                last = exc
                continue
            self._window = max(1, min(self.config.window, answer.window or self.config.window))
            self._gap = max(1.0 / self.config.qps, answer.gap_ms / 1000)
            return answer
        raise DnsTransportError(f"no usable answer for fragment {query.index} after "
                                f"{self.config.retries + 1} tries: {last}")

    async def _pace(self) -> None:
        now = time.monotonic()
        wait = self._next_send - now
        self._next_send = max(now, self._next_send) + self._gap
        if wait > 0:
            await asyncio.sleep(wait)

    def _answer(self, reply: DNSRecord, name: str) -> Answer:
        if reply.header.rcode != RCODE.NOERROR:
            self.stats.bad_answers += 1
            raise DnsTransportError(f"resolver answered {RCODE.get(reply.header.rcode)} for the zone")
        for rr in reply.rr:
            if rr.rtype == QTYPE.TXT and str(rr.rname).rstrip(".").lower() == name.lower():
                text = b"".join(rr.rdata.data).decode("ascii", "replace")
                try:
                    return decode_answer(text)
                except DnsNameError:
                    self.stats.bad_answers += 1
                    raise
        self.stats.bad_answers += 1
        raise DnsTransportError("the answer holds no TXT record for our name (NODATA from a resolver?)")

    async def _query(self, name: str) -> DNSRecord:
        loop = asyncio.get_running_loop()
        request = DNSRecord.question(name, "TXT")
        if self.config.edns_payload:
            request.add_ar(EDNS0(udp_len=self.config.edns_payload))
        qid = self._rng.getrandbits(16)
        while qid in self._waiting:
            qid = self._rng.getrandbits(16)
        request.header.id = qid
        packet = request.pack()
        if self._transport is None:
            raise DnsTransportError("DNS client is closed")
        future: asyncio.Future[DNSRecord] = loop.create_future()
        self._waiting[qid] = (name, future)
        self._transport.sendto(packet)
        self.stats.queries += 1
        self.stats.udp_packets_out += 1
        self.stats.bytes_out += len(packet)
        try:
            async with asyncio.timeout(self.config.query_timeout):
                reply = await future
        finally:
            self._waiting.pop(qid, None)
        if reply.header.tc:
            self.stats.tcp_fallbacks += 1
            return await self._query_tcp(packet)
        return reply

    async def _query_tcp(self, packet: bytes) -> DNSRecord:
        host, port = self.config.resolver
        async with asyncio.timeout(self.config.query_timeout * 2):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(_TCP_LEN.pack(len(packet)) + packet)
                self.stats.bytes_out += len(packet) + 2
                (length,) = _TCP_LEN.unpack(await reader.readexactly(2))
                data = await reader.readexactly(length)
                self.stats.bytes_in += length + 2
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        try:
            return DNSRecord.parse(data)
        except (DNSError, struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
            raise DnsTransportError(f"malformed DNS answer over TCP: {exc}") from None

    def _reply(self, data: bytes) -> None:
        self.stats.udp_packets_in += 1
        self.stats.bytes_in += len(data)
        try:
            reply = DNSRecord.parse(data)
        except (DNSError, struct.error, IndexError, ValueError, UnicodeDecodeError):
            self.stats.bad_answers += 1
            return
        waiting = self._waiting.get(reply.header.id)
        if waiting is None:
            return  # late, duplicated, or not ours
        name, future = waiting
        if not reply.questions or str(reply.q.qname).rstrip(".") != name or future.done():
            self.stats.bad_answers += 1
            return
        future.set_result(reply)
