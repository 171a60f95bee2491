"""Latency benchmark: from a datagram reaching the agent to the gateway forwarding it, p50 and p99, at the
default
setting, beside pmacct's UDP replicator (nfacctd's tee plugin) relaying the same stream in the same run.

A paced sender stamps each datagram as it sends it to the agent (loopback: the agent has it within
microseconds);
the gateway's udp-forward sink re-emits it to a receiver in this process that stamps each arrival; datagrams
are
matched by content (the gateway may add template re-announcements, which match nothing). Both clocks are this
process's monotonic clock. The agent runs with its defaults (``--latency 1s``: when caught up it sends at most
once a second), and also with ``--latency 0.1s`` to show the knob.

Run from the repository root: ``python bench/latency.py [--quick] [--write]``.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from _common import (
    Chain,
    Stream,
    UdpCapture,
    add_common_args,
    command_line,
    free_udp_port,
    machine,
    md_table,
    replace_section,
    send_paced,
    softflowd_streams,
    tool_version,
    utc_now,
    wait_udp_bound,
    workdir,
)

SECTION = "Latency"
RATE = 100.0  # datagrams/s


def delays(sent: Sequence[bytes], sent_at: Sequence[float], cap: UdpCapture) -> tuple[list[float], int]:
    """Seconds from send to arrival of every sent datagram that arrived (FIFO among equal payloads), and the
    number that did not arrive."""
    arrivals: dict[bytes, collections.deque[float]] = collections.defaultdict(collections.deque)
    with cap._cond:
        for (payload, _), stamp in zip(cap.datagrams, cap.stamps, strict=True):
            arrivals[payload].append(stamp)
    out: list[float] = []
    missing = 0
    for payload, t in zip(sent, sent_at, strict=True):
        queue = arrivals.get(payload)
        if queue:
            out.append(queue.popleft() - t)
        else:
            missing += 1
    return out, missing


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def _payloads(stream: Stream, count: int) -> list[bytes]:
    # Each payload once (matching is by content): at most one pass over the stream.
    return stream.payloads[: min(count, len(stream.payloads))]


def flowtunnel_run(
    payloads: Sequence[bytes], rate: float, latency: str, work: Path
) -> tuple[list[float], int]:
    with (
        UdpCapture() as cap,
        Chain(
            work,
            forward=[cap.url],
            agent_args=[
                "--latency",
                latency,
                "--status-interval",
                "2s",
                "--rcvbuf",
                "16MiB",
            ],
        ) as chain,
    ):
        stamps: list[float] = []
        send_paced(payloads, chain.agent_addr, rate, stamps=stamps)
        chain.wait(lambda: chain.acked() >= len(payloads), "gateway acknowledged everything", timeout=60)
        cap.wait_quiet(1.0, timeout=30)
        return delays(payloads, stamps, cap)


def nfacctd_tee_run(payloads: Sequence[bytes], rate: float, work: Path) -> tuple[list[float], int]:
    work.mkdir(parents=True, exist_ok=True)
    port = free_udp_port()
    with UdpCapture() as cap:
        receivers = work / "receivers.lst"
        receivers.write_text(f"id=1\tip=127.0.0.1:{cap.port}\n")
        conf = work / "nfacctd.conf"
        conf.write_text(
            "\n".join(
                [
                    "daemonize: false",
                    "nfacctd_ip: 127.0.0.1",
                    f"nfacctd_port: {port}",
                    "plugins: tee[t]",
                    f"tee_receivers[t]: {receivers}",
                    "tee_transparent[t]: false",
                ]
            )
            + "\n"
        )
        with (work / "nfacctd.log").open("wb") as log:
            proc = subprocess.Popen(
                ["nfacctd", "-f", str(conf)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        try:
            wait_udp_bound(port, proc, timeout=15)
            time.sleep(0.5)  # the tee plugin starts after the core binds
            stamps: list[float] = []
            send_paced(payloads, ("127.0.0.1", port), rate, stamps=stamps)
            cap.wait_quiet(1.0, timeout=30)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return delays(payloads, stamps, cap)


def _ms(x: float) -> str:
    return f"{x * 1000:,.1f} ms" if x < 10 else f"{x:,.1f} s"


def bench(args: argparse.Namespace) -> str:
    seconds = 3.0 if args.quick else 30.0
    stream = softflowd_streams(2_000 if args.quick else 50_000, versions=(9,))[0]
    payloads = _payloads(stream, int(RATE * seconds))
    rows: list[list[object]] = []
    with workdir("ft-bench-lat-") as tmp:
        runs: list[tuple[str, tuple[list[float], int]]] = [
            (
                "flowtunnel, agent defaults (`--latency 1s`)",
                flowtunnel_run(payloads, RATE, "1s", tmp / "ft1"),
            ),
            ("flowtunnel, `--latency 0.1s`", flowtunnel_run(payloads, RATE, "0.1s", tmp / "ft01")),
        ]
        if shutil.which("nfacctd"):
            runs.append(
                ("nfacctd tee plugin (pmacct's UDP replicator)", nfacctd_tee_run(payloads, RATE, tmp / "tee"))
            )
    base = next((d for name, (d, _) in runs if name.startswith("nfacctd")), None)
    base_p50 = pct(base, 50) if base else None
    for name, (values, missing) in runs:
        p50, p99 = pct(values, 50), pct(values, 99)
        rows.append(
            [
                name,
                f"{len(values):,}",
                f"**{_ms(p50)}**",
                f"**{_ms(p99)}**",
                _ms(max(values) if values else 0.0),
                _ms(statistics.fmean(values)) if values else "-",
                f"{p50 / base_p50:,.0f}x" if base_p50 and not name.startswith("nfacctd") else "-",
                str(missing),
            ]
        )
        print(f"latency: {name}: p50 {_ms(p50)} p99 {_ms(p99)} missing {missing}", file=sys.stderr)
    tee = tool_version(["nfacctd", "-V"]) if shutil.which("nfacctd") else "nfacctd not installed: no baseline"
    return "\n\n".join(
        [
            f"Command: {command_line('latency.py', args)}, {utc_now()}.\nMachine: {machine()}. Baseline: "
            f"{tee}.",
            f"Stream: {len(payloads):,} datagrams of softflowd's v9 export, {RATE:g} datagrams/s from one "
            "paced socket. flowtunnel: UDP → agent → HTTP over loopback → gateway (journal commit) → "
            "udp-forward sink → receiver; baseline: UDP → nfacctd tee → receiver. Delay = arrival at the "
            "receiver minus send to the agent (same clock, same process).",
            md_table(
                ["path", "datagrams matched", "p50", "p99", "max", "mean", "p50 / baseline p50", "missing"],
                rows,
                "lrrrrrrr",
            ),
            "The agent's latency target bounds how long a datagram waits for its batch: with the default 1 "
            "s, a datagram waits between 0 and 1 s for the next upload, so p50 sits near half the target "
            "and p99 near the whole of it, plus the upload, the journal commit and the sink's turn.",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    args = parser.parse_args(argv)
    body = bench(args)
    print(body)
    if args.write:
        replace_section(args.doc, SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
