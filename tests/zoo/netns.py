"""An isolated network for the agent: a network namespace of its own, reaching only the ports the zoo exposes.

On loopback every process can reach every port, so a proxy that "must be used" would be optional: an agent
could go straight to the gateway. ``IsolatedNet`` creates a network namespace (``unshare -n``, loopback only)
and carries chosen ports into it through ``nsbridge.py`` relays (unix sockets, shared through the file
system): inside, 127.0.0.1:PORT reaches the host's 127.0.0.1:HOST_PORT only for the exposed ports; the
gateway's own port is exposed only when the network lets traffic through to it (or to a captive portal in
its place). No address beyond loopback is ever used.

Public API::

    IsolatedNet(expose={inside_port: host_port, ...})            # context manager; needs root
    .command(argv) -> list[str]                                  # argv run inside the namespace (nsenter)
    .run(argv, **kw) -> CompletedProcess                          # same, to completion
    available() -> str | None                                     # None, or why the zoo cannot run here
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["IsolatedNet", "available"]

_BRIDGE = Path(__file__).with_name("nsbridge.py")


def available() -> str | None:
    """None when namespaces can be made here (root, unshare, nsenter, ip); else the reason."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [t for t in ("unshare", "nsenter", "ip") if shutil.which(t) is None]
    if missing:
        return f"not installed: {', '.join(missing)}"
    return None


def _wait_ready(proc: subprocess.Popen[bytes], what: str, timeout: float = 15.0) -> None:
    assert proc.stdout is not None
    import select

    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""
    if line.strip() != b"ready":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{what} did not start (got {line!r}, exit {proc.returncode})")


class IsolatedNet:
    """A network namespace whose loopback reaches the host only on the ``expose``d ports."""

    def __init__(self, *, expose: Mapping[int, int]) -> None:
        self.expose = dict(expose)
        # Unix socket paths are short (108 bytes): a private directory under /tmp, not the test's tmp_path.
        self._sockdir = Path(tempfile.mkdtemp(prefix="zoo-ns-"))
        self._outside: subprocess.Popen[bytes] | None = None
        self._holder: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._holder is not None, "IsolatedNet not started"
        return self._holder.pid

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside the namespace."""
        return ["nsenter", f"--net=/proc/{self.pid}/ns/net", "--", *argv]

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.command(argv), check=False, **kwargs)

    def __enter__(self) -> IsolatedNet:
        socks = {inside: str(self._sockdir / f"p{inside}.sock") for inside in self.expose}
        outside = [f"{socks[inside]}={host}" for inside, host in self.expose.items()]
        inside = [f"{port}={path}" for port, path in socks.items()]
        py = [sys.executable, "-I", str(_BRIDGE)]
        try:
            self._outside = subprocess.Popen([*py, "outside", *outside], stdout=subprocess.PIPE,
                                             stdin=subprocess.DEVNULL)
            _wait_ready(self._outside, "outside relay")
            script = 'ip link set lo up && exec "$@"'
            self._holder = subprocess.Popen(
                ["unshare", "-n", "sh", "-c", script, "sh", *py, "inside", *inside],
                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
            )
            _wait_ready(self._holder, "namespace relay")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for proc in (self._holder, self._outside):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc is not None and proc.stdout is not None:
                proc.stdout.close()
        shutil.rmtree(self._sockdir, ignore_errors=True)

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
