"""A fleet of simulated agents against one real ``flowtunnel gateway`` process (issue 16), and its scenarios.

Each simulated agent has its own enrolment (bulk-enrolled through ``Registry`` before the gateway starts),
key, sequence numbers and an in-memory spool, and speaks the project's own code: ``seal_batch`` for the body,
the ``Delivery`` state machine for every decision (resync, commit, backoff, refusals), ``plan_resync``
to align, and ``PostTransport`` over the agent's ``HttpClient``
(one kept-alive connection per agent, as a real agent has) -- not a second implementation of the protocol.
Agents run as asyncio tasks, a few hundred per worker process. Rates follow a spread (most 0.1-2 datagrams/s
of real softflowd v9 export payloads, a few at 100+), with outages (the agent's link down for a while: nothing
sent, the spool grows) and a share of misbehaving agents (replayed bodies,
garbage bodies, bodies sent too slowly, a revoked key).

After the run the gateway is stopped and its journal read once: every well-behaved agent must find each seq
it generated exactly once, with the payload it generated. Run ``python bench/fleet.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import functools
import json
import math
import multiprocessing
import os
import random
import resource
import signal
import statistics
import sys
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from _common import ROOT, softflowd_streams

if str(ROOT) not in sys.path:  # pragma: no cover - _common put it there
    sys.path.insert(0, str(ROOT))

from tests.agent.chain import GatewayProc

from flowtunnel.agent.transport import (
    Commit,
    Delivery,
    Hints,
    Rejected,
    Sent,
    Wait,
    plan_resync,
)
from flowtunnel.agent.transport.http11 import HttpClient, Timeouts
from flowtunnel.agent.transport.post import CONTENT_TYPE, PostTransport
from flowtunnel.datagram import Datagram
from flowtunnel.gateway.registry import Registry
from flowtunnel.log import DurableLog, LogConfig
from flowtunnel.wire import NONCE_BYTES, seal_batch

__all__ = ["AgentPlan", "FleetConfig", "FleetReport", "plan_fleet", "run_fleet"]

_NONCE = slice(32, 32 + NONCE_BYTES)  # where a sealed body carries its nonce (docs/protocol.md 1.1)
KINDS = ("good", "replay", "garbage", "slow", "revoked")
#: batches of more datagrams than this are sealed in a worker thread (the quiet agents' few stay on the loop)
SEAL_IN_THREAD = 32


@dataclass(frozen=True, kw_only=True)
class FleetConfig:
    """One fleet run. ``bad_share``: misbehaving agents (spread over replay, garbage, slow, revoked);
    ``fast_share``: agents at ``fast_rate`` datagrams/s; ``outage_share``: agents whose link goes down once
    for ``outage`` seconds; ``flood``: agent 0 sends ``flood_factor`` times the per-agent rate budget, from
    ``flood_at`` seconds on (the others' p99 before and during the flood then come from the same run)."""

    agents: int = 50
    seconds: float = 10.0
    processes: int = 2
    seed: int = 16
    latency: float = 1.0
    max_batch: int = 2000
    bad_share: float = 0.05
    fast_share: float = 0.01
    fast_rate: float = 100.0
    outage_share: float = 0.1
    outage: tuple[float, float] = (2.0, 20.0)
    backoff_base: float = 0.5  # the agent's defaults
    backoff_cap: float = 60.0
    reject_backoff: float = 300.0
    drain: float = 90.0
    flood: bool = False
    flood_factor: float = 10.0
    flood_at: float = 0.0  # the flooder starts at this second: the others' p99 before and during, one run
    agent_rate: int = 0  # the gateway's --agent-rate (bytes/s; 0: its default)
    kill_at: float | None = None  # herd: kill -9 the gateway at this second, restart after down seconds
    down: float = 10.0
    churn: bool = False  # enrol, rotate and revoke while the fleet runs
    gateway_args: tuple[str, ...] = ()
    sim_nice: int = 0  # the simulator's processes' niceness: > 0 leaves the CPU to the gateway first
    trace: str | None = None  # trace the gateway into this file (bench/gwtrace/, bench/gwtrace_report.py)


@dataclass(frozen=True, kw_only=True)
class AgentPlan:
    """What one simulated agent does: ``rate`` datagrams/s, an outage ``(start, length)`` or None."""

    agent_id: str
    key: bytes = field(repr=False)
    kind: str
    rate: float
    outage: tuple[float, float] | None
    seed: int


@dataclass(kw_only=True)
class AgentResult:
    agent_id: str
    kind: str
    rate: float
    generated: int = 0
    acked: int = 0
    exchanges: int = 0
    latencies: list[float] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)  # each request's start, seconds from the fleet's start
    failures: dict[str, int] = field(default_factory=dict)
    max_refused: float = 0.0  # longest time from a failed attempt to the next acknowledgement, seconds
    max_refused_gw: float = 0.0  # the same from the gateway's first refusal (503, 429...), not a lost link
    bad_sent: int = 0
    recovered: list[float] = field(default_factory=list)  # backlog delivered after a failure episode
    back: list[float] = field(default_factory=list)  # first acknowledgement after a failure episode
    rejected_at: float | None = None  # the gateway's first refusal (a revocation taking effect)
    drained: bool = True


