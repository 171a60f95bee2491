"""The unit flowtunnel carries: one export datagram plus where and when the agent received it.

Shared by the spool, the wire format, the journal and the sinks, so it lives at the top of the package.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Datagram"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Datagram:
    """One UDP export datagram as received by the agent.

    ``exporter`` is the sender's IP address as text (IPv4 or IPv6, no brackets), ``exporter_port`` its UDP
    port, ``local_port`` the agent's listening port that received it, ``received_ns`` the agent's wall clock
    (Unix nanoseconds) at reception.
    """

    received_ns: int
    exporter: str
    exporter_port: int
    local_port: int
    payload: bytes

    def __repr__(self) -> str:
        return (
            f"Datagram(exporter={self.exporter}:{self.exporter_port}, local_port={self.local_port}, "
            f"received_ns={self.received_ns}, {len(self.payload)} bytes)"
        )
