"""UDP reception into the spool: sockets → bounded in-memory buffer → group commit into the durable log.

The event loop only copies each datagram into a bounded deque; a committer task appends the deque to the
spool in a worker thread every ``commit_interval`` (or sooner when ``commit_max`` datagrams wait), so one
fsync covers many datagrams and the loop never blocks on the disk. A commit takes what was buffered when it
began; what arrives meanwhile waits for the next one, ``commit_interval`` later: committing it at once would
turn a busy agent into back-to-back commits of a few datagrams each (measured at 3,500 datagrams/s: ~90
commits/s of ~40 datagrams, their GIL hand-offs and fsyncs costing more CPU than the datagrams themselves).

With ``commit_bytes``, a commit also waits until that much payload is buffered, for at most
``commit_wait``: at a quiet site a commit of one or two datagrams costs as much as one of a hundred (a
transaction rewrites five or six 16 KiB spool pages and fsyncs them, ~0.5-0.8 ms of CPU; measured at 1,000
flows/s, 36 datagrams/s: 20 commits/s were the agent's largest cost, 1.1 % of a core). ``flush`` commits
at once (the uploader calls it before it reads a batch, so the wait adds no latency). The wait counts from
the oldest datagram buffered, so after the uploader's flush what arrives next waits from its own arrival:
one commit per batch, not a second one for the datagrams between that flush and the end of a wait begun
before it (issue 14: 1.8 commits a second at 1,000 flows/s, 1.0 now). The price: a
``kill -9`` loses what is buffered, up to ``commit_bytes`` or ``commit_wait`` of datagrams instead of
``commit_interval``.

Each socket is read with non-blocking ``recvfrom`` in a loop until it is empty, not one datagram per
callback. While datagrams come slowly (a quiet exporter) the loop wakes on readiness as usual; when
readiness events follow each other closer than half the longest poll wait (a quarter of the commit wait,
at most ``POLL_MAX``: 0.1 s at ``--latency 1s``), the socket is taken off the selector and polled instead,
until a read finds fewer than ``POLL_MIN``: one wake then reads several datagrams, instead of one wake
(selector round, callback) per datagram. Each poll waits long enough to find ~``POLL_FILL`` datagrams at the
rate the last one saw, from ``POLL_INTERVAL`` (20 ms) to that longest wait, which is shorter when the
kernel's receive buffer would not hold twice what ``FLOOD_RATE`` (100k flows/s) brings in it: 20 ms of 100k
flows/s is ~70 datagrams, ~160 KB of buffer as the kernel counts it. (Issue 14: at 10k flows/s, 357
datagrams/s, readiness events came 2.8 ms apart, above the 2.5 ms threshold of then, so every datagram cost a
wake of its own; at 1,000 flows/s, 28 ms apart, each did until the polls could wait 0.1 s.)

If the disk falls behind long enough to fill the buffer, the newest datagrams are dropped and counted as
``receiver_overflow``: memory stays bounded whatever happens.
When the spool's disk is full (``LogFull``: a REFUSE_NEW spool on a full filesystem), the buffer keeps what
it can and retries every second (the uploader's trims free space); what no longer fits is counted as
``disk_full`` instead.

Datagrams the kernel drops before we read them (the socket's receive buffer overflowed during a burst, or the
loop stalled) are counted too, as ``kernel_rcvbuf``, per listening socket: no silent loss. They are read with
``getsockopt(SOL_SOCKET, SO_MEMINFO)`` (Linux >= 4.6), whose ``SK_MEMINFO_DROPS`` slot is the socket's
``sk_drops`` counter, the same number as the ``drops`` column of /proc/net/udp. Why this and not the
alternatives: ``SO_RXQ_OVFL`` only reports the counter as it was when the *next* datagram was queued, so the
tail of a burst (exactly the datagrams a full buffer drops) stays invisible until traffic resumes, and it
needs ``recvmsg`` with ancillary data on every read; /proc/net/udp means parsing a
table of every UDP socket in the namespace to find our inode. SO_MEMINFO is one cheap syscall per socket,
exact at the moment it is read, so it is polled whenever drops are reported (status file, every upload
request) and once more before the sockets close. ``sk_drops`` also counts the rare datagram with a bad UDP
checksum or refused by a socket filter; the cause name is about the common case. Where SO_MEMINFO is
unavailable (not Linux, old kernel), kernel drops are reported as not countable (``None``) and one INFO line
says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import platform
import socket
import struct
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from flowtunnel.agent.config import ListenAddress
from flowtunnel.datagram import Datagram
from flowtunnel.log import AppendResult, DurableLog, LogError, LogFull
from flowtunnel.netflow.sequence import SequenceTracker
from flowtunnel.netflow.sniff import check_datagram, export_sequence
from flowtunnel.runtime import OnceLogger

__all__ = ["Receiver", "ReceiverStats", "check_datagram", "kernel_drops"]

logger = logging.getLogger(__name__)

# As the gateway's decoder: a backward jump this small is reordering, a forward jump this large a restart.
_REORDER_WINDOW, _MAX_GAP = 4096, 1 << 30
# Distinct exporters remembered for the status; beyond, new ones are only counted (a spoofing flood must not
# grow memory).
MAX_EXPORTERS = 1024
_RETRY_COMMIT = 1.0
# getsockopt(SOL_SOCKET, SO_MEMINFO): u32 counters, SK_MEMINFO_DROPS the ninth (linux/sock_diag.h).
SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)
_MEMINFO = struct.Struct("=9I")
_MEMINFO_DROPS = 8
# A kernel-drop episode ends (and the next one is warned about again) after this long without new drops.
KERNEL_DROP_QUIET = 60.0
# Linux reports (and uses) twice the value set with SO_RCVBUF, for its bookkeeping overhead.
_RCVBUF_FACTOR = 2 if sys.platform.startswith("linux") else 1
# SO_RCVBUFFORCE sets the buffer past net.core.rmem_max (with CAP_NET_ADMIN). Python's socket module does not
# export it, so this is Linux's value from asm-generic/socket.h (alpha, mips, parisc and sparc differ: there
# the agent does without).
_SO_RCVBUFFORCE: int | None = getattr(socket, "SO_RCVBUFFORCE", None)
if _SO_RCVBUFFORCE is None and sys.platform.startswith("linux") and not platform.machine().startswith(
    ("alpha", "mips", "parisc", "sparc")
):
    _SO_RCVBUFFORCE = 33
# Socket reading (see the module docstring): poll every POLL_INTERVAL to POLL_MAX seconds while each poll
# finds at least POLL_MIN datagrams: a poll finds about POLL_FILL datagrams at the rate the last one saw, and
# the kernel's receive buffer holds twice what FLOOD_RATE brings between two polls (its bytes as the kernel
# counts them: 100k flows/s of softflowd v9 is ~3,600 datagrams/s of ~2.3 KB each). Read at most MAX_DRAIN
# per callback, so other callbacks get their turn in a flood.
POLL_INTERVAL = 0.02
POLL_MAX = 0.1
POLL_MIN = 2
POLL_FILL = 64
FLOOD_RATE = 8 << 20
MAX_DRAIN = 512
MAX_DATAGRAM = 65535  # the largest UDP payload (IPv4)


def kernel_drops(sock: socket.socket) -> int | None:
    """The kernel's cumulative drop counter of ``sock`` (a u32 that wraps), or ``None`` if unavailable."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO.size)
    except OSError:
        return None
    if len(raw) < _MEMINFO.size:
        return None
    return int(_MEMINFO.unpack_from(raw)[_MEMINFO_DROPS])