def plan_fleet(config: FleetConfig, data: Path) -> list[AgentPlan]:
    """Enrol ``config.agents`` agents in ``data``'s registry (revoking the revoked share) and plan each."""
    rng = random.Random(config.seed)
    plans = []
    with Registry(data) as reg:
        for i in range(config.agents):
            name = f"fleet-{i:05d}"
            entry = reg.enroll(name)
            u = rng.random()
            kind = "good"
            if config.flood and i == 0:
                kind = "flood"
            elif u < config.bad_share:
                kind = KINDS[1 + int(u / config.bad_share * 4) % 4]
            if kind == "revoked":
                reg.revoke(name)
            if kind == "flood":
                rate = 0.0  # set from the gateway's budget below
            elif rng.random() < config.fast_share:
                rate = config.fast_rate * (1 + rng.random())
            else:
                rate = math.exp(rng.uniform(math.log(0.1), math.log(2.0)))  # log-uniform 0.1-2 /s
            outage = None
            if kind == "good" and rng.random() < config.outage_share:
                length = rng.uniform(*config.outage)
                outage = (rng.uniform(0, max(0.1, config.seconds - length)), length)
            plans.append(AgentPlan(agent_id=name, key=entry.key, kind=kind, rate=rate, outage=outage,
                                   seed=rng.randrange(1 << 30)))
    return plans


def _seq_of(entry: tuple[int, Datagram]) -> int:
    return entry[0]


def payload_for(pool: list[bytes], agent_id: str, seq: int) -> bytes:
    """The payload agent ``agent_id`` generates for ``seq`` (deterministic, so the check can recompute it)."""
    return pool[zlib.crc32(f"{agent_id}/{seq}".encode()) % len(pool)]


# -- one simulated agent -----------------------------------------------------------------------------------


