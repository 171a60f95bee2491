"""Reliability report: runs every fault-injection scenario, writes docs/reliability.md from what it measured.

Run from the repository root::

    python bench/reliability.py                        # quick variants (~2 min), writes docs/reliability.md
    python bench/reliability.py --soak --seconds 600   # plus the randomised soak variants, 600 s each
    python bench/reliability.py --seed 7 --only kill-gateway   # replay one scenario, print the page only

Each scenario (tests/reliability/scenarios.py) sends softflowd's export datagrams through a real agent, the
link emulator (tests/linkemu.py) and a real gateway while its fault plan breaks things; the harness
(tests/reliability/harness.py) then counts, from the gateway's journal, what was delivered, duplicated and
lost, and checks the forward sink got everything at least once. This command writes the page's intro, its
``## Results`` table and its ``## Open gaps`` list; the page's other sections are written by hand and kept.
Exit status: 0 when every scenario passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import datetime
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.reliability.harness import Outcome, Scenario, describe, failed_outcome, run_scenario  # noqa: E402
from tests.reliability.scenarios import SOAK_SECONDS_ENV, quick_scenarios, soak_scenarios  # noqa: E402

from _common import with_section  # noqa: E402

DOC = ROOT / "docs" / "reliability.md"

_INTRO = """\
# Reliability: what breaking things on purpose showed

flowtunnel promises that every datagram reaching the agent arrives in the gateway's journal exactly once and
in order, whatever the link and the processes do, and that the collector behind the udp-forward sink gets it
at least once (DESIGN.md, Invariants). Each row of the results is one scenario, run by

    {command}

on {date} (seed {seed}, {variant} variant; {machine}).
**The results table is produced by that command; do not edit it by hand.**

How a scenario runs: softflowd exports a synthetic trace once (v9, 2,000 flows → 142 datagrams; 1,000 flows
for the GPRS row); the harness replays those datagrams to a real `flowtunnel agent` at a steady rate (pausing
while the agent is down, since UDP to a dead port is lost before flowtunnel), the agent uploads through the
link emulator (`tests/linkemu.py`, an asyncio TCP proxy: latency, bandwidth cap, RSTs, black holes,
outages, proxy answers) to a real `flowtunnel gateway`, which forwards to a UDP capture (and nfcapd where
noted). The fault plan runs alongside, all its randomness from the seed. Then the harness reads the
gateway's journal (kept untrimmed for the run) and counts per agent sequence number:

- **delivered**: distinct datagrams of the agent in the journal; **duplicated**: journal entries beyond the
  first for a sequence number; **lost**: sent minus delivered;
- **forward missing / forwarded again**: delivered datagrams the udp-forward sink never re-emitted (must be
  0), and extra copies it re-emitted (allowed: forwarding is at-least-once across a gateway crash, the
  batch in flight is sent again; re-announced templates are not counted);
- **verdict** `pass` needs: nothing lost or duplicated, journal order = send order, byte-identical payloads,
  every delivered datagram re-emitted by the forward sink at least once (nfcapd: at least the exporter's
  record count), both processes exiting 0 on the final SIGTERM, the agent drained, and no form of the
  agent's key in either process's log.

