"""Source addresses for re-emitted datagrams, and the persisted (agent, exporter) → (address, port) map.

Collectors tell exporters apart by source address (DESIGN, "Exporter identity on re-emit"), so each
(agent, exporter) gets its own address from a configured pool, and keeps it across gateway restarts: the map
is stored in ``DATA/forward-map.json`` (written atomically) and shown by ``flowtunnel status``.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from flowtunnel.statusfile import write_json_atomic

__all__ = ["AddressPool", "ForwardMap", "Mapping", "PoolExhausted"]


class PoolExhausted(Exception):
    """Every address of the pool (of the wanted family) is taken."""


class AddressPool:
    """An ordered set of addresses given as addresses, CIDRs (host addresses only) or LOW-HIGH ranges."""

    def __init__(self, entries: Sequence[str]) -> None:
        self._ranges: list[tuple[int, int, int]] = []  # (version, low, high) inclusive
        for text in entries:
            text = text.strip()
            if "-" in text:
                lo_s, hi_s = text.split("-", 1)
                lo, hi = ipaddress.ip_address(lo_s.strip()), ipaddress.ip_address(hi_s.strip())
                self._ranges.append((lo.version, int(lo), int(hi)))
            elif "/" in text:
                net = ipaddress.ip_network(text, strict=False)
                first, last = int(net.network_address), int(net.broadcast_address)
                if net.num_addresses > 2 and net.version == 4:
                    first, last = first + 1, last - 1  # not the network and broadcast addresses
                self._ranges.append((net.version, first, last))
            else:
                addr = ipaddress.ip_address(text)
                self._ranges.append((addr.version, int(addr), int(addr)))

    def addresses(self, version: int) -> Iterator[str]:
        for v, lo, hi in self._ranges:
            if v == version:
                for n in range(lo, hi + 1):
                    yield str(ipaddress.ip_address(n))

    def has(self, version: int) -> bool:
        return any(v == version for v, _, _ in self._ranges)

    def allocate(self, version: int, used: set[str]) -> str:
        """The first address of ``version`` not in ``used``; ``PoolExhausted`` if there is none."""
        # Cost is O(len(used)) per call, as used addresses are taken in order.
        for addr in self.addresses(version):
            if addr not in used:
                return addr
        raise PoolExhausted(f"no free IPv{version} address left in the source pool ({len(used)} in use)")


@dataclass(frozen=True, slots=True, kw_only=True)
class Mapping:
    """One (agent, exporter) identity and the source it is re-emitted from (per address family)."""

    agent: str
    exporter: str  # the exporter's key: its address, or "address:port" with identity_port
    family: int  # 4 or 6
    address: str
    port: int


class ForwardMap:
    """The persisted identity → source map; ``add`` and ``update_port`` then ``save``."""

    FILE = "forward-map.json"

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / self.FILE
        self._by_key: dict[tuple[str, str, int], Mapping] = {}
        self.dirty = False
        if self.path.exists():
            try:
                doc = json.loads(self.path.read_text(encoding="utf-8"))
                for item in doc.get("mappings", []):
                    m = Mapping(**item)
                    self._by_key[(m.agent, m.exporter, m.family)] = m
            except (OSError, ValueError, TypeError) as exc:
                raise ValueError(f"forward map {self.path} is unreadable: {exc}") from None

    def get(self, agent: str, exporter: str, family: int) -> Mapping | None:
        return self._by_key.get((agent, exporter, family))

    def put(self, m: Mapping) -> None:
        if self._by_key.get((m.agent, m.exporter, m.family)) != m:
            self._by_key[(m.agent, m.exporter, m.family)] = m
            self.dirty = True

    def used(self, family: int) -> set[str]:
        return {m.address for m in self._by_key.values() if m.family == family}

    def all(self) -> list[Mapping]:
        return sorted(self._by_key.values(), key=lambda m: (m.agent, m.exporter, m.family))

    def save(self) -> None:
        if self.dirty:
            write_json_atomic(self.path, {"version": 1, "mappings": [asdict(m) for m in self.all()]})
            self.dirty = False
