"""A TLS-intercepting proxy: Debian's mitmproxy (``mitmdump``), re-signing every site with its own CA.

This is what a corporate "TLS inspection" box does: the client's CONNECT succeeds, but the certificate it
sees is minted on the fly by the proxy's CA (``ca_pem``), which the company installs in every machine's trust
store.
The proxy itself does not verify the gateway's self-signed certificate (``ssl_insecure``), as such boxes are
often configured for internal hosts. Listens on 127.0.0.1 on a free port; its CA lives in a private directory.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from tests.peers import free_tcp_port

__all__ = ["Mitmdump"]


class Mitmdump:
    """``mitmdump`` in regular (explicit proxy) mode; context manager. ``.port``, ``.url``, ``.ca_pem``."""

    def __init__(self) -> None:
        self.port = free_tcp_port()
        self.confdir = Path(tempfile.mkdtemp(prefix="zoo-mitm-"))
        self.log_path = self.confdir / "mitmdump.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca_pem(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Mitmdump:
        binary = shutil.which("mitmdump")
        if binary is None:
            raise RuntimeError("mitmproxy is not installed (tools/setup-dev.sh installs it)")
        cmd = [binary, "--listen-host", "127.0.0.1", "--listen-port", str(self.port),
               "--set", f"confdir={self.confdir}", "--set", "ssl_insecure=true",
               "--set", "termlog_verbosity=info"]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                raise RuntimeError(f"mitmdump exited with {code}:\n{self.log_text()[-2000:]}")
            if self.ca_pem.exists() and "listening at" in self.log_text().lower():
                return self
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise TimeoutError(f"mitmdump did not listen within 60 s:\n{self.log_text()[-2000:]}")
            time.sleep(0.1)

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        shutil.rmtree(self.confdir, ignore_errors=True)
