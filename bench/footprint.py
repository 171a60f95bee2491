"""Agent-footprint benchmark: CPU and peak memory of the ``flowtunnel agent`` process at 100, 1,000 and 10,000
flows/s, beside nfcapd receiving the same stream in the same run.

Stream: softflowd's v9 export of a generated trace, sent from one paced UDP socket at the datagram rate that
carries
the flow rate asked (records per datagram of the stream). A fresh agent (default settings: 1 s latency target,
uploading to a real gateway over loopback) and a fresh nfcapd are measured per rate: CPU is utime + stime of
the
process (from /proc/<pid>/stat, children excluded) over the measuring interval after a warm-up, as % of one
core;
peak RSS is the process's VmHWM at the end (start-up included: imports are a large share of it).

Plus the agent's start-up: CPU and peak RSS of the process from its start until ready.

If the agent misses the goal at 1,000 flows/s (< 1 % CPU, < 32 MB RSS: issue 14), or with ``--profile``, the
run
profiles it with py-spy (when installed) and reports where the time goes, plus what
importing the agent alone costs.

Run from the repository root: ``python bench/footprint.py [--quick] [--write]``.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    Chain,
    Nfcapd,
    Stream,
    add_common_args,
    command_line,
    cpu_seconds,
    machine,
    md_table,
    peak_rss_kib,
    replace_section,
    send_paced,
    softflowd_streams,
    tool_version,
    utc_now,
    workdir,
)

SECTION = "Agent footprint"
FLOW_RATES = (100, 1_000, 10_000)
GOAL_CPU = 1.0  # % of one core at 1,000 flows/s (issue 14; 5 % before)
GOAL_RSS_MB = 32.0  # issue 14 (80 MB before)
GOAL_STARTUP_CPU = 0.3  # s of CPU from start to ready (issue 14)
#: the agent's own defaults, restored over the bench chain's test-friendly settings
AGENT_DEFAULTS = ["--status-interval", "2s", "--rcvbuf", "16MiB", "--latency", "1s"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Reading:
    cpu_percent: float
    peak_rss_kib: int
    datagrams: int
    loop_percent: float | None = None  # the event loop's thread (the process's first), % of one core


def _loop_seconds(pid: int) -> float:
    """utime + stime of ``pid``'s main thread (the agent's event loop; the others are its worker threads)."""
    stat = Path(f"/proc/{pid}/task/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _payloads_for(stream: Stream, count: int) -> list[bytes]:
    reps = -(-count // len(stream.payloads))
    return (stream.payloads * reps)[:count]


def measure(pid: int, send: Callable[[], object], warmup: float, interval: float,
            on_start: Callable[[], object] | None = None) -> Reading:
    """Run ``send`` in a thread; read ``pid``'s CPU over ``interval`` seconds after ``warmup`` (``on_start``
    called as that interval starts)."""
    thread = threading.Thread(target=send, name="bench-sender", daemon=True)
    thread.start()
    time.sleep(warmup)
    if on_start is not None:
        on_start()
    cpu0, loop0, t0 = cpu_seconds(pid), _loop_seconds(pid), time.monotonic()
    time.sleep(interval)
    cpu1, loop1, t1 = cpu_seconds(pid), _loop_seconds(pid), time.monotonic()
    thread.join()
    return Reading(cpu_percent=100.0 * (cpu1 - cpu0) / (t1 - t0), peak_rss_kib=peak_rss_kib(pid), datagrams=0,
                   loop_percent=100.0 * (loop1 - loop0) / (t1 - t0))


def agent_reading(
    stream: Stream, dgram_rate: float, warmup: float, interval: float, work: Path, profile: Path | None = None
) -> tuple[Reading, bool]:
    count = int(dgram_rate * (warmup + interval + 0.5)) + 1
    payloads = _payloads_for(stream, count)
    with Chain(work, agent_args=AGENT_DEFAULTS) as chain:
        pid = chain.agent_pid()
        spies: list[subprocess.Popen[bytes]] = []

        def start_profile() -> None:
            # From the end of the warm-up, for the interval measured: the start-up's one-off work (imports,
            # the first plans and compressors) is not what a steady agent spends its CPU on.
            assert profile is not None
            spies.append(subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--duration",
                 str(int(interval)), "--rate", "200", "--format", "raw", "--output", str(profile),
                 "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))

        reading = measure(pid, lambda: send_paced(payloads, chain.agent_addr, dgram_rate), warmup, interval,
                          on_start=start_profile if profile is not None else None)
        chain.wait(lambda: chain.acked() >= count, f"gateway acknowledged {count} datagrams", timeout=60)
        for spy in spies:
            spy.wait(60)
        # the gateway's mark, not the agent's status.json (rewritten only every 2 s with the defaults)
        delivered = chain.acked()
    return Reading(cpu_percent=reading.cpu_percent, peak_rss_kib=reading.peak_rss_kib, datagrams=delivered,
                   loop_percent=reading.loop_percent), delivered >= count


def nfcapd_reading(stream: Stream, dgram_rate: float, warmup: float, interval: float, work: Path) -> Reading:
    count = int(dgram_rate * (warmup + interval + 0.5)) + 1
    payloads = _payloads_for(stream, count)
    with Nfcapd(work) as nf:
        proc = nf._proc
        assert proc is not None
        reading = measure(proc.pid, lambda: send_paced(payloads, nf.addr, dgram_rate), warmup, interval)
    return reading


# VmHWM of the child itself: ru_maxrss would report the forked bench process's peak (kept over exec).
_PEAK = (
    "import resource;u = resource.getrusage(resource.RUSAGE_SELF);hwm = [l for l in "
    "open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1];print(u.ru_utime + u.ru_stime, hwm)"
)


def import_cost() -> tuple[float, int]:
    """CPU seconds and peak RSS (KiB) of a Python that only imports the agent's modules."""
    code = "import flowtunnel.cli.agent, flowtunnel.agent.service;" + _PEAK
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    cpu, rss = out.stdout.split()
    return float(cpu), int(rss)


