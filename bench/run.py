"""Run every benchmark and rewrite ``docs/benchmarks.md``: the one command behind that page.

Runs, one after the other (they share the machine's two cores, so never at once), each as its own process with
its own write flag: ``wire.py``, ``throughput.py``, ``footprint.py``, ``latency.py`` (sections "Wire
efficiency", "Throughput", "Agent footprint", "Latency") and the codec's and store's own benches,
``decode.py`` ("Decoding") and ``store.py`` ("Store"), ``ladder.py`` and ``console.py`` ("Console"), when
they exist. A bench that fails is reported and the
others still run; the exit status is 1 if any failed.

``python bench/run.py`` (a full run takes roughly 20-30 minutes) or ``python bench/run.py --quick`` (a few
minutes: small streams, short intervals); ``--only wire,latency`` runs a subset.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: name -> (script, args for a full run, args for --quick); the decode and store benches take their own flags
BENCHES: dict[str, tuple[str, list[str], list[str]]] = {
    "wire": ("wire.py", ["--write"], ["--write", "--quick"]),
    "throughput": ("throughput.py", ["--write"], ["--write", "--quick"]),
    "footprint": ("footprint.py", ["--write", "--profile"], ["--write", "--quick"]),
    "latency": ("latency.py", ["--write"], ["--write", "--quick"]),
    "decode": ("decode.py", ["--write", "--profile"], ["--write", "--flows", "5000", "--repeat", "1"]),
    "store": ("store.py", ["--write"], ["--write", "--quick"]),
    "ladder": ("ladder.py", ["--write"], ["--write", "--quick"]),
    "console": ("console.py", ["--write"], ["--write", "--quick"]),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short runs of every bench")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHES)}")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown bench {', '.join(unknown)} (known: {', '.join(BENCHES)})")
    failed: list[str] = []
    for name in names:
        script, full, quick = BENCHES[name]
        path = HERE / script
        if not path.exists():
            print(f"run.py: {script} does not exist yet: its section is left as it is", file=sys.stderr)
            failed.append(f"{name} (missing)")
            continue
        cmd = [sys.executable, str(path), *(quick if args.quick else full)]
        print(f"run.py: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        started = time.monotonic()
        log = Path(tempfile.gettempdir()) / f"flowtunnel-bench-{name}.log"
        with log.open("wb") as out:
            code = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
        took = time.monotonic() - started
        if code:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print(
                f"run.py: {name} FAILED (exit {code}, {took:.0f} s); last lines of {log}:\n  "
                + "\n  ".join(tail),
                file=sys.stderr,
            )
            failed.append(name)
        else:
            print(f"run.py: {name} done in {took:.0f} s", file=sys.stderr)
    if failed:
        print(f"run.py: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"run.py: every bench ran; see {ROOT / 'docs' / 'benchmarks.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
