"""``flowtunnel demo``: arguments, progress display and the summary; the work is in ``flowtunnel.demo``."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

from flowtunnel.cli._common import init_logging
from flowtunnel.errors import ConfigError
from flowtunnel.runtime import run_daemon

__all__ = ["register"]

_STAGES = {
    "replay": "replaying the capture to the agent (UDP)",
    "upload": "agent → gateway (sealed HTTP batches)",
    "store": "gateway → DuckDB store",
    "forward": "gateway → collector (UDP)",
}


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "demo",
        help="gateway + agent on loopback, a bundled capture replayed through them, what arrived",
        description=(
            "Start a gateway (with the DuckDB store and UDP forwarding to a stand-in collector) and an agent "
            "in a temporary directory on loopback, replay a bundled NetFlow v5/v9/IPFIX capture (made with "
            "softflowd) to the agent, wait until everything arrived, print a summary and clean up. Exit "
            "status 0 when every record sent was stored and forwarded."
        ),
    )
    parser.add_argument("--capture", type=Path, default=None, metavar="FILE.pcap",
                        help="replay this capture instead of the bundled one")
    parser.add_argument("--rate", type=float, default=200.0, metavar="PPS",
                        help="datagrams per second sent to the agent (default 200)")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="work in DIR and keep it (gateway data, agent spool), not in a temporary one")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                        help="give up if the data has not arrived after this long (default 120)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from flowtunnel.demo import DemoConfig, DemoResult, Stage, run_demo

    # The services log at INFO; the demo's own output is the progress and the summary.
    init_logging(args, default_level="warning")
    try:
        config = DemoConfig(capture=args.capture, rate=args.rate, timeout=args.timeout, keep=args.keep)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if config.capture is not None and not config.capture.is_file():
        raise ConfigError(f"--capture {config.capture}: no such file")
    console = Console()
    outcome: list[DemoResult] = []

    async def main(stop: asyncio.Event) -> int:
        with Progress(
            TextColumn("{task.description:<44}"), BarColumn(), MofNCompleteColumn(), console=console,
            transient=False,
        ) as progress:
            tasks: dict[str, TaskID] = {}

            def report(stage: Stage) -> None:
                task = tasks.get(stage.name)
                if task is None:
                    task = tasks[stage.name] = progress.add_task(_STAGES.get(stage.name, stage.name),
                                                                 total=stage.total)
                progress.update(task, completed=stage.done, total=stage.total)

            demo = asyncio.ensure_future(run_demo(config, report))
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({demo, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
                if not demo.done():
                    demo.cancel()
                    await asyncio.gather(demo, return_exceptions=True)
            if demo.cancelled():
                console.print("[yellow]interrupted; cleaned up[/]")
                return 130
            try:
                outcome.append(demo.result())
            except TimeoutError:
                console.print(f"[red]the data did not arrive within {config.timeout:g} s[/]")
                return 1
        return 0

    code = run_daemon(main)
    if code or not outcome:
        return code or 1
    result = outcome[0]
    _summary(console, result)
    return 0 if result.ok else 1


def _summary(console: Console, r: Any) -> None:
    from flowtunnel.demo import DemoResult

    assert isinstance(r, DemoResult)
    versions = ", ".join(f"v{v}: {n}" for v, n in sorted(r.records_by_version.items()))
    counts = Table(title=f"flow records ({versions})", show_header=True)
    for col in ("sent by the exporters", "stored (DuckDB)", "forwarded (collector)"):
        counts.add_column(col, justify="right")
    counts.add_row(str(r.records_sent), str(r.records_stored), str(r.records_forwarded))
    console.print(counts)

    exporters = Table(title="exporters in the store")
    for col, right in (("exporter", False), ("version", True), ("flows", True), ("bytes", True)):
        exporters.add_column(col, justify="right" if right else "left")
    for row in r.exporters:
        exporters.add_row(*(str(v) for v in row))
    console.print(exporters)

    top = Table(title="top talkers (flowtunnel top --by src_addr)")
    for col, right in (("src_addr", False), ("bytes", True), ("packets", True), ("flows", True),
                       ("% bytes", True)):
        top.add_column(col, justify="right" if right else "left")
    for row in r.top:
        top.add_row(*(str(v) for v in row))
    console.print(top)

    wire = Table(title="bytes on the wire")
    wire.add_column("what")
    wire.add_column("bytes", justify="right")
    wire.add_row(f"raw UDP from the exporters ({r.datagrams_sent} datagrams, payload + 28)",
                 str(r.raw_udp_bytes))
    wire.add_row("HTTP agent → gateway, both directions, headers included", str(r.http_bytes))
    ratio = r.http_bytes / r.raw_udp_bytes if r.raw_udp_bytes else 0.0
    wire.add_row("HTTP / raw UDP", f"{ratio:.2f}")
    if r.compression_ratio is not None:
        wire.add_row("compression ratio of the batches (datagram bytes / sealed bytes)",
                     f"{r.compression_ratio:.2f}")
    console.print(wire)
    console.print(
        f"loss: between exporter and agent (NetFlow sequence numbers) {r.sequence_lost}, "
        f"in transit {r.transit_lost}"
    )
    if r.ok:
        console.print(
            f"[bold green]OK[/]: every record sent was stored and forwarded, exactly once "
            f"({r.seconds:.1f} s). Try: flowtunnel demo --keep DIR, then "
            "flowtunnel query --data DIR/gateway \"SELECT * FROM flows LIMIT 5\""
        )
    else:
        console.print("[bold red]MISMATCH[/]: records sent, stored and forwarded differ")
    logging.getLogger("flowtunnel.demo").debug("demo result %s", r)
