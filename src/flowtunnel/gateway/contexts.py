"""The compression contexts the gateway holds per agent (docs/protocol.md section 3.3), in memory only.

After each acknowledged batch with datagrams the agent's next batch may be compressed against that
batch's record block (``wire.context_of``, ``Batch.context``); the gateway keeps the last few per agent,
bounded in total, least recently used agent first out. Losing them (a restart, eviction) costs one
refusal (``unknown-context``) and a fresh resend, never data: the agent falls back to a batch without a
context.
"""

from __future__ import annotations

from collections import OrderedDict

from flowtunnel.wire import context_id

__all__ = ["PER_AGENT", "TOTAL_BYTES", "ContextCache"]

#: contexts kept per agent: the last acknowledged batch's, and older ones for a resend whose ack was lost
PER_AGENT = 4
#: bound on the bytes of all contexts held (32 KiB each at most: 512 agents with 4 each)
TOTAL_BYTES = 64 << 20


class ContextCache:
    """Contexts by agent, then by ``context_id``. Not thread-safe: use from the event loop only."""

    def __init__(self, *, per_agent: int = PER_AGENT, total_bytes: int = TOTAL_BYTES) -> None:
        if per_agent < 1 or total_bytes < 1:
            raise ValueError(f"per_agent {per_agent} and total_bytes {total_bytes} must be >= 1")
        self._per_agent = per_agent
        self._total_bytes = total_bytes
        self._agents: OrderedDict[str, OrderedDict[int, bytes]] = OrderedDict()
        self.size = 0

    def of(self, agent_id: str) -> dict[int, bytes]:
        """A copy of the contexts held for ``agent_id`` (safe to hand to a worker thread)."""
        held = self._agents.get(agent_id)
        return dict(held) if held else {}

    def remember(self, agent_id: str, context: bytes) -> None:
        """Keep the ``context`` an acknowledged batch leaves (``Batch.context``; nothing if empty)."""
        if not context:
            return
        held = self._agents.pop(agent_id, None) or OrderedDict()
        self._agents[agent_id] = held
        cid = context_id(context)
        old = held.pop(cid, None)
        if old is not None:
            self.size -= len(old)
        held[cid] = context
        self.size += len(context)
        while len(held) > self._per_agent:
            self.size -= len(held.popitem(last=False)[1])
        while self.size > self._total_bytes and self._agents:
            _, evicted = self._agents.popitem(last=False)
            self.size -= sum(len(c) for c in evicted.values())

    def forget(self, agent_id: str) -> None:
        """Drop every context of ``agent_id`` (revoked, or removed)."""
        held = self._agents.pop(agent_id, None)
        if held:
            self.size -= sum(len(c) for c in held.values())
