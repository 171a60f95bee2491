"""Wiring of the agent: spool + receiver + uploader + status file, started and stopped in order.

``run_agent(config, stop)`` is what ``flowtunnel agent`` runs under ``runtime.run_daemon``. Shutdown (SIGTERM,
SIGINT) stops receiving first, flushes the in-memory buffer into the spool, gives the uploader a bounded
moment to send what is left, then closes everything; whatever was not acknowledged stays in the spool for
the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

from flowtunnel.agent.config import AgentConfig, load_key, parse_host_port
from flowtunnel.agent.receiver import Receiver
from flowtunnel.agent.uploader import Uploader
from flowtunnel.datadir import create_private_file, prepare_private_dir
from flowtunnel.errors import ConfigError, describe_os_error
from flowtunnel.log import DurableLog, LogConfig, LogError, LogStats
from flowtunnel.runtime import OnceLogger, TaskSet, limit_malloc_arenas
from flowtunnel.statusfile import write_json_atomic

if TYPE_CHECKING:  # aiohttp (its server) is imported only when --metrics-listen asks for it
    from flowtunnel.agent.metrics import AgentMetricsServer

__all__ = ["SPOOL_FILE", "STATUS_FILE", "AgentService", "run_agent"]

logger = logging.getLogger(__name__)

SPOOL_FILE = "spool.sqlite"
# The spool's SQLite page cache, KiB: a spool that grows (gateway unreachable) filled the default 2 MB cache
# with pages not read again (uploads come from the in-memory tail): 1.7 MB of RSS; a commit's pages fit here.
SPOOL_CACHE_KIB = 256
STATUS_FILE = "status.json"
LOCK_FILE = "agent.lock"
#: An unchanged status is rewritten this often anyway, so that readers tell a running agent from a dead one
#: (``flowtunnel status`` calls a file older than ``agent.status.STALE_AFTER``, 30 s, stale). Between
#: heartbeats a quiet site's status costs no worker thread and no disk write (issue 14).
STATUS_HEARTBEAT = 10.0
#: A quiet site's datagrams wait for ``--commit-bytes`` at most ``--latency``, and never longer than this: a
#: long latency target (minutes, on a metered link) must not widen the loss window of a ``kill -9`` with it.
COMMIT_WAIT_MAX = 5.0


class AgentService:
    """The running agent. ``start`` binds and begins; ``shutdown`` stops in order; ``status`` describes it.

    Error handling: a spool already used by another agent process, an unreadable key or an address that
    cannot be bound raise ``ConfigError`` from ``start`` (the CLI exits 2 with the message).

    Resource handling: holds the spool lock file, the sockets, the spool database and an HTTP session from
    ``start`` until ``shutdown`` returns.
    """

    def __init__(self, config: AgentConfig, *, key: bytes | None = None) -> None:
        self.config = config
        self._key = key
        self._tasks = TaskSet()
        self._once = OnceLogger(logger)
        self._lock: IO[str] | None = None
        self._spool: DurableLog | None = None
        self._receiver: Receiver | None = None
        self._uploader: Uploader | None = None
        self._upload_task: asyncio.Task[None] | None = None
        self._started = time.time()
        self._last_rates: tuple[float, int, int] | None = None
        self._spool_full = 0  # spool quota drops, refreshed from a worker thread with the status
        self._rates: dict[str, float] = {}
        self._drops_total: int | None = None  # at the last status; the first one is the baseline
        self._drops_changed: float | None = None
        self._last_status: dict[str, object] | None = None  # what /metrics serves
        # The spool snapshot of the last status written, what that status said (but its time) and when
        # (monotonic): the status loop skips a rewrite that would only change the time.
        self._spool_seen: tuple[LogStats, float | None] | None = None
        self._written: tuple[object, float] | None = None
        self._metrics: AgentMetricsServer | None = None

    @property
    def spool(self) -> DurableLog:
        assert self._spool is not None, "AgentService.start() was not called"
        return self._spool

    @property
    def receiver(self) -> Receiver:
        assert self._receiver is not None, "AgentService.start() was not called"
        return self._receiver

    @property
    def uploader(self) -> Uploader:
        assert self._uploader is not None, "AgentService.start() was not called"
        return self._uploader

    async def start(self) -> None:
        cfg = self.config
        key = self._key if self._key is not None else load_key(cfg)
        spool_dir = cfg.spool_dir
        # Private (0700, datagrams in clear); someone else's or a group-writable one is refused.
        prepare_private_dir(spool_dir, what="spool directory")
        self._lock = _lock_spool(spool_dir)
        try:
            create_private_file(spool_dir / SPOOL_FILE)  # SQLite gives -wal and -shm the same mode
            log_config = LogConfig(
                path=spool_dir / SPOOL_FILE, quota_bytes=0, disk_quota_bytes=cfg.spool_quota,
                full_policy=cfg.full_policy, cache_kib=SPOOL_CACHE_KIB,
            )
            self._spool = await asyncio.to_thread(DurableLog, log_config)
            self._uploader = Uploader(cfg, key, self._spool, dropped=self.drops)
            self._receiver = Receiver(
                cfg.listen_addresses, self._spool, rcvbuf=cfg.rcvbuf, buffer_limit=cfg.buffer_datagrams,
                commit_interval=cfg.commit_interval, commit_bytes=cfg.commit_bytes,
                commit_wait=min(cfg.latency, COMMIT_WAIT_MAX),
                on_spooled=self._uploader.notify,
                on_committed=self._uploader.spooled,
            )
            self._uploader.before_batch = self._commit_buffered
            try:
                await self._receiver.start()
            except OSError as exc:
                raise ConfigError(str(exc.strerror or exc)) from None
            await self._uploader.open()
            if cfg.metrics_listen is not None:
                from flowtunnel.agent.metrics import AgentMetricsServer

                host, port = parse_host_port(cfg.metrics_listen, what="metrics-listen")
                self._metrics = AgentMetricsServer(host, port, lambda: self._last_status)
                await self._metrics.start()
            self._tasks.spawn(self._receiver.run(), name="agent-spool-commit")
            self._upload_task = self._tasks.spawn(self._uploader.run(), name="agent-upload")
            self._tasks.spawn(self._status_loop(), name="agent-status")
            await self.write_status()
        except BaseException:
            await self._tasks.close()
            await self._close()
            raise
        logger.info(
            "agent %s running: spool %s (%d datagrams waiting)",
            cfg.agent_id, spool_dir, self.spool.stats().entries,
        )

    async def shutdown(self) -> None:
        """Stop receiving, flush to the spool, try a last upload (bounded), close everything."""
        receiver, uploader = self._receiver, self._uploader
        if receiver is not None:
            receiver.stop_receiving()
            with contextlib.suppress(Exception):
                await receiver.flush()
            if receiver.buffered:
                logger.error(
                    "shutdown: %d received datagrams could not be written to the spool", receiver.buffered
                )
        if self._upload_task is not None:
            self._upload_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._upload_task
        if uploader is not None and self.config.shutdown_timeout > 0:
            done = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.shutdown_timeout):
                    done = await uploader.drain()
            if not done and self._spool is not None:
                logger.info("shutdown: %d datagrams stay in the spool for the next start",
                            self._spool.stats().entries)
        await self._tasks.close()
        if self._spool is not None:
            with contextlib.suppress(Exception):
                await self.write_status()
        await self._close()

    async def _close(self) -> None:
        if self._metrics is not None:
            await self._metrics.close()
            self._metrics = None
        if self._receiver is not None:
            self._receiver.stop_receiving()
        if self._uploader is not None:
            await self._uploader.close()
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    async def _commit_buffered(self) -> None:
        """Commit what the receiver buffers, before the uploader reads a batch. A spool that cannot be
        written must not stall the uploader (its trims free the space): the committer retries and reports."""
        with contextlib.suppress(LogError):
            await self.receiver.flush()

    # -- status ----------------------------------------------------------------------------------------------

    def drops(self) -> dict[str, int]:
        """Datagrams dropped by the agent, by cause (spool counters survive restarts, the others do not).

        Cheap and loop-safe: the spool's count is the one read with the last status; the kernel's drop
        counters are read now (one syscall per socket).
        """
        out: dict[str, int] = {}
        if self._receiver is not None:
            self._receiver.poll_kernel_drops()
            out.update(self._receiver.stats.drops)
        out["spool_full"] = self._spool_full
        return out

    def status(self, spool: LogStats | None = None, *, oldest: float | None = None) -> dict[str, object]:
        """A JSON-able snapshot: what ``status.json`` holds and ``flowtunnel status --spool`` renders.

        Call it on the event loop (it reads counters the loop updates); pass ``spool`` stats (and the
        receive time of the oldest spooled datagram, ``oldest``) read in a worker thread to keep the spool's
        lock off the loop.
        """
        cfg = self.config
        if spool is None:
            spool = self.spool.stats()
        self._spool_full = spool.dropped_oldest + spool.refused
        rec = self.receiver.stats
        up = self.uploader.status()
        now = time.time()
        self._update_rates(now, rec.datagrams, int(self.uploader.stats.sent_bytes))
        drops = self.drops()
        total = sum(drops.values())
        if self._drops_total is not None and total > self._drops_total:
            self._drops_changed = now
        self._drops_total = total
        return {
            "kind": "agent",
            "agent_id": cfg.agent_id,
            "pid": os.getpid(),
            "started": self._started,
            "updated": now,
            "listen": [f"udp://[{h}]:{p}" if ":" in h else f"udp://{h}:{p}" for h, p in self.receiver.bound],
            "rcvbuf": dict(rec.rcvbuf),
            "gateway": up["gateway"],  # the one in use (of --gateway's list)
            "gateway_acked": up["acked"],
            "backlog": {"datagrams": spool.entries, "bytes": spool.bytes,
                        "oldest_received": oldest if spool.entries else None},
            "spool": {
                "path": str(cfg.spool_dir / SPOOL_FILE),
                "first_seq": spool.first_seq,
                "last_seq": spool.last_seq,
                # The spool quota bounds every file of the spool (disk_bytes), not only the data (backlog).
                "quota_bytes": spool.disk_quota_bytes or spool.quota_bytes,
                "file_bytes": spool.file_bytes,
                "disk_bytes": spool.disk_bytes,
                "policy": cfg.full_policy.value,
                "torn_tails": spool.torn_tails,
                "disk_full": spool.disk_full,
            },
            "received": {"datagrams": rec.datagrams, "bytes": rec.bytes, "buffered": self.receiver.buffered},
            "rates": dict(self._rates),
            "upload": up,
            "compression_ratio": up["compression_ratio"],
            "drops": drops,
            "drops_changed": self._drops_changed,
            # per listen address; None where the kernel's counter cannot be read (drops not countable)
            "kernel_drops": dict(rec.kernel_drops),
            "malformed": dict(rec.malformed),
            "upstream_loss": rec.upstream_loss(),
            "exporters": {
                k: {"datagrams": int(v[0]), "last_seen": v[1]} for k, v in sorted(rec.exporters.items())
            },
            "exporters_untracked": rec.exporters_untracked,
        }

    def _update_rates(self, now: float, datagrams_in: int, bytes_out: int) -> None:
        prev = self._last_rates
        self._last_rates = (now, datagrams_in, bytes_out)
        if prev is None or now - prev[0] < 0.5:
            return
        span = now - prev[0]
        self._rates = {
            "datagrams_in_per_s": round((datagrams_in - prev[1]) / span, 1),
            "bytes_out_per_s": round((bytes_out - prev[2]) / span, 1),
        }

    async def write_status(self, *, only_if_changed: bool = False) -> bool:
        """Rewrite ``status.json`` (spool stats and the file write in a worker thread); True if written.

        ``only_if_changed`` (the status loop): when the status, rebuilt on the loop from the last spool
        snapshot, says what the file says but for its time, and the file is younger than
        ``STATUS_HEARTBEAT``, nothing is done. Every change to the spool comes with one the loop sees
        (datagrams received or committed, an acknowledgement), so a skipped rewrite misses nothing.
        """
        if only_if_changed and self._written is not None and self._spool_seen is not None:
            spool_seen, oldest_seen = self._spool_seen
            doc = self.status(spool_seen, oldest=oldest_seen)
            if self._status_key(doc) == self._written[0] and (
                    time.monotonic() - self._written[1] < STATUS_HEARTBEAT):
                self._last_status = doc  # the same figures, as of now
                return False
        spool, oldest = await asyncio.to_thread(self._spool_snapshot)
        doc = self._last_status = self.status(spool, oldest=oldest)
        await asyncio.to_thread(
            functools.partial(write_json_atomic, self.config.spool_dir / STATUS_FILE, doc, durable=False)
        )
        self._spool_seen = (spool, oldest)
        self._written = (self._status_key(doc), time.monotonic())
        return True

    def _status_key(self, doc: dict[str, object]) -> object:
        """What a status says, but when: its contents without ``updated``, and the datagrams committed to
        the spool so far (a commit after a write changes the spool's figures, which the loop cannot see)."""
        return {k: v for k, v in doc.items() if k != "updated"}, self.receiver.stats.spooled

    def _spool_snapshot(self) -> tuple[LogStats, float | None]:
        """Spool stats and the receive time (Unix seconds) of the oldest spooled datagram (worker thread)."""
        stats = self.spool.stats()
        oldest = None
        if stats.entries:
            first = self.spool.read(after=stats.first_seq - 1, limit=1, max_bytes=1 << 17)
            if first:
                oldest = first[0].datagram.received_ns / 1e9
        return stats, oldest

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.status_interval)
            try:
                await self.write_status(only_if_changed=True)
            except (OSError, LogError) as exc:
                self._once.warning(f"status-{type(exc).__name__}", "cannot write %s: %s",
                                   self.config.spool_dir / STATUS_FILE, exc)


def _lock_spool(spool_dir: Path) -> IO[str]:
    """Take an exclusive lock on the spool: two agents on one spool would send every datagram twice."""
    path = spool_dir / LOCK_FILE
    try:
        fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the agent's lifetime
    except OSError as exc:  # read-only filesystem, no permission, a directory in the way
        raise ConfigError(f"cannot open the spool's lock file: {describe_os_error(exc)}") from None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise ConfigError(f"spool {spool_dir} is in use by another agent (pid {holder})") from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
    except OSError as exc:  # a full disk
        with contextlib.suppress(OSError):
            fh.close()  # flushes again, and fails the same way
        raise ConfigError(f"cannot write the spool's lock file {path}: {exc.strerror}") from None
    return fh


async def run_agent(config: AgentConfig, stop: asyncio.Event) -> int:
    """Run the agent until ``stop`` is set; 0 on a clean stop. Raises ``ConfigError`` for startup problems."""
    limit_malloc_arenas()  # before the first worker thread
    service = AgentService(config)
    await service.start()
    try:
        await stop.wait()
        logger.info("stopping: flushing the receive buffer and sending what the gateway will take")
    finally:
        await service.shutdown()
    return 0
