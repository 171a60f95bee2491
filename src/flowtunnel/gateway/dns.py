"""The gateway's authoritative DNS endpoint: the DNS rung's server side (UDP and TCP on one port).

It owns nothing of the batch path: fragments named under ``--dns-zone`` are reassembled
(``wire.dns.Reassembler``, bounded) and each complete sealed batch goes to the same ``Ingest.submit`` as a
POST body; the answer (acked + tag, or the error) comes back as one TXT record. Answers have TTL 0, and every
retry of the agent is a fresh name, so no resolver cache can answer for us. Names a QNAME-minimising resolver
asks on its way down, and every query type but TXT, get NODATA (never NXDOMAIN: RFC 8020 would make the
resolver stop there).

dnslib parses and builds the packets: a small pure-Python library (no compiled parts, imports in a few ms),
enough for one zone's TXT answers; dnspython would bring a resolver and zone tooling we do not need.

Resource handling: the reassembler bounds pending batches and bytes; completed answers are kept in a bounded
LRU (so a resolver's retry of the last fragment, or a poll, gets the answer without a second ingest); ingest
calls run as referenced tasks, at most ``max_inflight`` at once and inside the gateway's shared ``Admission``
slots (beyond either, the agent is told ``busy`` and retries); sessions whose batch named an unknown or
revoked agent are remembered (bounded) and cost only a counter afterwards. Every refusal is counted by cause
(``counters``) and logged once per cause."""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from dnslib import EDNS0, NS, QTYPE, RCODE, RR, SOA, TXT, DNSError, DNSRecord

from flowtunnel.gateway.admission import Admission
from flowtunnel.gateway.edge import http_status
from flowtunnel.gateway.ingest import Ingest, Refusal
from flowtunnel.runtime import OnceLogger, TaskSet
from flowtunnel.wire import HEADER, header_length
from flowtunnel.wire.dns import (
    Answer,
    DnsNameError,
    FragmentQuery,
    Kind,
    Reassembler,
    ReassemblyLimits,
    decode_name,
    encode_answer,
    normalise_zone,
)

__all__ = ["DnsConfig", "DnsEndpoint"]

log = logging.getLogger("flowtunnel.gateway.dns")

_TCP_LEN = struct.Struct(">H")
EDNS_PAYLOAD = 1232  # the DNS flag day 2020 size: no IP fragmentation on any common path
MAX_QUERY = 512 + 255  # a query with one question and an OPT record never needs more


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsConfig:
    zone: str
    host: str = "127.0.0.1"
    port: int = 5353
    window: int = 8  # outstanding queries an agent may keep (hint in every answer)
    gap_ms: int = 20  # pause between an agent's queries (hint); raised while the journal refuses
    max_inflight: int = 16  # batches being ingested at once
    answers_cached: int = 8192
    bad_sessions: int = 4096
    limits: ReassemblyLimits = field(default_factory=ReassemblyLimits)
    tcp_idle: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "zone", normalise_zone(self.zone))
        if not 0 <= self.port <= 65535:
            raise ValueError(f"DNS port {self.port} is outside 0..65535")


