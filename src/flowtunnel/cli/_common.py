"""Helpers shared by subcommand modules: log-level resolution and config-file flags."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from flowtunnel.runtime import setup_logging

__all__ = ["add_config_flag", "init_logging"]


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=None, metavar="FILE",
        help="TOML config file; flags override it, env vars FLOWTUNNEL_<SECTION>_<KEY> sit in between",
    )


def init_logging(args: argparse.Namespace) -> None:
    level = getattr(args, "log_level", None) or os.environ.get("FLOWTUNNEL_LOG_LEVEL", "info")
    setup_logging(level)
