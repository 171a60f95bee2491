"""The uploader: reads the spool from the gateway's acknowledged seq, seals batches, POSTs them, trims on ack.

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

Codec choice (CPU against bytes, ``policy.choose_codec``): a throughput-bound batch (a backlog: more spooled
behind it, or above ``BIG_BATCH_BYTES`` of payload) goes the way that costs the least sealing CPU plus upload
time per raw byte, since with one request in flight a busy agent moves one batch per (seal + upload); other
batches go as ``DEFAULT`` (bytes count on metered links, and CPU is cheap at the rates of the steady path).
Three ways, measured on softflowd v9 (CPU per raw MB / body per raw byte): ``FAST`` codec 2 at zstd level 3
(~10 ms / 0.36), ``DEFAULT`` the sealer's choice of codec 3 or 2 at level 6 (~35 ms / 0.21), ``SMALL`` codec
4, columnar + LZMA2 (~190 ms / 0.16). Upload time comes from the uploads themselves (``policy.LinkEstimate``:
body bytes over request time less the round trip of an empty request, decaying, weighted by bytes; the
gateway's work per datagram counts in, so it errs towards fewer bytes) or from the ``bandwidth`` cap,
whichever is slower; a daily byte budget means bytes always count (``SMALL`` for big batches). Break-even at
softflowd's compressibility: ``FAST`` above ~6 MB/s of body (a loopback or LAN gateway: ~0.1 CPU-s less per
100k flows at 3,500 datagrams/s), ``SMALL`` below ~330 KB/s. Before the rule, every backlog batch went as
codec 4: on a fast link that made the agent CPU-bound (55 % of its CPU in ``lzma.compress`` at 2,000
datagrams/s), so it fell behind and every batch became a backlog batch. Until a batch was measured,
``DEFAULT``. A codec 4 batch up to ``BIG_BATCH_BYTES`` is also sealed with ``DEFAULT`` and the smaller kept:
below ~100 KB codec 4 (no dictionary) loses to zstd with the bundled dictionaries on some exports (Cisco
IPFIX: up to 1.9x).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import random
import re
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp

from flowtunnel.agent.config import MIN_BODY, AgentConfig, mask_url
from flowtunnel.agent.policy import (
    DEFAULT,
    SMALL,
    BatchSizer,
    CodecChoice,
    DailyBudget,
    LinkEstimate,
    Outcome,
    TokenBucket,
    backoff_delay,
    choose_codec,
    classify_status,
    parse_retry_after,
)
from flowtunnel.datagram import Datagram
from flowtunnel.log import AppendResult, DurableLog, Entry, LogError
from flowtunnel.runtime import OnceLogger
from flowtunnel.wire import AuthenticationFailed, Codec, TemplateLengths, seal_batch, verify_ack

__all__ = ["CURSOR", "Uploader", "UploaderStats"]

logger = logging.getLogger(__name__)

CURSOR = "gateway"  # spool cursor: the gateway's acknowledged seq, as last learned
CONTENT_TYPE = "application/vnd.flowtunnel.batch"
_MAX_RESPONSE = 64 * 1024
_TITLE_RE = re.compile(r"<title>([^<]{1,200})</title>", re.IGNORECASE)
_INFO_KEY = re.compile(r"[a-z0-9][a-z0-9_.:-]{0,31}")  # what seal_batch accepts as an agent info key
MAX_SOURCES = 1000  # distinct (exporter, port, local port) per batch, below the gateway's default 1024
# Spool state keys of the daily budget: "budget:<UTC day number>" = bytes spent that day. (Before, one pair
# "budget:day" / "budget:used" held the current day only; still read.)
_BUDGET_PREFIX, _BUDGET_DAY, _BUDGET_USED = "budget:", "budget:day", "budget:used"
_NONCE = slice(32, 44)  # the nonce in a sealed batch's header (docs/protocol.md, section 1.1)
_CODEC = 6  # the codec byte in a sealed batch's header
# Backlog batches and batches above BIG_BATCH_BYTES of payload may go as codec 4 when bytes cost more than
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

    Error handling: connection errors, timeouts, 5xx, 407, 408, 429 back off exponentially (or per
    ``Retry-After``); a 200 whose tag does not verify (``bad-ack``) too; 409 ``resync`` resynchronises at
    once; 413 halves the body limit and retries; 400/401/403 and other 4xx are logged as errors and retried
    after ``reject_backoff``, the data staying in the spool. Each transient cause is logged once, then
    counted.
    Nothing is ever dropped by the uploader.

    Resource handling: ``open`` creates one aiohttp session (keep-alive); ``close`` closes it.
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
    ) -> None:
        self._config = config
        self._key = key
        self._spool = spool
        self._dropped = dropped
        self._clock = clock
        self._draw = draw
        self._url = config.gateway.rstrip("/") + "/v1/batches"
        self._wake = asyncio.Event()
        self._once = OnceLogger(logger)
        self._session: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | bool = True
        self._sizer = BatchSizer(max_body=config.max_body)
        # One second of bandwidth may be saved up; a larger request goes when the bucket is full, into debt.
        self._bucket = TokenBucket(rate=float(config.bandwidth), burst=float(config.bandwidth))
        self._budget = DailyBudget(limit=config.daily_bytes)
        self._position = 0  # every seq <= position is at the gateway (as far as we know)
        self._last_seq = 0  # the spool's last seq when last looked at
        self._need_resync = True
        self._last_send = float("-inf")
        # Record lengths of the templates seen in the spool, so codec 3 can cut data sets into columns even
        # when the template went in an earlier batch. Empty after a restart: unknown sets travel verbatim.
        self._templates = TemplateLengths()
        self._learned = 0  # seqs up to this one went through the template cache
        self._resync_streak = 0  # 409 answers since the last acknowledged batch
        self._seeded = False  # whether a sealed batch has seeded the sizer's ratio yet
        self.link = LinkEstimate()  # the upload's achieved throughput, for the codec rule
        self._choice: CodecChoice = DEFAULT  # how the last batch was sealed
        # The newest datagrams the receiver committed, as entries with contiguous seqs, exactly as the spool
        # holds them (see ``spooled``).
        self._tail: deque[Entry] = deque()
        self._tail_bytes = 0
        self.stats = UploaderStats()

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def open(self) -> None:
        cfg = self._config
        if cfg.ca_file is not None:
            try:
                self._ssl = ssl.create_default_context(cafile=str(cfg.ca_file))
            except (OSError, ssl.SSLError) as exc:
                from flowtunnel.errors import ConfigError

                raise ConfigError(f"cannot load CA file {cfg.ca_file}: {exc}") from None
        pin: aiohttp.Fingerprint | bool = True
        if cfg.pin_sha256 is not None:
            # On the connector, the pin combines with a request's CA context (both must pass); alone, it
            # replaces CA verification (a self-signed gateway).
            pin = aiohttp.Fingerprint(bytes.fromhex(cfg.pin_sha256.replace(":", "")))
        connector = aiohttp.TCPConnector(limit=2, ssl=pin, keepalive_timeout=120.0)
        timeout = aiohttp.ClientTimeout(
            total=cfg.total_timeout, connect=cfg.connect_timeout, sock_connect=cfg.connect_timeout,
            sock_read=cfg.read_timeout,
        )
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=True)
        self._position = await asyncio.to_thread(self._spool.cursor, CURSOR)
        self._last_seq = await asyncio.to_thread(self._spool.last_seq)
        saved = await asyncio.to_thread(self._spool.states, _BUDGET_PREFIX)
        self._budget.spent.update(_budget_days(saved))
        via = f" via proxy {mask_url(cfg.proxy)}" if cfg.proxy else ""
        logger.info("uploading to %s%s as agent %s", self._url, via, cfg.agent_id)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def notify(self) -> None:
        """New datagrams are in the spool."""
        self._wake.set()

    def spooled(self, result: AppendResult, datagrams: Sequence[Datagram]) -> None:
        """The receiver committed ``datagrams`` to the spool as ``result`` (called in the loop).

        They are kept in memory (the newest ``TAIL_BYTES``; none while uploads fail) so the next batch need
        not read them back. The kept entries stay one run of consecutive seqs, as the spool holds them: a
        commit that did not store all its datagrams under consecutive seqs, or whose quota policy dropped
        older entries, starts the run afresh (and batches come from the spool until they reach it). Entries
        at or below the gateway's mark are discarded as batches are read. That covers resynchronisation too:
        the spool renumbers or advances its seqs only when the gateway's mark is beyond its last seq, so
        every kept entry is then at or below the new mark, and later commits start a new run above it.
        """
        tail = self._tail
        n = len(datagrams)
        whole = (n > 0 and result.appended == n and result.last_seq - result.first_seq + 1 == n
                 and not self.stats.consecutive_failures)
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
                if self._need_resync:
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
                self.stats.failures[f"local:{type(exc).__name__}"] += 1
                self.stats.last_result = f"local:{type(exc).__name__}"
                self._once.warning(f"local-{type(exc).__name__}", "upload stalled: %s", exc)
                self._need_resync = True
                await asyncio.sleep(self._config.backoff_cap)

    async def drain(self) -> bool:
        """Send batches back to back until the spool is empty; stop at the first failure.

        Returns True when the gateway acknowledged everything spooled. Used at shutdown, under a timeout.
        """
        try:
            if self._need_resync:
                await self._resync()
            while await self._send_next(draining=True):
                pass
        except (_Failed, LogError, ValueError):
            return False
        return True

    # -- one batch -------------------------------------------------------------------------------------------

    async def _send_next(self, *, draining: bool) -> bool:
        """Send one batch if the spool holds any; False when there was nothing to send."""
        self._wake.clear()
        entries = await self._read()
        if not entries:
            self._caught_up()
            return False
        if not draining and entries[-1].seq >= self._last_seq:
            # Caught up: let more datagrams gather, up to the latency target since the last send.
            wait = self._last_send + self._config.latency - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                entries = await self._read()
                if not entries:  # the quota policy dropped them meanwhile
                    return False
        body, batch = await asyncio.to_thread(self._seal, entries)
        self._seed_ratio(batch, len(body))
        await self._throttle(len(body))
        self._last_send = time.monotonic()
        acked = await self._post(body, batch)
        self._acknowledged()
        self._resync_streak = 0
        raw = sum(len(e.datagram.payload) for e in batch)
        self._sizer.observe(raw, len(body))
        st = self.stats
        st.batches += 1
        st.datagrams += len(batch)
        st.raw_bytes += raw
        st.body_bytes += len(body)
        st.codecs[body[_CODEC]] += 1
        last = batch[-1].seq
        if acked < last:
            # The contract says the gateway takes every datagram above its mark; if it did not, ask again.
            self._once.warning(
                "ack-behind", "gateway acknowledged %d after a batch ending at %d; resynchronising",
                acked, last,
            )
            self._need_resync = True
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
        templates = self._templates
        for e in entries[:n]:
            if e.seq > self._learned:  # a batch re-read after a failure was learned already
                templates.learn(e.datagram.payload)
                self._learned = e.seq
        # The drops also travel sealed (authenticated), as "dropped:<cause>"; the header copy is for proxies.
        # "clock_ms": this agent's clock; the gateway reports how far off it is (and acts on its own).
        info = {"acked": self._position, "clock_ms": max(0, int(self._clock() * 1000))}
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
                seal_batch, agent_id=self._config.agent_id, key=self._key, first_seq=batch[0].seq,
                datagrams=datagrams, agent_info=info, record_length=templates.record_length,
            )
            choice = self.codec_choice(big=raw > BIG_BATCH_BYTES or batch[-1].seq < self._last_seq)
            codec = None if choice.codec is None else Codec(choice.codec)
            body = seal(nonce=os.urandom(12), codec=codec, level=choice.level)
            if choice is SMALL and raw <= BIG_BATCH_BYTES:
                # Below ~100 KB, codec 4 (no dictionary) loses to zstd with the bundled dictionaries on some
                # exports (Cisco IPFIX: up to 1.9x larger); zstd costs a fraction of LZMA's CPU.
                other = seal(nonce=os.urandom(12), codec=None, level=DEFAULT.level)
                if len(other) < len(body):
                    body, choice = other, DEFAULT
            if len(body) <= self._sizer.max_body or n == 1:
                self._choice = choice
                return body, batch
            n = max(1, n // 2)

    def codec_choice(self, *, big: bool) -> CodecChoice:
        """How a batch is sealed now (see the module docstring); ``big``: a backlog or big batch."""
        cfg = self._config
        return choose_codec(self.link, big=big, bandwidth=cfg.bandwidth, daily_bytes=cfg.daily_bytes)

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
        spool.commit_cursor(CURSOR, acked)
        spool.trim(acked)
        self._position = acked
        self._last_seq = spool.last_seq()
        self.stats.gateway_acked = acked

    # -- resynchronisation -----------------------------------------------------------------------------------

    async def _resync(self) -> None:
        """Learn the gateway's acknowledged seq with an empty sealed batch and align the spool to it."""
        body = await asyncio.to_thread(
            seal_batch, agent_id=self._config.agent_id, key=self._key, first_seq=self._position + 1,
            datagrams=[], nonce=os.urandom(12), agent_info={"acked": self._position},
        )
        acked = await self._post(body, ())
        self.stats.resyncs += 1
        known, last = await asyncio.to_thread(lambda: (self._spool.cursor(CURSOR), self._spool.last_seq()))
        if acked < known:
            # The gateway forgot what it had acknowledged (its journal was restored from a backup, or lost).
            first_stored = (await asyncio.to_thread(self._spool.stats)).first_seq
            missing = max(0, min(first_stored - 1, known) - acked)
            if missing:
                self.stats.gateway_lost += missing
                logger.error(
                    "gateway acknowledged only up to seq %d, but earlier acknowledged %d: %d datagrams "
                    "(seq %d..%d) were lost at the gateway and are no longer in the spool; re-sending the "
                    "rest",
                    acked, known, missing, acked + 1, acked + missing,
                )
            else:
                logger.warning(
                    "gateway acknowledged only up to seq %d, but earlier acknowledged %d: re-sending from "
                    "the spool", acked, known,
                )
        if acked > last:
            await asyncio.to_thread(self._renumber, acked, known)
        await asyncio.to_thread(self._commit, acked)
        self._need_resync = False

    def _renumber(self, acked: int, known: int) -> None:
        """The gateway holds seqs up to ``acked``, beyond anything this spool handed out (worker thread).

        A spool that never heard from the gateway (``known == 0``) is a new one for an existing agent id: its
        datagrams are new, so they move above the mark, all in one spool transaction (a crash leaves them all
        at their old seqs, and the next resync moves them again, or all at their new ones). A spool that did
        hear from it was restored from a backup: what it holds up to the mark was delivered.
        """
        spool = self._spool
        last = spool.last_seq()
        if known:
            spool.advance_seq(acked + 1)
            logger.warning(
                "gateway acknowledged up to seq %d, beyond this spool's last seq %d (restored from a "
                "backup?): its datagrams up to %d count as delivered; numbering continues at %d",
                acked, last, acked, acked + 1,
            )
            return
        moved = spool.renumber(acked + 1)
        logger.warning(
            "gateway already holds seqs up to %d for agent %s but this spool is new: numbering continues at "
            "%d (%d spooled datagrams renumbered)", acked, self._config.agent_id, acked + 1, moved,
        )

    # -- HTTP ------------------------------------------------------------------------------------------------

    async def _post(self, body: bytes, batch: Sequence[Entry]) -> int:
        """POST one sealed batch; the gateway's acknowledged seq, or raise ``_Failed``."""
        assert self._session is not None, "Uploader.open() was not called"
        batch_end = batch[-1].seq if batch else self._position
        headers = {
            "Content-Type": CONTENT_TYPE,
            "X-Flowtunnel-Agent": self._config.agent_id,
            # What will still wait once this batch is acknowledged.
            "X-Flowtunnel-Backlog": str(max(0, self._last_seq - batch_end)),
            # Also sealed in the batch (agent info "acked"), which the gateway prefers: this copy is for
            # proxies and logs.
            "X-Flowtunnel-Acked": str(self._position),
        }
        dropped = {k: v for k, v in self._dropped().items() if v}
        if dropped:
            headers["X-Flowtunnel-Dropped"] = ",".join(f"{k}={v}" for k, v in sorted(dropped.items()))
        st = self.stats
        st.last_attempt = self._clock()
        st.sent_bytes += len(body)
        what = f"batch {batch[0].seq}..{batch[-1].seq}" if batch else "resync"
        started = time.monotonic()
        try:
            async with self._session.post(
                self._url, data=body, headers=headers, proxy=self._config.proxy, ssl=self._ssl,
            ) as resp:
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
                proxy_auth = "Proxy-Authenticate" in resp.headers
                payload = await resp.content.read(_MAX_RESPONSE)
        except (aiohttp.ClientError, TimeoutError) as exc:
            detail = str(exc) or type(exc).__name__
            raise self._failure(f"connection:{type(exc).__name__}", f"{what}: {detail}") from None
        if status == 401 and (proxy_auth or not _is_gateway_error(payload)):
            # The gateway always explains a 401 in JSON; a bare 401 comes from a proxy that wants a (better)
            # login (tinyproxy answers 401 instead of 407). That is transient from here: retry with backoff.
            status = 407
        outcome = classify_status(status)
        if outcome is Outcome.OK:
            try:
                doc = json.loads(payload)
                acked = doc["acked"]
                if not isinstance(acked, int) or isinstance(acked, bool) or acked < 0:
                    raise TypeError(f"acked {acked!r} is not a non-negative integer")
            except (ValueError, KeyError, TypeError) as exc:
                raise self._failure("bad-response", f"{what}: 200 with an unreadable body ({exc})") from None
            try:
                verify_ack(self._key, agent_id=self._config.agent_id, request_nonce=body[_NONCE],
                           acked=acked, tag=doc.get("tag"))
            except (AuthenticationFailed, ValueError) as exc:  # ValueError: acked beyond 2**64 - 1
                # Not from the gateway holding this agent's key (a forgery on the path, a replayed answer, or
                # a gateway too old to tag): trust nothing in it, keep every datagram, back off.
                raise self._failure("bad-ack", f"{what}: 200 whose acknowledgement is not authentic ({exc})",
                                    retry_after=None) from None
            self._succeeded()
            elapsed = time.monotonic() - started
            if batch:
                raw = sum(len(e.datagram.payload) for e in batch)
                self.link.observe(raw, len(body), elapsed, self._choice)
            else:  # a resync: the round trip and the gateway's fixed cost, without datagrams
                self.link.observe_round_trip(elapsed)
            return int(acked)
        detail = f"{what}: HTTP {status}: {_error_text(payload)}"
        if status == 409 and _error_code(payload) == "resync":
            # The gateway holds less than it once acknowledged (journal restored or torn): resynchronise now
            # (the answer's own "acked" is not authenticated; the resync's is), unless this keeps happening.
            st.failures["resync"] += 1
            st.last_result = "resync"
            self._need_resync = True
            self._once.warning("resync-409", "%s; resynchronising", detail)
            # The resync in between succeeds, so count 409s until a batch is acknowledged: a gateway (or
            # someone on the path) answering 409 to every batch gets backoff, not a request loop.
            delay = 0.0
            if self._resync_streak:
                delay = backoff_delay(self._resync_streak - 1, base=self._config.backoff_base,
                                      cap=self._config.backoff_cap, draw=self._draw())
            self._resync_streak += 1
            st.consecutive_failures += 1
            if st.unacked_since is None:
                st.unacked_since = self._clock()
            raise _Failed("resync", delay)
        if outcome is Outcome.TOO_LARGE and self._sizer.shrink(MIN_BODY):
            logger.warning("%s; lowering the body limit to %d bytes", detail, self._sizer.max_body)
            st.failures["http-413"] += 1
            raise _Failed("http-413", 0.0)
        if outcome is Outcome.RETRY:
            wait = parse_retry_after(retry_after, now=self._clock())
            raise self._failure(f"http-{status}", detail, retry_after=wait)
        raise self._failure(f"http-{status}", detail, rejected=True)

    def _failure(
        self, cause: str, detail: str, *, retry_after: float | None = None, rejected: bool = False
    ) -> _Failed:
        st = self.stats
        cfg = self._config
        st.failures[cause] += 1
        st.last_result = cause
        self._need_resync = True
        if rejected:
            delay = cfg.reject_backoff
            # Not transient: an operator must act (enroll the agent, fix the key). Say so every time.
            logger.error(
                "gateway rejected %s; retrying in %.0f s, datagrams stay in the spool", detail, delay,
            )
        else:
            delay = backoff_delay(
                st.consecutive_failures, base=cfg.backoff_base, cap=cfg.backoff_cap, draw=self._draw()
            )
            if retry_after is not None:
                delay = retry_after
            self._once.warning(cause, "upload failed (%s); retrying with backoff", detail)
        st.consecutive_failures += 1
        if st.unacked_since is None:
            st.unacked_since = self._clock()
        return _Failed(cause, delay)

    def _succeeded(self) -> None:
        """A 200 (a resync or a batch). Only an acknowledged batch (``_acknowledged``), or finding nothing
        left to send (``_caught_up``), ends a failure episode: a gateway that answers every resync but
        refuses every batch (503, journal full) must not look healthy, nor reset the backoff."""
        st = self.stats
        st.last_success = self._clock()
        st.last_result = "ok"

    def _acknowledged(self) -> None:
        """The gateway acknowledged a batch of datagrams."""
        st = self.stats
        now = self._clock()
        if st.consecutive_failures:
            since = "" if st.unacked_since is None else f" ({now - st.unacked_since:.0f} s without an ack)"
            logger.info("gateway acknowledging data again after %d failed attempts%s",
                        st.consecutive_failures, since)
        st.consecutive_failures = 0
        st.unacked_since = None
        st.last_ack = now

    def _caught_up(self) -> None:
        """Nothing left to send after a successful resync: whatever failed before, nothing is waiting."""
        st = self.stats
        if st.consecutive_failures and not self._need_resync:
            logger.info("gateway reachable again after %d failed attempts; nothing waiting",
                        st.consecutive_failures)
            st.consecutive_failures = 0
            st.unacked_since = None

    # -- status ----------------------------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        st = self.stats
        return {
            "gateway": self._config.gateway,
            "proxy": mask_url(self._config.proxy),
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
            "codecs": {str(k): v for k, v in sorted(st.codecs.items())},
            "link_bytes_per_s": None if self.link.body_rate is None else round(self.link.body_rate),
        }


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


def _source(entry: Entry) -> tuple[str, int, int]:
    d = entry.datagram
    return d.exporter, d.exporter_port, d.local_port


def _error_code(payload: bytes) -> str | None:
    """The ``error`` field of a JSON error body, if any."""
    try:
        doc = json.loads(payload)
    except ValueError:
        return None
    code = doc.get("error") if isinstance(doc, dict) else None
    return code if isinstance(code, str) else None


def _is_gateway_error(payload: bytes) -> bool:
    try:
        doc = json.loads(payload)
    except ValueError:
        return False
    return isinstance(doc, dict) and "error" in doc


def _error_text(payload: bytes) -> str:
    """The gateway's ``error``/``detail`` from a JSON error body, else a short printable excerpt."""
    try:
        doc = json.loads(payload)
        if isinstance(doc, dict) and "error" in doc:
            return f"{doc.get('error')}: {doc.get('detail', '')}".strip(": ")
    except ValueError:
        pass
    text = payload[:2000].decode("utf-8", "replace")
    title = _TITLE_RE.search(text)
    if title:  # an HTML error page from a proxy
        return title.group(1).strip()
    text = " ".join("".join(c if c.isprintable() else " " for c in text[:200]).split())
    return text or "(empty body)"
