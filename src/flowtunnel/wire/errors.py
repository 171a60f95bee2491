"""Errors of the batch wire format: who is at fault, and the HTTP status a server should answer with.

    WireError                    a batch or key cannot be used (base; ``http_status`` hint, ``code`` for JSON)
    ├── BadMagic                 400  not a flowtunnel batch at all
    ├── UnsupportedVersion       400  a batch format version this code does not speak
    ├── Truncated                400  the body ends before the header or the ciphertext does
    ├── MalformedHeader          400  a header field is out of range (flags, codec, agent id, sizes)
    ├── UnknownDictionary        400  the compression dictionary id is not one this side has
    ├── AuthenticationFailed     401  the AEAD tag does not verify: wrong key, or bytes changed in transit
    ├── LimitExceeded            413  a declared or actual size is over a WireLimits bound
    ├── MalformedRecords         400  authenticated, but the record block inside is inconsistent
    ├── BadKey                   400  a key text or key bytes are not a 256-bit key (never echoes the key)
    └── BadAgentId               400  an agent id breaks the naming rule

Messages name the field, the value and the limit; they never contain key bytes or plaintext.
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
    "UnknownDictionary",
    "UnsupportedVersion",
    "WireError",
]


class WireError(FlowtunnelError):
    """A batch (or key) is unusable. ``http_status`` is the status a gateway should answer with, ``code`` the
    short machine-readable error name for the JSON body."""

    http_status = 400
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


class AuthenticationFailed(WireError):
    http_status = 401
    code = "authentication-failed"


class LimitExceeded(WireError):
    http_status = 413
    code = "limit-exceeded"


class MalformedRecords(WireError):
    code = "malformed-records"


class BadKey(WireError, ValueError):
    code = "bad-key"


class BadAgentId(WireError, ValueError):
    code = "bad-agent-id"
