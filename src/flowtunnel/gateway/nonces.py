"""A small window of recent nonces per agent, to notice nonce reuse under one key.

Every sealed request carries a 96-bit nonce the agent draws at random, so a repeat within a few hundred
requests is, in practice, either an exact copy of an earlier request (a replay, or a proxy retrying a POST:
same nonce, same ciphertext, harmless) or a broken or hostile client sealing different content under the same
key and nonce, which weakens ChaCha20-Poly1305 for both messages. The first is answered as usual and changes
no figure; the second is counted and logged. Nothing is refused for it: the batch authenticated, and
refusing it would only stall the agent.

Memory: at most ``window`` (nonce, tag) pairs per agent; the window restarts when the agent's key changes.
"""

from __future__ import annotations

import enum
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

__all__ = ["DEFAULT_WINDOW", "NonceWindow", "Seen"]

#: Nonces remembered per agent (an agent sending one batch a second: the last four minutes).
DEFAULT_WINDOW = 256


class Seen(enum.Enum):
    NEW = "new"
    REPLAYED = "replayed"  # same nonce, same authentication tag: an exact copy
    REUSED = "reused"  # same nonce, different content: nonce reuse


@dataclass(slots=True)
class _Recent:
    key_id: bytes
    tags: OrderedDict[bytes, bytes] = field(default_factory=OrderedDict)


class NonceWindow:
    """Per agent, the last ``window`` nonces seen under its current key, with each request's tag."""

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        if window < 1:
            raise ValueError(f"nonce window {window} must be >= 1")
        self._window = window
        self._agents: dict[str, _Recent] = {}

    def check(self, agent: str, key: bytes, nonce: bytes, tag: bytes) -> Seen:
        """Record ``nonce`` (with the request's authentication ``tag``) for ``agent`` under ``key``."""
        key_id = hashlib.blake2s(key, digest_size=8).digest()  # never the key itself
        recent = self._agents.get(agent)
        if recent is None or recent.key_id != key_id:
            recent = self._agents[agent] = _Recent(key_id=key_id)
        known = recent.tags.get(nonce)
        if known is not None:
            recent.tags.move_to_end(nonce)
            return Seen.REPLAYED if known == tag else Seen.REUSED
        recent.tags[nonce] = bytes(tag)
        if len(recent.tags) > self._window:
            recent.tags.popitem(last=False)
        return Seen.NEW