The agent runs the default ladder, so after its first batch by POST it carries batches as WebSocket
messages (issue 14's bytes preference): outages, resets and kills hit that connection. The scenarios whose
faults pick HTTP requests (`cut-connections`, `proxy-answers`, `soak-mixed`: they match `POST /v1/b`) run
the agent with `--rungs post,get`; a fault no request met fails a quick scenario (armed is not injected: on
ws, none would). `quiet-kill`: a quiet site whose batches go as stream-compression frames over ws; its check
fails the run unless the last agent sealed stream frames.

Replay a row: `FLOWTUNNEL_SEED=<seed> pytest tests/reliability -k <scenario>`; soak rows:
`FLOWTUNNEL_SOAK_SECONDS=600 pytest -m soak tests/reliability` (each soak scenario loops its faults for that
long, default 120 s).
"""

def open_gaps() -> list[tuple[str, str, str]]:
    """(file, test, reason) of every strict xfail in tests/reliability and tests/security: the known gaps."""
    gaps = []
    for path in sorted([*ROOT.glob("tests/reliability/test_*.py"), *ROOT.glob("tests/security/test_*.py")]):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for deco in node.decorator_list:
                if not (isinstance(deco, ast.Call) and ast.unparse(deco.func) == "pytest.mark.xfail"):
                    continue
                kw = {k.arg: k.value for k in deco.keywords}
                strict = kw.get("strict")
                reason = kw.get("reason")
                if isinstance(strict, ast.Constant) and strict.value is True and reason is not None:
                    text = ast.literal_eval(reason)
                    gaps.append((str(path.relative_to(ROOT)), node.name, str(text)))
    return gaps


def gaps_section() -> str:
    gaps = open_gaps()
    lines = ["Every strict `xfail` test in `tests/reliability/` and `tests/security/`, listed by this\n"
             "command from the test files: each one fails the suite the day its bug is fixed, so this list\n"
             "cannot go stale unnoticed.\n"]
    if not gaps:
        lines.append("None.\n")
    for file, test, reason in gaps:
        lines.append(f"- `{file}::{test}`: {reason}")
    return "\n".join(lines) + "\n"


def _machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def table(outcomes: Sequence[Outcome]) -> str:
    rows = [
        "| scenario | faults injected | sent | delivered | duplicated | lost | in order | forward missing "
        "| forwarded again | link bytes up / down | seconds | verdict |",
        "|---|---|---:|---:|---:|---:|:-:|---:|---:|---:|---:|---|",
    ]
    for o in outcomes:
        rows.append(
            f"| `{o.scenario}` | {o.faults}: {o.description} | {o.sent} | {o.delivered} | {o.duplicated} "
            f"| {o.lost} | {'yes' if o.in_order else '**no**'} | {o.forwarded_missing} | {o.forwarded_again} "
            f"| {o.link_bytes_up:,} / {o.link_bytes_down:,} | {o.seconds:.0f} "
            f"| {o.verdict if o.ok else '**' + o.verdict + '**'} |"
        )
    return "\n".join(rows) + "\n"


def results_section(outcomes: Sequence[Outcome]) -> str:
    notes = [f"- `{o.scenario}`: {'; '.join(o.notes)}" for o in outcomes if o.notes]
    return table(outcomes) + (("\nNotes from the runs:\n\n" + "\n".join(notes) + "\n") if notes else "")


def render(outcomes: Sequence[Outcome], *, command: str, seed: int, variant: str,
           page: str | None = None) -> str:
    """``page`` with what this command measured in place: its intro (the text before the first section),
    ``## Results`` and ``## Open gaps``. The sections in between are written by hand (what the faults outside
    the table showed, scale-out, findings) and kept as they are; with no page, only the generated parts."""
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    intro = _INTRO.format(command=command, date=date, seed=seed, variant=variant, machine=_machine())
    first = page.find("\n## ") if page is not None else -1
    text = intro + ("\n" + page[first + 1:] if first >= 0 and page is not None else "")
    # Results is the page's first section, Open gaps its last: the order puts a missing one there.
    order = ("Results", *re.findall(r"^## (.+?)[ \t]*$", text, flags=re.M), "Open gaps")
    text = with_section(text, "Results", results_section(outcomes), order)
    return with_section(text, "Open gaps", gaps_section(), order)


async def run_all(scenarios: Sequence[Scenario], workdir: Path) -> list[Outcome]:
    outcomes = []
    for scenario in scenarios:
        print(f"running {scenario.name} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            outcome = await run_scenario(scenario, workdir / scenario.name)
        except Exception as exc:  # one broken scenario must not lose the others' rows
            outcome = failed_outcome(scenario, exc, time.monotonic() - started)
        print(f"  {describe(outcome)}", file=sys.stderr, flush=True)
        outcomes.append(outcome)
    return outcomes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--soak", action="store_true", help="also run the randomised soak scenarios")
    parser.add_argument("--seconds", type=float, default=None,
                        help=f"fault-loop seconds per soak scenario (sets {SOAK_SECONDS_ENV}; default 120)")
    parser.add_argument("--seed", type=int, default=1, help="seed of every scenario's randomness (default 1)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these scenarios")
    parser.add_argument("--no-write", action="store_true", help="print the page instead of writing it")
    parser.add_argument("--out", type=Path, default=DOC,
                        help=f"page to write (default {DOC.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    if args.seconds is not None:
        os.environ[SOAK_SECONDS_ENV] = str(args.seconds)
    scenarios = quick_scenarios(args.seed) + (soak_scenarios(args.seed) if args.soak else [])
    if args.only:
        unknown = set(args.only) - {s.name for s in scenarios}
        if unknown:
            parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; known: "
                         f"{', '.join(s.name for s in scenarios)}")
        scenarios = [s for s in scenarios if s.name in args.only]
    with tempfile.TemporaryDirectory(prefix="ft-reliability-") as tmp:
        outcomes = asyncio.run(run_all(scenarios, Path(tmp)))
    command = "python bench/reliability.py" + (" --soak" if args.soak else "")
    if args.soak and args.seconds is not None:
        command += f" --seconds {args.seconds:g}"
    if args.seed != 1:
        command += f" --seed {args.seed}"
    old = args.out.read_text(encoding="utf-8") if args.out.exists() else None
    page = render(outcomes, command=command, seed=args.seed, variant="quick + soak" if args.soak else "quick",
                  page=old)
    if args.no_write or args.only:
        print(page)
    else:
        args.out.write_text(page, encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
