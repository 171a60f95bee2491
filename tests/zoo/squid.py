"""Hostile proxies from Debian's squid: one ``Squid`` per test, configured from a ``SquidNetwork`` profile.

Each profile is the squid.conf of a network users meet: NTLM with CONNECT only to 443, Negotiate (squid's
``negotiate_wrapper_auth`` over ``ntlm_fake_auth``, as sites without Kerberos run it), a 64 KB body cap, a
refused content type (octet-stream; or the batch type too), POST denied, Upgrade stripped (squid's default)
or allowed for websocket. The fake auth helpers accept any user and password: the zoo tests the handshakes,
not a user database.

Squid listens on 127.0.0.1 on a free port, keeps nothing on disk (``cache deny all``), never resolves names
(no DNS beyond 127.0.0.1) and writes its logs into a private directory readable by the test
(``access_log()``); as root it runs as Debian's ``proxy`` user, which owns that directory.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.peers import free_tcp_port

__all__ = [
    "BASIC",
    "BODY_64K",
    "HELPERS",
    "NEGOTIATE",
    "NO_BATCH_TYPE",
    "NO_OCTET",
    "NO_POST",
    "NTLM_443",
    "UPGRADE_ALLOWED",
    "UPGRADE_STRIPPED",
    "LogEntry",
    "Squid",
    "SquidNetwork",
    "squid_binary",
]

HELPERS = Path("/usr/lib/squid")


def squid_binary() -> str | None:
    """The squid executable (Debian puts it in /usr/sbin), or None."""
    return shutil.which("squid") or ("/usr/sbin/squid" if os.access("/usr/sbin/squid", os.X_OK) else None)


@dataclass(frozen=True, kw_only=True)
class SquidNetwork:
    """A proxy's policy. ``connect_ports``: CONNECT allowed only to these ports (None: any port)."""

    name: str
    auth: str | None = None  # "basic" | "ntlm" | "negotiate"
    connect_ports: tuple[int, ...] | None = (443,)
    body_max_kb: int | None = None
    deny_mime: tuple[str, ...] = ()  # request bodies of these types refused (403)
    #: when set, POST bodies of any other type, or of none, are refused (403): a filter that lets through only
    #: the types it knows browsers send
    allow_mime: tuple[str, ...] = ()
    deny_post: bool = False
    upgrade_websocket: bool = False

    def conf(self, *, port: int, workdir: Path) -> str:
        lines = [
            f"http_port 127.0.0.1:{port}",
            f"pid_filename {workdir}/squid.pid",
            f"cache_log {workdir}/cache.log",
            f"access_log stdio:{workdir}/access.log squid",
            "cache deny all",
            "cache_mem 4 MB",
            f"coredump_dir {workdir}",
            "shutdown_lifetime 0 seconds",
            "netdb_filename none",
            "pinger_enable off",
            "icp_port 0",
            "htcp_port 0",
            "dns_nameservers 127.0.0.1",
            f"visible_hostname zoo-{self.name}",
            "forwarded_for delete",
        ]
        if self.auth == "basic":
            lines += [f"auth_param basic program {HELPERS}/basic_fake_auth", "auth_param basic children 2",
                      "auth_param basic realm zoo"]
        elif self.auth == "ntlm":
            lines += [f"auth_param ntlm program {HELPERS}/ntlm_fake_auth", "auth_param ntlm children 2"]
        elif self.auth == "negotiate":
            lines += [
                # No Kerberos here: the wrapper hands tokens starting with NTLMSSP to the NTLM helper and
                # anything else (SPNEGO/Kerberos) to the Kerberos helper, which has no keytab and refuses.
                f"auth_param negotiate program {HELPERS}/negotiate_wrapper_auth "
                f"--ntlm {HELPERS}/ntlm_fake_auth "
                f"--kerberos {HELPERS}/negotiate_kerberos_auth -s GSS_C_NO_NAME",
                "auth_param negotiate children 2",
            ]
        elif self.auth is not None:
            raise ValueError(f"auth {self.auth!r}: not basic, ntlm or negotiate")
        lines.append("acl CONNECT method CONNECT")
        if self.auth is not None:
            lines += ["acl authed proxy_auth REQUIRED", "http_access deny !authed"]
        if self.connect_ports is not None:
            lines += [f"acl connect_ports port {' '.join(map(str, self.connect_ports))}",
                      "http_access deny CONNECT !connect_ports"]
        if self.deny_post:
            lines += ["acl post method POST", "http_access deny post"]
        if self.deny_mime:
            patterns = " ".join(f"^{re.escape(mime)}$" for mime in self.deny_mime)
            lines += [f"acl refused_mime req_mime_type -i {patterns}",
                      "http_access deny refused_mime"]
        if self.allow_mime:
            patterns = " ".join(f"^{re.escape(mime)}$" for mime in self.allow_mime)
            lines += [f"acl known_mime req_mime_type -i {patterns}", "acl post_body method POST",
                      "http_access deny post_body !known_mime"]
        if self.body_max_kb is not None:
            lines.append(f"request_body_max_size {self.body_max_kb} KB")
        if self.upgrade_websocket:
            lines.append("http_upgrade_request_protocols websocket allow all")  # the name is case-sensitive
        lines += ["http_access allow all", ""]
        return "\n".join(lines)


