"""A minimal real squid (Debian's ``squid``) on loopback for the agent's proxy tests: a body limit, Basic auth
with ``basic_fake_auth`` (any password), and squid's default refusal of CONNECT to ports other than 443.

The fuller zoo (NTLM, Negotiate, mime types, Upgrade, portals) lives in tests/zoo/. Squid drops root to the
``proxy`` user, so its files go in a directory of its own under the system temp directory, world-writable
(pytest's ``tmp_path`` is private to root), removed on exit.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from tests.peers import _stop_process, _wait_tcp_listening, free_tcp_port

__all__ = ["Squid"]

FAKE_AUTH = "/usr/lib/squid/basic_fake_auth"


class Squid:
    """``with Squid(body_limit_kb=64, auth=True, deny_post=False) as squid: ... squid.url ...``."""

    def __init__(
        self, *, body_limit_kb: int | None = None, auth: bool = False, ssl_ports_only: bool = True,
        deny_post: bool = False, upgrade: bool = False,
    ) -> None:
        self.port = free_tcp_port()
        self._dir = Path(tempfile.mkdtemp(prefix="flowtunnel-squid-"))
        self._dir.chmod(0o777)
        lines = [
            f"http_port 127.0.0.1:{self.port}",
            "pid_filename none",
            "cache deny all",
            f"access_log stdio:{self._dir}/access.log",
            f"cache_log {self._dir}/cache.log",
            "cache_store_log none",
            f"coredump_dir {self._dir}",
            "shutdown_lifetime 0 seconds",
            "acl localnet src 127.0.0.1",
            "acl SSL_ports port 443",
            "acl CONNECT method CONNECT",
        ]
        if ssl_ports_only:
            lines.append("http_access deny CONNECT !SSL_ports")  # squid's default
        if auth:
            lines += [
                f"auth_param basic program {FAKE_AUTH}",
                "auth_param basic realm flowtunnel-test",
                "acl login proxy_auth REQUIRED",
                "http_access deny !login",
            ]
        if deny_post:
            lines += ["acl post method POST", "http_access deny post"]
        lines += ["http_access allow localnet", "http_access deny all"]
        if upgrade:  # squid strips Upgrade unless told (case matters: "websocket")
            lines.append("http_upgrade_request_protocols websocket allow all")
        if body_limit_kb is not None:
            lines.append(f"request_body_max_size {body_limit_kb} KB")
        self._conf = self._dir / "squid.conf"
        self._conf.write_text("\n".join(lines) + "\n")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_with(self, user: str, password: str) -> str:
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    def __enter__(self) -> Squid:
        self._proc = subprocess.Popen(
            ["squid", "-N", "-f", str(self._conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )
        _wait_tcp_listening("127.0.0.1", self.port, self._proc, "squid", timeout=20.0)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._proc is not None:
            _stop_process(self._proc)
        shutil.rmtree(self._dir, ignore_errors=True)

    def log_text(self) -> str:
        path = self._dir / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""
