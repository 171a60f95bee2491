"""Command-line entry point: argument parsing and dispatch only; each subcommand lives in its own module.

Every subcommand module exposes ``register(subparsers)``, which adds its parser(s) and sets ``func`` to a
callable taking the parsed ``argparse.Namespace`` and returning the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from flowtunnel import __version__
from flowtunnel.errors import ConfigError

__all__ = ["main"]

# Order is the order of ``flowtunnel --help``.
_MODULES = ("demo", "decode", "replay", "agent", "gateway", "store", "status")

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowtunnel",
        description=(
            "Carry NetFlow v5/v9/IPFIX exports from hostile networks to a central collector over HTTP(S), "
            "durably and exactly once. Run 'flowtunnel demo' for a tour, 'flowtunnel COMMAND --help' for details."
        ),
    )
    parser.add_argument("--version", action="version", version=f"flowtunnel {__version__}")
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="log verbosity on stderr (default: info; env FLOWTUNNEL_LOG_LEVEL)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _MODULES:
        module = importlib.import_module(f"flowtunnel.cli.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"flowtunnel {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return code