class SimAgent:
    """One agent: a generator of datagrams into an in-memory spool and a sender driven by ``Delivery``."""

    def __init__(self, plan: AgentPlan, config: FleetConfig, gateway: str, pool: list[bytes], t0: float,
                 flood_rate: float) -> None:
        self.plan = plan
        self.config = config
        self.pool = pool
        self.t0 = t0
        self.rng = random.Random(plan.seed)
        self.rate = flood_rate if plan.kind == "flood" else plan.rate
        self.result = AgentResult(agent_id=plan.agent_id, kind=plan.kind, rate=self.rate)
        self.spool: list[tuple[int, Datagram]] = []
        self.last_seq = 0
        self.position = 0  # acked
        self.delivery = Delivery(agent_id=plan.agent_id, key=plan.key, max_body=8 << 20, min_body=64 << 10,
                                 backoff_base=config.backoff_base, backoff_cap=config.backoff_cap,
                                 reject_backoff=config.reject_backoff)
        self.client = HttpClient(gateway, timeouts=Timeouts(connect=10.0, read=30.0, total=60.0))
        self.transport = PostTransport(self.client, gateway, agent_id=plan.agent_id, key=plan.key)
        self.generating = True
        self.sent_bodies: list[bytes] = []
        self.failing_since: float | None = None
        self.refused_since: float | None = None
        self.recover_target: int | None = None

    def link_down(self, now: float) -> float:
        """Seconds until this agent's own link is back (0 when up)."""
        if self.plan.outage is None:
            return 0.0
        start, length = self.plan.outage
        t = now - self.t0
        return max(0.0, start + length - t) if start <= t < start + length else 0.0

    async def generate(self) -> None:
        end = self.t0 + self.config.seconds
        port = 2055
        # Fast agents: datagrams come n at a time (n / rate apart on average), not one wake-up per datagram.
        n = max(1, int(self.rate * 0.05))
        if self.plan.kind == "flood" and self.config.flood_at > 0:
            await asyncio.sleep(max(0.0, self.t0 + self.config.flood_at - time.time()))
        while self.rate > 0:
            now = time.time()
            if now >= end:
                break
            await asyncio.sleep(min(end - now, self.rng.expovariate(self.rate / n)))
            if time.time() >= end:
                break
            for _ in range(n):
                self.last_seq += 1
                seq = self.last_seq
                self.spool.append((seq, Datagram(received_ns=time.time_ns(), exporter="192.0.2.1",
                                                 exporter_port=port, local_port=2055,
                                                 payload=payload_for(self.pool, self.plan.agent_id, seq))))
        self.generating = False
        self.result.generated = self.last_seq

    async def send(self) -> None:
        deadline = self.t0 + self.config.seconds
        if self.plan.kind in ("good", "flood"):  # the misbehaving share stops with the run, without draining
            deadline += self.config.drain
        cfg = self.config
        while True:
            now = time.time()
            if now > deadline:
                self.result.drained = not self.spool
                break
            if not self.generating and not self.spool and not self.delivery.wants_resync:
                break
            down = self.link_down(now)
            if down:
                await asyncio.sleep(down)
                continue
            if not self.delivery.wants_resync and not self.spool:
                await asyncio.sleep(cfg.latency * (0.5 + self.rng.random()))
                continue
            if self.delivery.wants_resync:
                body = seal_batch(agent_id=self.plan.agent_id, key=self.plan.key,
                                  first_seq=self.position + 1, datagrams=[], nonce=os.urandom(NONCE_BYTES),
                                  agent_info={"acked": self.position})
                sent = Sent(nonce=body[_NONCE], size=len(body))
                batch: list[tuple[int, Datagram]] = []
            else:
                batch = self.spool[: cfg.max_batch]
                info = {"acked": self.position, "spool_first": batch[0][0],
                        "backlog": max(0, self.last_seq - batch[-1][0])}
                seal = functools.partial(seal_batch, agent_id=self.plan.agent_id, key=self.plan.key,
                                         first_seq=batch[0][0], datagrams=[d for _, d in batch],
                                         nonce=os.urandom(NONCE_BYTES), agent_info=info)
                # A large batch is sealed in a worker thread, as the agent does (zstd and the AEAD release
                # the GIL): sealed on the event loop, a flooder's ~1 MB batches stopped the loop of the
                # 1,000 agents it shares a process with for tens of ms, and their latencies counted it.
                body = await asyncio.to_thread(seal) if len(batch) > SEAL_IN_THREAD else seal()
                sent = Sent(nonce=body[_NONCE], size=len(body), first=batch[0][0], last=batch[-1][0],
                            datagrams=len(batch))
                if self.plan.kind == "replay" and len(self.sent_bodies) < 4:
                    self.sent_bodies.append(body)
            hints = Hints(agent_id=self.plan.agent_id, backlog=max(0, self.last_seq - self.position),
                          acked=self.position, what=sent.what)
            started = time.monotonic()
            answer = await self.transport.exchange(body, hints)
            elapsed = time.monotonic() - started
            self.result.exchanges += 1
            self.result.latencies.append(elapsed)
            self.result.sent_at.append(time.time() - elapsed - self.t0)
            now = time.time()
            if isinstance(answer, Rejected) and self.result.rejected_at is None:
                self.result.rejected_at = now
            action = self.delivery.answer(sent, answer, draw=self.rng.random(), now=now)
            if isinstance(action, Commit):
                if self.failing_since is not None:
                    self.result.max_refused = max(self.result.max_refused, now - self.failing_since)
                    self.failing_since = None
                    self.result.back.append(now)
                    self.recover_target = self.last_seq  # the backlog gathered while failing
                if self.refused_since is not None:
                    self.result.max_refused_gw = max(self.result.max_refused_gw, now - self.refused_since)
                    self.refused_since = None
                acked = action.acked
                if action.resync:
                    first = self.spool[0][0] if self.spool else self.last_seq + 1
                    plan = plan_resync(acked=acked, known=self.position, last=self.last_seq,
                                       first_stored=first, agent_id=self.plan.agent_id)
                    if plan.renumber or plan.advance or plan.lost:
                        raise AssertionError(f"{self.plan.agent_id}: unexpected resync plan {plan}")
                self.position = max(self.position, acked)
                # one slice, not a pop(0) per datagram (quadratic in a backlog of thousands)
                del self.spool[: bisect.bisect_right(self.spool, self.position, key=_seq_of)]
                if self.recover_target is not None and self.position >= self.recover_target:
                    self.result.recovered.append(now)
                    self.recover_target = None
                if batch and len(self.spool) < cfg.max_batch and self.generating:
                    await asyncio.sleep(cfg.latency * (0.5 + self.rng.random()))
            else:
                assert isinstance(action, Wait)
                if self.failing_since is None:
                    self.failing_since = now
                if self.refused_since is None and not action.cause.startswith("connection:"):
                    self.refused_since = now
                await asyncio.sleep(min(action.delay, max(0.0, deadline - now)))
        if self.failing_since is not None:
            self.result.max_refused = max(self.result.max_refused, time.time() - self.failing_since)
        self.result.acked = self.position
        self.result.failures = dict(self.delivery.failures)
        await self.transport.close()

    async def misbehave(self) -> None:
        """The bad share's extra traffic, on its own connection, besides (or instead of) its own data."""
        end = self.t0 + self.config.seconds
        kind = self.plan.kind
        client = HttpClient(self.gateway, timeouts=Timeouts(connect=5.0, read=10.0, total=20.0))
        headers = [("Content-Type", CONTENT_TYPE), ("X-Flowtunnel-Agent", self.plan.agent_id)]
        try:
            while time.time() < end:
                await asyncio.sleep(1.0 + self.rng.random() * 2)
                try:
                    if kind == "replay" and self.sent_bodies:
                        await client.request("POST", "/v1/batches", body=self.rng.choice(self.sent_bodies),
                                             headers=headers)
                    elif kind == "garbage":
                        junk = os.urandom(self.rng.randrange(16, 4096))
                        await client.request("POST", "/v1/batches", body=junk, headers=headers)
                    elif kind == "slow":
                        await self._slow_body()
                    else:
                        continue
                    self.result.bad_sent += 1
                except Exception:
                    await client.close()
        finally:
            await client.close()

    async def _slow_body(self) -> None:
        """Headers for a 64 KiB body, then a few bytes a second until the gateway gives up (408)."""
        host, port = self.gateway.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write((f"POST /v1/batches HTTP/1.1\r\nHost: {host}\r\nContent-Type: {CONTENT_TYPE}\r\n"
                          f"X-Flowtunnel-Agent: {self.plan.agent_id}\r\n"
                          "Content-Length: 65536\r\n\r\n").encode())
            for _ in range(60):
                writer.write(b"\0" * 8)
                await writer.drain()
                try:
                    async with asyncio.timeout(1.0):
                        if await reader.read(1024):
                            break
                except TimeoutError:
                    continue
        finally:
            writer.close()

    gateway = ""


