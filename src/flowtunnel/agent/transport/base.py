"""The transport seam: one method that carries a sealed batch to the gateway and returns its answer.

A transport owns its connections (keep-alive, proxy, TLS) and maps everything that can happen on its way to
one ``Answer``; it never raises for a network failure (that is ``Retry``) and knows nothing of spools, seqs or
backoff, which the delivery protocol (``delivery.Delivery``) decides for every transport alike.
"""

from __future__ import annotations

from typing import Protocol

from flowtunnel.agent.transport.answers import Answer, Hints

__all__ = ["Transport"]


class Transport(Protocol):
    """``exchange`` one sealed batch (the exact POST body bytes) for the answer to it.

    Error handling: network failures, timeouts and answers not from the gateway come back as answers (never as
    exceptions) whose texts never hold credentials. Resource handling: connections are opened on demand and
    kept alive; ``close`` closes them.
    """

    name: str

    async def exchange(self, batch: bytes, hints: Hints) -> Answer: ...

    async def close(self) -> None: ...
