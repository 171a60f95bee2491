"""Per-agent keys and agent ids: generation, text form, validation.

A key is 32 random bytes (ChaCha20-Poly1305). Its text form is ``ftk1_`` + 43 base64url characters without
padding, so a key pasted into a config file is recognisable and its length checkable. Errors never echo the
key text; ``Key`` masks the secret in repr/str and shows only a short fingerprint (first 8 hex digits of
SHA-256 over the key), which is safe to log and lets an operator tell two keys apart.
"""

from __future__ import annotations

import base64
import binascii
import os
import re

from flowtunnel.wire.digest import equal, sha256
from flowtunnel.wire.errors import BadAgentId, BadKey

__all__ = [
    "AGENT_ID_MAX",
    "KEY_BYTES",
    "KEY_PREFIX",
    "Key",
    "format_key",
    "generate_key",
    "key_bytes",
    "key_fingerprint",
    "parse_key",
    "validate_agent_id",
]

KEY_BYTES = 32
KEY_PREFIX = "ftk1_"
AGENT_ID_MAX = 63
_KEY_TEXT_LEN = 43  # base64 of 32 bytes without padding
_B64URL_RE = re.compile(r"^[A-Za-z0-9_-]*$")
_AGENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def generate_key(random_bytes: bytes | None = None) -> bytes:
    """A new 256-bit key: ``random_bytes`` if given (must be 32 bytes, e.g. in tests), else ``os.urandom``."""
    if random_bytes is None:
        return os.urandom(KEY_BYTES)  # what secrets.token_bytes does (secrets imports hmac: OpenSSL)
    return key_bytes(random_bytes)


def key_bytes(key: bytes | Key) -> bytes:
    """The 32 raw bytes of ``key``; raises ``BadKey`` if it is not 32 bytes."""
    if isinstance(key, Key):
        return key.secret
    if not isinstance(key, bytes | bytearray | memoryview):
        raise BadKey(f"key must be {KEY_BYTES} bytes, got a {type(key).__name__}")
    raw = bytes(key)
    if len(raw) != KEY_BYTES:
        raise BadKey(f"key must be {KEY_BYTES} bytes, got {len(raw)}")
    return raw


def key_fingerprint(key: bytes | Key) -> str:
    """8 hex digits identifying a key without revealing it (SHA-256 prefix)."""
    return sha256(key_bytes(key)).hex()[:8]


def format_key(key: bytes | Key) -> str:
    """``ftk1_`` + base64url (no padding) of the 32 key bytes: 48 characters."""
    return KEY_PREFIX + base64.urlsafe_b64encode(key_bytes(key)).rstrip(b"=").decode("ascii")


def parse_key(text: str) -> bytes:
    """The 32 bytes of a key written by ``format_key`` (the ``ftk1_`` prefix is optional; surrounding
    whitespace is ignored). Raises ``BadKey`` saying what is wrong, without echoing the text."""
    if not isinstance(text, str):
        raise BadKey(f"key text must be a string, got a {type(text).__name__}")
    body = text.strip()
    if body.startswith(KEY_PREFIX):
        body = body[len(KEY_PREFIX):]
    if len(body) != _KEY_TEXT_LEN:
        raise BadKey(
            f"key text must be {KEY_PREFIX!r} + {_KEY_TEXT_LEN} base64url characters, got {len(body)} "
            "characters after the prefix"
        )
    if not _B64URL_RE.match(body):
        bad = sorted({c for c in body if not (c.isascii() and (c.isalnum() or c in "-_"))})
        shown = ", ".join(repr(c) if c.isprintable() else f"U+{ord(c):04X}" for c in bad[:3])
        raise BadKey(f"key text has characters outside the base64url alphabet ({shown})")
    try:
        raw = base64.urlsafe_b64decode(body + "=")
    except (binascii.Error, ValueError):
        raise BadKey("key text is not valid base64url") from None
    # 43 characters carry 258 bits: the last 2 must be zero, else two texts would map to one key.
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != body:
        raise BadKey("key text is not canonical base64url (its last character has stray low bits)")
    return key_bytes(raw)


def validate_agent_id(agent_id: str) -> str:
    """Return ``agent_id`` if it is 1-63 letters, digits, ``.``, ``_``, ``-``, starting with a letter or digit
    (safe as a file name, an HTTP header value and a metric label); else raise ``BadAgentId``."""
    if not isinstance(agent_id, str):
        raise BadAgentId(f"agent id must be a string, got a {type(agent_id).__name__}")
    if _AGENT_ID_RE.match(agent_id) and not agent_id.endswith("\n"):
        return agent_id
    shown = repr(agent_id[:80]) + ("..." if len(agent_id) > 80 else "")
    if not agent_id:
        why = "is empty"
    elif len(agent_id) > AGENT_ID_MAX:
        why = f"is {len(agent_id)} characters long, the limit is {AGENT_ID_MAX}"
    elif not (agent_id[0].isascii() and agent_id[0].isalnum()):
        why = "must start with a letter or digit"
    else:
        why = "may only contain letters, digits, '.', '_' and '-'"
    raise BadAgentId(f"agent id {shown} {why}")


class Key:
    """A 256-bit agent key whose repr/str show only a fingerprint. ``.secret`` gives the raw bytes."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        self._secret = key_bytes(secret)

    @classmethod
    def generate(cls) -> Key:
        return cls(generate_key())

    @classmethod
    def parse(cls, text: str) -> Key:
        return cls(parse_key(text))

    @property
    def secret(self) -> bytes:
        return self._secret

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self._secret)

    def text(self) -> str:
        """The ``ftk1_...`` form (this is the secret: do not log it)."""
        return format_key(self._secret)

    def __bytes__(self) -> bytes:
        return self._secret

    def __repr__(self) -> str:
        return f"Key(fingerprint={self.fingerprint})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Key):
            return NotImplemented
        return equal(self._secret, other._secret)

    def __hash__(self) -> int:
        return hash(self.fingerprint)
