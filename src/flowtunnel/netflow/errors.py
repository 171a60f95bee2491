"""Errors of the NetFlow/IPFIX codec: every one means the peer (the exporter) sent bad bytes.

    FlowtunnelError
    └── ProtocolError          bad export datagram (peer's fault; ``peer_fault = True``)
        ├── Truncated          the bytes end before a header, set or record does
        ├── MalformedHeader    unknown version or impossible header values
        ├── MalformedSet       a set's id or length is impossible
        ├── MalformedTemplate  a (options) template record is impossible (bad id, length, type size)
        ├── UnknownTemplate    a data set refers to a template never seen (and it could not be held)
        └── LimitExceeded      a bound of the decoder was hit (exporters, templates, held sets)

Caller misuse (wrong argument types, bad encoder input) raises ``ValueError`` / ``TypeError`` instead.
Messages name the thing, the value, the limit and the byte offset in the datagram.
"""

from __future__ import annotations

from flowtunnel.errors import FlowtunnelError

__all__ = [
    "LimitExceeded",
    "MalformedHeader",
    "MalformedSet",
    "MalformedTemplate",
    "ProtocolError",
    "Truncated",
    "UnknownTemplate",
]


class ProtocolError(FlowtunnelError):
    """The export datagram is not valid NetFlow v5/v9/IPFIX; the exporter is at fault.

    ``offset`` is the byte offset in the datagram where the problem was found (``None`` when not applicable);
    ``cause`` is a short stable name for counters and log-once keys.
    """

    peer_fault = True
    cause = "protocol_error"

    def __init__(self, message: str, *, offset: int | None = None) -> None:
        super().__init__(message if offset is None else f"{message} (at byte {offset})")
        self.offset = offset


class Truncated(ProtocolError):
    """The datagram ends before the header, set or record it announces."""

    cause = "truncated"


class MalformedHeader(ProtocolError):
    """The datagram header is impossible: unknown version, bad length or count."""

    cause = "malformed_header"


class MalformedSet(ProtocolError):
    """A set (v9 FlowSet) has an impossible id or length, or its records do not fit it."""

    cause = "malformed_set"


class MalformedTemplate(ProtocolError):
    """A template or options template record is impossible (id < 256, zero-length record, bad field size)."""

    cause = "malformed_template"


class UnknownTemplate(ProtocolError):
    """A data set uses a template id the exporter never announced in this scope, and it could not be held."""

    cause = "unknown_template"


class LimitExceeded(ProtocolError):
    """A bound of the decoder (exporters, templates per exporter, held sets) was reached."""

    cause = "limit_exceeded"
