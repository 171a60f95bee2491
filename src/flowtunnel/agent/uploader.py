"""The uploader: reads the spool from the gateway's acknowledged seq, seals batches, hands them to a transport
(``flowtunnel.agent.transport``: POST, WebSocket or GET-only pieces, chosen by the ladder), trims on ack. The
delivery protocol's rules (resync, backoff, body limit, oversize) are the pure
``transport.delivery.Delivery``; this module does the I/O around it (spool, sealing, budgets, the race of
rungs on a new network).

One request is in flight at a time, so batches arrive in order and an ack covers everything before it. Batch
size adapts: when the spool holds more than one batch (a backlog after an outage) full batches go back to
back; when caught up, what is there goes at most every ``latency`` seconds. Every failure leads to a backoff
(exponential with full jitter, or the gateway's ``Retry-After``) and a resynchronisation with the gateway's
high-water mark before the next batch, so restarts and lost responses on either side never duplicate or lose
data. The pure rules live in ``flowtunnel.agent.policy``.

The gateway's answers are trusted only once their ``tag`` verifies (``flowtunnel.wire.verify_ack``, bound to
this agent's key and to the nonce of the batch answered): a forged ``acked`` on the path would otherwise trim
the backlog. Every batch tells the gateway the last seq this agent saw acknowledged (``acked`` in the sealed
agent info): a gateway that lost acknowledged datagrams answers 409 and the agent resynchronises at once,
counting what it can no longer re-send as ``gateway_lost``.

Codec choice (bytes against CPU, ``policy.choose_codec``): bytes-lean by default, whatever link was measured
(any link may be metered). The batch goes the way with the smallest body whose sealing CPU, at the rate of raw
data arriving (``policy.ArrivalRate``, doubled for a backlog so it drains at least as fast), stays within
``policy.CPU_SHARE`` (25 %) of a core. Three ways, measured on softflowd v9 (CPU per raw MB / body per raw
byte): ``SMALL`` codec 5, columnar + field deltas + LZMA2 preset 6 with the field plans reused
(``wire.PlanCache``; ~125-190 ms / 0.14; codec 4's 0.16 before), only for throughput-bound batches (a backlog:
more spooled behind it, or above ``BIG_BATCH_BYTES`` of payload); ``DEFAULT`` codec 3, codec 2 or the
compression context at level 6 (~35 ms / 0.21), whichever won the last trial (``agent.sealing.SealWays``: a
trial seals every way every 32 batches or 2 minutes, or when the winner's ratio slips); ``FAST`` codec 2 at
zstd level 3 (~10 ms / 0.36); and at a quiet site, while it costs at most ``policy.TIGHT_SHARE`` (1.5 %) of a
core, ``TIGHT``: ``DEFAULT`` at level 15 with the context tried too, and from ``TIGHT_DELTAS_FROM`` (4)
datagrams codec 5 (field deltas + LZMA2) beside level 6 instead (~1,000 ms per raw MB; 5-20 % smaller bodies
of a few datagrams, 15 % on Cisco IPFIX); above a quiet site's rate, while it costs at most
``policy.LEAN_SHARE`` (5 %) of a core (up to ~830 KB/s arriving), ``LEAN``: codec 5 at LZMA2 preset 1 with the
field plans reused from earlier batches (``wire.PlanCache``), ~60 ms / 0.17 (softflowd v9 at 500 datagrams/s:
0.170 of raw against 0.221 with ``DEFAULT``). Only when no way keeps within the share does the link decide:
the least sealing CPU plus upload time per raw byte, since with one request in flight a busy agent moves one
batch per (seal + upload); upload time comes from the uploads themselves (``policy.LinkEstimate``) or from the
``bandwidth`` cap, whichever is slower. A daily byte budget means bytes always count (``SMALL`` for big
batches, ``LEAN`` for the others). Before this rule (issue 14) a measured fast link picked ``FAST`` for every
batch with anything spooled behind it: at 500 datagrams/s on a fast link that cost 0.34 of raw UDP instead of
~0.2. A ``SMALL`` batch up to ``BIG_BATCH_BYTES`` is also sealed with ``DEFAULT`` and the smaller kept: below
~100 KB LZMA2 (no dictionary) loses to zstd with the bundled dictionaries on some exports (Cisco IPFIX: up to
1.9x).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import re
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from flowtunnel.agent.config import MIN_BODY, AgentConfig, mask_url, parse_host_port
from flowtunnel.agent.policy import (
    DEFAULT,
    FAST,
    LEAN,
    SMALL,
    TIGHT,
    ArrivalRate,
    BatchSizer,
    CodecChoice,
    DailyBudget,
    LinkEstimate,
    TokenBucket,
    budget_latency,
    choose_codec,
)
from flowtunnel.agent.sealing import SealWays, Way
from flowtunnel.agent.transport import (
    Acked,
    Answer,
    Commit,
    Delivery,
    Hints,
    Note,
    Sent,
    Transport,
    plan_resync,
)
from flowtunnel.agent.transport.answers import GATEWAY, Rejected
from flowtunnel.agent.transport.delivery import Wait
from flowtunnel.agent.transport.dns import DnsTransport
from flowtunnel.agent.transport.failover import Failover, Move
from flowtunnel.agent.transport.get import GetTransport
from flowtunnel.agent.transport.http11 import Routes
from flowtunnel.agent.transport.ladder import Ladder, Switch
from flowtunnel.agent.transport.network import RungMemory, local_fingerprint
from flowtunnel.agent.transport.post import PostTransport, find_route, make_client
from flowtunnel.agent.transport.ws import WsTransport
from flowtunnel.datagram import Datagram
from flowtunnel.errors import ConfigError
from flowtunnel.log import AppendResult, DurableLog, Entry, LogError
from flowtunnel.runtime import OnceLogger, trim_malloc
from flowtunnel.wire import (
    CODEC_OFFSET,
    FLAG_CONTEXT,
    FLAG_STREAM,
    FLAG_STREAM_START,
    FLAGS_OFFSET,
    NONCE_BYTES,
    NONCE_OFFSET,
    AuthenticationFailed,
    Codec,
    PlanCache,
    SealStream,
    TemplateLengths,
    lzstream,
    seal_batch,
    seal_batch_and_context,
    seal_stream_batch,
    verify_ack,
)
from flowtunnel.wire.codec import release_compressors

__all__ = ["CURSOR", "Uploader", "UploaderStats"]

logger = logging.getLogger(__name__)

CURSOR = "gateway"  # spool cursor: the gateway's acknowledged seq, as last learned
_INFO_KEY = re.compile(r"[a-z0-9][a-z0-9_.:-]{0,31}")  # what seal_batch accepts as an agent info key
MAX_SOURCES = 1000  # distinct (exporter, port, local port) per batch, below the gateway's default 1024
# Spool state keys of the daily budget: "budget:<UTC day number>" = bytes spent that day. (Before, one pair
# "budget:day" / "budget:used" held the current day only; still read.)
_BUDGET_PREFIX, _BUDGET_DAY, _BUDGET_USED = "budget:", "budget:day", "budget:used"
# The body limit learned from a proxy (413 or cuts mid-body), and the configured limit it was learned under.
_LIMIT, _LIMIT_OF = "body:limit", "body:configured"
RUNG_MEMORY = "rungs.json"  # in the spool directory: per network, the rung (and POST label) that worked
RACE_STAGGER = 1.0  # seconds between the starts of racing rungs, best first
_NONCE = slice(NONCE_OFFSET, NONCE_OFFSET + NONCE_BYTES)  # the nonce in a sealed batch's header
# codecs whose record block is columnar (codec 5's too, with some fields as differences)
_COLUMNAR = (int(Codec.COLUMNAR), int(Codec.COLUMNAR_LZMA), int(Codec.DELTA_LZMA))
#: a quiet site (``policy.TIGHT``) tries codec 5 beside zstd on batches of this many datagrams or more
TIGHT_DELTAS_FROM = 4
#: failures answered "again at once" (unknown-context, a lower body limit) a shutdown's drain retries in a row
DRAIN_AT_ONCE = 3
#: continuation frames refused in a row (``unknown-context``) after which the agent sends start frames only
#: for STREAM_PAUSE seconds: each batch then compresses on its own, but is not sent twice
STREAM_MISSES, STREAM_PAUSE = 3, 600.0
# Backlog batches and batches above BIG_BATCH_BYTES of payload may go as codec 5 when bytes cost more than
# CPU: see the module docstring.
BIG_BATCH_BYTES = 1 << 20
# The newest committed datagrams kept in memory (payload bytes), so a caught-up uploader batches them without
# reading them back from the spool: ~3 s at 100k flows/s. Nothing is kept while uploads fail (an outage would
# otherwise pin this much memory for nothing: the backlog is read from the spool anyway).
TAIL_BYTES = 16 << 20


@dataclass(slots=True)
class UploaderStats:
    """Counters of the uploader (cumulative since start unless named otherwise)."""

    batches: int = 0
    datagrams: int = 0
    raw_bytes: int = 0  # datagram payload bytes acknowledged by the gateway
    body_bytes: int = 0  # request body bytes acknowledged (the compressed, sealed form)
    sent_bytes: int = 0  # request body bytes put on the wire, failed attempts included
    failures: Counter[str] = field(default_factory=Counter)
    consecutive_failures: int = 0  # failed attempts since data was last acknowledged (or nothing was left)
    last_attempt: float | None = None
    last_success: float | None = None  # the gateway last answered 200 (a resync or a batch)
    last_ack: float | None = None  # the gateway last acknowledged datagrams (a batch, not a resync)
    unacked_since: float | None = None  # the first failure since data was last acknowledged; None: no episode
    last_result: str = "none"
    gateway_acked: int | None = None
    gateway_lost: int = 0  # acknowledged earlier, then lost by the gateway, and no longer in the spool
    resyncs: int = 0
    next_attempt: float | None = None
    codecs: Counter[int] = field(default_factory=Counter)  # acknowledged batches by codec
    context_batches: int = 0  # acknowledged batches sealed against a compression context
    stream_batches: int = 0  # acknowledged batches sealed as frames of a compression stream
    streams: int = 0  # compression streams started (each with a start frame)
    oversize: int = 0  # single datagrams too large for the path's body limit even alone (kept in the spool)


class _Failed(Exception):
    """An attempt failed; ``delay`` is how long to wait before the next."""

    def __init__(self, cause: str, delay: float) -> None:
        super().__init__(cause)
        self.cause = cause
        self.delay = delay


class Uploader:
    """Moves the spool to the gateway; see the module docstring.

    ``dropped`` returns the agent's drop counters by cause, reported to the gateway in a header.
    ``clock`` (unix seconds) and ``draw`` (uniform in [0, 1)) are injectable for tests.

    Error handling: the transport (``transport``; by default POST over the agent's HTTP/1.1 client) turns
    every outcome into an answer, and the delivery protocol (``flowtunnel.agent.transport.delivery``)
    decides: connection errors, timeouts, 5xx, 407, 408, 429 back off exponentially (or per
    ``Retry-After``); a 200 whose tag does not verify (``bad-ack``) too; 409 ``resync`` resynchronises at
    once; 413 (or a body cut twice) lowers the body limit and retries; 400/401/403 and other 4xx are logged
    as errors and retried after ``reject_backoff``, the data staying in the spool. Each transient cause is
    logged once, then counted. Nothing is ever dropped by the uploader.

    Resource handling: ``open`` creates the transport (one kept-alive connection); ``close`` closes it.
    """

    def __init__(
        self,
        config: AgentConfig,
        key: bytes,
        spool: DurableLog,
        *,
        dropped: Callable[[], Mapping[str, int]] = dict,
        clock: Callable[[], float] = time.time,
        draw: Callable[[], float] = random.random,
        transport: Transport | None = None,
    ) -> None:
        self._config = config
        self._key = key
        self._spool = spool
        self._dropped = dropped
        self._clock = clock
        self._draw = draw
        self._wake = asyncio.Event()
        #: awaited before a caught-up batch is read, once its latency wait is over: the agent commits what
        #: its receiver still buffers (commits wait for ``commit_bytes``), so that goes in this batch
        self.before_batch: Callable[[], Awaitable[None]] | None = None
        self._once = OnceLogger(logger)
        # The gateways (``--gateway``, several of one cluster) and which one is in use; for each gateway used
        # so far its rungs by name, best first (``--rungs``), each with its own connections, probe and pin
        # state; the ladder choosing among the rungs (the path's property, shared by the gateways). A
        # transport given by the caller is the only rung of the only gateway.
        gateways = config.gateways if transport is None else config.gateways[:1]
        self._failover = Failover(gateways=gateways)
        self._stacks: dict[str, dict[str, Transport]] = (
            {} if transport is None else {gateways[0]: {transport.name: transport}})
        self._dns: DnsTransport | None = None  # the dns rung, one for every gateway (it goes by the zone)
        self._ladder = Ladder(rungs=tuple(config.rungs) if transport is None else (transport.name,))
        self._delivery = Delivery(
            agent_id=config.agent_id, key=key, max_body=config.max_body,
            min_body=min(MIN_BODY, config.max_body), backoff_base=config.backoff_base,
            backoff_cap=config.backoff_cap, reject_backoff=config.reject_backoff,
        )
        self._saved_limit = config.max_body
        self._memory: RungMemory | None = None  # the rung that worked per network (own transports only)
        self._network: str | None = None
        self._race = False  # race the rungs at the next resync (a network without a remembered rung)
        self._sizer = BatchSizer(max_body=config.max_body)
        # One second of bandwidth may be saved up; a larger request goes when the bucket is full, into debt.
        self._bucket = TokenBucket(rate=float(config.bandwidth), burst=float(config.bandwidth))
        self._budget = DailyBudget(limit=config.daily_bytes)
        self._position = 0  # every seq <= position is at the gateway (as far as we know)
        self._last_seq = 0  # the spool's last seq when last looked at
        self._last_send = float("-inf")
        # Record lengths of the templates seen in the spool, so codec 3 can cut data sets into columns even
        # when the template went in an earlier batch. Empty after a restart: unknown sets travel verbatim.
        self._templates = TemplateLengths()
        self._learned = 0  # seqs up to this one went through the template cache
        # Codec 5's field plans, chosen once per template layout and reused (most of codec 5's CPU otherwise).
        self._plans = PlanCache()
        self._seeded = False  # whether a sealed batch has seeded the sizer's ratio yet
        self.link = LinkEstimate()  # the upload's achieved throughput, for the codec rule
        self._choice: CodecChoice = DEFAULT  # how the last batch was sealed
        self._ways = SealWays()  # at default settings, which way(s) the next batch is sealed (seal once)
        self.arrival = ArrivalRate()  # raw bytes/s arriving, for the codec rule's CPU share
        # The compression context the gateway holds from this agent: the last acknowledged batch's payloads
        # (docs/protocol.md section 3.3); None after a start or an ``unknown-context`` answer.
        self._context: bytes | None = None
        self._leaves = b""  # the context the last sealed batch leaves once acknowledged
        # The codec whose record block layout the context has (verbatim payloads: codec 1; columnar: 3;
        # columnar with field differences: 5, tried as 3 but not beside LEAN).
        self._context_codec = self._leaves_codec = Codec.COLUMNAR
        # The compression stream (docs/protocol.md section 3.4): continued only while every frame sealed in
        # it was acknowledged (``_stream_clean``); anything else starts a new one. Gateways that refused
        # stream frames (older than the stream flags) get none, until this process restarts.
        self._stream: SealStream | None = None
        self._stream_clean = False
        # Set by a move to another rung for bytes (nothing failed): the resync on the new rung keeps the
        # stream when it finds the gateway's mark where the agent left it (the gateway still holds the stream
        # up to the last acknowledged frame; if not, the next frame is refused ``unknown-context`` and goes
        # again in a new stream at once).
        self._keep_stream = False
        self._no_streams: set[str] = set()
        # Continuations refused in a row (``unknown-context``: the gateway lost or never had the stream, e.g.
        # per-request round robin over gateways): after STREAM_MISSES, start frames only for STREAM_PAUSE s.
        self._stream_misses = 0
        self._stream_pause_until = float("-inf")
        # The newest datagrams the receiver committed, as entries with contiguous seqs, exactly as the spool
        # holds them (see ``spooled``).
        self._tail: deque[Entry] = deque()
        self._tail_bytes = 0
        self.stats = UploaderStats()

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def _build(self, url: str) -> str:
        """The rungs for gateway ``url``, with their own connections; says which route they take."""
        cfg = self._config.for_gateway(url)
        kinds = {"post": PostTransport, "get": GetTransport, "ws": WsTransport}
        routes = await find_route(cfg)  # per gateway: a PAC file may name another proxy for another host
        # One choice of route for every rung: a proxy one finds dead, the others skip.
        shared = Routes(items=tuple((r.proxy, r.credentials, r.source) for r in routes))
        client = None
        rungs: dict[str, Transport] = {}
        for name in cfg.rungs:
            if name == "dns":
                # The last rung: query names through the resolver, no HTTP client (docs/protocol.md 9).
                if self._dns is None:
                    assert cfg.dns_zone is not None  # AgentConfig refuses the dns rung without a zone
                    resolver = (parse_host_port(cfg.dns_resolver, what="dns-resolver")
                                if cfg.dns_resolver else None)
                    self._dns = DnsTransport(zone=cfg.dns_zone, resolver=resolver, qps=cfg.dns_qps)
                rungs[name] = self._dns
                continue
            # Each rung its own connection: rungs race when the network is new, and a WebSocket holds its
            # connection for itself.
            client = make_client(cfg, shared)
            rungs[name] = kinds[name](client, cfg.gateway, agent_id=cfg.agent_id, key=self._key,
                                      clock=self._clock)
        self._stacks[url] = rungs
        self._recall_label([rungs])
        shown = client.route if client is not None else "dns only"
        then = "".join(f", then {r}" for r in routes[1:])  # tried when the first cannot be connected to
        return f"{shown}, from {routes[0].source}{then}; rungs {', '.join(cfg.rungs)}"

    async def open(self) -> None:
        cfg = self._config
        via = ""
        if not self._stacks:
            via = f" ({await self._build(self._failover.current)})"
            self._memory = RungMemory(self._spool.path.parent / RUNG_MEMORY)
        await self._recall_network()
        limit, limit_of = await asyncio.to_thread(
            lambda: (self._spool.get_state(_LIMIT), self._spool.get_state(_LIMIT_OF)))
        if limit is not None and limit_of == cfg.max_body and self._delivery.min_body <= limit < cfg.max_body:
            # A proxy's body limit learned before a restart: start below it rather than learn it again.
            self._delivery.max_body = self._sizer.max_body = self._saved_limit = limit
            logger.info("using the body limit of %d bytes learned earlier on this path (max-body %d)",
                        limit, cfg.max_body)
        self._position = await asyncio.to_thread(self._spool.cursor, CURSOR)
        self._last_seq = await asyncio.to_thread(self._spool.last_seq)
        saved = await asyncio.to_thread(self._spool.states, _BUDGET_PREFIX)
        self._budget.spent.update(_budget_days(saved))
        others = self._failover.gateways[1:]
        logger.info("uploading to %s as agent %s: batches by %s%s%s", self._failover.current.rstrip("/"),
                    cfg.agent_id, self._batch_route(), via,
                    f"; on failure to {', '.join(others)}" if others else "")

    def _batch_route(self) -> str:
        """How batches go, for the start-up line: the rung in use and its route ("POST /v1/b", or
        "/v1/batches" where that was refused on this network before), or, on a network not seen before, the
        race of the rungs and each one's route."""
        def route(transport: Transport) -> str:
            if isinstance(transport, PostTransport):
                return transport.batch_route
            if isinstance(transport, DnsTransport):
                return "DNS queries under the gateway's zone"
            return transport.name

        if self._race:
            each = ", ".join(f"{name}: {route(t)}" for name, t in self._rungs.items())
            return f"the first rung to answer on this new network ({each})"
        transport = self._transport
        return "?" if transport is None else route(transport)

    @property
    def _rungs(self) -> dict[str, Transport]:
        """The rungs of the gateway in use."""
        return self._stacks.get(self._failover.current, {})

    @property
    def _transport(self) -> Transport | None:
        return self._rungs.get(self._ladder.current)

    async def close(self) -> None:
        closed: set[int] = set()
        for rungs in self._stacks.values():
            for transport in rungs.values():
                if id(transport) not in closed:  # the dns rung is shared
                    closed.add(id(transport))
                    await transport.close()

    def notify(self) -> None:
        """New datagrams are in the spool."""
        self._wake.set()

    def spooled(self, result: AppendResult, datagrams: Sequence[Datagram]) -> None:
        """The receiver committed ``datagrams`` to the spool as ``result`` (called in the loop).

        They are kept in memory (the newest ``TAIL_BYTES``; none while uploads fail or before the first
        resynchronisation: on a new network the rungs race for seconds, while the quota may drop) so the next
        batch need not read them back. The kept entries stay one run of consecutive seqs, as the spool holds
        them: a commit that did not store all its datagrams under consecutive seqs, or whose quota policy
        dropped older entries, starts the run afresh (and batches come from the spool until they reach it).
        Entries at or below the gateway's mark are discarded as batches are read. That covers
        resynchronisation too: the spool renumbers or advances its seqs only when the gateway's mark is beyond
        its last seq, so every kept entry is then at or below the new mark, and later commits start a new run
        above it.
        """
        tail = self._tail
        n = len(datagrams)
        whole = (n > 0 and result.appended == n and result.last_seq - result.first_seq + 1 == n
                 and not self.stats.consecutive_failures and not self._delivery.wants_resync)
        if not whole or result.dropped or result.refused or (tail and tail[-1].seq + 1 != result.first_seq):
            tail.clear()
            self._tail_bytes = 0
        if not whole:
            return
        seq = result.first_seq
        for d in datagrams:
            tail.append(Entry(seq, "", None, d))
            seq += 1
        self._tail_bytes += sum(len(d.payload) for d in datagrams)
        while self._tail_bytes > TAIL_BYTES and tail:
            self._tail_bytes -= len(tail.popleft().datagram.payload)

    # -- main loops ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Upload until cancelled."""
        while True:
            try:
                if self._delivery.wants_resync:
                    await self._resync()
                if not await self._send_next(draining=False):
                    await self._wake.wait()
            except _Failed as failed:
                self.stats.next_attempt = self._clock() + failed.delay
                await asyncio.sleep(failed.delay)
                self.stats.next_attempt = None
            except (LogError, ValueError) as exc:
                # The spool cannot be read or a datagram cannot be sealed: nothing the gateway can fix.
                # Keep everything, say so once, and try again later rather than lose the upload task.
                self._delivery.local_failure(f"local:{type(exc).__name__}")
                self._sync_stats()
                self._once.warning(f"local-{type(exc).__name__}", "upload stalled: %s", exc)
                await asyncio.sleep(self._config.backoff_cap)

    async def drain(self) -> bool:
        """Send batches back to back until the spool is empty; stop at the first failure.

        Returns True when the gateway acknowledged everything spooled. Used at shutdown, under a timeout. A
        failure the delivery protocol answers by sending again at once (the gateway lacks the compression
        context or stream the batch was sealed against: it restarted; a lower body limit) is not the end:
        the batch goes again at once, up to ``DRAIN_AT_ONCE`` times in a row.
        """
        at_once = 0
        while True:
            try:
                if self._delivery.wants_resync:
                    await self._resync()
                while await self._send_next(draining=True):
                    at_once = 0
                return True
            except _Failed as exc:
                if exc.delay > 0 or at_once >= DRAIN_AT_ONCE:
                    return False
                at_once += 1
            except (LogError, ValueError):
                return False

    # -- one batch -------------------------------------------------------------------------------------------

    async def _send_next(self, *, draining: bool) -> bool:
        """Send one batch if the spool holds any; False when there was nothing to send."""
        self._wake.clear()
        entries = await self._read()
        if not entries:
            self._caught_up()
            return False
        if not draining and entries[-1].seq >= self._last_seq:
            # Caught up: let more datagrams gather, up to the latency target since the last send (a rung may
            # ask for more: on DNS every query costs ~300 bytes both ways and larger batches compress better).
            latency = max(self.latency_target(), getattr(self._transport, "min_latency", 0.0))
            wait = self._last_send + latency - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                if self.before_batch is not None:
                    await self.before_batch()
                entries = await self._read()
                if not entries:  # the quota policy dropped them meanwhile
                    return False
        self._climb()
        body, batch = await asyncio.to_thread(self._seal, entries)
        self._seed_ratio(batch, len(body))
        await self._throttle(len(body))
        self._last_send = time.monotonic()
        acked = await self._exchange(body, batch)
        if body[FLAGS_OFFSET] & FLAG_STREAM:
            self._stream_clean = True  # the gateway holds the stream up to this frame: it may go on
            if not body[FLAGS_OFFSET] & FLAG_STREAM_START:
                self._stream_misses = 0
            self.stats.stream_batches += 1
        self._context = self._leaves or None  # what the gateway now holds
        self._context_codec = self._leaves_codec
        raw = sum(len(e.datagram.payload) for e in batch)
        self._sizer.observe(raw, len(body))
        st = self.stats
        st.batches += 1
        st.datagrams += len(batch)
        st.raw_bytes += raw
        st.body_bytes += len(body)
        st.codecs[body[CODEC_OFFSET]] += 1
        st.context_batches += bool(body[FLAGS_OFFSET] & FLAG_CONTEXT)
        await asyncio.to_thread(self._commit, acked)
        return True

    async def _read(self) -> list[Entry]:
        cached = self._read_tail(self._position, self._config.max_batch_datagrams, self._sizer.raw_target())
        if cached is not None:
            return cached
        # Every spool call runs in a worker thread: the spool's lock may be held through an fsync by the
        # receiver's group commit, and the event loop must keep draining the UDP sockets meanwhile.
        entries, self._last_seq = await asyncio.to_thread(
            self._read_sync, self._position, self._config.max_batch_datagrams, self._sizer.raw_target(),
        )
        return entries

    def _seed_ratio(self, batch: Sequence[Entry], body: int) -> None:
        """Let the batch sizer use the ratio this batch was just sealed at, before it is acknowledged.

        The sizer starts at ratio 1 and learns rises slowly from acknowledged batches, so a backlog drain
        (after a restart, or an outage during which every attempt failed) would go in batches of a fraction
        of the body limit. The first batch sealed, and every backlog batch (whose size the sizer's read
        target decides), is a measurement of this data with this codec: a higher ratio is taken at once.
        Drops still come through ``observe`` at once; an overshoot costs a re-seal at half size (``_seal``).
        """
        if not batch or body <= 0:
            return
        sizer = self._sizer
        sample = min(sizer.max_ratio, sum(len(e.datagram.payload) for e in batch) / body)
        first = not self._seeded
        self._seeded = True
        if (first or batch[-1].seq < self._last_seq) and sample > sizer.ratio:
            sizer.ratio = sample

    def _read_tail(self, after: int, limit: int, max_bytes: int) -> list[Entry] | None:
        """What ``DurableLog.read`` would return, from the in-memory tail; ``None`` if it starts elsewhere.

        The tail ends at the spool's last seq (every commit since it began is in it), so that is also the
        spool's ``last_seq``."""
        tail = self._tail
        while tail and tail[0].seq <= after:
            self._tail_bytes -= len(tail.popleft().datagram.payload)
        if not tail or tail[0].seq != after + 1:
            return None
        out: list[Entry] = []
        total = 0
        for e in tail:
            total += len(e.datagram.payload)
            if len(out) >= limit or (out and total > max_bytes):
                break
            out.append(e)
        self._last_seq = max(self._last_seq, tail[-1].seq)
        return out

    def _read_sync(self, after: int, limit: int, max_bytes: int) -> tuple[list[Entry], int]:
        return self._spool.read(after=after, limit=limit, max_bytes=max_bytes), self._spool.last_seq()

    def _seal(self, entries: Sequence[Entry]) -> tuple[bytes, Sequence[Entry]]:
        """Seal the longest contiguous prefix of ``entries`` that fits the body limit (halving as needed)."""
        # A batch's source table is bounded at the gateway (WireLimits.max_exporters): stop before it fills.
        sources = {_source(entries[0])}
        n = 1
        while n < len(entries) and entries[n].seq == entries[0].seq + n:
            sources.add(_source(entries[n]))
            if len(sources) > MAX_SOURCES:
                break
            n += 1
        if self._delivery.fresh_context:  # the gateway lacks our context: seal without until the next ack
            self._context = None
            self._delivery.fresh_context = False
        templates = self._templates
        for e in entries[:n]:
            if e.seq > self._learned:  # a batch re-read after a failure was learned already
                templates.learn(e.datagram.payload)
                self._learned = e.seq
        # The drops also travel sealed (authenticated), as "dropped:<cause>"; the header copy is for proxies.
        # spool_first: the lowest seq this agent still holds, so a gap below it (its own drops) is declared,
        # and a batch that overtook an earlier one on another rung is told apart (409 out-of-order).
        # "clock_ms": this agent's clock; the gateway reports how far off it is (and acts on its own).
        info = {"acked": self._position, "spool_first": entries[0].seq,
                "clock_ms": max(0, int(self._clock() * 1000))}
        info.update((f"dropped:{k}", v) for k, v in sorted(self._dropped().items())
                    if v and _INFO_KEY.fullmatch(f"dropped:{k}"))
        while True:
            batch = entries[:n]
            info["backlog"] = max(0, self._last_seq - batch[-1].seq)  # sealed: the gateway prefers it
            # How long the oldest datagram not yet acknowledged (this batch's first) has waited, in whole
            # seconds of this box's clock: the gateway's console shows how far behind the box is.
            info["backlog_age"] = max(0, int(self._clock() - batch[0].datagram.received_ns / 1e9))
            datagrams = [e.datagram for e in batch]
            raw = sum(len(d.payload) for d in datagrams)
            seal = functools.partial(
                seal_batch_and_context, agent_id=self._config.agent_id, key=self._key, first_seq=batch[0].seq,
                datagrams=datagrams, agent_info=info, record_length=templates.record_length,
                field_widths=templates.field_widths, plans=self._plans,
            )
            if self.arrival.stamp is None and batch[-1].seq >= self._last_seq:
                self._first_arrival(batch)
            choice = self.codec_choice(big=raw > BIG_BATCH_BYTES or batch[-1].seq < self._last_seq)
            if choice is TIGHT and self._streams_here():
                body = self._seal_frame(batch[0].seq, datagrams, info)
                if len(body) <= self._sizer.max_body or n == 1:
                    self._choice, self._leaves = TIGHT, b""
                    self.arrival.observe(last_seq=self._last_seq, raw_bytes=raw, count=len(batch),
                                         now=self._clock())
                    return body, batch
                self._stream = None  # that frame will not be sent: the stream cannot go on without it
                n = max(1, n // 2)
                continue
            # Not a quiet batch: the stream's encoder (~2 MB once warm) is not kept for when the site is quiet
            # again (that costs one start frame then).
            self._stream = None
            codec = None if choice.codec is None else Codec(choice.codec)
            # A rung short of bytes (DNS: every byte is a share of a query) asks for its own lean codec (5).
            lean = getattr(self._transport, "small_codec", None)
            lean_codec = Codec(lean) if isinstance(lean, int) else None
            # A quiet site (TIGHT) tries codec 5 too on batches of TIGHT_DELTAS_FROM datagrams or more (its
            # field deltas pay from a few datagrams on: softflowd v9 at 10/s 0.22 of raw against 0.27), and
            # then seals with zstd at level 6, not 15: ~1 ms a datagram in all.
            deltas = choice is TIGHT and len(batch) >= TIGHT_DELTAS_FROM
            if deltas and lean_codec is None:
                lean_codec = Codec.DELTA_LZMA
            level = DEFAULT.level if deltas else choice.level
            if choice is SMALL and lean_codec is not None:
                codec = lean_codec
            ways: tuple[Way, ...] = ()
            if choice in (DEFAULT, LEAN) and lean_codec is None:
                # The common case: sealed the way that won the last trial, or every way on a trial (SealWays);
                # LEAN (codec 5) is one of the ways where the codec rule allows it.
                context = self._context if raw <= BIG_BATCH_BYTES else None
                ways = self._ways.plan(now=self._clock(), context=context is not None, lean=choice is LEAN)
                body, leaves = self._seal_ways(seal, ways, context)
                # the way that won is what the link estimate and the sizer learn from
                choice = LEAN if body[CODEC_OFFSET] == Codec.DELTA_LZMA else DEFAULT
            else:
                body, leaves, choice = self._seal_tries(seal, choice, codec=codec, level=level,
                                                        lean_codec=lean_codec, raw=raw, deltas=deltas)
            if len(body) <= self._sizer.max_body or n == 1:
                if ways:
                    self._ways.observe(tried=ways, won=_way_of(body), body=len(body), raw=raw,
                                       now=self._clock())
                self._choice, self._leaves = choice, leaves
                self._leaves_codec = (Codec.DELTA_LZMA if body[CODEC_OFFSET] == Codec.DELTA_LZMA
                                      else Codec.COLUMNAR if body[CODEC_OFFSET] in _COLUMNAR else Codec.ZSTD)
                self.arrival.observe(last_seq=self._last_seq, raw_bytes=raw, count=len(batch),
                                     now=self._clock())
                return body, batch
            n = max(1, n // 2)

    def _seal_tries(
        self, seal: Callable[..., tuple[bytes, bytes]], choice: CodecChoice, *, codec: Codec | None,
        level: int, lean_codec: Codec | None, raw: int, deltas: bool,
    ) -> tuple[bytes, bytes, CodecChoice]:
        """A batch sealed as ``choice`` says when seal-once does not apply (``SMALL``, ``TIGHT``, ``FAST``, a
        rung with its own lean codec), with the other ways that may pay for it tried beside, the smallest
        kept: the body, the context it leaves and the choice it went."""
        body, leaves = seal(nonce=os.urandom(12), codec=codec, level=level)
        if choice is SMALL and raw <= BIG_BATCH_BYTES:
            # Below ~100 KB, LZMA2 (no dictionary) may lose to zstd with the bundled dictionaries on some
            # exports (Cisco IPFIX: up to 1.9x larger); zstd costs a fraction of LZMA's CPU.
            other, left = seal(nonce=os.urandom(12), codec=None, level=DEFAULT.level)
            if len(other) < len(body):
                body, leaves, choice = other, left, DEFAULT
        elif choice in (DEFAULT, TIGHT, LEAN) and lean_codec is not None and raw <= BIG_BATCH_BYTES:
            # Caught up on such a rung, the lean codec is tried too: on DNS, ~10 ms of sealing per batch
            # of 50 softflowd datagrams buys ~12 % fewer queries (bench/dns.py, 10/s).
            other, left = seal(nonce=os.urandom(12), codec=lean_codec, level=SMALL.level)
            if len(other) < len(body):
                body, leaves, choice = other, left, SMALL
        # Not beside LEAN when the context came from a codec 5 batch (LEAN's own, once it runs): that
        # context is in codec 5's layout of field differences, which a zstd frame of a columnar block gets
        # nothing from (softflowd v9 and Cisco IPFIX: never smaller), for ~40 % more sealing CPU (issue
        # 14's footprint at 10,000 flows/s). A context left by a zstd batch is still tried.
        deltas_context = self._context_codec is Codec.DELTA_LZMA
        if (self._context is not None and choice is not FAST
                and not (choice is LEAN and deltas_context) and raw <= BIG_BATCH_BYTES):
            # Against what the gateway already holds from this agent: a quiet site's batch of a few
            # datagrams repeats much of the previous one (headers, templates, addresses, ports). In the
            # layout of that context (a record block with verbatim payloads matches codec 1 best, a
            # columnar one codec 3), at the level chosen (TIGHT's 15 at a quiet site).
            level = TIGHT.level if choice is TIGHT and not deltas else DEFAULT.level
            other, left = seal(nonce=os.urandom(12), context=self._context, level=level,
                               codec=self._context_layout)
            if len(other) < len(body):
                body, leaves, choice = other, left, (TIGHT if choice is TIGHT else DEFAULT)
        return body, leaves, choice

    def _seal_ways(
        self, seal: Callable[..., tuple[bytes, bytes]], ways: tuple[Way, ...], context: bytes | None,
    ) -> tuple[bytes, bytes]:
        """A batch at default settings sealed the ``ways`` planned (``SealWays.plan``), the smallest kept:
        the body and the context it leaves. ``Way.LEAN`` (where the codec rule allows it) is codec 5 at
        ``LEAN``'s preset, kept on a tie with zstd."""
        level = DEFAULT.level
        if len(ways) == 1:
            way = ways[0]
            if way is Way.CONTEXT:
                assert context is not None  # planned only with a context
                return seal(nonce=os.urandom(12), context=context, level=level, codec=self._context_layout)
            if way is Way.LEAN:
                return seal(nonce=os.urandom(12), codec=Codec.DELTA_LZMA, level=LEAN.level)
            return seal(nonce=os.urandom(12), codec=_WAY_CODECS[way], level=level)
        # A trial: each way's compressor (~1.4 MB with its dictionary tables at level 6, LZMA2's ~1.3 MB) is
        # let go before the next way's is made, so the peak RSS holds one of them, not all (issue 14); the
        # winner's is made again by the next batch. LEAN goes first, with the LZMA2 encoder kept from the
        # batches before (codec.compress), which is let go then too: the zstd ways reuse its freed memory.
        # The smallest body is kept, LEAN on a tie with zstd, codec 3 on a tie with codec 2.
        lean: tuple[bytes, bytes] | None = None
        if Way.LEAN in ways:
            lean = seal(nonce=os.urandom(12), codec=Codec.DELTA_LZMA, level=LEAN.level)
        release_compressors()
        body, leaves = seal(nonce=os.urandom(12), codec=Codec.COLUMNAR, level=level)
        release_compressors()
        other, left = seal(nonce=os.urandom(12), codec=Codec.ZSTD_DICT, level=level)
        release_compressors()
        if len(other) < len(body):
            body, leaves = other, left
        if lean is not None and len(lean[0]) <= len(body):
            body, leaves = lean
        if context is not None and Way.CONTEXT in ways:
            # Against what the gateway already holds from this agent: a batch of a few datagrams repeats much
            # of the previous one (headers, templates, addresses, ports). In the layout of that context (a
            # record block with verbatim payloads matches codec 1 best, a columnar one codec 3).
            other, left = seal(nonce=os.urandom(12), context=context, level=level, codec=self._context_layout)
            if len(other) < len(body):
                body, leaves = other, left
        return body, leaves

    @property
    def _context_layout(self) -> Codec:
        """The codec a batch against the context is sealed with: the context's layout (a codec 5 batch's
        context, field differences, goes with codec 3's columnar layout, the nearest)."""
        return Codec.COLUMNAR if self._context_codec is Codec.DELTA_LZMA else self._context_codec

    def _first_arrival(self, batch: Sequence[Entry]) -> None:
        """The arrival rate before the first batch is sealed, from its own datagrams' receive times: with
        no rate yet the codec rule takes the site for a quiet one, so a busy agent's first batch was sealed
        the quiet way (several times the CPU, and a stream compressor of ~2 MB kept for good; issue 14). A
        caught-up batch only: a backlog's first datagram may be hours old."""
        raw = sum(len(e.datagram.payload) for e in batch)
        first = batch[0].datagram.received_ns / 1e9
        self.arrival.observe(last_seq=batch[0].seq - 1, raw_bytes=raw, count=len(batch), now=first)
        self.arrival.observe(last_seq=self._last_seq, raw_bytes=raw, count=len(batch), now=self._clock())

    def _streams_here(self) -> bool:
        """Whether the next batch goes as a stream frame: configured, liblzma found, the gateway takes them,
        and not on the DNS rung (whose lean codec is tried per batch, and whose queries may overtake)."""
        return (self._config.stream_compression and lzstream.SUPPORTED
                and self._failover.current not in self._no_streams and self._ladder.current != "dns")

    def _seal_frame(self, first_seq: int, datagrams: Sequence[Datagram], info: Mapping[str, int]) -> bytes:
        """The next frame of the compression stream, or the start frame of a new one when any frame of the
        current one was not acknowledged (docs/protocol.md section 3.4). A quiet site's few datagrams go
        verbatim (codec 6); from ``TIGHT_DELTAS_FROM`` on, columnar with field deltas (codec 5). One try
        only: a stream cannot be rewound to try another way."""
        stream = self._stream
        paused = time.monotonic() < self._stream_pause_until
        if stream is None or not self._stream_clean or stream.full or paused:
            stream = self._stream = SealStream(random.randrange(1, 0x10000))
            self.stats.streams += 1
        self._stream_clean = False  # until this frame is acknowledged
        codec = Codec.DELTA_LZMA if len(datagrams) >= TIGHT_DELTAS_FROM else Codec.LZMA
        templates = self._templates
        return seal_stream_batch(
            agent_id=self._config.agent_id, key=self._key, first_seq=first_seq, datagrams=datagrams,
            nonce=os.urandom(12), stream=stream, codec=codec, agent_info=info,
            record_length=templates.record_length, field_widths=templates.field_widths, plans=self._plans,
        )

    def latency_target(self) -> float:
        """``--latency``, lengthened when a daily byte budget needs fewer requests (``policy.budget_latency``:
        each request costs ~600 bytes beyond its body)."""
        cfg = self._config
        if cfg.daily_bytes <= 0:
            return cfg.latency
        now = self._clock()
        body_rate = self.arrival.bytes_per_second / max(self._sizer.ratio, 1e-3)
        return budget_latency(daily_bytes=cfg.daily_bytes, used_today=self._budget.used(now), now=now,
                              body_rate=body_rate, configured=cfg.latency)

    def codec_choice(self, *, big: bool) -> CodecChoice:
        """How a batch is sealed now (see the module docstring); ``big``: a backlog or big batch."""
        cfg = self._config
        return choose_codec(self.link, big=big, bandwidth=cfg.bandwidth, daily_bytes=cfg.daily_bytes,
                            arrival=self.arrival.bytes_per_second)

    async def _throttle(self, size: int) -> None:
        """Wait until ``size`` body bytes fit the bandwidth cap and the daily budget, then spend them."""
        first = True
        while True:
            now = self._clock()
            wait = max(self._bucket.delay(size, now), self._budget.delay(size, now))
            if wait <= 0:
                break
            if first and self._budget.delay(size, now) > 0:
                logger.warning(
                    "daily upload budget of %d bytes used up; uploads resume at UTC midnight, in %.0f s "
                    "(datagrams stay spooled)", self._config.daily_bytes, wait,
                )
            first = False
            self.stats.next_attempt = now + wait
            # Sleep in slices: the clock may jump (NTP on a box that booted without one).
            await asyncio.sleep(min(wait, 60.0))
        self.stats.next_attempt = None
        now = self._clock()
        self._bucket.spend(size, now)
        self._budget.spend(size, now)
        if self._config.daily_bytes:
            await asyncio.to_thread(self._save_budget)

    def _save_budget(self) -> None:
        spent = self._budget.spent
        day = next(reversed(spent))  # the day just spent on
        self._spool.set_state(f"{_BUDGET_PREFIX}{day}", spent[day])
        for key in self._spool.states(_BUDGET_PREFIX):
            suffix = key[len(_BUDGET_PREFIX):]
            if not (suffix.isascii() and suffix.isdigit() and int(suffix) in spent):
                self._spool.delete_state(key)  # a day forgotten, or the old single-day keys

    def _commit(self, acked: int) -> None:
        """Record the gateway's mark and trim what it holds (runs in a worker thread)."""
        spool = self._spool
        if acked > spool.last_seq():
            # The gateway knows seqs this spool never handed out: the spool was replaced or restored. Number
            # new datagrams above the mark, or the gateway would discard them as replays.
            logger.warning(
                "gateway acknowledged up to seq %d but this spool only reached %d (spool replaced or "
                "restored?): numbering continues at %d", acked, spool.last_seq(), acked + 1,
            )
            spool.advance_seq(acked + 1)
        spool.trim(acked, cursor=CURSOR)  # the mark and the trim in one transaction: one fsync per batch
        trim_malloc()  # the batch's buffers are freed: their pages go back (peak RSS, issue 14)
        self._position = acked
        self._last_seq = spool.last_seq()
        self.stats.gateway_acked = acked

    # -- resynchronisation -----------------------------------------------------------------------------------

    async def _recall_network(self) -> None:
        """Which network is this? Start on the rung that worked here last, or race them (unknown network)."""
        if self._memory is None:
            return
        network = await asyncio.to_thread(local_fingerprint)
        if network == self._network:
            return
        self._network = network
        known = self._memory.get(network)
        self._recall_label(self._stacks.values())
        if known is not None and known in self._ladder.rungs:
            if self._ladder.current != known:
                logger.info("network %s: using the %s rung that worked here before", network, known)
            self._ladder.use(known, now=self._clock(), why="it worked on this network before")
            self._race = False
        else:
            self._race = len(self._rungs) > 1

    def _recall_label(self, stacks: Iterable[dict[str, Transport]]) -> None:
        """The POST rungs of ``stacks`` start with the content type and batch path that passed on this network
        last, else the first type and ``/v1/b``."""
        if self._memory is None or self._network is None:
            return
        label = self._memory.content_type(self._network)
        path = self._memory.batch_path(self._network)
        since = self._memory.path_since(self._network)
        for rungs in stacks:
            if isinstance(post := rungs.get("post"), PostTransport):
                post.types.use(label)
                post.use_path(path, since=since)

    async def _empty_batch(self) -> bytes:
        """The empty batch of a resynchronisation, uncompressed (codec 0): its record block is a few bytes,
        which zstd would only lengthen, and sealing it with the default codecs made their compressors and
        dictionary tables (~2.3 MB of peak RSS at start-up, issue 14), which an agent sealing with LZMA2
        (LEAN, SMALL, TIGHT's stream) never uses again."""
        return await asyncio.to_thread(
            seal_batch, agent_id=self._config.agent_id, key=self._key, first_seq=self._position + 1,
            datagrams=[], nonce=os.urandom(12), agent_info={"acked": self._position}, codec=Codec.NONE,
        )

    async def _race_resync(self) -> int:
        """On a network without a remembered rung: the resync on every rung, starting ``RACE_STAGGER`` apart,
        best first; the first verified acknowledgement picks the rung, the others are cancelled (their
        connections closed). An empty batch writes nothing, so a race cannot duplicate anything."""
        names = list(self._ladder.rungs)
        hints = Hints(agent_id=self._config.agent_id, backlog=max(0, self._last_seq - self._position),
                      acked=self._position, what="resync")

        async def attempt(i: int, name: str) -> tuple[str, Sent, Answer]:
            await asyncio.sleep(i * RACE_STAGGER)
            body = await self._empty_batch()
            sent = Sent(nonce=body[_NONCE], size=len(body))
            self.stats.sent_bytes += len(body)
            return name, sent, await self._rungs[name].exchange(body, hints)

        self._race = False
        self.stats.last_attempt = self._clock()
        outcomes: dict[str, tuple[Sent, Answer]] = {}
        tasks = [asyncio.ensure_future(attempt(i, name)) for i, name in enumerate(names)]
        try:
            for next_done in asyncio.as_completed(tasks):
                name, sent, answer = await next_done
                outcomes[name] = (sent, answer)
                if isinstance(answer, Acked) and _verifies(self._key, self._config.agent_id, sent, answer):
                    break
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        winner = next((n for n in names if n in outcomes and isinstance(outcomes[n][1], Acked)
                       and _verifies(self._key, self._config.agent_id, *outcomes[n])), None)
        if winner is not None:
            # A better rung that lost only to a failure every rung shares (the gateway was not up yet when
            # its turn came) gets one more try now that the network evidently works.
            for name in names[:names.index(winner)]:
                outcome = outcomes.get(name)
                if outcome is None or (isinstance(outcome[1], Rejected) and outcome[1].by != GATEWAY):
                    continue
                body = await self._empty_batch()
                sent = Sent(nonce=body[_NONCE], size=len(body))
                self.stats.sent_bytes += len(body)
                again = await self._rungs[name].exchange(body, hints)
                outcomes[name] = (sent, again)
                if _verifies(self._key, self._config.agent_id, sent, again):
                    winner = name
                    break
        chosen = winner or names[0]
        for name, (_, answer) in outcomes.items():
            if name != winner and not _verifies(self._key, self._config.agent_id, *outcomes[name]):
                self._ladder.fail(name, _describe(answer), now=self._clock())
        if winner is not None:
            why = "; ".join(f"{n}: {self._ladder.failed[n]}" for n in names if n in self._ladder.failed)
            logger.info("network %s is new: the rungs raced, %s answered first%s", self._network, winner,
                        f" ({why})" if why else "")
            self._ladder.use(winner, now=self._clock(), why="it answered first on this new network")
        sent, answer = outcomes.get(chosen) or outcomes[next(iter(outcomes))]
        action = self._delivery.answer(sent, answer, draw=self._draw(), now=self._clock())
        self._sync_stats()
        if isinstance(action, Commit):
            self._emit(action.notes)
            self._failover.after(answer, None, now=self._clock())
        if not isinstance(action, Commit):
            self._race = True  # still nothing known about this network: race again next time
            raise _Failed(action.cause, await self._failover_after(answer, action))  # logs the notes
        return action.acked

    async def _resync(self) -> None:
        """Learn the gateway's acknowledged seq with an empty sealed batch and align the spool to it."""
        keep, self._keep_stream = self._keep_stream, False
        if not keep:
            self._stream = None  # spool renumbered, gateway restarted...: the next batch starts a new stream
        if self._race:
            acked = await self._race_resync()
        else:
            acked = await self._exchange(await self._empty_batch(), ())
        self.stats.resyncs += 1
        known, last, first_stored = await asyncio.to_thread(
            lambda: (self._spool.cursor(CURSOR), self._spool.last_seq(), self._spool.stats().first_seq))
        plan = plan_resync(acked=acked, known=known, last=last, first_stored=first_stored,
                           agent_id=self._config.agent_id)
        if acked != known or plan.renumber or plan.advance or plan.lost:
            self._stream = None
        self.stats.gateway_lost += plan.lost
        self._emit(plan.notes)
        if plan.renumber:
            moved = await asyncio.to_thread(self._spool.renumber, acked + 1)
            logger.info("%d spooled datagrams renumbered from seq %d", moved, acked + 1)
        elif plan.advance:
            await asyncio.to_thread(self._spool.advance_seq, acked + 1)
        await asyncio.to_thread(self._commit, acked)

    # -- one exchange ----------------------------------------------------------------------------------------

    async def _exchange(self, body: bytes, batch: Sequence[Entry]) -> int:
        """Send one sealed batch (or a resync) through the transport; the gateway's acknowledged seq, or raise
        ``_Failed`` with the delivery protocol's wait."""
        transport = self._transport
        assert transport is not None, "Uploader.open() was not called"
        if batch:
            flags = body[FLAGS_OFFSET]
            sent = Sent(nonce=body[_NONCE], size=len(body), first=batch[0].seq, last=batch[-1].seq,
                        datagrams=len(batch), context=bool(flags & FLAG_CONTEXT),
                        stream=bool(flags & FLAG_STREAM),
                        continued=bool(flags & FLAG_STREAM) and not flags & FLAG_STREAM_START)
        else:
            sent = Sent(nonce=body[_NONCE], size=len(body))
        batch_end = batch[-1].seq if batch else self._position
        hints = Hints(
            agent_id=self._config.agent_id, backlog=max(0, self._last_seq - batch_end), acked=self._position,
            dropped=tuple((k, v) for k, v in sorted(self._dropped().items()) if v), what=sent.what,
        )
        st = self.stats
        st.last_attempt = self._clock()
        self._climb()
        back = self._failover.before(self._clock()) if self._ladder.current != "dns" else None
        if back is not None and await self._move(back):
            raise _Failed("gateway-move", 0.0)
        transport = self._transport
        assert transport is not None
        st.sent_bytes += len(body)
        started = time.monotonic()
        answer = await transport.exchange(body, hints)
        elapsed = time.monotonic() - started
        action = self._delivery.answer(sent, answer, draw=self._draw(), now=self._clock())
        if self._delivery.no_streams:  # this gateway refused the stream flags: an older version
            self._delivery.no_streams = False
            self._no_streams.add(self._failover.current)
        if sent.continued and not isinstance(action, Commit) and action.cause == "unknown-context":
            self._stream_misses += 1
            if self._stream_misses >= STREAM_MISSES:
                self._stream_misses = 0
                self._stream_pause_until = time.monotonic() + STREAM_PAUSE
                self._once.warning(
                    "stream-pause", "%d stream frames in a row refused as unknown to the gateway (several "
                    "gateways behind a per-request balancer?): each batch starts a new stream for %.0f s",
                    STREAM_MISSES, STREAM_PAUSE)
        self._sync_stats()
        switch = self._ladder.after(answer, None if isinstance(action, Commit) else action.cause,
                                    now=self._clock(), batch=bool(batch))
        if isinstance(action, Commit):
            self._emit(action.notes)  # a failure's notes wait for the gateway's choice, below
        elif switch is not None:
            # The next rung may carry it: tried at once, and the switch's line says so (the failure's own
            # line without its "retrying in ..." first).
            self._emit(action.notes, at_once=True)
            self._switched(switch)
            raise _Failed(action.cause, 0.0)
        if self._delivery.max_body != self._sizer.max_body:
            self._sizer.max_body = self._delivery.max_body
        if self._delivery.max_body != self._saved_limit:
            self._saved_limit = self._delivery.max_body
            await asyncio.to_thread(self._save_limit, self._saved_limit)
        if not isinstance(action, Commit):
            delay = await self._failover_after(answer, action)
            if self._delivery.consecutive_failures >= 2:
                await self._recall_network()  # moved to another network meanwhile?
            raise _Failed(action.cause, delay)
        self._failover.after(answer, None, now=self._clock())
        if batch and self._memory is not None and self._network is not None:
            post = transport if transport.name == "post" and isinstance(transport, PostTransport) else None
            changed = self._memory.update(
                self._network, self._ladder.current,
                content_type=None if post is None else post.types.status(),
                path=None if post is None else post.batch_path,
                since=None if post is None else post.classic_since)
            if changed is not None:  # most batches change nothing: no thread, no write
                await asyncio.to_thread(self._memory.write, changed)
        if batch:
            raw = sum(len(e.datagram.payload) for e in batch)
            self.link.observe(raw, len(body), elapsed, self._choice)
        else:  # a resync: the round trip and the gateway's fixed cost, without datagrams
            self.link.observe_round_trip(elapsed)
        return action.acked

    def _climb(self) -> None:
        """A re-probe of a higher rung, or the bytes preference's move once post carried a batch, when due:
        switch, and raise so that the new rung's resync comes first. Checked before a batch is sealed (a move
        for bytes then keeps the compression stream: ``_switched``) and before each exchange (a batch already
        sealed as a frame is sealed again after the resync; its frame was not acknowledged, so in a new
        stream)."""
        up = self._ladder.before(self._clock())
        if up is not None:
            self._switched(up, failed=False)
            self._delivery.wants_resync = True  # a new rung starts with a resync (its own answers)
            raise _Failed("rung-switch", 0.0)

    def _switched(self, switch: Switch, *, failed: bool = True) -> None:
        """Log a switch of rung, once, with its reason and what happens: the new rung is tried now (with
        what failed on the old one, when ``failed``; else a re-probe of a higher rung, or the bytes
        preference, logged as information: nothing failed)."""
        if switch.for_bytes and not failed:
            self._keep_stream = True  # nothing failed: the frames acknowledged so far hold (``_resync``)
        else:
            self._stream = None  # another rung after a failure: the next batch starts a new stream
        # The batch was due (or went and failed): after the new rung's resync it goes at once, not after
        # another --latency (before, every switch delayed a caught-up agent's batch by up to --latency).
        self._last_send = float("-inf")
        level = logging.INFO if switch.for_bytes else logging.WARNING
        logger.log(level, "upload rung %s -> %s: %s; %s %s now", switch.old, switch.new, switch.reason,
                   "retrying on" if failed else "trying", switch.new)

    async def _failover_after(self, answer: Answer, action: Wait) -> float:
        """After a failed exchange: move to another gateway if the failure was the gateway's; the wait
        before the next attempt (none when the next gateway has not failed since the last ack). Logs the
        delivery protocol's notes on the failure, except those saying what the next attempt waits when the
        next gateway is tried at once: the move's own line says what happens, and why."""
        if self._ladder.current == "dns":
            self._emit(action.notes)
            return action.delay  # the dns rung reaches the cluster by the zone, whatever the gateway URL
        move = self._failover.after(answer, action.cause, now=self._clock())
        if move is None or not await self._move(move):
            self._emit(action.notes)
            return action.delay
        if not move.at_once:
            self._emit(action.notes)
            return action.delay
        self._emit([note for note in action.notes if not note.then])
        return 0.0

    async def _move(self, move: Move) -> bool:
        """Use gateway ``move.new`` from now on (building its rungs the first time); False when its rungs
        cannot be built (its proxy setting fails), and the agent stays where it was."""
        if move.new not in self._stacks:
            try:
                await self._build(move.new)
            except ConfigError as exc:
                self._once.warning(f"gateway-build:{move.new}", "cannot use gateway %s: %s", move.new, exc)
                self._failover.index = self._failover.gateways.index(move.old)
                return False
        # Each move is logged once, with its reason; while every gateway keeps failing (the cluster is
        # down, or this network reaches none), the rounds after the first are counted, not logged.
        if move.round == 0 and not move.failed:
            logger.info("moving to gateway %s: %s", move.new, move.reason)
        elif move.round == 0:
            logger.warning("gateway %s failed (%s): moving to gateway %s at once", move.old, move.reason,
                           move.new)
        elif move.round == 1 and not move.at_once:
            logger.warning("every gateway failed since the last acknowledgement (%s: %s): trying them in "
                           "turn, one per backoff", move.old, move.reason)
        else:
            logger.debug("gateway %s -> %s: %s", move.old, move.new, move.reason)
        self._delivery.wants_resync = True  # the new gateway's mark, from the shared journal
        self._delivery.fresh_context = True  # it does not hold the compression context the old one held
        self._stream = None  # nor the compression stream
        return True

    def _save_limit(self, limit: int) -> None:
        self._spool.set_state(_LIMIT, limit)
        self._spool.set_state(_LIMIT_OF, self._config.max_body)

    def _emit(self, notes: Sequence[Note], *, at_once: bool = False) -> None:
        """Log the delivery protocol's notes; ``at_once``: the next attempt goes now (the caller says where),
        so what the notes say it waits (``Note.then``) is left out."""
        for note in notes:
            text = note.text if at_once else note.line
            if note.once is not None and note.level == logging.WARNING:
                self._once.warning(note.once, "%s", text)
            else:
                logger.log(note.level, "%s", text)

    def _sync_stats(self) -> None:
        d, st = self._delivery, self.stats
        st.failures = d.failures
        st.consecutive_failures = d.consecutive_failures
        st.last_result = d.last_result
        st.oversize = d.oversize
        st.unacked_since = d.unacked_since
        st.last_ack = d.last_ack
        if d.last_result == "ok":
            st.last_success = self._clock()

    def _caught_up(self) -> None:
        """Nothing left to send after a successful resync: whatever failed before, nothing is waiting."""
        self._emit(self._delivery.caught_up(now=self._clock()))
        self._sync_stats()

    # -- status ----------------------------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        st = self.stats
        transport = self._transport
        return {
            **self._failover.status(),
            "proxy": mask_url(self._config.proxy),
            "route": (transport.client.route if isinstance(transport, PostTransport)
                      else transport.route if isinstance(transport, DnsTransport) else None),
            **self._ladder.status(),
            "acked": st.gateway_acked,
            "batches": st.batches,
            "datagrams": st.datagrams,
            "raw_bytes": st.raw_bytes,
            "body_bytes": st.body_bytes,
            "sent_bytes": st.sent_bytes,
            "compression_ratio": round(st.raw_bytes / st.body_bytes, 2) if st.body_bytes else None,
            "last_attempt": st.last_attempt,
            "last_success": st.last_success,
            "last_ack": st.last_ack,
            "unacked_since": st.unacked_since,
            "last_result": st.last_result,
            "consecutive_failures": st.consecutive_failures,
            "next_attempt": st.next_attempt,
            "failures": dict(st.failures),
            "gateway_lost": st.gateway_lost,
            "resyncs": st.resyncs,
            "max_body": self._sizer.max_body,
            "body_limit_by": self._delivery.limit_by,
            "oversize": st.oversize,
            "intercepted_by": transport.intercepted if isinstance(transport, PostTransport) else None,
            "captive_portal": transport.portal if isinstance(transport, PostTransport) else None,
            # The POST rung's label for batches: another than the first when a proxy refused it (``labels``).
            "content_type": (transport.types.status() if isinstance(transport, PostTransport)
                             and transport.name == "post" else None),
            # ... and its batch path: /v1/batches when /v1/b was refused on this network (``post``).
            "batch_path": (transport.batch_path if isinstance(transport, PostTransport)
                           and transport.name == "post" else None),
            "codecs": {str(k): v for k, v in sorted(st.codecs.items())},
            "context_batches": st.context_batches,
            "stream_batches": st.stream_batches,
            "link_bytes_per_s": None if self.link.body_rate is None else round(self.link.body_rate),
            "dns": dns.stats if isinstance(dns := self._rungs.get("dns"), DnsTransport) else None,
        }


def _describe(answer: Answer) -> str:
    """Why a rung lost a race, for the status."""
    by = getattr(answer, "by", None)
    cause = getattr(answer, "cause", type(answer).__name__.lower())
    return f"{by} refuses it ({cause})" if by not in (None, "gateway") else str(cause)


def _verifies(key: bytes, agent_id: str, sent: Sent, answer: Answer) -> bool:
    if not isinstance(answer, Acked):
        return False
    try:
        verify_ack(key, agent_id=agent_id, request_nonce=sent.nonce, acked=answer.acked, tag=answer.tag)
    except (AuthenticationFailed, ValueError):
        return False
    return True


def _budget_days(saved: Mapping[str, int]) -> dict[int, int]:
    """The daily budget's spend by UTC day from the spool's ``budget:*`` state keys (oldest day first)."""
    days: dict[int, int] = {}
    legacy = saved.get(_BUDGET_DAY), saved.get(_BUDGET_USED)
    if legacy[0] is not None and legacy[1] is not None:
        days[legacy[0]] = legacy[1]
    for key, used in saved.items():
        suffix = key[len(_BUDGET_PREFIX):]
        if suffix.isascii() and suffix.isdigit():
            days[int(suffix)] = max(used, days.get(int(suffix), 0))
    return dict(sorted(days.items()))


_WAY_CODECS = {Way.ZSTD: Codec.ZSTD_DICT, Way.COLUMNAR: Codec.COLUMNAR}


def _way_of(body: bytes) -> Way:
    """The way a sealed body went (``SealWays``): its context flag, else its codec."""
    if body[FLAGS_OFFSET] & FLAG_CONTEXT:
        return Way.CONTEXT
    if body[CODEC_OFFSET] == Codec.DELTA_LZMA:
        return Way.LEAN
    return Way.COLUMNAR if body[CODEC_OFFSET] == Codec.COLUMNAR else Way.ZSTD


def _source(entry: Entry) -> tuple[str, int, int]:
    d = entry.datagram
    return d.exporter, d.exporter_port, d.local_port
