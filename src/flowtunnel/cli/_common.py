"""Helpers shared by subcommand modules: log level and format resolution, config-file flags."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from flowtunnel.errors import ConfigError
from flowtunnel.runtime import LOG_FORMATS, setup_logging

__all__ = ["add_config_flag", "add_log_format_flag", "init_logging", "log_format", "port_arg"]


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=None, metavar="FILE",
        help="TOML config file; flags override it, env vars FLOWTUNNEL_<SECTION>_<KEY> sit in between",
    )
    add_log_format_flag(parser)  # every command with a config file is a long-running one


def add_log_format_flag(parser: argparse.ArgumentParser) -> None:
    """``--log-format`` on a long-running command (also accepted before the command name)."""
    parser.add_argument(
        "--log-format", dest="command_log_format", choices=list(LOG_FORMATS), default=None,
        help="log lines on stderr as text (default) or json (one object per line, for log shippers); "
        "under systemd (JOURNAL_STREAM) without timestamps, journald adds them (env FLOWTUNNEL_LOG_FORMAT)",
    )


def log_format(args: argparse.Namespace) -> str:
    fmt = (getattr(args, "command_log_format", None) or getattr(args, "log_format", None)
           or os.environ.get("FLOWTUNNEL_LOG_FORMAT") or "text")
    if fmt not in LOG_FORMATS:
        allowed = ", ".join(LOG_FORMATS)
        raise ConfigError(f"log format {fmt!r} (FLOWTUNNEL_LOG_FORMAT) is not one of {allowed}")
    return fmt


def init_logging(args: argparse.Namespace, *, default_level: str = "info") -> None:
    level = getattr(args, "log_level", None) or os.environ.get("FLOWTUNNEL_LOG_LEVEL") or default_level
    setup_logging(level, log_format(args))


def port_arg(text: str) -> int:
    """argparse ``type=`` for a UDP/TCP port: 1..65535, with a message naming the bad value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port {text!r} is not a number") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port {value} is outside 1..65535")
    return value
