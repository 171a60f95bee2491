"""Byte relays that carry chosen TCP ports into an isolated network namespace (stdlib only, run as a script).

An agent in a namespace of its own (``unshare -n``: nothing but its own loopback) reaches the outside only
through the ports the zoo exposes: ``inside PORT=SOCKET ...`` runs in that namespace and relays each TCP
connection to its 127.0.0.1:PORT into the unix socket SOCKET; ``outside SOCKET=HOST_PORT ...`` runs in the
host namespace and relays each connection on SOCKET to 127.0.0.1:HOST_PORT. Unix sockets live in the file
system, which both namespaces share, so the pair is a private wire: no address beyond loopback is involved.

Prints ``ready`` on stdout once every listener is up; runs until SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


async def _relay(
    client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
    connect: Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]],
) -> None:
    try:
        up_r, up_w = await connect()
    except OSError:
        client_w.transport.abort()  # the service behind is down: the client sees a reset, as on a real link
        return
    try:
        await asyncio.gather(_pipe(client_r, up_w), _pipe(up_r, client_w))
    finally:
        for w in (client_w, up_w):
            with contextlib.suppress(OSError):
                w.close()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _to_unix(path: str) -> Handler:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        # Cancelled at exit with a connection still open (a WebSocket agent's): asyncio would print the
        # cancellation as "Exception in callback" (3.11 looks at the handler task's exception).
        with contextlib.suppress(asyncio.CancelledError):
            await _relay(r, w, lambda: asyncio.open_unix_connection(path))

    return handle


def _to_tcp(port: int) -> Handler:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # at exit, as in ``_to_unix``
            await _relay(r, w, lambda: asyncio.open_connection("127.0.0.1", port))

    return handle


async def main(mode: str, specs: list[str]) -> None:
    servers: list[asyncio.Server] = []
    for spec in specs:
        left, _, right = spec.partition("=")
        if mode == "inside":
            port, path = int(left), right
            servers.append(await asyncio.start_server(_to_unix(path), "127.0.0.1", port, reuse_address=True))
        else:
            path, port = left, int(right)
            servers.append(await asyncio.start_unix_server(_to_tcp(port), path))
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers:
        s.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
