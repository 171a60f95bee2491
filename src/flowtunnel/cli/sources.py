"""``flowtunnel sources``: which (agent, original exporter) each source address a collector sees stands for.

The udp-forward sink re-emits every (agent, exporter) from its own source address (a pool address, or with
``--spoof`` a forged one), so nfdump/nfacctd/goflow2 list the gateway's addresses as exporters. This listing,
read from ``DATA/forward-map.json`` (and the last ``status.json`` for sources that fell back), maps them back.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from flowtunnel.errors import FlowtunnelError

__all__ = ["read_sources", "register"]

COLUMNS = ("source_address", "source_port", "agent", "exporter", "mode")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "sources",
        help="map the source addresses collectors see back to (agent, original exporter)",
        description=(
            "List the udp-forward mapping of a gateway: for each source address (and port) a collector such "
            "as nfcapd sees as an exporter, the agent and the original exporter it stands for. Without "
            "--spoof the source is a bound pool address and port (nfdump shows the address as the "
            "exporter); with --spoof it is the agent's forged address and the exporter's own port ('*')."
        ),
    )
    parser.add_argument("--data", type=Path, required=True, metavar="DIR",
                        help="the gateway's data directory")
    parser.add_argument("--format", choices=["text", "csv", "json"], default="text",
                        help="text table (default), CSV with a header row, or JSON lines")
    parser.set_defaults(func=_run)


def read_sources(data_dir: Path) -> list[dict[str, object]]:
    """One row per (agent, exporter, family): ``COLUMNS``; ``FlowtunnelError`` if the map cannot be read."""
    path = data_dir / "forward-map.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        mappings = doc["mappings"]
    except FileNotFoundError:
        if not data_dir.is_dir():
            raise FlowtunnelError(f"no gateway data directory at {data_dir}") from None
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FlowtunnelError(f"cannot read {path}: {exc}") from None
    live: dict[tuple[str, str], dict[str, Any]] = {}
    try:
        status = json.loads((data_dir / "status.json").read_text(encoding="utf-8"))
        for m in status["sinks"]["udp-forward"]["mappings"]:
            live[(str(m["agent"]), str(m["exporter"]))] = m
    except (OSError, ValueError, KeyError, TypeError):
        pass
    rows: list[dict[str, object]] = []
    for m in mappings:
        if not isinstance(m, dict):
            continue
        agent, exporter = str(m.get("agent")), str(m.get("exporter"))
        state = live.get((agent, exporter), {})
        port = m.get("port") or 0
        # port 0: no socket of its own was bound, the raw socket forges the source (or, while the status
        # says "fallback", binding failed and the collector sees the gateway's own address)
        mode = "fallback" if state.get("fallback") else "bound" if port else "spoofed"
        rows.append({
            "source_address": m.get("address"),
            # 0: a forged source keeps each datagram's original exporter port
            "source_port": port if port else "*",
            "agent": agent,
            "exporter": exporter,
            "mode": mode,
        })
    return sorted(rows, key=lambda r: (str(r["agent"]), str(r["exporter"])))


def _run(args: argparse.Namespace) -> int:
    try:
        rows = read_sources(args.data)
    except FlowtunnelError as exc:
        print(f"flowtunnel sources: error: {exc}", file=sys.stderr)
        return 1
    if args.format == "json":
        for row in rows:
            print(json.dumps(row))
    elif args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    elif not rows:
        print(f"no forwarded sources yet in {args.data} (the gateway needs --forward and traffic)")
    else:
        table = [["collector sees", "agent", "exporter", "mode"]]
        for r in rows:
            addr = str(r["source_address"])
            shown = f"[{addr}]:{r['source_port']}" if ":" in addr else f"{addr}:{r['source_port']}"
            table.append([shown, str(r["agent"]), str(r["exporter"]), str(r["mode"])])
        widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
        for line in table:
            print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    return 0
