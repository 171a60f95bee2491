"""The compression contexts the gateway holds per agent (docs/protocol.md section 3.3), in memory only.

After each acknowledged batch with datagrams the agent's next batch may be compressed against that
batch's record block (``wire.context_of``, ``Batch.context``); the gateway keeps the last few per agent,
bounded in total, least recently used agent first out. Losing them (a restart, eviction) costs one
refusal (``unknown-context``) and a fresh resend, never data: the agent falls back to a batch without a
context.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from flowtunnel.wire import context_id

__all__ = ["PER_AGENT", "TOTAL_BYTES", "ContextCache"]

#: contexts kept per agent: the last acknowledged batch's, and older ones for a resend whose ack was lost
PER_AGENT = 4
#: bound on the bytes of all contexts held (32 KiB each at most: 512 agents with 4 each)
TOTAL_BYTES = 64 << 20


@dataclass(slots=True)
class _Held:
    """One context held, and its id once computed (``ContextCache.of``)."""

    context: bytes
    cid: int | None = None


class ContextCache:
    """Contexts by agent, then by ``context_id``. Not thread-safe: use from the event loop only.

    A context's id (a BLAKE2b digest of up to 32 KiB) is computed only when the agent's batch names one
    (``of``): every acknowledged batch leaves a context, and most agents never compress against one, so
    hashing each as it came was work for nothing on every request (issue 16)."""

    def __init__(self, *, per_agent: int = PER_AGENT, total_bytes: int = TOTAL_BYTES) -> None:
        if per_agent < 1 or total_bytes < 1:
            raise ValueError(f"per_agent {per_agent} and total_bytes {total_bytes} must be >= 1")
        self._per_agent = per_agent
        self._total_bytes = total_bytes
        self._agents: OrderedDict[str, list[_Held]] = OrderedDict()  # per agent, oldest first
        self.size = 0

    def of(self, agent_id: str) -> dict[int, bytes]:
        """A copy of the contexts held for ``agent_id``, by id (safe to hand to a worker thread)."""
        held = self._agents.get(agent_id)
        if not held:
            return {}
        out: dict[int, bytes] = {}
        for item in held:
            if item.cid is None:
                item.cid = context_id(item.context)
            out[item.cid] = item.context
        return out

    def remember(self, agent_id: str, context: bytes) -> None:
        """Keep the ``context`` an acknowledged batch leaves (``Batch.context``; nothing if empty)."""
        if not context:
            return
        held = self._agents.pop(agent_id, None) or []
        self._agents[agent_id] = held
        for i, item in enumerate(held):
            if item.context == context:  # the same again (same content, same id): kept once, as the newest
                held.append(held.pop(i))
                break
        else:
            held.append(_Held(context))
            self.size += len(context)
        while len(held) > self._per_agent:
            self.size -= len(held.pop(0).context)
        while self.size > self._total_bytes and self._agents:
            _, evicted = self._agents.popitem(last=False)
            self.size -= sum(len(item.context) for item in evicted)

    def forget(self, agent_id: str) -> None:
        """Drop every context of ``agent_id`` (revoked, or removed)."""
        held = self._agents.pop(agent_id, None)
        if held:
            self.size -= sum(len(item.context) for item in held)

