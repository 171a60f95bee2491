"""Summary of a gateway trace (``bench/fleet.py --trace FILE``, ``bench/gwtrace/``): the gateway's own
per-request latency and where the slowest 1 % spent it, loop stalls, garbage collections, journal commits.
``--split S``: the others' p99 before and after second S (the flood scenario's --flood-at), agent 0 left out,
and p99 of the total, the slot wait and the mark read per 5-second slice before S.
Run ``python bench/gwtrace_report.py FILE``."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

PHASES = ("head", "slot", "body", "open", "mark", "commit")


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def _phases(reqs: list[dict[str, Any]], label: str) -> None:
    total = sum(r["total"] for r in reqs) or 1.0
    shares = ", ".join(f"{k} {sum(r.get(k, 0.0) for r in reqs) / total:.0%}" for k in PHASES)
    sizes = [r.get("n", 0) for r in reqs]
    small = sum(1 for n in sizes if n <= 200)
    print(f"{label}: {len(reqs)} requests; time in {shares}; {small} of them <= 200 datagrams "
          f"(median {statistics.median(sizes) if sizes else 0})")


def report(doc: dict[str, Any], split: float | None) -> None:
    reqs = [r for r in doc["reqs"] if "total" in r]
    totals = [r["total"] for r in reqs]
    after_head = [r["total"] - r.get("head", 0.0) for r in reqs]
    print(f"gateway-side: {len(reqs)} requests, p50 {_pct(totals, 0.5):.0f} ms, "
          f"p99 {_pct(totals, 0.99):.0f} ms (after the batch header: p99 {_pct(after_head, 0.99):.0f} ms)")
    reqs.sort(key=lambda r: r["total"])
    _phases(reqs, "all")
    _phases(reqs[int(0.99 * len(reqs)):], "slowest 1 %")
    stalls = doc["stalls"]
    longest = max([s[3] for s in stalls] or [0.0]) * 1000
    print(f"loop callbacks over 20 ms: {len(stalls)}, wall {sum(s[1] for s in stalls):.1f} s, "
          f"CPU {sum(s[3] for s in stalls):.2f} s (longest CPU {longest:.0f} ms)")
    for gen in (0, 1, 2):
        cpu = [g[3] for g in doc["gcs"] if g[1] == gen]
        if cpu:
            print(f"gc generation {gen}: {len(cpu)} x, CPU {sum(cpu):.2f} s, p50 {_pct(cpu, 0.5):.1f} ms, "
                  f"max {max(cpu) * 1000:.1f} ms")
    for label, rows in (("commits that checkpointed (file grew)", [c for c in doc["commits"] if c[3] > 0]),
                        ("other commits", [c for c in doc["commits"] if c[3] <= 0])):
        walls = [c[1] for c in rows]
        if walls:
            print(f"{label}: {len(walls)}, p50 {_pct(walls, 0.5):.1f} ms, p99 {_pct(walls, 0.99):.1f} ms")
    takes, settles = doc.get("takes") or [], doc.get("settles") or []
    commits = doc["commits"]
    if takes and len(takes) == len(settles) == len(commits):
        # Rounds are serialised (one at a time), so the i-th take, commit and settle are one round's.
        to_thread = [c[0] - t for t, c in zip(takes, commits, strict=True)]
        back = [s - (c[0] + c[1]) for s, c in zip(settles, commits, strict=True)]
        rounds = sum(s - t for t, s in zip(takes, settles, strict=True))
        thread_cpu = f", {sum(c[4] for c in commits):.1f} s of CPU" if len(commits[0]) > 4 else ""
        in_group = sum(c[1] for c in commits)
        print(f"commit rounds: {rounds:.1f} s in all, {in_group:.1f} s in append_group{thread_cpu}; "
              f"to the thread p50 {_pct(to_thread, 0.5):.1f} ms, p99 {_pct(to_thread, 0.99):.1f} ms; "
              f"back to the loop p50 {_pct(back, 0.5):.1f} ms, p99 {_pct(back, 0.99):.1f} ms")
    for kind in ("background", "restart", "forced"):
        walls = [c[1] for c in doc.get("checkpoints") or [] if c[2] == kind]
        if walls:
            print(f"checkpoints ({kind}): {len(walls)}, p50 {_pct(walls, 0.5):.1f} ms, "
                  f"p99 {_pct(walls, 0.99):.1f} ms, max {max(walls) * 1000:.1f} ms")
    census = doc.get("census") or {}
    if census:
        print(f"objects tracked 40 s after start: {census['objects']} ({census['frozen']} frozen); most: "
              + ", ".join(f"{n} {t}" for t, n in census["types"][:6]))
    if split is not None and reqs:
        reqs = [r for r in reqs if "t0" in r]  # a request the trace saw only at its end has no start
        first = min(r["t0"] for r in reqs)
        others = [r for r in reqs if r.get("agent") not in (None, "fleet-00000")]
        before = [r["total"] for r in others if 5 <= r["t0"] - first < split]
        during = [r["total"] for r in others if split <= r["t0"] - first < 2 * split]
        b, d = _pct(before, 0.99), _pct(during, 0.99)
        print(f"others' p99 before {split:g} s: {b:.0f} ms ({len(before)}), "
              f"after: {d:.0f} ms ({len(during)}), ratio {d / b:.2f}")
        for lo in range(0, int(split), 5):
            part = [r for r in reqs if lo <= r["t0"] - first < lo + 5]
            if part:
                print(f"  {lo:2d}-{lo + 5:2d} s: {len(part)} requests, p99 total "
                      f"{_pct([r['total'] for r in part], 0.99):.0f} ms, slot "
                      f"{_pct([r.get('slot', 0.0) for r in part], 0.99):.0f} ms, mark "
                      f"{_pct([r.get('mark', 0.0) for r in part], 0.99):.0f} ms")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--split", type=float, default=None)
    ns = ap.parse_args(argv)
    report(json.loads(ns.trace.read_text()), ns.split)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
