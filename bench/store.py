"""Store benchmark: the flow rate the whole chain sustains into DuckDB with zero loss, beside nfcapd.

End to end: softflowd's v9 export of a generated trace is sent over loopback UDP, paced, to a real
``flowtunnel agent`` process (agent defaults: 1 s latency target), which uploads over HTTP to a real
``flowtunnel gateway`` process, whose store sink decodes it into DuckDB. Each step sends at one flow rate for
``--seconds`` with fresh processes; it passes when

- nothing was lost: the agent dropped nothing (kernel receive buffer included, read by the agent with
  ``SO_MEMINFO``) and the store holds every flow record sent, exactly (the gateway's status: rows and cursor);
- and it kept pace: every record was stored at most ``LAG_BOUND`` seconds (plus the agent's 1 s latency
  target) after the last datagram was sent. A slower chain builds a backlog that grows with the step's
  length; within the bound, the rate is sustained rather than absorbed by a buffer.

Also measured in the same run: nfcapd taking the same datagrams straight over UDP (the reference: a lossless
collector that stores flows but forwards nothing and authenticates nothing), and the store sink alone
draining a journal filled beforehand (its ceiling on this machine, one process).

Run from the repository root: ``python bench/store.py`` prints markdown; ``--write`` also puts it in the
"Store" section of ``docs/benchmarks.md``. Needs softflowd and nfcapd/nfdump (Debian).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    UNBUDGETED,
    AgentProc,
    Nfcapd,
    StoreGatewayProc,
    add_common_args,
    capture_softflowd,
    cpu_seconds,
    enroll_agent,
    free_udp_port,
    machine,
    make_trace,
    md_table,
    replace_section,
    send_paced,
    udp_drops,
    utc_now,
    wait_udp_drained,
    workdir,
)
from flowtunnel.store import StoreSink

SECTION = "Store"
GOAL = 100_000  # flows/s sustained with zero loss (issue 4)
LAG_BOUND = 3.0  # seconds after the last datagram (plus the agent's latency target) to have stored it all
AGENT_LATENCY = 1.0
TICK = 0.005  # the sender's burst interval


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    flows_per_s: float  # asked
    datagrams: int
    records: int
    send_seconds: float
    stored: int
    lag: float  # seconds from the last datagram sent until every record was stored (inf: not within bound)
    drops: dict[str, int]
    kernel_drops: int
    agent_cpu: float
    gateway_cpu: float
    detail: str

    @property
    def ok(self) -> bool:
        return (
            self.stored == self.records
            and not self.drops
            and not self.kernel_drops
            and self.lag <= LAG_BOUND + AGENT_LATENCY
        )

    @property
    def achieved(self) -> float:
        """Flow records per second sent (what the step sustained, when it passed)."""
        return self.records / self.send_seconds if self.send_seconds else 0.0


def _store_status(gateway: StoreGatewayProc) -> dict[str, Any]:
    sinks = gateway.status().get("sinks", {})
    store = sinks.get("store", {})
    return store if isinstance(store, dict) else {}


def run_step(
    payloads: Sequence[bytes], per_datagram: float, flows_per_s: float, seconds: float, work: Path
) -> Step:
    """One step at ``flows_per_s`` for ``seconds``, with a fresh gateway and agent under ``work``."""
    work.mkdir(parents=True)
    rate = flows_per_s / per_datagram  # datagrams/s
    count = max(1, round(rate * seconds / len(payloads))) * len(payloads)  # whole repetitions: exact count
    stream = (list(payloads) * (count // len(payloads)))[:count]
    records = round(count * per_datagram)
    data = work / "gateway"
    key = enroll_agent(data, "bench")
    port = free_udp_port()
    with StoreGatewayProc(data, extra=[*UNBUDGETED, "--status-interval", "0.5"]) as gateway:
        gateway.start()
        agent = AgentProc(
            work / "spool", gateway=gateway.url, agent_id="bench", key=key, port=port,
            extra=["--latency", f"{AGENT_LATENCY:g}s", "--status-interval", "0.5", "--rcvbuf", "64MiB",
                   "--buffer-datagrams", "200000"],
        )
        with agent:
            agent.start()
            assert agent.proc is not None
            assert gateway.proc is not None
            cpu0 = cpu_seconds(agent.proc.pid), cpu_seconds(gateway.proc.pid)
            spent = send_paced(stream, ("127.0.0.1", port), rate, tick=TICK)
            sent_at = time.monotonic()
            stored, lag = 0, float("inf")
            bound = LAG_BOUND + AGENT_LATENCY
            while time.monotonic() - sent_at <= bound:
                stored = int(_store_status(gateway).get("rows", 0) or 0)
                if stored >= records:
                    lag = time.monotonic() - sent_at
                    break
                time.sleep(0.05)
            cpu1 = cpu_seconds(agent.proc.pid), cpu_seconds(gateway.proc.pid)
            detail = ""
            if lag == float("inf"):
                # How far behind: let it finish (bounded) to tell a slow chain from a lossy one.
                last, last_change = stored, time.monotonic()
                while stored < records and time.monotonic() - last_change < 20:
                    time.sleep(0.2)
                    stored = int(_store_status(gateway).get("rows", 0) or 0)
                    if stored != last:
                        last, last_change = stored, time.monotonic()
                behind = time.monotonic() - sent_at
                detail = (
                    f"all stored {behind:.1f} s after the last datagram" if stored >= records
                    else f"{stored:,} of {records:,} stored"
                )
            st_agent = agent.status() or {}
            drops = {k: int(v) for k, v in dict(st_agent.get("drops", {})).items() if v}
            kernel = udp_drops(port)
            agent.stop()
        gateway.stop()
    return Step(
        flows_per_s=flows_per_s, datagrams=count, records=records, send_seconds=spent, stored=stored, lag=lag,
        drops=drops, kernel_drops=kernel, agent_cpu=cpu1[0] - cpu0[0], gateway_cpu=cpu1[1] - cpu0[1],
        detail=detail,
    )


def nfcapd_reference(payloads: Sequence[bytes], records: int, work: Path) -> dict[str, float]:
    """nfcapd taking ``payloads`` sent as fast as one Python socket sends them; records/s if lossless."""
    work.mkdir(parents=True)
    with Nfcapd(work, extra_args=()) as nf:
        started = time.monotonic()
        spent = send_paced(payloads, nf.addr, 0)
        wait_udp_drained(nf.addr[1], timeout=30)  # then it has read (and processed) every datagram
        elapsed = time.monotonic() - started
        stored = len(nf.records())
        drops = udp_drops(nf.addr[1])
    return {"stored": stored, "records": records, "seconds": elapsed, "send_seconds": spent, "drops": drops}


def sink_only(datagrams: list[Any], work: Path) -> dict[str, float]:
    from tests.store._support import fill_journal, run_sink_until, to_datagrams  # after _common's sys.path

    work.mkdir(parents=True)
    journal = fill_journal(work / "journal.sqlite", to_datagrams(datagrams))
    sink = StoreSink(data_dir=work / "data", query_socket=False)
    cpu, started = time.process_time(), time.perf_counter()
    asyncio.run(run_sink_until(sink, journal, limit=3600))
    out = {"stored": sink.rows, "seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu}
    journal.close()
    return out


def bench(args: argparse.Namespace) -> str:
    rates = [float(r) for r in args.rates.split(",")]
    with workdir("ft-bench-store-") as work:
        trace = make_trace(work / "trace.pcap", flows=args.flows, seed=3)
        export = capture_softflowd(trace.path, 9)
        payloads = export.payloads
        per_datagram = export.stats.records / len(payloads)
        steps: list[Step] = []
        for i, fps in enumerate(rates):
            step = run_step(payloads, per_datagram, fps, args.seconds, work / f"step{i}")
            steps.append(step)
            print(
                f"store: {fps:,.0f} flows/s: {'ok' if step.ok else 'FAIL'} "
                f"(stored {step.stored:,}/{step.records:,}, lag {step.lag:.1f} s, drops {step.drops}, "
                f"kernel {step.kernel_drops}, agent {step.agent_cpu:.2f} CPU-s, "
                f"gateway {step.gateway_cpu:.2f}) "
                f"{step.detail}",
                file=sys.stderr,
            )
            if not step.ok and not args.all_steps:
                break
        ref_reps = max(1, round(args.reference_records / export.stats.records))
        ref = nfcapd_reference(payloads * ref_reps, export.stats.records * ref_reps, work / "nfcapd")
        alone = sink_only(export.datagrams * ref_reps, work / "sink")

    passed = [s for s in steps if s.ok]
    best = max(passed, key=lambda s: s.achieved) if passed else None
    rows = []
    for s in steps:
        per100k = 100_000 / s.records
        rows.append([
            f"{s.flows_per_s:,.0f}", f"{s.datagrams / s.send_seconds:,.0f}", f"{s.records:,}",
            f"{s.stored:,}", f"**{s.achieved:,.0f}**" if s.ok else f"{s.achieved:,.0f}",
            f"{s.lag:.1f} s" if s.lag != float("inf") else f"> {LAG_BOUND + AGENT_LATENCY:g} s",
            f"{s.agent_cpu * per100k:.2f} / {s.gateway_cpu * per100k:.2f}",
            ("none" if not s.drops and not s.kernel_drops else f"{s.drops} kernel {s.kernel_drops}"),
            "ok" if s.ok else f"FAIL{': ' + s.detail if s.detail else ''}",
        ])
    table = md_table(
        ["flows/s asked", "datagrams/s sent", "records sent", "records stored", "flows/s sustained",
         "stored after last send", "CPU-s per 100k records (agent / gateway)", "loss", "step"],
        rows, "rrrrrrrll",
    )
    ref_rate = float(ref["stored"]) / float(ref["seconds"])
    alone_rate = float(alone["stored"]) / float(alone["seconds"])
    alone_cpu = float(alone["stored"]) / float(alone["cpu"]) if alone["cpu"] else 0.0
    reached = best.achieved if best else 0.0
    # The paced sender ends a hair behind its schedule (99,99x flows/s for 100,000 asked): a passing step
    # asked at the goal rate, sent within 1 % of it, meets the goal.
    met = best is not None and best.flows_per_s >= GOAL and reached >= 0.99 * best.flows_per_s
    lines = [
        f"Command: `python bench/store.py --flows {args.flows} --seconds {args.seconds:g} --rates "
        f"{args.rates}`, {utc_now()}.",
        f"Machine: {machine()}. The sender, agent and gateway share these CPUs.",
        "",
        f"Stream: softflowd v9 export of a generated {args.flows:,}-conversation trace "
        f"({len(payloads):,} datagrams, {per_datagram:.1f} flow records per datagram), repeated to fill "
        f"{args.seconds:g} s per step at the rate asked, from one UDP socket paced in {TICK * 1000:g} ms "
        "bursts. Each step starts a fresh agent (defaults, such as the 1 s latency target, except a 64 MiB "
        "receive buffer and room for 200,000 datagrams in memory, `--rcvbuf 64MiB --buffer-datagrams "
        "200000`) and gateway (store on). A step passes when the agent dropped nothing (kernel buffer "
        "included), the "
        f"store holds exactly every record sent, and all were stored within {LAG_BOUND:g} s (+ the 1 s "
        "latency target) of the last datagram sent. CPU is utime + stime of each process during the step.",
        "",
        table,
        "",
        f"**Sustained end to end with zero loss: {reached:,.0f} flows/s** "
        f"(goal >= {GOAL:,}: {'met' if met else f'not met, {reached / GOAL:.0%} of it'}; a step asked at "
        "the goal rate must pass, its sender within 1 % of the rate asked: a paced sender ends a hair behind "
        "its schedule).",
        "",
        f"Reference, same run: nfcapd took {int(ref['stored']):,} of {int(ref['records']):,} records sent "
        f"as fast as one Python socket sends ({ref['send_seconds']:.2f} s), {int(ref['drops'])} socket "
        "drops: "
        f"{ref_rate:,.0f} flows/s, a lower bound of what it can take (the sender was the limit). "
        f"flowtunnel's sustained rate is {reached / ref_rate:.2f} of that figure, while it also spools "
        "durably at the agent, seals, authenticates and journals every datagram exactly once.",
        "",
        f"The store sink alone, draining a journal filled beforehand (one process): "
        f"{int(alone['stored']):,} records in {alone['seconds']:.2f} s ({alone_rate:,.0f} records/s, "
        f"{alone_cpu:,.0f} records per CPU second).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    parser.add_argument("--flows", type=int, default=10_000, help="conversations in the generated trace")
    parser.add_argument("--seconds", type=float, default=15.0, help="how long each step sends")
    parser.add_argument(
        "--rates", default="25000,50000,75000,100000,125000",
        help="flow rates (records/s) of the steps, in order; the run stops at the first failing step",
    )
    parser.add_argument("--all-steps", action="store_true", help="run every step even after a failure")
    parser.add_argument(
        "--reference-records", type=int, default=100_000, help="records sent to nfcapd and the sink alone"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.flows, args.seconds, args.rates, args.reference_records = 2000, 3.0, "5000,10000", 20_000
    text = bench(args)
    print(text)
    if args.write:
        replace_section(args.doc, SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
