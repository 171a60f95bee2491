"""Helpers shared by subcommand modules: log-level resolution and config-file flags."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from flowtunnel.runtime import setup_logging

__all__ = ["add_config_flag", "init_logging", "port_arg"]


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=None, metavar="FILE",
        help="TOML config file; flags override it, env vars FLOWTUNNEL_<SECTION>_<KEY> sit in between",
    )


def init_logging(args: argparse.Namespace) -> None:
    level = getattr(args, "log_level", None) or os.environ.get("FLOWTUNNEL_LOG_LEVEL", "info")
    setup_logging(level)


def port_arg(text: str) -> int:
    """argparse ``type=`` for a UDP/TCP port: 1..65535, with a message naming the bad value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port {text!r} is not a number") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port {value} is outside 1..65535")
    return value
