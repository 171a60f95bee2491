"""Running ``flowtunnel`` as an operator does: a subprocess with its own environment, stderr in a file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = ["Daemon", "clean_env", "run_cli"]

ROOT = Path(__file__).resolve().parents[2]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without any FLOWTUNNEL_* or JOURNAL_STREAM variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FLOWTUNNEL_") and k not in ("JOURNAL_STREAM", "CI")}
    env.update(extra or {})
    return env


def run_cli(args: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 60,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``flowtunnel ARGS`` to completion; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "flowtunnel", *args], env=clean_env(env), capture_output=True, text=True,
        timeout=timeout, check=False, cwd=cwd,
    )


class Daemon:
    """``flowtunnel ARGS`` running in the background, its stderr going to a file the test can read."""

    def __init__(self, args: Sequence[str], *, workdir: Path, env: Mapping[str, str] | None = None,
                 name: str = "daemon", prefix: Sequence[str] = ()) -> None:
        self.log = workdir / f"{name}.stderr"
        self._fh = self.log.open("wb")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "flowtunnel", *args], env=clean_env(env),
            stdout=subprocess.DEVNULL, stderr=self._fh,
        )

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, what: str | Callable[[str], bool], timeout: float = 30.0) -> str:
        """Wait until stderr contains ``what`` (or ``what(stderr)`` is true); fails if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if (what in text) if isinstance(what, str) else what(text):
                return text
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode} before {what!r}:\n{self.text()}")
            time.sleep(0.05)
        raise AssertionError(f"no {what!r} after {timeout} s:\n{self.text()}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()
        return self.proc.returncode

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
