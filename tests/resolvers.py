"""Real recursive resolvers on loopback for the DNS rung's tests: unbound (0x20 case randomisation and QNAME
minimisation on) and dnsmasq, each sending the test zone to the gateway's DNS endpoint; and a lossy UDP relay
to put in front of either."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.peers import _stop_process, _wait_udp_bound, free_udp_port, require

__all__ = ["Dnsmasq", "LossyRelay", "Unbound", "dns_gateway", "free_dns_port"]


@contextlib.asynccontextmanager
async def dns_gateway(data: Path, *, agent: str, zone: str) -> AsyncIterator[tuple[Any, Any, bytes]]:
    """An in-process gateway with ``agent`` enrolled and a DNS endpoint for ``zone`` on a free port:
    ``(Gateway, DnsEndpoint, the agent's key)``."""
    from flowtunnel.gateway.dns import DnsConfig, DnsEndpoint
    from tests.gateway.util import enroll, start_gateway

    key = enroll(data, agent)
    gw = await start_gateway(data)
    assert gw.ingest is not None
    dns = DnsEndpoint(DnsConfig(zone=zone, host="127.0.0.1", port=0), gw.ingest)
    await dns.start()
    try:
        yield gw, dns, key
    finally:
        await dns.stop()
        await gw.stop()


def free_dns_port() -> int:
    """A port free a moment ago on 127.0.0.1 for both UDP and TCP (a DNS server listens on both)."""
    for _ in range(50):
        port = free_udp_port()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")


class _Resolver:
    name = "resolver"

    def __init__(self, workdir: Path, *, zone: str, upstream_port: int) -> None:
        self.zone = zone
        self.upstream_port = upstream_port
        self.port = free_dns_port()  # resolvers listen on TCP too
        self.dir = Path(workdir) / f"{self.name}-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def __enter__(self) -> _Resolver:
        require(self.command()[0])
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=log,
                                          stdin=subprocess.DEVNULL)
        try:
            # Bound, not answering: the zone's server may run in the caller's own event loop.
            _wait_udp_bound("127.0.0.1", self.port, self._proc, self.name, 15.0)
        except BaseException:
            _stop_process(self._proc)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._proc is not None:
            _stop_process(self._proc)


class Unbound(_Resolver):
    """unbound iterating to the gateway as the zone's authoritative server (a stub zone), with
    ``use-caps-for-id`` (0x20) and QNAME minimisation on, validation off (the test zone is unsigned)."""

    name = "unbound"

    def command(self) -> list[str]:
        conf = self.dir / "unbound.conf"
        conf.write_text(
            "server:\n"
            "  interface: 127.0.0.1\n"
            f"  port: {self.port}\n"
            "  do-daemonize: no\n"
            '  username: ""\n'
            '  chroot: ""\n'
            f'  directory: "{self.dir}"\n'
            '  pidfile: ""\n'
            "  use-syslog: no\n"
            f'  logfile: "{self.log_path}"\n'
            "  verbosity: 1\n"
            "  access-control: 127.0.0.0/8 allow\n"
            "  do-not-query-localhost: no\n"
            "  use-caps-for-id: yes\n"
            "  qname-minimisation: yes\n"
            "  qname-minimisation-strict: no\n"
            '  module-config: "iterator"\n'
            "  do-ip6: no\n"
            "  cache-max-ttl: 0\n"
            f'  domain-insecure: "{self.zone}"\n'
            "stub-zone:\n"
            f'  name: "{self.zone}"\n'
            f"  stub-addr: 127.0.0.1@{self.upstream_port}\n"
        )
        return ["unbound", "-d", "-c", str(conf)]


class Dnsmasq(_Resolver):
    """dnsmasq forwarding the zone to the gateway (no other upstream, no hosts file)."""

    name = "dnsmasq"

    def command(self) -> list[str]:
        return ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
                "--listen-address=127.0.0.1", f"--port={self.port}", "--user=root", "--pid-file",
                f"--server=/{self.zone}/127.0.0.1#{self.upstream_port}", f"--log-facility={self.log_path}",
                "--cache-size=150"]


class LossyRelay:
    """A UDP relay on 127.0.0.1 that forwards queries to ``target`` and answers back, dropping ``loss`` of
    the queries (seeded): what a flaky uplink does to the DNS rung."""

    def __init__(self, target: int, *, loss: float, seed: int = 1) -> None:
        self.target = target
        self.loss = loss
        self.rng = random.Random(seed)
        self.port = 0
        self.dropped = 0
        self.forwarded = 0
        self._front: asyncio.DatagramTransport | None = None
        self._clients: dict[tuple[str, int], socket.socket] = {}

    async def __aenter__(self) -> LossyRelay:
        loop = asyncio.get_running_loop()
        relay = self

        class Front(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                relay._query(data, addr)

        self._front, _ = await loop.create_datagram_endpoint(Front, local_addr=("127.0.0.1", 0))
        self.port = self._front.get_extra_info("sockname")[1]
        return self

    def _query(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.rng.random() < self.loss:
            self.dropped += 1
            return
        self.forwarded += 1
        back = self._clients.get(addr)
        if back is None:
            back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            back.setblocking(False)
            back.connect(("127.0.0.1", self.target))
            self._clients[addr] = back
            asyncio.get_running_loop().add_reader(back.fileno(), self._reply, back, addr)
        back.send(data)

    def _reply(self, back: socket.socket, addr: tuple[str, int]) -> None:
        try:
            reply = back.recv(65535)
        except OSError:
            return
        if self._front is not None:
            self._front.sendto(reply, addr)

    async def __aexit__(self, *exc: object) -> None:
        if self._front is not None:
            self._front.close()
        loop = asyncio.get_running_loop()
        for back in self._clients.values():
            loop.remove_reader(back.fileno())
            back.close()