class DnsEndpoint:
    """Serves ``config.zone`` on UDP and TCP. ``await start()``, ``.port``, ``await stop()``, ``counters``."""

    def __init__(
        self,
        config: DnsConfig,
        ingest: Ingest,
        *,
        admission: Admission | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.ingest = ingest
        self.admission = admission
        self.clock = clock
        self.reassembler = Reassembler(config.limits)
        self.counters: dict[str, int] = {}
        self._answers: OrderedDict[tuple[int, int], Answer] = OrderedDict()
        self._inflight: dict[tuple[int, int], asyncio.Future[Answer]] = {}
        self._bad_sessions: OrderedDict[int, str] = OrderedDict()
        self._tasks = TaskSet()
        self._once = OnceLogger(log)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._slow_until = 0.0
        self.port = config.port

    def _count(self, cause: str, n: int = 1) -> None:
        self.counters[cause] = self.counters.get(cause, 0) + n

    # -- life cycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on UDP and TCP, same port. Port 0 picks one free for both (a few tries: the UDP pick may be
        taken on TCP). Error handling: ``OSError`` (port busy, address not local), nothing left open."""
        loop = asyncio.get_running_loop()
        tries = 20 if self.config.port == 0 else 1
        for attempt in range(tries):
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(self.config.host, self.config.port)
            )
            port = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(
                    self._serve_tcp, self.config.host, port, reuse_address=True
                )
            except OSError:
                transport.close()
                if attempt + 1 == tries:
                    raise
                continue
            self._udp = transport
            self.port = port
            break
        log.info("DNS endpoint for zone %s listening on udp+tcp %s:%d", self.config.zone, self.config.host,
                 self.port)

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
            self._tcp = None
        await self._tasks.close()

    def status(self) -> dict[str, object]:
        return {
            "zone": self.config.zone,
            "port": self.port,
            "pending_batches": self.reassembler.pending_batches,
            "pending_bytes": self.reassembler.pending_bytes,
            "counters": {**self.counters, **{k: v for k, v in self.reassembler.counters.items() if v}},
        }

    # -- transports -----------------------------------------------------------------------------------------

    def _datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        self._count("dns-queries")
        self._tasks.spawn(self._answer_udp(data, addr), name="dns-udp-query")

    async def _answer_udp(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = await self.handle(data, udp=True)
        if reply is not None and self._udp is not None:
            self._udp.sendto(reply, addr)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                async with asyncio.timeout(self.config.tcp_idle):
                    head = await reader.readexactly(2)
                    (length,) = _TCP_LEN.unpack(head)
                    if length > MAX_QUERY:
                        self._count("dns-oversized")
                        return
                    data = await reader.readexactly(length)
                self._count("dns-queries-tcp")
                reply = await self.handle(data, udp=False)
                if reply is None:
                    return
                writer.write(_TCP_LEN.pack(len(reply)) + reply)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    # -- one query ------------------------------------------------------------------------------------------

    async def handle(self, data: bytes, *, udp: bool) -> bytes | None:
        """The reply to one DNS message (``None``: no answer at all, e.g. garbage or a response)."""
        if len(data) > MAX_QUERY:
            self._count("dns-oversized")
            return None
        try:
            request = DNSRecord.parse(data)
        except (DNSError, struct.error, IndexError, ValueError, UnicodeDecodeError):
            self._count("dns-malformed")
            self._once.warning("malformed", "DNS endpoint: malformed DNS message (%d bytes) ignored",
                               len(data))
            return None
        if request.header.qr or len(request.questions) != 1:
            self._count("dns-malformed")
            return None
        reply = request.reply()
        reply.header.aa = 1
        q = request.q
        qname = str(q.qname)
        zone = self.config.zone
        lower = qname.rstrip(".").lower()
        if lower != zone and not lower.endswith("." + zone):
            self._count("dns-refused")
            reply.header.rcode = RCODE.REFUSED
            return self._pack(request, reply, udp)
        if qname != qname.lower():
            self._count("dns-mixed-case")  # a resolver randomising case (0x20): base32 does not mind
        if q.qtype == QTYPE.TXT:
            answer = await self._txt(qname)
            if answer is None:
                self._nodata(reply)
            else:
                reply.add_answer(RR(q.qname, QTYPE.TXT, ttl=0, rdata=TXT(encode_answer(answer))))
        elif lower == zone and q.qtype == QTYPE.SOA:
            reply.add_answer(RR(q.qname, QTYPE.SOA, ttl=0, rdata=self._soa()))
        elif lower == zone and q.qtype == QTYPE.NS:
            reply.add_answer(RR(q.qname, QTYPE.NS, ttl=0, rdata=NS(f"ns.{zone}.")))
        else:
            self._nodata(reply)
        return self._pack(request, reply, udp)

    def _soa(self) -> SOA:
        zone = self.config.zone
        return SOA(f"ns.{zone}.", f"hostmaster.{zone}.", (1, 3600, 600, 86400, 0))

    def _nodata(self, reply: DNSRecord) -> None:
        self._count("dns-nodata")
        reply.add_auth(RR(self.config.zone + ".", QTYPE.SOA, ttl=0, rdata=self._soa()))

    def _pack(self, request: DNSRecord, reply: DNSRecord, udp: bool) -> bytes:
        opt = next((rr for rr in request.ar if rr.rtype == QTYPE.OPT), None)
        limit = 65535
        if udp:
            limit = 512 if opt is None else max(512, min(int(opt.rclass), EDNS_PAYLOAD))
        if opt is not None:
            reply.add_ar(EDNS0(udp_len=EDNS_PAYLOAD))
        packed: bytes = reply.pack()
        if len(packed) > limit:
            self._count("dns-truncated")
            reply.rr = []
            reply.auth = []
            reply.header.tc = 1
            packed = reply.pack()
        return packed

    # -- the rung -------------------------------------------------------------------------------------------

    def _hints(self, kind: str, fields: dict[str, str]) -> Answer:
        gap = self.config.gap_ms
        if self.clock() < self._slow_until:
            gap = max(gap * 10, 500)
        return Answer(kind=kind, fields=fields, window=self.config.window, gap_ms=gap)

    async def _txt(self, qname: str) -> Answer | None:
        try:
            query = decode_name(qname, self.config.zone)
        except DnsNameError as exc:
            self._count(exc.cause)
            self._once.warning(exc.cause, "DNS endpoint: %s (counted as %s)", exc, exc.cause)
            return self._hints("e", {"st": "400", "code": exc.cause})
        if query is None:
            return None
        key = (query.session, query.batch)
        if query.session in self._bad_sessions:
            self._count("dns-bad-session")
            return self._hints("e", {"st": "401", "code": self._bad_sessions[query.session]})
        done = self._answers.get(key)
        if done is not None:
            self._answers.move_to_end(key)
            self._count("dns-repeated")
            return done
        inflight = self._inflight.get(key)
        if inflight is not None:
            return await asyncio.shield(inflight)
        if query.kind is Kind.POLL:
            self._count("dns-polls")
            return self._hints("u", {})
        now = self.clock()
        self.reassembler.expire(now)
        if query.index == 0:
            refusal = self._check_agent(query)
            if refusal is not None:
                return refusal
        try:
            progress = self.reassembler.add(query, now)
        except DnsNameError as exc:
            self._count(exc.cause)
            self._once.warning(exc.cause, "DNS endpoint: %s", exc)
            return self._hints("e", {"st": "413", "code": exc.cause})
        if progress.duplicate:
            self._count("dns-duplicate-fragments")
        if progress.body is None:
            return self._hints("p", {"have": str(progress.have), "of": str(progress.count)})
        if len(self._inflight) >= self.config.max_inflight:
            self._count("dns-busy")
            return self._hints("e", {"st": "503", "code": "busy", "ra": "1"})
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            answer = await self._ingest(progress.body)
            future.set_result(answer)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs "never retrieved"
            raise
        finally:
            del self._inflight[key]
        self._answers[key] = answer
        while len(self._answers) > self.config.answers_cached:
            self._answers.popitem(last=False)
        return answer

    def _check_agent(self, query: FragmentQuery) -> Answer | None:
        agent = _header_agent(query.data)
        if agent is None or self.ingest.enrolled(agent) is not None:
            return None  # no whole header in this fragment: ingest's checks refuse it precisely later
        cause = "unknown-agent"
        self._count("dns-unknown-agent")
        self._once.warning("unknown-agent", "DNS endpoint: fragments for an agent that is not enrolled "
                           "(or revoked) are refused; the session costs a counter from now on")
        self._bad_sessions[query.session] = cause
        while len(self._bad_sessions) > self.config.bad_sessions:
            self._bad_sessions.popitem(last=False)
        return self._hints("e", {"st": "401", "code": cause})

    async def _ingest(self, body: bytes) -> Answer:
        agent = _header_agent(body) or ""
        if self.admission is None:
            outcome = await self.ingest.deliver(body, agent_header=agent, rung="dns")
        else:
            with self.admission.slot(agent) as busy:
                if busy is not None:
                    self._count("dns-busy")
                    return self._hints("e", {"st": "503", "code": "busy", "ra": "1"})
                outcome = await self.ingest.deliver(body, agent_header=agent, rung="dns")
        if isinstance(outcome, Refusal):
            self._count(f"dns-refused-{outcome.code}")
            status = http_status(outcome.code)
            fields = {"st": str(status), "code": outcome.code}
            if "acked" in outcome.extra:
                fields["acked"] = str(outcome.extra["acked"])
            if outcome.retry_after is not None:
                fields["ra"] = str(outcome.retry_after)
                if status == 503:
                    self._slow_until = self.clock() + outcome.retry_after
            return self._hints("e", fields)
        self._count("dns-batches")
        fields = {"st": "200", "acked": str(outcome.acked), "tag": outcome.tag, "acc": str(outcome.accepted),
                  "dup": str(outcome.duplicates)}
        return self._hints("a", fields)


def _header_agent(data: bytes) -> str | None:
    """The agent id a batch header names, or ``None`` when ``data`` does not hold the whole header."""
    end = header_length(data)
    if end is None or len(data) < end:
        return None
    return data[HEADER.size : end].decode("ascii", "replace")


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, endpoint: DnsEndpoint) -> None:
        self.endpoint = endpoint

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.endpoint._datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("DNS endpoint: UDP error %s", exc)
