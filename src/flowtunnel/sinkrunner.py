"""Sinks as their own processes on a shared JetStream journal (``flowtunnel sink KIND --journal nats://...``).

The registry of sink kinds: each has a factory (from the command's options to a ``Sink``), the options it
takes and where its position lives (``position``: ``own`` when the sink commits the stream sequence with its
side effect, ``consumer`` when the durable consumer's acknowledgement is its position). ``run_sink`` opens a
durable pull consumer named after the sink, runs the sink on it until SIGTERM/SIGINT and restarts it after a
failure; every ``status_interval`` it writes ``DATA/sink-<name>.json``.

Delivery: ``store`` commits the stream sequence in the DuckDB transaction of its rows (exactly once);
``jsonl`` writes the sequence in each line (``_seq``: a reader drops a repeated one after a crash);
``forward`` is at least once (a crash between sending and acknowledging repeats that batch to the collectors).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowtunnel.errors import ConfigError
from flowtunnel.statusfile import write_json_atomic

__all__ = ["SINK_KINDS", "SinkKind", "SinkOptions", "run_sink"]

log = logging.getLogger("flowtunnel.sink")


@dataclass(frozen=True, slots=True, kw_only=True)
class SinkOptions:
    """What ``flowtunnel sink`` was told: the journal, the sink's own directory, its kind's options."""

    journal: str
    data: Path
    name: str
    retain: float | None = None
    jsonl: str | None = None
    forward: tuple[str, ...] = ()
    status_interval: float = 2.0
    restart_delay: float = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class SinkKind:
    """One kind of sink: ``factory`` builds it from the options; ``position`` says where its position is."""

    name: str
    factory: Callable[[SinkOptions], Any]
    options: tuple[str, ...] = ()
    position: str = "consumer"
    delivery: str = "at-least-once"
    description: str = field(default="")


def _store(opts: SinkOptions) -> Any:
    from flowtunnel.store.sink import StoreSink

    return StoreSink(data_dir=opts.data, retain_seconds=opts.retain, name=opts.name)


def _jsonl(opts: SinkOptions) -> Any:
    from flowtunnel.gateway.sinks.jsonl import JsonlSink

    if not opts.jsonl:
        raise ConfigError("sink jsonl needs --output FILE ('-' for stdout)")
    sink = JsonlSink(data_dir=opts.data, path=opts.jsonl)
    sink.name = opts.name
    return sink


def _forward(opts: SinkOptions) -> Any:
    from flowtunnel.gateway.config import GatewayConfig
    from flowtunnel.gateway.metrics import GatewayMetrics
    from flowtunnel.gateway.sinks.udp_forward import UdpForwardConfig, UdpForwardSink

    if not opts.forward:
        raise ConfigError("sink forward needs --forward udp://HOST:PORT (repeatable)")
    cfg = GatewayConfig(data=opts.data, forward=opts.forward)
    sink = UdpForwardSink(
        UdpForwardConfig(
            data_dir=opts.data, targets=cfg.targets, source_pool=cfg.source_pool,
            source_ports=cfg.source_port_range, identity_port=cfg.identity_port, spoof=cfg.spoof,
            spoof_map=cfg.spoof_addresses, max_sources=cfg.max_sources, forward_rate=cfg.forward_rate,
        ),
        metrics=GatewayMetrics(),
    )
    sink.name = opts.name
    return sink


#: The sink kinds ``flowtunnel sink`` runs (and the way to add one).
SINK_KINDS: dict[str, SinkKind] = {
    "store": SinkKind(name="store", factory=_store, options=("retain",), position="own",
                      delivery="exactly-once", description="decode into DuckDB (query --data DIR)"),
    "jsonl": SinkKind(name="jsonl", factory=_jsonl, options=("jsonl",), position="consumer",
                      delivery="at-least-once, _seq in each line",
                      description="decoded records as JSON lines"),
    "forward": SinkKind(name="forward", factory=_forward, options=("forward",), position="consumer",
                        delivery="at-least-once", description="re-emit datagrams to UDP collectors"),
}


async def run_sink(kind: str, opts: SinkOptions, stop: asyncio.Event) -> int:
    """The body of ``flowtunnel sink KIND``: the exit code."""
    from flowtunnel.journal.jetstream import JetStreamReader, parse_journal_url

    spec = SINK_KINDS.get(kind)
    if spec is None:
        raise ConfigError(f"sink kind {kind!r} is not one of {', '.join(sorted(SINK_KINDS))}")
    try:
        jcfg = parse_journal_url(opts.journal, create=False)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    opts.data.mkdir(parents=True, exist_ok=True)
    sink = spec.factory(opts)
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
                    log.error("sink %s failed, restarting in %.1f s: %s", opts.name, opts.restart_delay, exc,
                              exc_info=exc)
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