async def _run_agents(plans: list[AgentPlan], config: FleetConfig, gateway: str, pool: list[bytes], t0: float,
                      flood_rate: float) -> tuple[list[AgentResult], list[float]]:
    agents = [SimAgent(p, config, gateway, pool, t0, flood_rate) for p in plans]
    for a in agents:
        a.gateway = gateway
    await asyncio.sleep(max(0.0, t0 - time.time()))
    tasks: list[asyncio.Task[None]] = []
    lags: list[float] = []
    lag = asyncio.create_task(_loop_lag(lags))
    async with asyncio.TaskGroup() as tg:
        for a in agents:
            # Agents start spread over the first second, as boxes do not boot in the same millisecond.
            tasks.append(tg.create_task(_start(a, a.rng.random())))
    lag.cancel()
    return [a.result for a in agents], lags


async def _loop_lag(out: list[float], tick: float = 0.02) -> None:
    """How late this worker's event loop wakes up (s): the simulator's own stalls (sealing, GC) count in the
    agents' latencies, so the report gives them beside those."""
    while True:
        start = time.monotonic()
        await asyncio.sleep(tick)
        out.append(time.monotonic() - start - tick)


async def _start(agent: SimAgent, delay: float) -> None:
    await asyncio.sleep(delay)
    jobs = [agent.generate(), agent.send()]
    if agent.plan.kind in ("replay", "garbage", "slow"):
        jobs.append(agent.misbehave())
    await asyncio.gather(*jobs)