def agent_startup(work: Path) -> tuple[float, int]:
    """CPU seconds and peak RSS (KiB) of a whole ``flowtunnel agent`` process from its start until it is
    ready (its first status written, the gateway reached), before any datagram: what a field box pays at
    each boot or restart (issue 14)."""
    with Chain(work, agent_args=AGENT_DEFAULTS) as chain:
        pid = chain.agent_pid()
        chain.wait(lambda: chain.agent_status().get("upload", {}).get("resyncs", 0) >= 1, "first resync",
                   timeout=30)
        return cpu_seconds(pid), peak_rss_kib(pid)


def bare_python_rss() -> int:
    """Peak RSS (KiB) of this interpreter doing nothing."""
    out = subprocess.run(
        [sys.executable, "-c", _PEAK], capture_output=True, text=True, check=True, timeout=60
    )
    return int(out.stdout.split()[1])


def summarise_profile(path: Path, top: int = 15) -> str:
    """py-spy's raw (collapsed) stacks → the functions with the most samples, own and inclusive."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        own[frames[-1]] += count
        for frame in set(frames):
            incl[frame] += count
    if not total:
        return "(no samples)"
    lines = [
        f"{total} samples of the agent's threads while busy (py-spy at 200/s, idle samples left out)",
        "",
        "own time (leaf frames):",
    ]
    lines += [f"  {100 * c / total:5.1f} %  {f}" for f, c in own.most_common(top)]
    lines += ["", "inclusive (frames in flowtunnel):"]
    lines += [f"  {100 * c / total:5.1f} %  {f}" for f, c in incl.most_common(200) if "flowtunnel" in f][:top]
    return "\n".join(lines)


def use_bytecode() -> None:
    """Compile flowtunnel to bytecode and let every process measured here load it, as an installed package
    does (pip compiles at install). A Python under ``PYTHONDONTWRITEBYTECODE`` (set in this project's shells)
    compiles each module from source at every start: measured, 0.20 s CPU and 39.3 MB peak RSS to import
    the agent, against 0.13 s and 37.9 MB from bytecode."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    package = Path(__file__).resolve().parent.parent / "src" / "flowtunnel"
    # and a tree PYTHONPATH names (an A/B pair's other code), which the processes measured load instead
    others = [Path(p) / "flowtunnel" for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    for tree in [package, *(o for o in others if o.is_dir())]:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree)], check=True, timeout=300)


