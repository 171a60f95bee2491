"""The gateway process: journal, registry, HTTP server and sinks wired together, started and stopped in order.

Start: open the journal (refuse-new quota policy: nothing acknowledged is ever dropped), build the sinks,
start the HTTP server and log "listening on ..." only once it accepts connections. While running: each sink
runs under a supervisor that restarts it after a failure; every ``status_interval`` the journal is trimmed up
to the slowest sink's committed position and ``DATA/status.json`` is rewritten atomically.

Stop (SIGTERM/SIGINT): refuse new batches (503), stop listening, let in-flight requests finish, stop the sinks
one by one, write a last status, close the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import resource
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from flowtunnel import __version__
from flowtunnel.config import parse_duration
from flowtunnel.datadir import DirLock, PrivateUmask, create_private_file, prepare_private_dir
from flowtunnel.errors import ConfigError, describe_failure, describe_os_error
from flowtunnel.gateway.app import ADMISSION_KEY, HttpErrorLogger, build_app
from flowtunnel.gateway.budget import AgentBudgets, BudgetConfig, scan_journal_usage
from flowtunnel.gateway.config import GatewayConfig
from flowtunnel.gateway.console import (
    AgentThresholds,
    Console,
    ConsoleData,
    GuardSettings,
    OperatorAuth,
    RateHistory,
    add_console,
    guard_middleware,
    operator_access,
    read_token_file,
)
from flowtunnel.gateway.dns import DnsConfig, DnsEndpoint
from flowtunnel.gateway.ingest import Ingest
from flowtunnel.gateway.metrics import GatewayMetrics
from flowtunnel.gateway.notify import JournalNotify
from flowtunnel.gateway.pieces import PieceSettings
from flowtunnel.gateway.registry import AgentKeys, Registry, RegistryError
from flowtunnel.gateway.sinks.base import Sink
from flowtunnel.gateway.sinks.registry import SINK_KINDS, SinkSettings, build_sink, lock_sink
from flowtunnel.gateway.ws import WsSettings
from flowtunnel.health import silent_agents
from flowtunnel.journal import AgentJournal, SqliteAgentJournal
from flowtunnel.log import DurableLog, FullPolicy, LogConfig, LogError
from flowtunnel.runtime import OnceLogger, TaskSet, cancel_and_wait, settle_gc
from flowtunnel.statusfile import write_json_atomic
from flowtunnel.wire import WireLimits

if TYPE_CHECKING:
    from flowtunnel.gateway.kvregistry import KvAgentKeys, KvRegistry
    from flowtunnel.journal.jetstream import JetStreamJournal

__all__ = ["ADMIN_TOKEN_FILE", "JOURNAL_FILE", "LOCK_FILE", "STATUS_FILE", "Gateway", "run_gateway"]

log = logging.getLogger("flowtunnel.gateway")

JOURNAL_FILE = "journal.sqlite"
STATUS_FILE = "status.json"
#: Held (fcntl) by the gateway using the data directory: one writer, or exactly once does not hold.
LOCK_FILE = "gateway.lock"
#: The operator token a gateway uses when --admin-token-file is not given (``flowtunnel admin-token``).
ADMIN_TOKEN_FILE = "admin.token"


def _raise_fd_limit() -> None:
    """udp-forward holds a socket per (agent, exporter): lift the soft descriptor limit to the hard one."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class Gateway:
    """One running gateway. ``start()`` then ``stop()``; or ``run(stop_event)`` for both around a wait.

    Tests use this class directly; the CLI uses ``run_gateway``.
    """

    def __init__(self, config: GatewayConfig, *, extra_sinks: list[Sink] | None = None) -> None:
        self.config = config
        self.data_dir = config.data_dir
        self.metrics = GatewayMetrics()
        self.sinks: list[Sink] = []
        self._extra_sinks = list(extra_sinks or [])
        #: Position names of wanted sinks that could not be built: the journal keeps what they have not read.
        self._missing: list[str] = []
        self.journal: DurableLog | None = None
        #: What ingest appends to: the SQLite journal's async face, or the shared JetStream journal.
        self.agent_journal: AgentJournal | None = None
        self.shared_journal: JetStreamJournal | None = None
        self._kv_registry: KvRegistry | None = None
        self._kv_keys: KvAgentKeys | None = None
        self._shared_stats: dict[str, object] = {}
        self.ingest: Ingest | None = None
        self.budgets: AgentBudgets | None = None
        self.keys: AgentKeys | None = None
        self.notify: JournalNotify | None = None
        self.urls: list[str] = []
        self._runner: web.AppRunner | None = None
        self._sites: list[web.BaseSite] = []
        self.dns: DnsEndpoint | None = None
        self._tasks = TaskSet()
        self._sink_tasks: dict[str, asyncio.Task[None]] = {}
        self._started = time.time()
        self._trimmed = 0
        self._lock: DirLock | None = None
        self._sink_locks: list[DirLock] = []
        #: Sinks whose lock waits for their output to be usable (taken before each start until it is held).
        self._deferred_locks: dict[str, Callable[[], DirLock]] = {}
        self._umask = PrivateUmask()
        #: Per-agent wire byte samples for the console's upload rates (fed at each status rewrite).
        self.rates = RateHistory()
        self.auth: OperatorAuth | None = None
        self._guard = GuardSettings()
        self.console_data: ConsoleData | None = None
        self._token: str | None = None
        #: Pause before restarting a sink that failed.
        self.sink_restart_delay = 5.0

    # -- start --------------------------------------------------------------------------------------------

    def _build_sinks(self) -> list[Sink]:
        """The in-process sinks the config asks for, from the registry (``gateway/sinks/registry.py``)."""
        sinks: list[Sink] = []
        self._missing = []
        for kind in SINK_KINDS.values():
            if not kind.wanted(self.config):
                continue
            # A 'flowtunnel sink' of the same kind on these files would write them too: refused either way.
            take = functools.partial(lock_sink, kind.name, data_dir=self.data_dir,
                                     parquet=self.config.parquet, name=kind.position_name)
            deferred = None
            try:
                self._sink_locks.append(take())
            except OSError:
                # Its output cannot be made yet (a file where the parquet directory should be): the sink
                # fails and is restarted as any failing sink, and takes its lock once it can start.
                deferred = take
            settings = SinkSettings(config=self.config, data_dir=self.data_dir, metrics=self.metrics)
            if not kind.optional:
                sinks.append(build_sink(kind, settings))
                if deferred is not None:
                    self._deferred_locks[sinks[-1].name] = deferred
                continue
            try:
                sinks.append(build_sink(kind, settings))
                if deferred is not None:
                    self._deferred_locks[sinks[-1].name] = deferred
            except Exception as exc:
                # The journal keeps everything for this sink to catch up on after a restart that fixes this.
                log.error("%s sink cannot start (%s); running without it", kind.name, exc)
                self._missing.append(kind.position_name)
        sinks.extend(self._extra_sinks)
        return sinks

    async def start(self) -> None:
        _raise_fd_limit()
        # An unusable operator token file (readable by others, empty) refuses the start before anything runs.
        self._token = self._operator_token()
        # Private from the start (the journal holds datagrams in clear, the registry every key), and one
        # gateway per data directory: both refused with one line (ConfigError) before anything is written.
        prepare_private_dir(self.data_dir, what="data directory")
        self._lock = DirLock.acquire(self.data_dir, LOCK_FILE, what="gateway")
        self._umask.acquire()  # what libraries create on their own (DuckDB files) is 0600 too
        try:
            await self._start()
        except BaseException:
            # What _start opened before it failed (the journal and its threads, sinks, sites) is closed too:
            # a refused start leaves nothing running in the process.
            await self.stop()
            raise

    def _release_data_dir(self) -> None:
        for lock in self._sink_locks:
            lock.release()
        self._sink_locks = []
        self._umask.release()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    async def _start(self) -> None:
        cfg = self.config
        if cfg.journal:
            await self._start_shared_journal()
        else:
            await self._start_local_journal()
        assert self.budgets is not None
        assert self.keys is not None
        assert self.agent_journal is not None
        self.ingest = ingest = Ingest(
            journal=self.agent_journal, keys=self.keys, metrics=self.metrics,
            limits=WireLimits(max_body=cfg.max_body, max_raw=cfg.max_raw, max_count=cfg.max_batch_datagrams),
            retry_after=cfg.retry_after, budgets=self.budgets,
        )
        self.sinks = [] if cfg.journal else self._build_sinks()
        if cfg.journal:
            log.info("sinks run as separate processes on the shared journal ('flowtunnel sink ...')")
            ignored = [k.name for k in SINK_KINDS.values() if k.name != "store" and k.wanted(cfg)]
            if ignored:
                log.warning("%s ignored with --journal: run %s instead",
                            ", ".join(f"--{k}" for k in ignored),
                            ", ".join(f"'flowtunnel sink {k}'" for k in ignored))
        elif not self.sinks:
            log.warning("no sinks configured (no --forward, --jsonl, --parquet or store): the journal keeps "
                        "everything")
        for sink in self.sinks:
            self._sink_tasks[sink.name] = self._tasks.spawn(self._supervise(sink), name=f"sink:{sink.name}")
        app = build_app(
            ingest=ingest, metrics=self.metrics, serve_metrics=cfg.metrics, max_body=cfg.max_body,
            max_inflight=cfg.max_inflight, max_inflight_per_agent=cfg.max_inflight_per_agent,
            max_waiting=cfg.max_waiting, max_small=cfg.max_inflight_small, slot_wait=cfg.slot_wait,
            body_timeout=cfg.body_timeout,
            min_body_rate=cfg.min_body_rate, retry_after=cfg.retry_after,
            status=self.status if cfg.metrics else None, probe_rate=cfg.probe_rate,
            ws=WsSettings(
                max_body=cfg.max_body, max_connections=cfg.max_ws, max_per_agent=cfg.max_ws_per_agent,
                heartbeat=cfg.ws_heartbeat, idle_timeout=cfg.ws_idle_timeout, auth_timeout=cfg.body_timeout,
                retry_after=cfg.retry_after,
            ),
            pieces=PieceSettings(
                max_body=cfg.max_body, max_pieces=cfg.get_max_pieces,
                pending_per_agent=cfg.get_pending_per_agent, pending_bytes=cfg.get_pending_bytes,
                max_age=cfg.get_max_age, retry_after=cfg.retry_after,
            ),
        )
        app.router.add_get("/v1/health", self._health)
        self._install_console(app)
        self._runner = web.AppRunner(
            app, access_log=None, keepalive_timeout=cfg.keepalive_timeout, max_line_size=8190,
            max_field_size=8190, max_headers=64, shutdown_timeout=15.0, logger=HttpErrorLogger(self.metrics),
        )
        await self._runner.setup()
        ssl_ctx: ssl.SSLContext | None = None
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                ssl_ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
            except ssl.SSLError as exc:  # before OSError: SSLError is one
                raise ConfigError(
                    f"cannot load TLS certificate {cfg.tls_cert} with key {cfg.tls_key}: {exc.reason or exc}"
                ) from None
            except OSError as exc:
                raise ConfigError(f"cannot read TLS certificate or key: {describe_os_error(exc)}") from None
        # One site per listen address (plain HTTP and TLS side by side), in the order given; each one's
        # sockets are the runner's new addresses once it started (a host name may give several).
        for where in cfg.listen_addresses:
            before = list(self._runner.addresses)
            tls = ssl_ctx if where.scheme == "https" else None
            site = web.TCPSite(self._runner, where.host, where.port, ssl_context=tls, reuse_address=True)
            try:
                await site.start()
            except OSError as exc:
                reason = str(exc.strerror or exc).rsplit(": ", 1)[-1]  # asyncio's text repeats the address
                raise ConfigError(f"cannot listen on {where}: {reason}") from None
            self._sites.append(site)
            for addr in self._runner.addresses:
                if addr in before:
                    continue
                h, p = addr[0], addr[1]
                self.urls.append(f"{where.scheme}://[{h}]:{p}" if ":" in str(h) else f"{where.scheme}://{h}:{p}")
        if cfg.dns_zone is not None:
            host, port = cfg.dns_host_port
            self.dns = DnsEndpoint(DnsConfig(zone=cfg.dns_zone, host=host, port=port), ingest,
                                   admission=app[ADMISSION_KEY])
            try:
                await self.dns.start()
            except OSError as exc:
                raise ConfigError(f"cannot listen on {cfg.dns_listen} (DNS): {exc.strerror or exc}") from None
            self.urls.append(f"dns://{host}:{self.dns.port}/{cfg.dns_zone}")
        self._tasks.spawn(self._housekeeping(), name="gateway:housekeeping")
        log.info("listening on %s (data %s, sinks: %s)", ", ".join(self.urls), self.data_dir,
                 ", ".join(s.name for s in self.sinks) or "none")

    def _operator_token(self) -> str | None:
        """The operator token: ``admin_token_file``, else ``DATA/admin.token`` if it exists, else None.
        ``ConfigError`` when a configured or present file is unusable (readable by others, empty, ...)."""
        path = self.config.admin_token_file
        if path is None:
            default = self.data_dir / ADMIN_TOKEN_FILE
            if not default.exists():
                return None
            path = default
        return read_token_file(Path(path))

    def _install_console(self, app: web.Application) -> None:
        """Operator access to /metrics and /v1/status, and the console (docs/console.md)."""
        cfg = self.config
        token = self._token
        self.auth = auth = OperatorAuth(token, session_ttl=cfg.console_session, clock=time.monotonic)
        self._guard = guard = GuardSettings(metrics_public=cfg.metrics_public)
        app.middlewares.append(guard_middleware(auth, guard))
        if not cfg.metrics_public and token is None and cfg.metrics:
            log.info("no operator token (--admin-token-file, or 'flowtunnel admin-token --data %s'): "
                     "/metrics and /v1/status answer loopback only", self.data_dir)
        if not cfg.console:
            return
        if token is None:
            log.warning("console off: it needs an operator token (run 'flowtunnel admin-token --data %s', or "
                        "give --admin-token-file)", self.data_dir)

            async def off(request: web.Request) -> web.Response:
                return web.Response(status=503, text="the console is off: the gateway has no operator token "
                                    "(flowtunnel admin-token --data DIR, then restart the gateway)\n")

            app.router.add_get("/console", off)
            return
        self.console_data = data = ConsoleData(
            data_dir=self.data_dir, status=self.status, history=self.rates,
            thresholds=AgentThresholds(late=cfg.console_late, silent=cfg.console_silent),
        )
        add_console(app, Console(auth=auth, data=data, session_ttl=cfg.console_session))

    async def _start_local_journal(self) -> None:
        """The embedded default: the SQLite journal and the file registry in the data directory."""
        cfg = self.config
        Registry(self.data_dir).close()  # create it (0600) so the first lookup finds a valid file
        create_private_file(self.data_dir / JOURNAL_FILE)  # SQLite gives -wal and -shm the same mode
        self.journal = journal = await asyncio.to_thread(
            DurableLog,
            LogConfig(path=self.data_dir / JOURNAL_FILE, quota_bytes=0, disk_quota_bytes=cfg.journal_quota,
                      full_policy=FullPolicy.REFUSE_NEW, background_checkpoint=True),
        )
        self.notify = JournalNotify(journal.last_seq())
        self._restore_last_seen()
        self.keys = AgentKeys(self.data_dir, ttl=cfg.registry_ttl)
        # A share of 1 is the whole quota: the journal's own "journal-full" then says it better.
        share = int(cfg.journal_quota * cfg.journal_agent_share) if cfg.journal_agent_share < 1 else 0
        budget = BudgetConfig(rate=cfg.agent_rate, burst=cfg.agent_burst, share=share)
        self.budgets = budgets = AgentBudgets(budget)
        # What each agent already holds in the journal (one pass over it) counts against its share.
        budgets.seed(await asyncio.to_thread(scan_journal_usage, self.data_dir / JOURNAL_FILE))
        for agent_id in budgets.agents():
            self.metrics.held(agent_id, budgets.held(agent_id))
        # Every agent's mark, read once (the group commit keeps them): not one thread hop per agent.
        marks = await asyncio.to_thread(journal.states, "hwm:")
        self.agent_journal = SqliteAgentJournal(
            journal, self.notify, agent_bytes=cfg.commit_agent_bytes, max_bytes=cfg.commit_max_bytes,
            on_commit=self.metrics.journal_commit,
            marks={k.removeprefix("hwm:"): v for k, v in marks.items()},
        )

    async def _start_shared_journal(self) -> None:
        """Scale-out: the journal is a JetStream stream and the registry a KV bucket, shared by every gateway;
        this gateway keeps only its status (and lock) in the data directory, and runs no sink (sinks are
        ``flowtunnel sink ...`` processes on the stream)."""
        from flowtunnel.gateway.kvregistry import KvAgentKeys, KvRegistry
        from flowtunnel.journal.jetstream import JetStreamJournal, parse_journal_url

        cfg = self.config
        try:
            jcfg = parse_journal_url(
                cfg.journal or "", replicas=cfg.journal_replicas, max_bytes=cfg.journal_quota,
                max_age=cfg.journal_max_age or 0.0, agent_max_msgs=cfg.journal_agent_messages,
                publish_timeout=cfg.journal_timeout,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        shared = JetStreamJournal(jcfg)
        await shared.open(name=f"flowtunnel-gateway-{os.getpid()}")
        self.shared_journal = self.agent_journal = shared
        self._kv_registry = KvRegistry(jcfg)
        await self._kv_registry.open()
        kv_keys = KvAgentKeys(self._kv_registry)
        await kv_keys.start()
        self._kv_keys = kv_keys
        self.keys = kv_keys  # type: ignore[assignment]
        self._restore_last_seen()
        # The stream enforces each agent's quota (journal_agent_messages); the rate budget stays local.
        self.budgets = AgentBudgets(BudgetConfig(rate=cfg.agent_rate, burst=cfg.agent_burst, share=0))
        log.info("journal: JetStream %s, %d replicas", jcfg.describe(), jcfg.effective_replicas)

    async def _health(self, request: web.Request) -> web.Response:
        """``GET /v1/health``: 200 while every watched agent was heard from within ``health_silence``, else
        503 (for a load balancer or an uptime monitor; ``/healthz`` is liveness only). The endpoint is open,
        so only a reader of ``/v1/status`` (the operator) is told which agents are silent; anyone else gets
        the verdict and counts. ``?silence=DURATION`` overrides the threshold for one request."""
        if self.ingest is not None and self.ingest.closing:
            return web.json_response({"status": "shutting_down"}, status=503)
        silence = self.config.health_silence
        operator = self.auth is not None and operator_access(self.auth, self._guard, request)
        if "silence" in request.query:
            try:
                silence = parse_duration(request.query["silence"])
            except ValueError as exc:
                return web.json_response({"error": "bad-silence", "detail": str(exc)}, status=400)
        try:
            entries = self.keys.entries() if self.keys is not None else {}
        except RegistryError as exc:
            failing: dict[str, object] = {"status": "failing"}
            if operator:  # the message names the data directory
                failing["detail"] = str(exc)
            return web.json_response(failing, status=503)
        agents = {
            agent_id: {"last_seen": st.last_seen if (st := self.metrics.agents.get(agent_id)) else None,
                       "enrolled_at": entry.created_at, "revoked": entry.revoked}
            for agent_id, entry in entries.items()
        }
        ignore = self.config.health_ignore
        silent = silent_agents(agents, now=time.time(), silence=silence, ignore=ignore)
        doc: dict[str, object] = {
            "status": "failing" if silent else "ok",
            "silence_s": silence,
            "watched": sum(1 for a, e in entries.items() if not e.revoked and a not in ignore),
            "silent_count": len(silent),
        }
        if operator:
            doc["silent"] = {agent_id: round(age) for agent_id, age in sorted(silent.items())}
        return web.json_response(doc, status=503 if silent else 200)

    def _restore_last_seen(self) -> None:
        """Seed "last seen" from the previous run's status.json, so a restart does not show "never"."""
        try:
            doc = json.loads((self.data_dir / STATUS_FILE).read_text(encoding="utf-8"))
            agents = doc.get("agents", {})
            for agent_id, info in agents.items():
                seen = info.get("last_seen") if isinstance(info, dict) else None
                if isinstance(seen, int | float) and isinstance(agent_id, str):
                    self.metrics.restore_last_seen(agent_id, float(seen))
        except (OSError, ValueError, AttributeError):
            return

    @property
    def url(self) -> str:
        return self.urls[0]

    async def _supervise(self, sink: Sink) -> None:
        assert self.journal is not None
        assert self.notify is not None
        seen: set[str] = set()
        while True:
            try:
                take = self._deferred_locks.get(sink.name)
                if take is not None:
                    # Still unusable: the sink's own start below fails and says so in its own words.
                    with contextlib.suppress(OSError):
                        self._sink_locks.append(take())
                        del self._deferred_locks[sink.name]
                await sink.run(self.journal, self.notify)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.metrics.sink_errors.labels(sink.name, "crashed").inc()
                cause = f"{type(exc).__name__}: {exc}"
                if cause in seen:  # a sink failing the same way every few seconds must not flood the log
                    log.debug("sink %s failed again: %s", sink.name, cause)
                else:
                    if len(seen) < 64:
                        seen.add(cause)
                    # An environment problem (a file where the output directory should be) in one line.
                    text, expected = describe_failure(exc)
                    log.error("sink %s failed, restarting in %.1f s (repeats of this failure are counted, "
                              "not logged): %s", sink.name, self.sink_restart_delay, text,
                              exc_info=None if expected else exc)
                await asyncio.sleep(self.sink_restart_delay)

    # -- running ------------------------------------------------------------------------------------------

    def _position(self, sink: Sink) -> int:
        """How far ``sink`` has durably consumed: the "cursor" of its status (the store sink keeps its own
        inside DuckDB), else the one committed in the journal."""
        assert self.journal is not None
        own = sink.status().get("cursor")
        if isinstance(own, int) and not isinstance(own, bool):
            return own
        return self.journal.cursor(sink.name)

    def _trim_point(self) -> int:
        """The journal seq every sink has durably consumed (0 with no sinks: then nothing is trimmed)."""
        journal = self.journal
        if journal is None or not self.sinks:
            return 0
        positions = [self._position(s) for s in self.sinks]
        # Sinks wanted that could not start: keep what they have not consumed yet for when they can.
        positions.extend(journal.cursor(name) for name in self._missing)
        return min(positions)

    async def _trim(self) -> None:
        if self.shared_journal is not None:
            # Every gateway trims what every durable consumer acknowledged (idempotent), and refreshes the
            # stream figures for its status.
            try:
                # Bounded: a cluster that answers nothing must not stall the housekeeping loop for good.
                async with asyncio.timeout(30):
                    await self.shared_journal.trim()
                    self._shared_stats = await self.shared_journal.stats()
            except Exception as exc:
                raise LogError(f"journal {self.shared_journal.config.describe()}: {exc}", path="jetstream") \
                    from None
            return
        upto = self._trim_point()  # on the event loop: it reads the sinks' state
        if self.journal is not None and upto > self._trimmed:
            await asyncio.to_thread(self.journal.trim, upto)
            self._trimmed = upto
            if self.budgets is not None:
                self.budgets.trimmed(upto)
                for agent_id in self.budgets.agents():
                    self.metrics.held(agent_id, self.budgets.held(agent_id))

    async def _housekeeping(self) -> None:
        once = OnceLogger(log)
        while True:
            await asyncio.sleep(self.config.status_interval)
            try:
                await self._trim()
            except LogError as exc:
                once.warning("trim", "trimming the journal failed: %s", exc)
            try:
                # Built and written in a thread: with 2,000 agents the document is 1.2 MB, and building it
                # on the event loop stalled every request (it also waits for the journal's lock behind a
                # commit). Only the sinks' and the DNS endpoint's own figures are read on the loop.
                doc = await asyncio.to_thread(self._write_status, self._loop_parts())
                agents = doc.get("agents")
                if isinstance(agents, dict):
                    self.rates.sample(agents, time.time())
            except (OSError, ValueError, TypeError) as exc:
                once.warning("status", "writing %s failed: %s", self.data_dir / STATUS_FILE, exc)

    def _loop_parts(self) -> dict[str, object]:
        """The parts of the status read on the event loop: the sinks' figures (their tasks change them) and
        the DNS endpoint's (a handful of values each)."""
        return {"sinks": self._sinks_status(), "dns": self.dns.status() if self.dns is not None else None}

    def _write_status(self, parts: dict[str, object]) -> dict[str, object]:
        """In a worker thread: build the status around ``parts`` and write it atomically."""
        doc = self.status(parts)
        write_json_atomic(self.data_dir / STATUS_FILE, doc, durable=False, compact=True)
        return doc

    def status(self, parts: dict[str, object] | None = None) -> dict[str, object]:
        """What ``status.json`` and ``GET /v1/status`` show. ``parts``: ``_loop_parts()`` read on the event
        loop when this runs in a worker thread; then the per-agent figures (changed on the loop) are read
        from atomic copies of their dictionaries."""
        if parts is None:
            parts = self._loop_parts()
        journal = self.journal
        journal_doc: dict[str, object] = {}
        hwms: dict[str, int] = {}
        last = 0
        if self.shared_journal is not None:
            journal_doc = dict(self._shared_stats)
            last = int(str(journal_doc.get("last_seq") or 0))
        if journal is not None:
            with contextlib.suppress(LogError):
                stats = journal.stats()
                journal_doc = asdict(stats)
                last = stats.last_seq
                hwms = {k.removeprefix("hwm:"): v for k, v in journal.states("hwm:").items()}
        agents: dict[str, dict[str, object]] = {}
        try:
            enrolled = self.keys.entries() if self.keys is not None else {}
        except RegistryError:
            enrolled = {}
        agent_stats = self.metrics.agents.copy()  # one C call: atomic under the GIL, whatever the loop does
        for agent_id in sorted(set(enrolled) | set(agent_stats) | set(hwms)):
            st = agent_stats.get(agent_id)
            doc: dict[str, object] = st.as_dict() if st is not None else {}
            doc["acked"] = hwms.get(agent_id, 0)
            entry = enrolled.get(agent_id)
            doc["enrolled"] = entry is not None
            doc["enrolled_at"] = entry.created_at if entry is not None else None
            doc["revoked"] = entry is not None and entry.revoked
            doc["health_ignored"] = agent_id in self.config.health_ignore
            agents[agent_id] = doc
        sinks = parts.get("sinks")
        assert isinstance(sinks, dict)
        for name, sdoc in sinks.items():
            cursor = sdoc.get("cursor")
            if isinstance(cursor, int):
                lag = max(0, last - cursor)
                sdoc["lag"] = lag
                self.metrics.sink_lag.labels(name).set(lag)
        if journal_doc:
            on_disk = journal_doc.get("disk_bytes") or journal_doc.get("file_bytes", 0)
            self.metrics.journal_bytes.set(float(str(on_disk)))
            self.metrics.journal_entries.set(float(str(journal_doc.get("entries", 0))))
        return {
            "kind": "gateway",
            "version": __version__,
            "pid": os.getpid(),
            "started": self._started,
            "updated": time.time(),
            "listen": list(self.urls),
            "data": str(self.data_dir),
            "agents": agents,
            "journal": journal_doc,
            "sinks": sinks,
            "rejected": self.metrics.rejects_by_cause.copy(),
            "rungs": {rung: doc.copy() for rung, doc in sorted(self.metrics.rungs.copy().items())},
            "dns": parts.get("dns"),
        }

    def _sinks_status(self) -> dict[str, dict[str, object]]:
        """Each sink's own figures and whether it runs (on the event loop)."""
        sinks: dict[str, dict[str, object]] = {}
        for sink in self.sinks:
            try:
                sdoc = dict(sink.status())
            except Exception as exc:  # a sink's status must never break the gateway's
                sdoc = {"error": str(exc)}
            task = self._sink_tasks.get(sink.name)
            sdoc["running"] = task is not None and not task.done()
            sinks[sink.name] = sdoc
        return sinks

    def write_status(self) -> None:
        # Not fsynced (rewritten every status_interval; a lost one costs nothing), one compact line.
        write_json_atomic(self.data_dir / STATUS_FILE, self.status(), durable=False, compact=True)

    # -- stop ---------------------------------------------------------------------------------------------

    async def stop(self) -> None:
        # Nothing to say when start() refused before opening anything (data directory refused or in use).
        opened = self.journal is not None or self._runner is not None or self.shared_journal is not None
        if self.ingest is not None:
            self.ingest.closing = True
        if self.dns is not None:
            await self.dns.stop()
            self.dns = None
        # Stop accepting, site by site, then let in-flight requests finish (runner.cleanup waits for them).
        for site in self._sites:
            try:
                await site.stop()
            except Exception as exc:
                log.warning("stopping site %s: %s", site.name, exc)
        self._sites.clear()
        if self.console_data is not None:
            self.console_data.close()  # console queries in flight answer now, not at their timeout
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        # Sinks one by one: each commits its cursor after its side effect, so cancelling is safe.
        for sink in reversed(self.sinks):
            task = self._sink_tasks.pop(sink.name, None)
            if task is not None and await cancel_and_wait([task]):
                log.error("sink %s did not stop within 10 s of its cancellation; left behind", sink.name)
        await self._tasks.close()
        if isinstance(self.agent_journal, SqliteAgentJournal):
            await asyncio.to_thread(self.agent_journal.close)  # after the commit under way, if any
        if self.journal is not None:
            with contextlib.suppress(OSError, LogError):
                self.write_status()
            self.journal.close()
            self.journal = None
        if self._kv_keys is not None:
            await self._kv_keys.close()
            self._kv_keys = None
        if self._kv_registry is not None:
            await self._kv_registry.close()
            self._kv_registry = None
        if self.shared_journal is not None:
            with contextlib.suppress(OSError, LogError):
                self.write_status()
            await self.shared_journal.close()
            self.shared_journal = None
        self._release_data_dir()
        if opened:
            log.info("stopped")

    async def run(self, stop: asyncio.Event, *, started: Callable[[], None] | None = None) -> int:
        """Start, call ``started`` (if given), serve until ``stop`` is set, stop; the exit code."""
        try:
            await self.start()
            if started is not None:
                started()
            await stop.wait()
        finally:
            await self.stop()
        return 0


async def run_gateway(config: GatewayConfig, stop: asyncio.Event) -> int:
    """The body of ``flowtunnel gateway``; returns the exit code. The process is the gateway's own: once it
    listens, its start-up objects are frozen out of the collector (``settle_gc``)."""
    return await Gateway(config).run(stop, started=settle_gc)