@dataclass(slots=True)
class ReceiverStats:
    """Counters of the receiver; ``drops`` and ``malformed`` are keyed by cause."""

    datagrams: int = 0
    wakeups: int = 0  # socket reads (callbacks); datagrams / wakeups is how many each one found
    bytes: int = 0
    spooled: int = 0
    drops: Counter[str] = field(default_factory=Counter)
    malformed: Counter[str] = field(default_factory=Counter)
    # "ip:port" → [datagrams, last seen (unix seconds)]
    exporters: dict[str, list[float]] = field(default_factory=dict)
    exporters_untracked: int = 0
    rcvbuf: dict[str, int] = field(default_factory=dict)
    # listen address → datagrams the kernel dropped at that socket (``None``: cannot be counted here); their
    # sum is ``drops["kernel_rcvbuf"]``
    kernel_drops: dict[str, int | None] = field(default_factory=dict)
    # "ip:port/vN/domain" → sequence tracker (v5 and v9 only: IPFIX counts records, which needs decoding;
    # the gateway's decoder tracks every version). The version is part of the key because v5 counts flows and
    # v9 packets; the port because one host often runs several exporters (a restarted exporter on a new port
    # starts a new stream instead of counting a bogus gap).
    sequences: dict[str, SequenceTracker] = field(default_factory=dict)

    def upstream_loss(self) -> dict[str, dict[str, int]]:
        """Loss between exporters and this agent, from export sequence numbers, per exporter/domain."""
        out: dict[str, dict[str, int]] = {}
        for key, tracker in sorted(self.sequences.items()):
            st = tracker.stats()
            out[key] = {"lost": st.lost, "received": st.received, "resets": st.resets}
        return out


