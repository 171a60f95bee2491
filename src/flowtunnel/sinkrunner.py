"""Sinks as their own processes on a shared JetStream journal (``flowtunnel sink KIND --journal nats://...``).

The kinds, their factories, options and positions are the gateway's registry
(``flowtunnel.gateway.sinks.registry``): the same sink code runs in a gateway on the embedded journal and
here on a durable pull consumer. ``run_sink`` opens a durable pull consumer named after the sink, runs the
sink on it until SIGTERM/SIGINT and restarts it after a failure; every ``status_interval`` it writes
``DATA/sink-<name>.json``.

Delivery: ``store`` commits the stream sequence in the DuckDB transaction of its rows (exactly once);
``parquet`` names each file by the sequence range it holds and recovers its position from the names (exactly
once); ``jsonl`` writes the sequence in each line (``_seq``: a reader drops a repeated one after a crash);
``forward`` is at least once (a crash between sending and acknowledging repeats that batch to the collectors).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flowtunnel.config import masked_repr
from flowtunnel.datadir import PrivateUmask, prepare_private_dir
from flowtunnel.errors import ConfigError, describe_failure
from flowtunnel.gateway.sinks.registry import SINK_KINDS, SinkKind, SinkSettings, build_sink, lock_sink
from flowtunnel.statusfile import write_json_atomic

if TYPE_CHECKING:
    from flowtunnel.journal.jetstream import JetStreamConfig

__all__ = ["SINK_KINDS", "SinkKind", "SinkOptions", "run_sink"]

log = logging.getLogger("flowtunnel.sink")


@dataclass(frozen=True, slots=True, kw_only=True)
class SinkOptions:
    """What ``flowtunnel sink`` was told: the journal, the sink's own directory and name, its kind's options
    (``out``: parquet's directory; ``shard``: (I, N), this process's share of the agents; ``flush``: how
    often parquet writes a file while flows arrive)."""

    journal: str
    data: Path
    name: str
    retain: float | None = None
    jsonl: str | None = None
    forward: tuple[str, ...] = ()
    out: Path | None = None
    shard: tuple[int, int] = (1, 1)
    flush: float = 10.0
    status_interval: float = 2.0
    restart_delay: float = 5.0

    def __repr__(self) -> str:
        return masked_repr(self)  # the journal URL may carry a NATS password

    def settings(self) -> SinkSettings:
        """The registry's settings for the sink these options describe."""
        from flowtunnel.gateway.config import GatewayConfig
        from flowtunnel.gateway.metrics import GatewayMetrics

        try:
            config = GatewayConfig(data=self.data, forward=self.forward, jsonl=self.jsonl, retain=self.retain,
                                   parquet=self.out, parquet_flush=self.flush)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return SinkSettings(config=config, data_dir=self.data, metrics=GatewayMetrics(), name=self.name,
                            shard=self.shard)


async def run_sink(kind: str, opts: SinkOptions, stop: asyncio.Event) -> int:
    """The body of ``flowtunnel sink KIND``: the exit code."""
    from flowtunnel.journal.jetstream import parse_journal_url

    spec = SINK_KINDS.get(kind)
    if spec is None:
        raise ConfigError(f"sink kind {kind!r} is not one of {', '.join(sorted(SINK_KINDS))}")
    try:
        jcfg = parse_journal_url(opts.journal, create=False)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    # Private from the start, as the gateway's data directory (the store holds flows in clear): created 0700,
    # someone else's or a group-writable one refused in one line (ConfigError) before anything is written.
    prepare_private_dir(opts.data, what="sink directory")
    umask = PrivateUmask()
    umask.acquire()  # what libraries create on their own (DuckDB's database and WAL) is 0600 too
    try:
        lock = lock_sink(kind, data_dir=opts.data, parquet=opts.out, name=opts.name)
        try:
            return await _run(spec, kind, opts, jcfg, stop)
        finally:
            lock.release()
    finally:
        umask.release()


async def _run(
    spec: SinkKind, kind: str, opts: SinkOptions, jcfg: JetStreamConfig, stop: asyncio.Event
) -> int:
    from flowtunnel.journal.jetstream import JetStreamReader

    sink = build_sink(spec, opts.settings())
    reader = JetStreamReader(jcfg, opts.name)
    await reader.open()
    log.info("sink %s (%s, %s) on %s, consumer %s from stream seq %d", opts.name, kind, spec.delivery,
             jcfg.describe(), opts.name, reader.cursor(opts.name))
    status_path = opts.data / f"sink-{opts.name}.json"
    started = time.time()

    async def supervise() -> None:
        seen: set[str] = set()
        while True:
            try:
                await sink.run(reader, reader)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                cause = f"{type(exc).__name__}: {exc}"
                if cause not in seen:
                    seen.add(cause)
                    text, expected = describe_failure(exc)  # one line for an environment problem
                    log.error("sink %s failed, restarting in %.1f s: %s", opts.name, opts.restart_delay, text,
                              exc_info=None if expected else exc)
                await asyncio.sleep(opts.restart_delay)

    def status() -> dict[str, object]:
        doc: dict[str, object] = {"kind": "sink", "sink": kind, "name": opts.name, "pid": os.getpid(),
                                  "started": started, "updated": time.time(), "delivery": spec.delivery}
        with contextlib.suppress(Exception):
            doc["sink_status"] = dict(sink.status())
        doc["consumer"] = reader.status()
        return doc

    async def write_status() -> None:
        while True:
            await asyncio.sleep(opts.status_interval)
            with contextlib.suppress(OSError, ValueError, TypeError):
                await asyncio.to_thread(write_json_atomic, status_path, status())

    task = asyncio.get_running_loop().create_task(supervise(), name=f"sink:{opts.name}")
    writer = asyncio.get_running_loop().create_task(write_status(), name=f"sink:{opts.name}:status")
    try:
        stopper = asyncio.get_running_loop().create_task(stop.wait())
        await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopper
    finally:
        for t in (task, writer):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        with contextlib.suppress(OSError, ValueError, TypeError):
            write_json_atomic(status_path, status())
        await reader.close()
        log.info("sink %s stopped", opts.name)
    return 0
