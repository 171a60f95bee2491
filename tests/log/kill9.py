"""One kill -9 harness for the log's tests: a writer process appends numbered batches (and trims) until it is
killed at a random instant, then the log must hold every committed batch whole, nothing after the last one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from flowtunnel.log import DurableLog, LogConfig

_WRITER = r"""
import sys
from pathlib import Path
from flowtunnel.datagram import Datagram
from flowtunnel.log import DurableLog, LogConfig
log = DurableLog(LogConfig(path=Path(sys.argv[1]), quota_bytes=0, {settings}))
batch = log.get_state("batches") or 0
while True:
    batch += 1
    n = 1 + batch % 50
    dgs = [Datagram(received_ns=batch, exporter="127.0.0.1", exporter_port=1, local_port=2,
                    payload=batch.to_bytes(4, "big") + i.to_bytes(4, "big") + bytes(batch % 300 + {pad}))
           for i in range(n)]
    res = log.append(dgs, state={{"batches": batch, "hwm": log.last_seq() + n}})
    if batch % 7 == 0:
        log.trim(res.first_seq - 200)
    sys.stdout.write(f"{{batch}} {{res.last_seq}}\n")
    sys.stdout.flush()
"""


def kill_9_rounds(path: Path, *, settings: str, pad: int, seed: int, pause: tuple[float, float],
                  rounds: int = 6) -> None:
    """``rounds`` writers on ``path`` (``LogConfig`` keyword arguments ``settings``, payloads of ``pad`` +
    0..299 bytes), each killed ``pause`` (a uniform range, seconds) after its first commit, the log checked
    after each: the last reported batch committed and at most one after it, seqs contiguous, the mark at the
    last seq, every batch not cut by a trim whole."""
    rnd = random.Random(seed)
    writer = _WRITER.format(settings=settings, pad=pad)
    for _round in range(rounds):
        proc = subprocess.Popen(
            [sys.executable, "-c", writer, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdout is not None
        assert proc.stderr is not None
        first = proc.stdout.readline()  # the writer is committing
        assert first, proc.stderr.read()
        time.sleep(rnd.uniform(*pause))
        os.kill(proc.pid, signal.SIGKILL)
        out = first + proc.stdout.read()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        reported = int(out.decode().split()[-2])
        with DurableLog(LogConfig(path=path, quota_bytes=0)) as lg:  # quick_check on open
            batches = lg.get_state("batches") or 0
            # the last reported batch committed; at most the one after it committed unreported
            assert reported <= batches <= reported + 1
            assert lg.get_state("hwm") == lg.last_seq()
            entries = lg.read(0, limit=1_000_000, max_bytes=1 << 40)
            seqs = [e.seq for e in entries]
            assert seqs == sorted(set(seqs))
            assert seqs == list(range(seqs[0], seqs[-1] + 1))
            assert seqs[-1] == lg.last_seq()
            by_batch: dict[int, list[int]] = {}
            for e in entries:
                p = e.datagram.payload
                by_batch.setdefault(int.from_bytes(p[:4], "big"), []).append(int.from_bytes(p[4:8], "big"))
            # every batch not cut by a trim is whole; the newest stored batch is the last committed one
            assert max(by_batch) == batches
            for b, idx in list(by_batch.items())[1:]:
                assert idx == list(range(1 + b % 50)), f"batch {b} is partial: {idx}"