class _Reader:
    """One listening socket, read on readiness while datagrams come slowly, polled while they come fast."""

    def __init__(
        self, receiver: Receiver, sock: socket.socket, loop: asyncio.AbstractEventLoop, *,
        poll_max: float = POLL_MAX,
    ) -> None:
        self._receiver = receiver
        self._sock = sock
        self._fd = sock.fileno()
        self._local_port = int(sock.getsockname()[1])
        self._loop = loop
        self._armed = False
        self._timer: asyncio.TimerHandle | None = None
        self._last_wake = float("-inf")
        # The longest wait between polls: with a receive buffer too small for POLL_MAX of a flood, less.
        given = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self._poll_max = max(POLL_INTERVAL, min(poll_max, given / (2 * FLOOD_RATE)))

    def arm(self) -> None:
        self._loop.add_reader(self._fd, self._on_readable)
        self._armed = True

    def close(self) -> None:
        if self._armed:
            self._loop.remove_reader(self._fd)
            self._armed = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_readable(self) -> None:
        now = time.monotonic()
        n = self._drain()
        elapsed = now - self._last_wake
        self._last_wake = now
        if n >= POLL_MIN:  # a burst: the rate is not known yet
            self._poll(POLL_INTERVAL)
        elif elapsed < self._poll_max / 2:  # datagrams come closer than polls would be
            self._poll(self._interval(1, elapsed))

    def _poll(self, delay: float) -> None:
        self._loop.remove_reader(self._fd)
        self._armed = False
        self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = time.monotonic()
        elapsed = now - self._last_wake
        self._last_wake = now
        n = 0
        try:
            n = self._drain()
        finally:  # whatever happened, the socket stays read: by the next poll, or on readiness
            self._reschedule(n, elapsed)

    def _reschedule(self, n: int, elapsed: float) -> None:
        if n >= MAX_DRAIN:  # a backlog in the kernel's buffer: read on after other callbacks had their turn
            self._timer = self._loop.call_later(0.0, self._on_timer)
        elif n >= POLL_MIN:
            self._timer = self._loop.call_later(self._interval(n, elapsed), self._on_timer)
        else:
            self.arm()

    def _interval(self, n: int, elapsed: float) -> float:
        """The next poll's delay after ``n`` datagrams came in ``elapsed`` seconds: long enough that it finds
        about POLL_FILL datagrams at that rate, within POLL_INTERVAL .. the longest wait."""
        if elapsed <= 0:
            return POLL_INTERVAL
        return min(self._poll_max, max(POLL_INTERVAL, POLL_FILL * elapsed / n))

    def _drain(self) -> int:
        """Read up to ``MAX_DRAIN`` datagrams, until the socket is empty; how many."""
        self._receiver.stats.wakeups += 1
        recv = self._sock.recvfrom
        handle = self._receiver._on_datagram
        port = self._local_port
        n = 0
        while n < MAX_DRAIN:
            try:
                data, addr = recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._receiver._once.warning(f"socket-{type(exc).__name__}", "UDP socket error: %s", exc)
                break
            handle(data, addr[0], addr[1], port)
            n += 1
        return n


