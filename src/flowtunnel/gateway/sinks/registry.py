"""The registry of sink kinds: the one place a sink is added, for the gateway and for ``flowtunnel sink``.

Each ``SinkKind`` says how to build the sink (``factory``, from ``SinkSettings``), when a gateway runs it in
process (``wanted``, from the gateway's config), the ``flowtunnel sink KIND`` options it takes, the name of
its position (its journal cursor in process; the durable consumer's name on a shared journal) and where that
position is kept (``own``: committed with the sink's side effect, e.g. in DuckDB or in Parquet file names;
``consumer``: the journal's cursor / the consumer's acknowledgement). The gateway builds every wanted kind in
registry order; ``flowtunnel sink KIND --journal nats://...`` builds one kind on a durable pull consumer.

Adding a sink: write it (``Sink``: ``name``, ``run(journal, notify)``, ``status()``), add a factory and a
``SinkKind`` below, and a config key (``GatewayConfig``) if the gateway should run it in process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from flowtunnel.datadir import DirLock
from flowtunnel.errors import ConfigError
from flowtunnel.gateway.config import GatewayConfig
from flowtunnel.gateway.metrics import GatewayMetrics
from flowtunnel.gateway.sinks.base import Sink

__all__ = ["SINK_KINDS", "SinkKind", "SinkSettings", "build_sink", "lock_sink"]

log = logging.getLogger("flowtunnel.gateway")


@dataclass(frozen=True, slots=True, kw_only=True)
class SinkSettings:
    """What a sink's factory is given.

    ``config``: the gateway's settings (in process), or settings made of ``flowtunnel sink``'s flags (the
    kind's own keys: ``forward``, ``jsonl``, ``retain``, ``parquet``); ``data_dir``: the sink's own state
    (forward mappings, the DuckDB store, template caches); ``name``: its position's name (None: the kind's
    ``position_name``); ``metrics``: where it counts; ``shard``: (I, N), this process takes the agents whose
    hash modulo N is I - 1 (the sinks that support several processes: ``parquet``).
    """

    config: GatewayConfig
    data_dir: Path
    metrics: GatewayMetrics
    name: str | None = None
    shard: tuple[int, int] = (1, 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class SinkKind:
    """One kind of sink; see the module docstring."""

    #: ``flowtunnel sink NAME``.
    name: str
    factory: Callable[[SinkSettings], Sink]
    #: Whether a gateway with this config runs the sink in process (never with a shared journal).
    wanted: Callable[[GatewayConfig], bool]
    #: The name of its position by default: its journal cursor in a gateway, its durable consumer's name.
    position_name: str
    #: ``own``: the sink commits its position with its side effect; ``consumer``: the journal holds it.
    position: Literal["own", "consumer"] = "consumer"
    #: The ``flowtunnel sink`` options (``dest`` names) the kind takes.
    options: tuple[str, ...] = ()
    delivery: str = "at-least-once"
    description: str = ""
    #: In a gateway, a sink that cannot be built is logged and left out (the journal keeps what it has not
    #: consumed, for when it can run); otherwise the gateway refuses to start.
    optional: bool = False


def lock_sink(kind: str, *, data_dir: Path, parquet: Path | None, name: str) -> DirLock:
    """One process per set of a sink's files, whether a gateway runs it in process or ``flowtunnel sink``
    does (issue 15 item 3, as the gateway's ``gateway.lock``): a store, jsonl or forward sink owns fixed names
    in its data directory (``store/flows.duckdb``, templates, the forward map), whatever its name; a parquet
    writer owns its state ``OUT/_flowtunnel/<name>.json``, so writers of other names (shards) share ``OUT``.
    ``ConfigError`` naming the holder's pid when taken."""
    if kind == "parquet" and parquet is not None:
        from flowtunnel.store.parquet import STATE_DIR

        where = parquet / STATE_DIR
        where.mkdir(parents=True, exist_ok=True)
        return DirLock.acquire(where, f"{name}.lock", what=f"parquet sink {name}")
    return DirLock.acquire(data_dir, f"sink-{kind}.lock", what=f"{kind} sink")


def _store(s: SinkSettings) -> Sink:
    from flowtunnel.store.sink import StoreSink

    sink = StoreSink(data_dir=s.data_dir, retain_seconds=s.config.retain, name=s.name or "store")
    _register_store_metrics(sink, s.metrics)
    return sink


def _register_store_metrics(sink: Sink, metrics: GatewayMetrics) -> None:
    """Per-exporter rows, decode errors and loss (the store's collector) on /metrics."""
    from flowtunnel.store.metrics import StoreCollector
    from flowtunnel.store.sink import StoreSink

    if not isinstance(sink, StoreSink):
        return
    try:
        metrics.registry.register(StoreCollector(sink))
    except (ValueError, TypeError) as exc:  # duplicate names: a bug, but not worth refusing to start
        log.warning("store metrics not registered: %s", exc)


def _jsonl(s: SinkSettings) -> Sink:
    from flowtunnel.gateway.sinks.jsonl import JsonlSink

    if not s.config.jsonl:
        raise ConfigError("sink jsonl needs --output FILE ('-' for stdout)")
    sink = JsonlSink(data_dir=s.data_dir, path=s.config.jsonl)
    sink.name = s.name or "jsonl"
    return sink


def _forward(s: SinkSettings) -> Sink:
    from flowtunnel.gateway.sinks.udp_forward import UdpForwardConfig, UdpForwardSink

    cfg = s.config
    if not cfg.forward:
        raise ConfigError("sink forward needs --forward udp://HOST:PORT (repeatable)")
    sink = UdpForwardSink(
        UdpForwardConfig(
            data_dir=s.data_dir, targets=cfg.targets, source_pool=cfg.source_pool,
            source_ports=cfg.source_port_range, identity_port=cfg.identity_port, spoof=cfg.spoof,
            spoof_map=cfg.spoof_addresses, max_sources=cfg.max_sources, forward_rate=cfg.forward_rate,
        ),
        metrics=s.metrics,
    )
    sink.name = s.name or "udp-forward"
    return sink


def _parquet(s: SinkSettings) -> Sink:
    from flowtunnel.store.parquet import ParquetSink

    if s.config.parquet is None:
        raise ConfigError("sink parquet needs --out DIR")
    return ParquetSink(out=s.config.parquet, writer=s.name or "parquet", shard=s.shard,
                       flush_interval=s.config.parquet_flush)


#: Every sink kind, in the order a gateway starts them.
SINK_KINDS: Final[dict[str, SinkKind]] = {
    k.name: k
    for k in (
        SinkKind(name="forward", factory=_forward, wanted=lambda c: bool(c.forward),
                 position_name="udp-forward", options=("forward",), delivery="at-least-once",
                 description="re-emit datagrams to UDP collectors"),
        SinkKind(name="jsonl", factory=_jsonl, wanted=lambda c: bool(c.jsonl), position_name="jsonl",
                 options=("jsonl",), delivery="at-least-once, _seq in each line",
                 description="decoded records as JSON lines"),
        SinkKind(name="store", factory=_store, wanted=lambda c: c.store, position_name="store",
                 position="own", options=("retain",), delivery="exactly-once", optional=True,
                 description="decode into DuckDB (query --data DIR)"),
        SinkKind(name="parquet", factory=_parquet, wanted=lambda c: c.parquet is not None,
                 position_name="parquet", position="own", options=("parquet", "shard", "parquet_flush"),
                 delivery="exactly-once",
                 description="decoded flows as Parquet files named by sequence range (query --parquet DIR)"),
    )
}


def build_sink(kind: str | SinkKind, settings: SinkSettings) -> Sink:
    """The sink of ``kind`` (a name or a ``SinkKind``); ``ConfigError`` for an unknown kind or bad options."""
    spec = kind if isinstance(kind, SinkKind) else SINK_KINDS.get(kind)
    if spec is None:
        raise ConfigError(f"sink kind {kind!r} is not one of {', '.join(sorted(SINK_KINDS))}")
    return spec.factory(settings)
