"""Process plumbing in ``flowtunnel.runtime`` that the other test modules do not cover."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CALL = "from flowtunnel.runtime import limit_malloc_arenas; print(limit_malloc_arenas())"


def _run(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", CALL], env=env, capture_output=True, text=True, check=True,
                         timeout=60)
    return out.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_malloc_arenas_are_limited_on_glibc() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    assert _run(env) == "True"


def test_an_explicit_malloc_arena_max_wins() -> None:
    assert _run({**os.environ, "MALLOC_ARENA_MAX": "4"}) == "False"
