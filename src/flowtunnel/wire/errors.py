"""Errors of the batch wire format: who is at fault, and a short code naming the cause.

    WireError                    a batch or key cannot be used (base; ``code`` names the cause)
    ├── BadMagic                 bad-magic              not a flowtunnel batch at all
    ├── UnsupportedVersion       unsupported-version    a batch format version this code does not speak
    ├── Truncated                truncated              the body ends inside the header or ciphertext
    ├── MalformedHeader          malformed-header       a header field out of range (flags, codec, id, sizes)
    ├── UnknownDictionary        unknown-dictionary     the compression dictionary id is not one this side has
    ├── UnknownContext           unknown-context        the compression context named is not held (or bad)
    ├── AuthenticationFailed     authentication-failed  the AEAD tag fails: wrong key, or bytes changed
    ├── LimitExceeded            limit-exceeded         a declared or actual size is over a WireLimits bound
    ├── MalformedRecords         malformed-records      authenticated, but the record block is inconsistent
    ├── BadKey                   bad-key                key text or bytes are not a 256-bit key (never echoed)
    └── BadAgentId               bad-agent-id           an agent id breaks the naming rule

The wire format is transport-neutral: the gateway maps codes to HTTP statuses at its edge
(``flowtunnel.gateway.edge.HTTP_STATUS``; the table in docs/protocol.md section 6). Messages name the field,
the value and the limit; they never contain key bytes or plaintext.
"""

from __future__ import annotations

from flowtunnel.errors import FlowtunnelError

__all__ = [
    "AuthenticationFailed",
    "BadAgentId",
    "BadKey",
    "BadMagic",
    "LimitExceeded",
    "MalformedHeader",
    "MalformedRecords",
    "Truncated",
    "UnknownContext",
    "UnknownDictionary",
    "UnsupportedVersion",
    "WireError",
]


class WireError(FlowtunnelError):
    """A batch (or key) is unusable. ``code`` is the short machine-readable name of the cause."""

    code = "bad-batch"


class BadMagic(WireError):
    code = "bad-magic"


class UnsupportedVersion(WireError):
    code = "unsupported-version"


class Truncated(WireError):
    code = "truncated"


class MalformedHeader(WireError):
    code = "malformed-header"


class UnknownDictionary(WireError):
    code = "unknown-dictionary"


class UnknownContext(WireError):
    """A batch compressed against a context (docs/protocol.md section 3.3) this side does not hold, or
    whose context does not reproduce it (a corrupted dictionary): the sender falls back to a fresh one."""

    code = "unknown-context"


class AuthenticationFailed(WireError):
    code = "authentication-failed"


class LimitExceeded(WireError):
    code = "limit-exceeded"


class MalformedRecords(WireError):
    code = "malformed-records"


class BadKey(WireError, ValueError):
    code = "bad-key"


class BadAgentId(WireError, ValueError):
    code = "bad-agent-id"
