"""Running ``flowtunnel`` as a user does, in its own process, for the CLI tests."""

from __future__ import annotations

import asyncio
import subprocess
import sys

__all__ = ["aflowtunnel", "flowtunnel"]


def flowtunnel(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flowtunnel", *args], capture_output=True, text=True, timeout=120, check=False
    )


async def aflowtunnel(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(flowtunnel, *args)
