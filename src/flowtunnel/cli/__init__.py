"""Command-line entry point: argument parsing and dispatch only; each subcommand lives in its own module.

Every subcommand module exposes ``register(subparsers)``, which adds its parser(s) and sets ``func`` to a
callable taking the parsed ``argparse.Namespace`` and returning the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from flowtunnel import __version__
from flowtunnel.errors import ConfigError, FlowtunnelError, describe_os_error

__all__ = ["main"]

# Order is the order of ``flowtunnel --help``.
_MODULES = ("demo", "decode", "replay", "agent", "gateway", "sink", "store", "status", "sources")
# Which module registers each command: only that module is imported when the command is known, so that
# ``flowtunnel decode`` does not pay for importing duckdb and aiohttp (start-up time matters in scripts).
_COMMANDS = {
    "demo": "demo",
    "decode": "decode",
    "replay": "replay",
    "agent": "agent",
    "gateway": "gateway",
    "enroll": "gateway",
    "revoke": "gateway",
    "agents": "gateway",
    "sink": "sink",
    "query": "store",
    "top": "store",
    "export": "store",
    "status": "status",
    "sources": "sources",
}

EXIT_USAGE = 2


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (first word that is not an option or an option's value)."""
    skip = False
    for word in argv:
        if skip:
            skip = False
            continue
        if word in ("--log-level", "--log-format"):
            skip = True
            continue
        if word.startswith("-"):
            continue
        return word
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowtunnel",
        description=(
            "Carry NetFlow v5/v9/IPFIX exports from hostile networks to a central collector over HTTP(S), "
            "durably and exactly once. Run 'flowtunnel demo' for a tour, "
            "'flowtunnel COMMAND --help' for details."
        ),
    )
    parser.add_argument("--version", action="version", version=f"flowtunnel {__version__}")
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="log verbosity on stderr (default: info; env FLOWTUNNEL_LOG_LEVEL)",
    )
    parser.add_argument(
        "--log-format",
        default=None,
        choices=["text", "json"],
        help="log lines on stderr as text or json (default: text; env FLOWTUNNEL_LOG_FORMAT)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    module_name = _COMMANDS.get(command or "")
    for name in (module_name,) if module_name else _MODULES:
        module = importlib.import_module(f"flowtunnel.cli.{name}")
        module.register(sub)
    return parser


def _agent_tls(words: Sequence[str]) -> None:
    """An agent that nothing can make use TLS runs without ``ssl`` (~3.4 MB; ``flowtunnel.tls``): decided
    here, before its modules import asyncio."""
    from flowtunnel.tls import leave_out_ssl, tls_reason

    if tls_reason(words, os.environ) is None:
        leave_out_ssl()


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(words)
    if command == "agent":
        _agent_tls(words)
    parser = build_parser(command)
    args = parser.parse_args(words)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"flowtunnel {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FlowtunnelError as exc:  # start-up failures the command did not report: one line, no traceback
        print(f"flowtunnel {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file or directory that cannot be created, written or read
        print(f"flowtunnel {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code