def bench(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    use_bytecode()
    flows = 2_000 if args.quick else 25_000
    warmup, interval = (1.0, 2.0) if args.quick else (3.0, 20.0)
    rates = tuple(args.rates) if args.rates else (100, 1_000) if args.quick else FLOW_RATES
    stream = softflowd_streams(flows, versions=(9,))[0]
    per = stream.records / len(stream.payloads)
    rows: list[list[object]] = []
    summary: dict[str, Any] = {}
    profile_text = ""
    load_before = os.getloadavg()[0]
    if args.agent_only:  # A/B pairs: the agent's readings only, on stderr (PYTHONPATH=<src> picks the code)
        with workdir("ft-bench-fp-") as tmp:
            for rate in rates:
                agent, complete = agent_reading(stream, rate / per, warmup, interval, tmp / f"agent-{rate}")
                print(f"footprint: {rate}/s agent {agent.cpu_percent:.2f} % (event loop "
                      f"{agent.loop_percent or 0.0:.2f} %) {agent.peak_rss_kib / 1024:.1f} MB, "
                      f"{'complete' if complete else 'datagrams missing'}; load {load_before:.1f} -> "
                      f"{os.getloadavg()[0]:.1f}", file=sys.stderr)
        return "", summary
    with workdir("ft-bench-fp-") as tmp:
        for rate in rates:
            dgram_rate = rate / per
            agent, complete = agent_reading(stream, dgram_rate, warmup, interval, tmp / f"agent-{rate}")
            nf = nfcapd_reading(stream, dgram_rate, warmup, interval, tmp / f"nfcapd-{rate}")
            met = ""
            if rate == 1_000:
                ok = agent.cpu_percent < GOAL_CPU and agent.peak_rss_kib / 1024 < GOAL_RSS_MB
                met = f"< {GOAL_CPU:g} % and < {GOAL_RSS_MB:g} MB: {'met' if ok else 'missed'}"
                summary["goal_met"] = ok
            rows.append(
                [
                    f"{rate:,}",
                    f"{dgram_rate:,.1f}",
                    f"**{agent.cpu_percent:.1f} %**",
                    f"{agent.loop_percent or 0.0:.1f} %",
                    f"**{agent.peak_rss_kib / 1024:.1f} MB**",
                    f"{agent.cpu_percent * 10 / dgram_rate:.2f} ms",
                    f"{nf.cpu_percent:.2f} %",
                    f"{nf.peak_rss_kib / 1024:.1f} MB",
                    f"{agent.cpu_percent / nf.cpu_percent:.0f}x"
                    if nf.cpu_percent >= 0.1
                    else "n/a (nfcapd < 0.1 %)",
                    met,
                    "none" if complete else "datagrams missing",
                ]
            )
            summary[f"{rate}"] = agent
            print(
                f"footprint: {rate}/s agent {agent.cpu_percent:.1f} % {agent.peak_rss_kib / 1024:.1f} MB; "
                f"nfcapd {nf.cpu_percent:.1f} % {nf.peak_rss_kib / 1024:.1f} MB",
                file=sys.stderr,
            )
        spy = Path(sys.executable).parent / "py-spy"
        if args.profile or not summary.get("goal_met", True):
            if spy.exists() or shutil.which("py-spy"):
                prof = tmp / "profile.txt"
                agent_reading(stream, 1_000 / per, warmup, interval, tmp / "agent-profile", profile=prof)
                profile_text = summarise_profile(prof) if prof.exists() else "(py-spy wrote no profile)"
            else:  # the table's event-loop column is the split there is
                print("footprint: py-spy is not installed: no profile", file=sys.stderr)
        start_cpu, start_rss = agent_startup(tmp / "agent-startup")
    imp_cpu, imp_rss = import_cost()
    bare = bare_python_rss()
    load_after = os.getloadavg()[0]
    summary["startup_cpu"], summary["startup_rss_kib"] = start_cpu, start_rss
    body = [
        f"Command: {command_line('footprint.py', args)}, {utc_now()}.\nMachine: {machine()}. "
        f"Baseline: {tool_version(['nfcapd', '-V']) or 'nfcapd'} receiving the same stream.",
        f"Stream: softflowd v9 export of a generated trace ({per:.1f} flow records per datagram), sent at "
        "the datagram rate that carries each flow rate. Per rate, a fresh agent (defaults: `--latency 1s`, "
        "16 MiB receive buffer, status every 2 s) uploads to a gateway over loopback; CPU over "
        f"{interval:g} s after a {warmup:g} s warm-up, % of one core (utime + stime from /proc/<pid>/stat; "
        "the event loop's share from its thread's own stat, the rest is the worker threads: spool commits, "
        "sealing, status); peak RSS = VmHWM at the end. Every process runs flowtunnel from bytecode, as "
        f"installed. Load average (1 min) {load_before:.1f} at the start, {load_after:.1f} at the end: "
        "other jobs shared the machine, so read the figures as ± a few tenths of a percent.",
        md_table(
            [
                "flows/s",
                "datagrams/s",
                "agent CPU",
                "of which event loop",
                "agent peak RSS",
                "agent CPU per datagram",
                "nfcapd CPU",
                "nfcapd peak RSS",
                "agent / nfcapd CPU",
                "goal (1,000 flows/s)",
                "loss",
            ],
            rows,
            "rrrrrrrrrll",
        ),
        f"Start-up: the `flowtunnel agent` process from its start until ready (first resync with the "
        f"gateway done, no datagram yet) uses **{start_cpu:.2f} s CPU** and peaks at "
        f"**{start_rss / 1024:.1f} MB RSS** (goal <= {GOAL_STARTUP_CPU:g} s CPU: "
        f"{'met' if start_cpu <= GOAL_STARTUP_CPU else 'missed'}). Of that, a Python that only imports the "
        f"agent's modules uses {imp_cpu:.2f} s CPU and peaks at {imp_rss / 1024:.1f} MB RSS (a bare "
        f"interpreter: {bare / 1024:.1f} MB).",
    ]
    if profile_text:
        body.append(
            "<details><summary>Where the agent's time goes at 1,000 flows/s (py-spy)</summary>\n\n"
            "How to read it: `EpollSelector.select` (the event loop) and `_worker` (the thread pool) are "
            "threads waiting, which py-spy does not always tell from work; `DurableLog.append` is the "
            "spool's group commit (one SQLite transaction, fsync included, per `--commit-bytes` of datagrams "
            "or `--latency`); `Uploader._seal` is compression and sealing.\n\n```\n"
            + profile_text
            + "\n```\n</details>"
        )
    return "\n\n".join(body), summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    parser.add_argument(
        "--profile", action="store_true", help="profile the agent at 1,000 flows/s even if it meets the goal"
    )
    parser.add_argument(
        "--rates", type=lambda t: [int(r) for r in t.split(",")], default=None,
        help="flow rates to measure, comma-separated (default 100,1000,10000)",
    )
    parser.add_argument(
        "--agent-only", action="store_true",
        help="the agent's CPU and peak RSS per rate only, on stderr (no nfcapd, start-up, table): for A/B "
        "pairs, PYTHONPATH=<a tree's src> choosing the code",
    )
    args = parser.parse_args(argv)
    body, _ = bench(args)
    if args.agent_only:
        return 0
    print(body)
    if args.write:
        replace_section(args.doc, SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
