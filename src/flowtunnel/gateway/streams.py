"""The compression streams the gateway holds per agent (docs/protocol.md section 3.4), in memory only.

One LZMA2 decoder per agent that sends stream frames, ~130 KB each (a fixed 64 KiB dictionary), bounded in
total, least recently used agent out first. A frame decodes only against the agent's stream at exactly its
position; while it decodes, the stream is out of the cache (``take``), so a second frame of that stream at
the same time finds none and is refused (``unknown-context``), and it comes back only once its batch was
acknowledged (``keep``). Losing a stream (a restart, eviction, a failure) costs the agent one refusal and a
resend in a new stream, never data.
"""

from __future__ import annotations

from collections import OrderedDict

from flowtunnel.wire import OpenStream, lzstream, stream_of

__all__ = ["TOTAL_BYTES", "StreamCache"]

#: bound on the decoders held: ~1,000 agents' streams (each ~130 KB with liblzma's 64 KiB dictionary)
TOTAL_BYTES = 128 << 20


class StreamCache:
    """The held stream of each agent. Not thread-safe: use from the event loop only (a taken stream may be
    decoded in a worker thread: it is out of the cache meanwhile)."""

    def __init__(self, *, total_bytes: int = TOTAL_BYTES, per_stream: int | None = None) -> None:
        if total_bytes < 1:
            raise ValueError(f"total_bytes {total_bytes} must be >= 1")
        self._per_stream = max(1, per_stream if per_stream is not None else lzstream.decoder_memory() or 1)
        self._max = max(1, total_bytes // self._per_stream)
        self._streams: OrderedDict[str, OpenStream] = OrderedDict()
        self.evicted = 0  # streams dropped to stay within the bound

    def __len__(self) -> int:
        return len(self._streams)

    @property
    def size(self) -> int:
        """Bytes the held decoders take (as liblzma counts them)."""
        return len(self._streams) * self._per_stream

    def held(self, agent_id: str) -> OpenStream | None:
        """The agent's stream, left in place (for status and tests)."""
        return self._streams.get(agent_id)

    def take(self, agent_id: str, dict_id: int) -> OpenStream | None:
        """For a continuation frame (header ``dict_id``): the agent's stream, out of the cache, if it is that
        stream at that position; else None, and the cache is unchanged."""
        stream = self._streams.get(agent_id)
        if stream is None or (stream.stream_id, stream.position) != stream_of(dict_id):
            return None
        del self._streams[agent_id]
        return stream

    def keep(self, agent_id: str, stream: OpenStream, *, start: bool) -> None:
        """Hold ``stream`` after its frame's batch was acknowledged. A start frame's replaces any stream the
        agent has; a continuation's comes back only if no start frame of the agent was kept meanwhile."""
        old = self._streams.get(agent_id)
        if old is not None and not start:
            _close(stream)
            return
        if old is not None:
            _close(self._streams.pop(agent_id))
        self._streams[agent_id] = stream
        while len(self._streams) > self._max:
            _, evicted = self._streams.popitem(last=False)
            _close(evicted)
            self.evicted += 1

    def give_back(self, agent_id: str, stream: OpenStream, *, position: int) -> None:
        """A taken stream whose frame failed: held again if the frame never reached its decoder (the
        decoder is whole and still at ``position``: a tag that failed, a refusal before decoding), else
        dropped (its state no longer matches the agent's, which starts a new stream anyway)."""
        if not stream.decoder.broken and stream.position == position:
            self.keep(agent_id, stream, start=False)
        else:
            _close(stream)

    def forget(self, agent_id: str) -> None:
        """Drop the agent's stream (revoked, deleted)."""
        stream = self._streams.pop(agent_id, None)
        if stream is not None:
            _close(stream)


def _close(stream: OpenStream) -> None:
    stream.decoder.close()