BASIC = SquidNetwork(name="basic", auth="basic", connect_ports=None)
NTLM_443 = SquidNetwork(name="ntlm-443", auth="ntlm")
NEGOTIATE = SquidNetwork(name="negotiate", auth="negotiate")
BODY_64K = SquidNetwork(name="body-64k", body_max_kb=64)
NO_OCTET = SquidNetwork(name="no-octet", deny_mime=("application/octet-stream",))
# A filter that lets through only the types it knows browsers send: the batch type, octet-stream and a POST
# without a type (the agent's /v1/b) refused.
NO_BATCH_TYPE = SquidNetwork(name="no-batch-type",
                             allow_mime=("application/x-www-form-urlencoded", "multipart/form-data",
                                         "text/plain"))
NO_POST = SquidNetwork(name="no-post", deny_post=True)
UPGRADE_STRIPPED = SquidNetwork(name="upgrade-stripped")  # squid's default: Upgrade removed
UPGRADE_ALLOWED = SquidNetwork(name="upgrade-allowed", deny_post=True, upgrade_websocket=True)


@dataclass(frozen=True, kw_only=True)
class LogEntry:
    """One access.log line: squid's result code (TCP_DENIED...), HTTP status, method, URL and the login."""

    result: str
    status: int
    method: str
    url: str
    user: str  # "-" when the request carried no accepted login


class Squid:
    """``squid -N`` with a ``SquidNetwork``'s configuration; context manager. ``.port``, ``.url``."""

    def __init__(self, network: SquidNetwork, *, port: int | None = None) -> None:
        self.network = network
        self.port = port or free_tcp_port()
        # A private directory outside pytest's 0700 tmp tree: squid drops to the `proxy` user as root.
        self.workdir = Path(tempfile.mkdtemp(prefix=f"zoo-squid-{network.name}-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def access_log(self) -> str:
        path = self.workdir / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def requests(self) -> list[LogEntry]:
        """The access log parsed (squid's native format), oldest first."""
        out = []
        for line in self.access_log().splitlines():
            f = line.split()
            if len(f) >= 10 and "/" in f[3]:
                code = f[3].split("/", 1)[1]
                out.append(LogEntry(result=f[3].split("/", 1)[0], status=int(code) if code.isdigit() else 0,
                                    method=f[5], url=f[6], user=f[7]))
        return out

    def cache_log(self) -> str:
        path = self.workdir / "cache.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> Squid:
        binary = squid_binary()
        if binary is None:
            raise RuntimeError("squid is not installed (tools/setup-dev.sh installs it)")
        conf = self.workdir / "squid.conf"
        conf.write_text(self.network.conf(port=self.port, workdir=self.workdir))
        if os.geteuid() == 0:
            proxy = pwd.getpwnam("proxy")
            os.chown(self.workdir, proxy.pw_uid, proxy.pw_gid)
        cmd = [binary, "-N", "-f", str(conf), "-n", f"zoo{self.port}"]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while "Accepting HTTP Socket connections" not in self.cache_log():
            if self._proc.poll() is not None:
                raise RuntimeError(f"squid exited with {self._proc.returncode}:\n{self.cache_log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"squid did not listen within 30 s:\n{self.cache_log()[-3000:]}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> Squid:
        return self.start() if self._proc is None else self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