class Receiver:
    """Listens on each address and spools what arrives.

    ``on_spooled`` is called (in the loop) after every commit that stored datagrams, so the uploader wakes;
    ``on_committed(result, datagrams)`` before it, with the spool's ``AppendResult`` and the datagrams of
    that commit (the uploader keeps the newest in memory instead of reading them back).

    Error handling: a listen address that cannot be bound raises ``OSError`` from ``start`` naming it; a spool
    error during commit keeps the chunk and retries every second (logged once per cause), while new datagrams
    beyond the buffer count as ``receiver_overflow``. Spool quota drops are counted as ``spool_full`` by the
    log itself (``LogStats.dropped_oldest`` / ``refused``). Datagrams the kernel dropped at a socket are
    counted as ``kernel_rcvbuf`` by ``poll_kernel_drops`` (call it before reporting drops; ``stop_receiving``
    does once more), with one WARNING per episode.

    Resource handling: ``start`` opens the sockets, ``stop_receiving`` closes them; ``run`` (the committer)
    runs until cancelled; ``flush`` commits whatever is buffered.
    """

    def __init__(
        self,
        addresses: Sequence[ListenAddress],
        spool: DurableLog,
        *,
        rcvbuf: int,
        buffer_limit: int,
        commit_interval: float,
        commit_max: int = 4096,
        commit_bytes: int = 0,
        commit_wait: float = 0.0,
        on_spooled: Callable[[], None] | None = None,
        on_committed: Callable[[AppendResult, list[Datagram]], None] | None = None,
    ) -> None:
        self._addresses = tuple(addresses)
        self._spool = spool
        self._rcvbuf = rcvbuf
        self._limit = buffer_limit
        self._interval = commit_interval
        self._commit_max = commit_max
        self._commit_bytes = commit_bytes
        self._commit_wait = max(commit_wait, commit_interval)
        self._buffered_bytes = 0  # payload bytes in _buffer
        # When the oldest datagram in _buffer was read (monotonic; set as the buffer stops being empty, never
        # later than that datagram's read): a commit waiting for commit_bytes waits commit_wait from it.
        self._oldest = float("-inf")
        self._enough = asyncio.Event()  # set once commit_bytes are buffered
        self._on_spooled = on_spooled
        self._on_committed = on_committed
        self._buffer: deque[Datagram] = deque()
        self._pending = asyncio.Event()
        self._readers: list[_Reader] = []
        self._commit_lock = asyncio.Lock()
        self._once = OnceLogger(logger)
        self._disk_full = False  # the last commit failed for want of disk space
        self._sockets: list[tuple[str, socket.socket]] = []
        self._kernel_seen: dict[str, int] = {}  # listen address → last raw (u32) kernel drop counter
        self._kernel_last_drop: float | None = None  # monotonic time of the last new kernel drop seen
        self._kernel_unavailable_logged = False
        self.stats = ReceiverStats()
        self.bound: list[tuple[str, int]] = []

    # -- sockets ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for addr in self._addresses:
                sock = self._open_socket(addr)
                self._sockets.append((str(addr), sock))
                # Polls at most a quarter of a commit's wait apart (latency 1 s: 0.1 s; 0.05 s: 0.02 s).
                reader = _Reader(self, sock, loop, poll_max=self._commit_wait / 4)
                self._readers.append(reader)
                reader.arm()
        except BaseException:
            self.stop_receiving()
            raise

    def _open_socket(self, addr: ListenAddress) -> socket.socket:
        family = socket.AF_INET6 if addr.family_v6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                # "::" must not swallow IPv4: a separate udp://0.0.0.0 listener can then coexist.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            given, short = self._set_rcvbuf(sock)
            try:
                sock.bind((addr.host, addr.port))
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {addr}: {exc.strerror}") from None
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        host, port = sock.getsockname()[:2]
        self.bound.append((host, port))
        self.stats.rcvbuf[str(addr)] = given
        # What the kernel reports (Linux doubles the value set, for its bookkeeping) is what we report.
        if short is not None:
            logger.warning(
                "listening on %s with a receive buffer of %d bytes (as the kernel counts it), below the %d "
                "asked for: %s; to absorb exporter bursts raise net.core.rmem_max (sysctl -w "
                "net.core.rmem_max=%d) or give the agent CAP_NET_ADMIN", addr, given, self._rcvbuf, short,
                self._rcvbuf,
            )
        else:
            logger.info("listening on %s (receive buffer %d bytes)", addr, given)
        baseline = kernel_drops(sock)
        if baseline is None:
            self.stats.kernel_drops[str(addr)] = None
            if not self._kernel_unavailable_logged:
                self._kernel_unavailable_logged = True
                logger.info(
                    "datagrams the kernel drops at a full receive buffer cannot be counted on this system "
                    "(no SO_MEMINFO: Linux >= 4.6 needed); status shows them as unknown",
                )
        else:
            self.stats.kernel_drops[str(addr)] = 0
            self._kernel_seen[str(addr)] = baseline
        return sock

    def _set_rcvbuf(self, sock: socket.socket) -> tuple[int, str | None]:
        """Ask for ``rcvbuf``; if ``net.core.rmem_max`` caps it, force it with ``SO_RCVBUFFORCE`` (which needs
        CAP_NET_ADMIN, i.e. root). Returns the size the kernel reports and, when that is short of what was
        asked, why (for the warning)."""
        asked = self._rcvbuf
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, asked)
        given = int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
        if given >= asked * _RCVBUF_FACTOR:
            return given, None
        capped = f"SO_RCVBUF capped at {given} bytes by net.core.rmem_max"
        if _SO_RCVBUFFORCE is None:
            return given, f"{capped} and SO_RCVBUFFORCE does not exist on this system"
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, asked)
        except OSError as exc:
            if exc.errno == errno.EPERM:
                return given, f"{capped} and SO_RCVBUFFORCE not permitted (needs CAP_NET_ADMIN)"
            return given, f"{capped} and SO_RCVBUFFORCE failed: {exc.strerror}"
        forced = int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
        logger.info("SO_RCVBUF capped at %d bytes by net.core.rmem_max; SO_RCVBUFFORCE gave %d",
                    given, forced)
        if forced < asked * _RCVBUF_FACTOR:
            return forced, f"{capped} and SO_RCVBUFFORCE gave only {forced} bytes"
        return forced, None

    def poll_kernel_drops(self) -> int:
        """Read each socket's kernel drop counter; add what is new to ``kernel_rcvbuf``; return how many.

        Cheap (one syscall per socket) and loop-safe. The first new drops after a quiet spell of
        ``KERNEL_DROP_QUIET`` seconds log one WARNING with the count and what to raise.
        """
        stats = self.stats
        new_total = 0
        per_socket: list[str] = []
        for name, sock in self._sockets:
            last = self._kernel_seen.get(name)
            if last is None or sock.fileno() < 0:
                continue
            raw = kernel_drops(sock)
            if raw is None:
                continue
            new = (raw - last) & 0xFFFFFFFF  # the kernel's counter is a wrapping u32
            self._kernel_seen[name] = raw
            if new:
                stats.kernel_drops[name] = (stats.kernel_drops.get(name) or 0) + new
                per_socket.append(f"{name}: {new}")
                new_total += new
        now = time.monotonic()
        if new_total:
            stats.drops["kernel_rcvbuf"] += new_total
            quiet = self._kernel_last_drop is None or now - self._kernel_last_drop >= KERNEL_DROP_QUIET
            self._kernel_last_drop = now
            if quiet:
                logger.warning(
                    "the kernel dropped %d datagrams at the agent's UDP socket (%s; %d in total): its "
                    "receive buffer (%s bytes) overflowed before the agent could read them. Raise --rcvbuf "
                    "and net.core.rmem_max (as root: sysctl -w net.core.rmem_max=%d); further drops in this "
                    "episode are counted as kernel_rcvbuf, not logged",
                    new_total, ", ".join(per_socket), stats.drops["kernel_rcvbuf"],
                    "/".join(str(v) for v in stats.rcvbuf.values()), max(4 * self._rcvbuf, 64 << 20),
                )
        elif self._kernel_last_drop is not None and now - self._kernel_last_drop >= KERNEL_DROP_QUIET:
            self._kernel_last_drop = None
            logger.info("the kernel stopped dropping datagrams at the agent's sockets (%d dropped in total)",
                        stats.drops["kernel_rcvbuf"])
        return new_total

    def stop_receiving(self) -> None:
        """Close the sockets, after a last read of their kernel drop counters."""
        self.poll_kernel_drops()
        for reader in self._readers:
            reader.close()
        self._readers.clear()
        for _, sock in self._sockets:
            sock.close()
        self._sockets.clear()

    def _on_datagram(self, data: bytes, host: str, port: int, local_port: int) -> None:
        stats = self.stats
        stats.datagrams += 1
        stats.bytes += len(data)
        now_ns = time.time_ns()
        key = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        seen = stats.exporters.get(key)
        if seen is not None:
            seen[0] += 1
            seen[1] = now_ns / 1e9
        elif len(stats.exporters) < MAX_EXPORTERS:
            stats.exporters[key] = [1, now_ns / 1e9]
        else:
            stats.exporters_untracked += 1
        cause = check_datagram(data)
        if cause is None:
            self._track_sequence(data, host, port)
        else:
            stats.malformed[cause] += 1
            self._once.warning(
                f"malformed-{cause}", "datagram from %s is not a valid export datagram (%s, %d bytes); "
                "carried anyway", key, cause, len(data),
            )
        if len(self._buffer) >= self._limit:
            if self._disk_full:
                stats.drops["disk_full"] += 1
                self._once.warning(
                    "disk_full", "spool disk full and receive buffer full (%d datagrams): dropping new "
                    "datagrams until the spool can be written again", self._limit,
                )
                return
            stats.drops["receiver_overflow"] += 1
            self._once.warning(
                "receiver_overflow", "receive buffer full (%d datagrams): the spool is not keeping up, "
                "dropping new datagrams", self._limit,
            )
            return
        self._buffer.append(Datagram(
            received_ns=now_ns, exporter=host, exporter_port=port, local_port=local_port, payload=data,
        ))
        self._buffered_bytes += len(data)
        if len(self._buffer) == 1:
            self._oldest = time.monotonic()
        if len(self._buffer) == 1 or len(self._buffer) >= self._commit_max:
            self._pending.set()
        if self._buffered_bytes >= self._commit_bytes or len(self._buffer) >= self._commit_max:
            self._enough.set()

    def _track_sequence(self, data: bytes, host: str, port: int) -> None:
        """Account the export sequence number of a (well-formed) v5 or v9 datagram."""
        fields = export_sequence(data)
        if fields is None:
            return
        version, units, sequence, domain, uptime = fields
        key = f"[{host}]:{port}/v{version}/{domain}" if ":" in host else f"{host}:{port}/v{version}/{domain}"
        tracker = self.stats.sequences.get(key)
        if tracker is None:
            if len(self.stats.sequences) >= MAX_EXPORTERS:
                return
            tracker = SequenceTracker(reorder_window=_REORDER_WINDOW, max_gap=_MAX_GAP)
            self.stats.sequences[key] = tracker
        lost, _ = tracker.update(sequence, units, uptime)
        if lost:
            self._once.warning(
                f"upstream-loss-{key}", "exporter %s lost %d units before this agent (export sequence gap)",
                key, lost,
            )

    # -- group commit ----------------------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    async def run(self) -> None:
        """The committer: appends buffered datagrams to the spool until cancelled."""
        while True:
            await self._pending.wait()
            if len(self._buffer) < self._commit_max:
                # Let a burst gather so one transaction (one fsync) covers it.
                await asyncio.sleep(self._interval)
                if self._commit_bytes:
                    await self._gather()
            self._pending.clear()
            try:
                await self.flush()
            except LogError:
                await asyncio.sleep(_RETRY_COMMIT)
            if self._buffer:
                self._pending.set()

    async def _gather(self) -> None:
        """A quiet site: wait until ``commit_bytes`` are buffered, or the oldest datagram buffered has waited
        ``commit_wait``. A flush meanwhile (the uploader's, before each batch) takes the buffer: what comes
        after it waits from its own arrival, not from the datagram that flush took (issue 14: at 1,000
        flows/s the wait that began before the uploader's flush ended a fraction of a second after it, a
        second commit for the few datagrams in between: 1.8 commits a second instead of one per batch)."""
        while self._buffer and not self._enough.is_set():
            oldest = self._oldest
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(oldest + self._commit_wait - time.monotonic()):
                    await self._enough.wait()
            if self._oldest == oldest:  # still the same oldest datagram: it has waited long enough
                return

    def _took(self, chunk: list[Datagram], sign: int) -> None:
        """Account ``chunk`` taken out of the buffer (``sign`` -1) or put back (+1)."""
        self._buffered_bytes += sign * sum(len(d.payload) for d in chunk)
        if self._buffered_bytes < self._commit_bytes and len(self._buffer) < self._commit_max:
            self._enough.clear()
        else:
            self._enough.set()

    async def flush(self) -> None:
        """Commit what is buffered now (datagrams arriving meanwhile wait for the next commit).

        Raises ``LogError`` if the spool fails; the failed chunk goes back to the front of the buffer.
        """
        async with self._commit_lock:
            todo = len(self._buffer)
            while todo > 0 and self._buffer:
                # Take the chunk out before handing it to the thread: if this task is cancelled meanwhile, the
                # thread still commits it, and nobody may commit it a second time.
                take = min(self._commit_max, todo, len(self._buffer))
                chunk = [self._buffer.popleft() for _ in range(take)]
                todo -= len(chunk)
                self._took(chunk, -1)
                try:
                    result = await asyncio.to_thread(self._spool.append, chunk)
                except LogError as exc:
                    self._buffer.extendleft(reversed(chunk))
                    self._took(chunk, 1)
                    self._oldest = float("-inf")  # read before anything buffered: no more waiting for them
                    self._disk_full = isinstance(exc, LogFull)
                    self._once.warning(f"spool-{type(exc).__name__}", "cannot write to the spool: %s", exc)
                    raise
                if self._disk_full:
                    self._disk_full = False
                    logger.info("spool writable again (%d datagrams dropped while its disk was full so far)",
                                self.stats.drops["disk_full"])
                self.stats.spooled += len(chunk)
                if self._on_committed is not None:
                    self._on_committed(result, chunk)
                if self._on_spooled is not None:
                    self._on_spooled()
