"""Runs real flowtunnel processes through faults and counts what came out: the reliability scenarios.

One scenario: ``flowtunnel gateway`` and ``flowtunnel agent`` as subprocesses (stderr to files), a
``LinkEmulator`` between them in this event loop, softflowd's export datagrams (captured once from a real
softflowd run, then replayed at a steady rate so the exporter can be paused while the agent is down: UDP to a
dead port is lost before flowtunnel) sent to the agent, and a fault plan running alongside. Afterwards:

- the gateway's journal (ground truth: every sink reads it) must hold each of the agent's datagrams exactly
  once, in the order sent, byte for byte;
- the udp-forward sink (a UDP capture, and optionally nfcapd) must have re-emitted each at least once;
- no process log may contain the agent's key.

The journal is kept untrimmed during a run (``--status-interval`` at its maximum: trimming happens in the
gateway's housekeeping) so it can be read whole at the end. The same code serves the pytest scenarios
(tests/reliability/test_scenarios.py) and ``bench/reliability.py``, which writes docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import os
import random
import re
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowtunnel.log import DurableLog, LogConfig
from tests.linkemu import LinkEmulator, Mode
from tests.peers import Nfcapd, UdpCapture, capture_softflowd, free_tcp_port, free_udp_port, make_trace

__all__ = [
    "AgentProc",
    "FaultPlan",
    "GatewayProc",
    "Outcome",
    "Proc",
    "Run",
    "Scenario",
    "Stack",
    "enroll",
    "exported",
    "failed_outcome",
    "read_journal",
    "run_scenario",
    "stack",
]

FLOWTUNNEL = (sys.executable, "-m", "flowtunnel")
#: Agent settings that make a test link recover in seconds rather than minutes.
FAST_AGENT = (
    "--latency", "200ms", "--connect-timeout", "2s", "--read-timeout", "3s", "--total-timeout", "6s",
    "--backoff-base", "100ms", "--backoff-cap", "1s", "--reject-backoff", "1s", "--status-interval", "1s",
    "--shutdown-timeout", "10s",
)
_READY_TIMEOUT = 60.0
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


# ------------------------------------------------------------------------------------------- processes


class Proc:
    """A flowtunnel subprocess with stderr appended to ``log_path``; restartable with the same arguments."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        # a developer's proxy settings must not capture test traffic
        clean = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
        self.env = {**clean, **(env or {})}
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.exit_codes: list[int] = []

    async def start(self, ready: str) -> None:
        """Start and wait until the log (since this start) contains ``ready``; raise if it dies first."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as fh:
            self.proc = await asyncio.create_subprocess_exec(
                *FLOWTUNNEL, *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=fh, stderr=fh, env=self.env
            )
        self.starts += 1
        deadline = time.monotonic() + _READY_TIMEOUT
        while True:
            text = self.log_text(offset)
            if ready in text:
                return
            if self.proc.returncode is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before ready:\n{text}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {_READY_TIMEOUT:.0f} s:\n{text}")
            await asyncio.sleep(0.05)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def kill9(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.exit_codes.append(await self.proc.wait())

    async def terminate(self, grace: float = 30.0) -> int:
        """SIGTERM and wait; SIGKILL (and return -9) if it does not stop within ``grace`` seconds."""
        assert self.proc is not None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), grace)
        except TimeoutError:
            await self.kill9()
            return -9
        self.exit_codes.append(code)
        return code

    def log_text(self, offset: int = 0) -> str:
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", "replace")


class GatewayProc(Proc):
    def __init__(
        self, workdir: Path, *, forward: Sequence[str], store: bool, extra: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_tcp_port()
        self.data = workdir / "gateway"
        argv = ["gateway", "--listen", f"127.0.0.1:{self.port}", "--data", str(self.data),
                "--status-interval", "86400", *extra]
        for target in forward:
            argv += ["--forward", target]
        if not store:
            argv.append("--no-store")
        super().__init__("gateway", argv, workdir / "gateway.log", env=env)

    async def start(self, ready: str = "listening on") -> None:
        await super().start(ready)

    @property
    def journal_path(self) -> Path:
        return self.data / "journal.sqlite"


class AgentProc(Proc):
    def __init__(
        self, workdir: Path, *, gateway_url: str, agent_id: str, key: str, extra: Sequence[str] = (),
        env: dict[str, str] | None = None, name: str = "agent", spool: Path | None = None,
    ) -> None:
        self.udp_port = free_udp_port()
        self.spool = spool or (workdir / name / "spool" if name != "agent" else workdir / "spool")
        self.agent_id = agent_id
        argv = ["agent", "--gateway", gateway_url, "--listen", f"udp://127.0.0.1:{self.udp_port}",
                "--spool", str(self.spool), "--agent-id", agent_id, *FAST_AGENT, *extra]
        # the key through the environment, as the CLI recommends (argument lists are world-readable)
        env = {"FLOWTUNNEL_AGENT_KEY": key, **(env or {})}
        super().__init__(name, argv, workdir / f"{name}.log", env=env)

    async def start(self, ready: str = "running: spool") -> None:
        await super().start(ready)

    def status(self) -> dict[str, Any]:
        """The agent's ``status.json`` (written every ``--status-interval``), {} while there is none."""
        try:
            data = json.loads((self.spool / "status.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def spool_progress(self) -> tuple[int, int]:
        """(last seq spooled, seq acknowledged by the gateway), read from the spool without locking it."""
        path = self.spool / "spool.sqlite"
        candidates = [path] if path.exists() else sorted(self.spool.glob("*.sqlite"))
        if not candidates:
            return 0, 0
        try:
            db = sqlite3.connect(f"file:{candidates[0]}?mode=ro", uri=True, timeout=5.0)
            try:
                meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
                row = db.execute("SELECT seq FROM cursors WHERE name = 'gateway'").fetchone()
            finally:
                db.close()
        except sqlite3.Error:
            return -1, -1
        return int(meta.get("next_seq", 1)) - 1, int(row[0]) if row else 0


async def enroll(data: Path, name: str) -> tuple[str, str]:
    """``flowtunnel enroll NAME --data DIR --format json`` → (agent id, key text)."""
    proc = await asyncio.create_subprocess_exec(
        *FLOWTUNNEL, "enroll", name, "--data", str(data), "--format", "json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"flowtunnel enroll {name} failed ({proc.returncode}): {err.decode()}")
    doc = json.loads(out)
    return str(doc["agent_id"]), str(doc["key"])


# ------------------------------------------------------------------------------------------- data


@functools.cache
def exported(version: int = 9, flows: int = 2000, seed: int = 1) -> tuple[tuple[bytes, ...], int]:
    """softflowd's export datagrams for a synthetic trace (run once per process) and its record count."""
    with tempfile.TemporaryDirectory(prefix="ft-reliability-") as tmp:
        trace = make_trace(Path(tmp) / "trace.pcap", flows=flows, seed=seed)
        export = capture_softflowd(trace.path, version)
    return tuple(export.payloads), export.stats.records


def read_journal(path: Path) -> list[tuple[str, int, bytes]]:
    """Every journal entry as (stream, stream_seq, payload), in journal order (gateway stopped)."""
    out: list[tuple[str, int, bytes]] = []
    log = DurableLog(LogConfig(path=path, quota_bytes=0))
    try:
        after = 0
        while batch := log.read(after=after, limit=10_000, max_bytes=64 << 20):
            out.extend((e.stream, e.stream_seq or 0, e.datagram.payload) for e in batch)
            after = batch[-1].seq
    finally:
        log.close()
    return out


# ------------------------------------------------------------------------------------------- scenarios


@dataclass(slots=True)
class Run:
    """What a fault plan can touch while a scenario runs."""

    workdir: Path
    rng: random.Random
    link: LinkEmulator
    gateway: GatewayProc
    agent: AgentProc
    sending: asyncio.Event  # cleared: the exporter pauses
    sent: list[bytes] = field(default_factory=list)
    faults: int = 0
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # failed expectations of the plan itself
    done_sending: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_sent(self, count: int, *, within: float = 120.0) -> None:
        """Until at least ``count`` datagrams were sent (or sending finished)."""
        deadline = time.monotonic() + within
        while len(self.sent) < count and not self.done_sending.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.sent)} of {count} datagrams sent in {within:.0f} s")
            await asyncio.sleep(0.02)

    async def wait_spooled(self, *, within: float = 20.0) -> None:
        """Until the agent's spool holds everything sent so far (call with the exporter paused)."""
        deadline = time.monotonic() + within
        while self.agent.spool_progress()[0] < len(self.sent):
            if time.monotonic() > deadline:
                spooled = self.agent.spool_progress()[0]
                raise TimeoutError(f"agent spooled {spooled} of {len(self.sent)} within {within:.0f} s")
            await asyncio.sleep(0.05)

    def uploading(self) -> bool:
        """The agent holds datagrams the gateway has not acknowledged (or its spool cannot be read now)."""
        spooled, acked = self.agent.spool_progress()
        return spooled < 0 or acked < spooled

    async def sleep_random(self, low: float, high: float) -> None:
        await asyncio.sleep(self.rng.uniform(low, high))


FaultPlan = Callable[[Run], Coroutine[Any, Any, None]]


async def _no_faults(run: Run) -> None:
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    """One row of docs/reliability.md: a fault plan applied while softflowd's stream crosses flowtunnel."""

    name: str
    description: str
    plan: FaultPlan = _no_faults
    seed: int = 1
    version: int = 9
    flows: int = 2000
    repeat: int = 1  # the capture is sent this many times (soak variants)
    rate: float = 80.0  # datagrams per second towards the agent
    agent_args: tuple[str, ...] = ()
    gateway_args: tuple[str, ...] = ()
    nfcapd: bool = False
    store: bool = False
    setup: Callable[[LinkEmulator], None] | None = None
    drain_timeout: float = 90.0
    #: after the drain, before the processes stop: what the run must have exercised (problems, [] if none)
    check: Callable[[Run], list[str]] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What a scenario measured. ``verdict`` is "pass" or "FAIL: <reasons>"."""

    scenario: str
    description: str
    seed: int
    faults: int
    sent: int
    delivered: int
    duplicated: int
    lost: int
    in_order: bool
    forwarded_missing: int
    forwarded_again: int  # extra copies the forward sink re-emitted (at-least-once after a crash)
    nfcapd_records: int | None
    expected_records: int
    key_leaks: list[str]
    notes: list[str]
    seconds: float
    link_bytes_up: int
    link_bytes_down: int
    verdict: str

    @property
    def ok(self) -> bool:
        return self.verdict == "pass"


def _is_subsequence(part: Sequence[bytes], whole: Sequence[bytes]) -> bool:
    it = iter(whole)
    return all(any(p == w for w in it) for p in part)


def key_variants(key_text: str) -> list[str]:
    """Forms in which a leaked key could show up in a log: text, raw base64 body, hex, standard base64."""
    body = key_text.removeprefix("ftk1_")
    raw = base64.urlsafe_b64decode(body + "=")
    return [key_text, body, raw.hex(), base64.b64encode(raw).decode().rstrip("="), repr(raw)[2:-1]]


def find_leaks(texts: Sequence[str], key_text: str) -> list[str]:
    return [v for v in key_variants(key_text) if any(v in t for t in texts)]


async def _send(run: Run, payloads: Sequence[bytes], rate: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    try:
        interval = 1.0 / rate
        next_at = time.monotonic()
        for payload in payloads:
            if not run.sending.is_set():
                await run.sending.wait()
                next_at = time.monotonic()
            sock.sendto(payload, ("127.0.0.1", run.agent.udp_port))
            run.sent.append(payload)
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
    finally:
        sock.close()
        run.done_sending.set()


async def _drain(run: Run, within: float) -> bool:
    """Until the agent spooled all that was sent (or stopped growing) and the gateway acknowledged it."""
    deadline = time.monotonic() + within
    stable_since, last = time.monotonic(), (-2, -2)
    while time.monotonic() < deadline:
        progress = run.agent.spool_progress()
        if progress != last:
            stable_since, last = time.monotonic(), progress
        spooled, acked = progress
        if spooled >= 0 and acked >= spooled and (
            spooled >= len(run.sent) or time.monotonic() - stable_since > 2.0
        ):
            return True
        await asyncio.sleep(0.1)
    return False


async def run_scenario(scenario: Scenario, workdir: Path) -> Outcome:
    """Run ``scenario`` in ``workdir`` (created) and measure it; never raises for a failed invariant."""
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    started = time.monotonic()
    payloads, records = await asyncio.to_thread(exported, scenario.version, scenario.flows)
    payloads = payloads * scenario.repeat
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        capture = stack.enter_context(UdpCapture())
        forward = [capture.url]
        nfcapd: Nfcapd | None = None
        if scenario.nfcapd:
            nfcapd = stack.enter_context(Nfcapd(workdir))
            forward.append(nfcapd.url)
        gateway = GatewayProc(workdir, forward=forward, store=scenario.store, extra=scenario.gateway_args)
        agent_id, key = await enroll(gateway.data, f"site-{scenario.name}"[:63])
        await gateway.start()
        async with LinkEmulator(upstream=("127.0.0.1", gateway.port), seed=scenario.seed) as link:
            if scenario.setup is not None:
                scenario.setup(link)
            agent = AgentProc(workdir, gateway_url=link.url, agent_id=agent_id, key=key,
                              extra=scenario.agent_args)
            await agent.start()
            run = Run(workdir=workdir, rng=random.Random(scenario.seed), link=link, gateway=gateway,
                      agent=agent, sending=asyncio.Event())
            run.sending.set()
            drained = False
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(_send(run, payloads, scenario.rate), name="exporter")
                    tg.create_task(scenario.plan(run), name="faults")
                link.clear_faults()
                link.set_mode(Mode.FORWARD)
                if not gateway.running:
                    await gateway.start()
                if not agent.running:
                    await agent.start()
                drained = await _drain(run, scenario.drain_timeout)
                if not drained:
                    notes.append(f"agent did not drain within {scenario.drain_timeout:.0f} s "
                                 f"(spooled, acked = {agent.spool_progress()})")
                elif scenario.check is not None:
                    run.problems.extend(await asyncio.to_thread(scenario.check, run))
                # forwarding lags the journal a little: wait until the capture goes quiet
                await asyncio.to_thread(capture.wait_quiet, 0.5, 30.0)
            finally:
                for proc in (agent, gateway):
                    if proc.running:
                        code = await proc.terminate()
                        if code != 0:
                            run.problems.append(f"{proc.name} exited with {code} on SIGTERM")
            link_stats = link.stats()
        nfcapd_records: int | None = None
        if nfcapd is not None:
            try:
                nfcapd_records = len(await asyncio.to_thread(nfcapd.records))
            except (RuntimeError, ValueError) as exc:  # nfdump could not read what nfcapd wrote
                run.problems.append(f"nfcapd's files unreadable: {exc}")
                nfcapd_records = -1
        forwarded = capture.payloads
    journal = await asyncio.to_thread(read_journal, gateway.journal_path)
    mine = [(seq, payload) for stream, seq, payload in journal if stream == agent_id]
    seqs = [seq for seq, _ in mine]
    distinct = dict(mine)
    duplicated = len(mine) - len(distinct)
    by_seq = [distinct[s] for s in sorted(distinct)]
    in_order = seqs == sorted(seqs) and _is_subsequence(by_seq, run.sent)
    lost = len(run.sent) - len(distinct)
    have = Counter(forwarded)
    need = Counter(by_seq)
    forwarded_missing = sum(max(0, n - have[p]) for p, n in need.items())
    forwarded_again = sum(max(0, have[p] - n) for p, n in need.items())
    leaks = find_leaks([gateway.log_text(), agent.log_text()], key)
    reasons = []
    if lost:
        reasons.append(f"{lost} lost")
    if duplicated:
        reasons.append(f"{duplicated} duplicated in the journal")
    if not in_order:
        reasons.append("order broken")
    if forwarded_missing:
        reasons.append(f"{forwarded_missing} never forwarded")
    if nfcapd_records is not None and nfcapd_records < records * scenario.repeat:
        reasons.append(f"nfcapd has {nfcapd_records} of {records * scenario.repeat} records")
    if leaks:
        reasons.append("key in a log")
    if not drained:
        reasons.append("not drained")
    reasons.extend(run.problems)
    notes.extend(run.notes)
    return Outcome(
        scenario=scenario.name, description=scenario.description, seed=scenario.seed, faults=run.faults,
        sent=len(run.sent), delivered=len(distinct), duplicated=duplicated, lost=lost, in_order=in_order,
        forwarded_missing=forwarded_missing, forwarded_again=forwarded_again, nfcapd_records=nfcapd_records,
        expected_records=records * scenario.repeat, key_leaks=leaks, notes=notes,
        seconds=time.monotonic() - started, link_bytes_up=link_stats.bytes_from_client,
        link_bytes_down=link_stats.bytes_from_server,
        verdict="pass" if not reasons else "FAIL: " + ", ".join(reasons),
    )


def failed_outcome(scenario: Scenario, error: BaseException, seconds: float) -> Outcome:
    """The row of a scenario that could not run to the end (a process would not start, ...)."""
    text = " ".join(str(error).split())[:300]
    return Outcome(
        scenario=scenario.name, description=scenario.description, seed=scenario.seed, faults=0, sent=0,
        delivered=0, duplicated=0, lost=0, in_order=False, forwarded_missing=0, forwarded_again=0,
        nfcapd_records=None, expected_records=0, key_leaks=[], notes=[], seconds=seconds, link_bytes_up=0,
        link_bytes_down=0, verdict=f"FAIL: did not run to the end ({type(error).__name__}: {text})",
    )


def describe(outcome: Outcome) -> str:
    """A one-paragraph account of an outcome for assertion messages."""
    fields: dict[str, Any] = {
        k: getattr(outcome, k)
        for k in ("verdict", "faults", "sent", "delivered", "duplicated", "lost", "in_order",
                  "forwarded_missing", "forwarded_again", "nfcapd_records", "expected_records", "notes")
    }
    return f"{outcome.scenario} (seed {outcome.seed}): " + ", ".join(f"{k}={v}" for k, v in fields.items())


_LOG_LINE = re.compile(r"^\S+Z (?P<level>[A-Z]+) (?P<logger>\S+): (?P<message>.*)$")


def log_lines(text: str, level: str | None = None) -> list[str]:
    """The log lines of a flowtunnel process (optionally only those of ``level``)."""
    out = []
    for line in text.splitlines():
        m = _LOG_LINE.match(line)
        if m and (level is None or m.group("level") == level):
            out.append(line)
    return out


# ------------------------------------------------------------------------------------------- ad-hoc stacks


@dataclass(slots=True)
class Stack:
    """A gateway, a link emulator and an agent, for tests that script their own story."""

    workdir: Path
    gateway: GatewayProc
    link: LinkEmulator
    agent: AgentProc
    agent_id: str
    key: str
    capture: UdpCapture

    async def send(self, payloads: Sequence[bytes], *, rate: float = 500.0,
                   source: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        """Send ``payloads`` to the agent from ``source``, paced at ``rate`` per second."""
        family = socket.AF_INET6 if ":" in source[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind(source)
            for i, payload in enumerate(payloads):
                sock.sendto(payload, ("127.0.0.1", self.agent.udp_port))
                if i % 10 == 9:
                    await asyncio.sleep(10 / rate)

    async def spooled(self, count: int, *, within: float = 30.0) -> None:
        """Until the agent's spool holds ``count`` datagrams."""
        deadline = time.monotonic() + within
        while self.agent.spool_progress()[0] < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent spooled {self.agent.spool_progress()[0]} of {count}")
            await asyncio.sleep(0.05)

    async def drained(self, count: int, *, within: float = 60.0) -> None:
        """Until the agent spooled ``count`` datagrams and the gateway acknowledged them all."""
        deadline = time.monotonic() + within
        while True:
            spooled, acked = self.agent.spool_progress()
            if spooled >= max(count, 0) and acked >= spooled:  # (-1, -1): the spool was unreadable
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent spooled {spooled}, acked {acked}, expected {count}")
            await asyncio.sleep(0.1)

    async def stop(self) -> list[int]:
        codes = []
        for proc in (self.agent, self.gateway):
            if proc.running:
                codes.append(await proc.terminate())
        return codes

    def journal(self) -> list[tuple[str, int, bytes]]:
        return read_journal(self.gateway.journal_path)


@contextlib.asynccontextmanager
async def stack(
    workdir: Path,
    *,
    name: str = "site-1",
    store: bool = False,
    record: bool = False,
    seed: int = 1,
    agent_args: Sequence[str] = (),
    gateway_args: Sequence[str] = (),
    start_agent: bool = True,
    log_level: str = "info",
    forward: bool = True,
    spool: Path | None = None,
) -> AsyncIterator[Stack]:
    """Gateway (forwarding to a UDP capture) ← link emulator ← agent, all on loopback; stopped on exit."""
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    with UdpCapture() as capture:
        env = {"FLOWTUNNEL_LOG_LEVEL": log_level}
        gateway = GatewayProc(workdir, forward=[capture.url] if forward else [], store=store,
                              extra=gateway_args, env=env)
        agent_id, key = await enroll(gateway.data, name)
        await gateway.start()
        try:
            async with LinkEmulator(upstream=("127.0.0.1", gateway.port), seed=seed, record=record) as link:
                agent = AgentProc(workdir, gateway_url=link.url, agent_id=agent_id, key=key, extra=agent_args,
                                  env=env, spool=spool)
                st = Stack(workdir=workdir, gateway=gateway, link=link, agent=agent, agent_id=agent_id,
                           key=key, capture=capture)
                if start_agent:
                    await agent.start()
                try:
                    yield st
                finally:
                    await st.stop()
        finally:
            if gateway.running:
                await gateway.terminate()