def _worker(plans: list[AgentPlan], config: FleetConfig, gateway: str, pool: list[bytes], t0: float,
            flood_rate: float) -> tuple[list[AgentResult], list[float]]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if config.sim_nice:
        os.nice(config.sim_nice)
    return asyncio.run(_run_agents(plans, config, gateway, pool, t0, flood_rate))


# -- the run -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FleetReport:
    """A run's figures (see ``summary``)."""

    config: dict[str, Any]
    agents: int
    by_kind: dict[str, int]
    generated: int
    journaled: int
    lost: int
    duplicates: int
    wrong_payload: int
    undrained: list[str]
    p50_ms: float
    p99_ms: float
    p99_flooder_ms: float | None
    # flood_at > 0: the well-behaved agents' p99 over requests started in [5 s, flood_at) and after flood_at
    p99_before_flood_ms: float | None
    p99_during_flood_ms: float | None
    flooder: dict[str, Any] | None  # the flooding agent: datagrams generated, acked, failures by cause
    exchanges: int
    max_refused_s: float
    max_refused_by_gateway_s: float
    refused_over_30s: int
    failures: dict[str, int]
    gateway_rss_mb: float
    gateway_fds: int
    gateway_cpu_s: float  # user + system CPU seconds of the gateway process(es)
    journal_commits: int | None  # commits of the last gateway process, and batch pieces they held
    commit_batches: int | None
    gateway_p50_ms: float | None  # the gateway's own view (its histogram's bucket bound), last process
    gateway_p99_ms: float | None
    load_average: list[float]  # 1-minute load average at the start and at the end (a shared machine)
    sim_loop_lag_ms: list[float]  # the simulator's own event-loop lateness, p99 and max (in agents' latency)
    revocation_effect_s: float | None  # churn: from the revocation to the agent's first refusal
    restart_backlog_s: float | None  # restart to the last agent's backlog acknowledged
    back_spread_s: list[float] | None  # restart to each agent's first ack: p50, p90, p99, max
    elapsed_s: float

    def summary(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _gateway_figures(url: str) -> dict[str, Any]:
    """From the gateway's /metrics (over loopback): its journal commits and the batch pieces they held, and
    its own p50/p99 of POST /v1/batches (the upper bound of the histogram bucket holding it, in ms)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, Any] = {}
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == "flowtunnel_gateway_journal_commits_total":
            out["journal_commits"] = int(float(value))
        elif name == "flowtunnel_gateway_journal_commit_batches_total":
            out["commit_batches"] = int(float(value))
        elif name.startswith("flowtunnel_gateway_batch_request_seconds_bucket{"):
            le = name.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((math.inf if le == "+Inf" else float(le), float(value)))
    if buckets and buckets[-1][1]:
        total = buckets[-1][1]
        for q, key in ((0.5, "gateway_p50_ms"), (0.99, "gateway_p99_ms")):
            le = next(b for b, n in buckets if n >= q * total)
            out[key] = le * 1000 if le != math.inf else None
    return out


def _proc_figures(pid: int) -> tuple[float, int]:
    try:
        rss = 0.0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0.0, 0


def read_journal(data: Path) -> dict[str, list[tuple[int, bytes]]]:
    """(seq, payload) per agent of the whole journal, in one pass (read with the gateway stopped)."""
    log = DurableLog(LogConfig(path=data / "journal.sqlite", quota_bytes=0))
    out: dict[str, list[tuple[int, bytes]]] = defaultdict(list)
    try:
        after = 0
        while entries := log.read(after=after, limit=50_000, max_bytes=256 << 20):
            for e in entries:
                out[e.stream].append((int(e.stream_seq or 0), e.datagram.payload))
            after = entries[-1].seq
    finally:
        log.close()
    return out


def run_fleet(config: FleetConfig, work: Path, *, pool: list[bytes] | None = None,
              log: Any = print) -> FleetReport:
    """Enrol, start a gateway, run the fleet, stop the gateway and check the journal."""
    started = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    data = work / "gw"
    if pool is None:
        pool = [p for s in softflowd_streams(3000, versions=(9,)) for p in s.payloads]
    plans = plan_fleet(config, data)
    log(f"enrolled {len(plans)} agents in {time.monotonic() - started:.1f} s")
    # The gateway's own status interval (GatewayProc's 0.2 s suits tests of one agent); probes from every
    # agent share one source address here (see docs/reliability.md, "Fleet").
    args = ["--status-interval", "2s", "--probe-rate", "100000", *config.gateway_args]
    if config.agent_rate:
        args += ["--agent-rate", str(config.agent_rate)]
    if config.trace:  # the gateway process inherits the environment (bench/gwtrace/sitecustomize.py)
        os.environ["FLOWTUNNEL_GWTRACE"] = str(Path(config.trace).resolve())
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parent / "gwtrace"), os.environ.get("PYTHONPATH")) if p)
    gw = GatewayProc(data, extra=args)
    load = [round(os.getloadavg()[0], 1)]
    gw.start()
    cpu: dict[int, float] = {}
    mean_payload = statistics.fmean(len(p) for p in pool)
    flood_rate = 0.0
    if config.flood:
        rate = config.agent_rate or 1 << 20  # bytes/s: the gateway's per-agent budget
        flood_rate = config.flood_factor * rate / (mean_payload + 60)
    t0 = time.time() + 2.0 + config.agents / 1000
    chunks = [plans[i:: config.processes] for i in range(config.processes)]
    ctx = multiprocessing.get_context("spawn")
    rss_peak, fds_peak = 0.0, 0
    restart_at: float | None = None
    churned: list[str] = []
    churn_at: float | None = None
    with ctx.Pool(config.processes) as mp:
        pending = mp.starmap_async(_worker, [(c, config, gw.url, pool, t0, flood_rate) for c in chunks])
        killed = False
        while not pending.ready():
            pending.wait(0.5)
            if gw.proc is not None:
                rss, fds = _proc_figures(gw.proc.pid)
                rss_peak, fds_peak = max(rss_peak, rss), max(fds_peak, fds)
                cpu[gw.proc.pid] = max(cpu.get(gw.proc.pid, 0.0), _proc_cpu(gw.proc.pid))
            t = time.time() - t0
            if config.kill_at is not None and not killed and t >= config.kill_at:
                killed = True
                log(f"t={t:.1f} s: kill -9 the gateway, restart in {config.down:g} s")
                gw.kill9()
                time.sleep(config.down)
                gw.start()
                restart_at = time.time()
                log(f"t={time.time() - t0:.1f} s: gateway back")
            if config.churn and not churned and t >= config.seconds / 2:
                churned = _churn(data, plans)
                churn_at = time.time()
                log(f"t={t:.1f} s: churn {churned}")
        done = pending.get()
        results = [r for chunk, _ in done for r in chunk]
        lags = [x for _, chunk in done for x in chunk]
    figures = _gateway_figures(gw.url)
    if gw.proc is not None:
        cpu[gw.proc.pid] = max(cpu.get(gw.proc.pid, 0.0), _proc_cpu(gw.proc.pid))
    load.append(round(os.getloadavg()[0], 1))
    gw.stop()
    journal = read_journal(data)
    report = _report(config, plans, results, journal, pool, rss_peak, fds_peak, restart_at, churned, churn_at,
                     time.monotonic() - started)
    return replace(report, gateway_cpu_s=round(sum(cpu.values()), 1), load_average=load,
                   journal_commits=figures.get("journal_commits"),
                   commit_batches=figures.get("commit_batches"),
                   gateway_p50_ms=figures.get("gateway_p50_ms"),
                   gateway_p99_ms=figures.get("gateway_p99_ms"),
                   sim_loop_lag_ms=[round(_pct(lags, 0.99), 1), round(_pct(lags, 1.0), 1)])


def _churn(data: Path, plans: list[AgentPlan]) -> list[str]:
    """While the fleet runs: enrol 10 more agents, rotate a quiet revoked agent's key, revoke another."""
    with Registry(data) as reg:
        for i in range(10):
            reg.enroll(f"fleet-late-{i:03d}")
        rotated = next((p.agent_id for p in plans if p.kind == "revoked"), None)
        if rotated is not None:
            reg.enroll(rotated, rotate=True)  # its old key stays refused: a new key was issued
        revoked = next(p.agent_id for p in reversed(plans) if p.kind == "good")
        reg.revoke(revoked)
    return [f"rotated {rotated}", f"revoked {revoked}", "enrolled 10"]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def _report(config: FleetConfig, plans: list[AgentPlan], results: list[AgentResult],
            journal: dict[str, list[tuple[int, bytes]]], pool: list[bytes], rss: float, fds: int,
            restart_at: float | None, churned: list[str], churn_at: float | None,
            elapsed: float) -> FleetReport:
    revoked_live = {c.split()[1] for c in churned if c.startswith("revoked ")}
    lost = dups = wrong = journaled = generated = 0
    undrained = []
    lat: list[float] = []
    before: list[float] = []
    during: list[float] = []
    flood_lat: list[float] = []
    flooder: dict[str, Any] | None = None
    failures: Counter[str] = Counter()
    max_refused = 0.0
    max_gw = 0.0
    over30 = 0
    effect: float | None = None
    for r in results:
        if r.agent_id in revoked_live and r.rejected_at is not None and churn_at is not None:
            effect = round(r.rejected_at - churn_at, 2)
    backlog_s: float | None = None
    spread: list[float] | None = None
    if restart_at is not None:
        backs, recs = [], []
        for r in results:
            if r.kind != "good":
                continue
            b = [t - restart_at for t in r.back if t >= restart_at]
            c = [t - restart_at for t in r.recovered if t >= restart_at]
            if b:
                backs.append(b[0])
            if c:
                recs.append(c[0])
        backlog_s = round(max(recs), 1) if recs else None
        spread = [round(_pct(backs, q) / 1000, 1) for q in (0.5, 0.9, 0.99, 1.0)]
    for r in results:
        entries = journal.get(r.agent_id, [])
        journaled += len(entries)
        if r.kind == "flood":
            flood_lat += r.latencies
            flooder = {"rate": round(r.rate), "generated": r.generated, "acked": r.acked,
                       "failures": r.failures}
        if r.kind not in ("good", "flood") or r.agent_id in revoked_live:
            continue
        generated += r.generated
        seqs = Counter(s for s, _ in entries)
        dups += sum(n - 1 for n in seqs.values() if n > 1)
        # An agent still holding data at the end (a flooder held back by its budget) has not lost it: its
        # spool keeps it. Lost is what the gateway acknowledged and the journal does not hold, or, for an
        # agent that drained, anything it generated.
        lost += sum(1 for s in range(1, (r.generated if r.drained else r.acked) + 1) if s not in seqs)
        wrong += sum(1 for s, p in entries if p != payload_for(pool, r.agent_id, s))
        if not r.drained:
            undrained.append(r.agent_id)
        if r.kind == "good":
            lat += r.latencies
            if config.flood_at > 0:
                for at, x in zip(r.sent_at, r.latencies, strict=True):
                    if at >= config.flood_at:
                        during.append(x)
                    elif at >= 5.0:  # after the start-up (connections, first reads of each mark)
                        before.append(x)
            failures.update(r.failures)
            max_refused = max(max_refused, r.max_refused)
            max_gw = max(max_gw, r.max_refused_gw)
            over30 += r.max_refused_gw > 30
    return FleetReport(
        config={k: v for k, v in asdict(config).items() if k != "gateway_args"},
        agents=len(plans), by_kind=dict(Counter(p.kind for p in plans)), generated=generated,
        journaled=journaled, lost=lost, duplicates=dups, wrong_payload=wrong, undrained=undrained[:20],
        p50_ms=round(_pct(lat, 0.5), 1), p99_ms=round(_pct(lat, 0.99), 1),
        p99_flooder_ms=round(_pct(flood_lat, 0.99), 1) if flood_lat else None, flooder=flooder,
        p99_before_flood_ms=round(_pct(before, 0.99), 1) if before else None,
        p99_during_flood_ms=round(_pct(during, 0.99), 1) if during else None,
        exchanges=sum(r.exchanges for r in results), max_refused_s=round(max_refused, 1),
        max_refused_by_gateway_s=round(max_gw, 1),
        refused_over_30s=over30, failures=dict(failures), gateway_rss_mb=round(rss, 1), gateway_fds=fds,
        revocation_effect_s=effect, restart_backlog_s=backlog_s, back_spread_s=spread,
        elapsed_s=round(elapsed, 1), gateway_cpu_s=0.0, journal_commits=None, commit_batches=None,
        gateway_p50_ms=None, gateway_p99_ms=None, load_average=[], sim_loop_lag_ms=[],
    )


SCENARIOS: dict[str, dict[str, Any]] = {
    "steady": {},
    "herd": {"kill_at": 20.0, "down": 15.0, "outage_share": 0.0},
    "flood": {"flood": True, "agent_rate": 100_000, "outage_share": 0.0, "fast_share": 0.0},
    # The same fleet without the flooder: the baseline its p99 is compared with.
    "flood-baseline": {"agent_rate": 100_000, "outage_share": 0.0, "fast_share": 0.0},
    "churn": {"churn": True},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="steady")
    ap.add_argument("--agents", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--bad-share", type=float, default=0.05)
    ap.add_argument("--latency", type=float, default=1.0, help="the agents' --latency (batching delay), s")
    ap.add_argument("--backoff-cap", type=float, default=60.0, help="the agents' --backoff-cap, s")
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--gateway-arg", action="append", default=[], help="extra gateway argument (repeat)")
    ap.add_argument("--sim-nice", type=int, default=0,
                    help="niceness of the simulator's processes (10: the gateway gets the CPU first on a "
                         "small box; the agents' latencies then include more of the simulator's own delay)")
    ap.add_argument("--trace", default=None,
                    help="trace the gateway into this JSON file (read it with bench/gwtrace_report.py)")
    ap.add_argument("--flood-at", type=float, default=None,
                    help="flood: the flooder starts at this second (default: half-way; 0: from the start)")
    ns = ap.parse_args(argv)
    extra = dict(SCENARIOS[ns.scenario])
    if extra.get("flood"):
        extra["flood_at"] = ns.seconds / 2 if ns.flood_at is None else ns.flood_at
    config = FleetConfig(agents=ns.agents, seconds=ns.seconds, processes=ns.processes, bad_share=ns.bad_share,
                         latency=ns.latency, backoff_cap=ns.backoff_cap,
                         gateway_args=tuple(ns.gateway_arg), sim_nice=ns.sim_nice, trace=ns.trace,
                         **extra)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ft-fleet-") as tmp:
        report = run_fleet(config, ns.work or Path(tmp))
    print(report.summary())
    return 0 if report.lost == report.duplicates == report.wrong_payload == 0 else 1


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
