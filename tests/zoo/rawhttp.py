"""A minimal blocking HTTP/1.1 client for the zoo's self-tests: proves ``ProxyAuthenticator`` against real
squid helpers (the agent's own client is h11-based; this one only needs Content-Length framing)."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from flowtunnel.agent.proxy.auth import ProxyAuthenticator

__all__ = ["Reply", "request_via_proxy"]


@dataclass(frozen=True, kw_only=True)
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    rounds: int  # 407s answered on the connection

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def _read_reply(sock: socket.socket) -> tuple[int, list[tuple[str, str]], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a full response head ({len(data)} bytes)")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body[:length]


def request_via_proxy(
    proxy_port: int, url: str, auth: ProxyAuthenticator | None, *, method: str = "GET", body: bytes = b"",
    headers: dict[str, str] | None = None, timeout: float = 10.0,
) -> Reply:
    """``method url`` through the proxy at 127.0.0.1:``proxy_port`` on ONE connection, answering 407s with
    ``auth`` (raises its ``ProxyAuthError``). The handshake uses the request itself, so keep bodies empty."""
    host = url.split("/")[2]
    rounds = 0
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout) as sock:
        value = auth.initial() if auth else None
        while True:
            lines = [f"{method} {url} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
            lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
            if value:
                lines.append(f"Proxy-Authorization: {value}")
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            status, got, payload = _read_reply(sock)
            if status != 407 or auth is None:
                if auth is not None:
                    auth.done()
                return Reply(status=status, headers=got, body=payload, rounds=rounds)
            rounds += 1
            value = auth.respond([v for k, v in got if k.lower() == "proxy-authenticate"])
