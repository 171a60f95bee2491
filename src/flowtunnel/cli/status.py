"""Subcommand module placeholder: being written (owner fills register())."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: "argparse._SubParsersAction[Any]") -> None:
    pass
