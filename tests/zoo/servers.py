"""Small loopback servers for the zoo: an echoing origin with static files (PAC/WPAD), and a captive portal.

``Origin`` answers every request with a JSON echo of what reached it (method, target, headers, body size), so
a fixture self-test can see what a proxy passed or stripped; ``files`` serves fixed bodies (a PAC file).

``CaptivePortal`` stands where the gateway should be (the isolated network maps the gateway's port to it):
until it opens it answers every request itself, as hotel portals do (a 302 to its login page, or the login
page with 200), reading and counting any request body; once open (after ``open_after`` seconds, or
``open()``) it relays connections byte for byte to the real gateway. Every portal answer closes the
connection, so nothing of the closed phase leaks into the open one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import ssl
import struct
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["CaptivePortal", "HostileProxy", "Origin"]

LOGIN_PAGE = (b"<!DOCTYPE html><html><head><title>Hotel Wi-Fi - Sign in</title></head><body>"
              b"<form method=post action=/login><input name=room><input type=submit></form></body></html>")
_MAX_HEAD = 64 * 1024


class Origin:
    """A threaded HTTP/1.1 server on 127.0.0.1: static ``files`` by path, a JSON echo for anything else."""

    def __init__(
        self, files: Mapping[str, tuple[str, bytes]] | None = None, *, tls: tuple[Path, Path] | None = None
    ) -> None:
        static = dict(files or {})
        self.scheme = "https" if tls else "http"

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.path in static:
                    ctype, payload = static[self.path]
                else:
                    ctype = "application/json"
                    echo = {"method": self.command, "path": self.path, "body_len": len(body),
                            "headers": {k.lower(): v for k, v in self.headers.items()}}
                    payload = json.dumps(echo).encode()
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"origin-{self.port}",
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def __enter__(self) -> Origin:
        self._thread.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class _Interposer:
    """Stands between a client and ``upstream`` (host, port): answers every request itself until it opens
    (after ``open_after`` seconds, from the start or, with ``count_from_first_connection``, from the first
    connection; or ``open()``), then relays bytes both ways; runs its own loop in a thread. Subclasses say how
    to answer (``_answer_closed``)."""

    count_from_first_connection = False

    def __init__(self, upstream: tuple[str, int], *, open_after: float | None = None) -> None:
        self.upstream = upstream
        self.open_after = open_after
        self.port = 0
        self.requests_while_closed: list[str] = []  # request lines answered by the portal
        self.body_bytes_while_closed = 0
        self.opened_at: float | None = None
        self._open = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=type(self).__name__, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._started = 0.0
        self._connected = False  # a client connected yet

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def is_open(self) -> bool:
        if not self._open.is_set() and self.open_after is not None and \
                time.monotonic() - self._started >= self.open_after:
            self.open()
        return self._open.is_set()

    def open(self) -> None:
        """From now on connections go through to ``upstream``."""
        if not self._open.is_set():
            self.opened_at = time.monotonic()
            self._open.set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        if self.count_from_first_connection and not self._connected:
            self._started = time.monotonic()  # ``open_after`` counts from here
        self._connected = True
        try:
            if self.is_open:
                try:
                    up_r, up_w = await asyncio.open_connection(*self.upstream)
                except OSError:
                    writer.transport.abort()
                    return
                self._writers.add(up_w)
                try:
                    await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer))
                finally:
                    up_w.close()
                    self._writers.discard(up_w)
                return
            # Keep-alive: answer each request of the connection while closed; once open, end the connection
            # so that the client's next one is relayed.
            while not reader.at_eof() and not self.is_open:
                if not await self._answer_closed(reader, writer):
                    break
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.transport.abort()
        finally:
            with contextlib.suppress(OSError):
                writer.close()
            self._writers.discard(writer)

    async def _read_request(self, reader: asyncio.StreamReader) -> list[str] | None:
        """The request head's lines (its body read and counted); None at a clean end of the connection."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        self.requests_while_closed.append(lines[0])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length" and value.strip().isdigit():
                length = int(value.strip())
        if length:
            body = await reader.read(min(length, 16 << 20))
            self.body_bytes_while_closed += len(body)
        return lines

    async def _answer_closed(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request while closed; False ends the connection."""
        raise NotImplementedError

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()
            await asyncio.sleep(0.05)  # let the aborted connections' handlers finish

    def __enter__(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        self._started = time.monotonic()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


class CaptivePortal(_Interposer):
    """A transparent captive portal in front of ``upstream``: until it opens, a 302 to its login page
    (``style="redirect"``) or the login page itself with 200 (``style="page"``) for every request. It opens
    ``open_after`` seconds after the first connection (someone logs in a while after the agent met it; from
    its start, a slow start of the gateway on a loaded box left the agent a portal already open)."""

    count_from_first_connection = True

    def __init__(
        self, upstream: tuple[str, int], *, open_after: float | None = None, style: str = "redirect"
    ) -> None:
        if style not in ("redirect", "page"):
            raise ValueError(f"style {style!r}: not 'redirect' or 'page'")
        super().__init__(upstream, open_after=open_after)
        self.style = style

    async def _answer_closed(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        lines = await self._read_request(reader)
        if lines is None:
            return False
        if self.style == "redirect" and lines[0].split(" ")[1:2] != ["/login"]:
            status, extra, body = "302 Found", f"Location: {self.url}/login\r\n", b""
        else:
            status, extra, body = "200 OK", "Content-Type: text/html; charset=utf-8\r\n", LOGIN_PAGE
        writer.write(f"HTTP/1.1 {status}\r\n{extra}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                     .encode() + body)
        await writer.drain()
        return False


class HostileProxy(_Interposer):
    """A broken or hostile proxy in front of the real one (``upstream``) until it heals (``open_after``):

    - ``garbage-407``: 407 whose challenges are not base64, not a scheme, or control characters;
    - ``endless-407``: 407 with a fresh, well-formed NTLM challenge every time, whatever the client answers;
    - ``not-an-ack``: 200 with an HTML block page instead of the gateway's JSON;
    - ``cut``: a response head and half a body, then the connection closes.

    Connections are kept alive while it misbehaves (except ``cut``), so a client that loops on one
    connection shows up in ``requests_while_closed``."""

    BEHAVIOURS = ("garbage-407", "endless-407", "not-an-ack", "cut")
    # ``open_after`` counts from the client's first connection, not from the start: the gateway and the
    # agent's namespace may take longer than that to start on a loaded machine, and the agent then met a
    # proxy that had already healed.
    count_from_first_connection = True

    def __init__(self, upstream: tuple[str, int], *, behaviour: str, open_after: float | None = None) -> None:
        if behaviour not in self.BEHAVIOURS:
            raise ValueError(f"behaviour {behaviour!r}: not one of {', '.join(self.BEHAVIOURS)}")
        super().__init__(upstream, open_after=open_after)
        self.behaviour = behaviour

    async def _answer_closed(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if await self._read_request(reader) is None:
            return False
        keep = True
        if self.behaviour == "garbage-407":
            head = ("HTTP/1.1 407 Proxy Authentication Required\r\n"
                    "Proxy-Authenticate: NTLM %%%not-base64%%%\r\n"
                    "Proxy-Authenticate: \x01\x02 realm\r\n"
                    "Proxy-Authenticate: Basic realm=\"unterminated\r\n")
            body = b"<html>auth</html>"
        elif self.behaviour == "endless-407":
            challenge = base64.b64encode(_ntlm_challenge()).decode()
            head = f"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: NTLM {challenge}\r\n"
            body = b""
        elif self.behaviour == "not-an-ack":
            head = "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n"
            body = b"<html><body>This site is blocked by your organisation's policy.</body></html>"
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n"
                         b'{"acked": 99999999, "tag": "')
            await writer.drain()
            return False
        writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode("latin-1") + body)
        await writer.drain()
        return keep


def _ntlm_challenge() -> bytes:
    """A well-formed NTLM CHALLENGE_MESSAGE (type 2) with a random server challenge and no target info."""
    flags = 0x00000001 | 0x00000200 | 0x00008000 | 0x00080000 | 0x20000000 | 0x80000000
    return (b"NTLMSSP\0" + struct.pack("<I", 2) + struct.pack("<HHI", 0, 0, 56) + struct.pack("<I", flags)
            + os.urandom(8) + bytes(8) + struct.pack("<HHI", 0, 0, 56) + bytes(8))


