"""Authenticated acknowledgements: the gateway's answer, bound to the request, under the agent's key.

The agent trims its spool up to the ``acked`` sequence number the gateway returns, so that number must come
from the gateway: on plain HTTP, or through a TLS-inspecting proxy, anyone on the path could otherwise answer
``{"acked": <huge>}`` and make the agent discard its backlog. The gateway adds ``ack_tag(...)`` to its JSON
answer; the agent checks it with ``verify_ack(...)`` before trusting ``acked``. The tag covers the agent id,
the nonce of the batch being answered (so an old answer cannot be replayed for a new request) and ``acked``.

Tag = first 16 bytes of HMAC-SHA256(K_ack, "flowtunnel-ack-v1" || len(agent) || agent || nonce || acked u64),
with K_ack = HMAC-SHA256(agent key, "flowtunnel ack key v1") so the MAC key differs from the AEAD key;
written as 22 base64url characters without padding. Byte layout: docs/protocol.md, section 7.1.

The compact answer (``POST /v1/b``, docs/protocol.md section 7; a WebSocket ``flowtunnel.v2`` acknowledgement,
section 7.4) carries the same two values in 24 bytes
instead of a JSON object: ``acked`` as a u64, big-endian, then the tag's 16 raw bytes.
"""

from __future__ import annotations

import base64
import binascii
import struct

from flowtunnel.wire.digest import equal, hmac_sha256
from flowtunnel.wire.errors import AuthenticationFailed
from flowtunnel.wire.keys import Key, key_bytes, validate_agent_id

__all__ = ["ACK_TAG_BYTES", "COMPACT_ACK_BYTES", "ack_tag", "compact_ack", "parse_compact_ack", "verify_ack"]

ACK_TAG_BYTES = 16
_KEY_LABEL = b"flowtunnel ack key v1"
_MSG_LABEL = b"flowtunnel-ack-v1"
_U64 = struct.Struct(">Q")
_COMPACT = struct.Struct(">Q16s")
#: the length of a compact answer: acked (u64) and the tag's raw bytes
COMPACT_ACK_BYTES = _COMPACT.size


def _message(agent_id: str, request_nonce: bytes, acked: int) -> bytes:
    validate_agent_id(agent_id)
    if len(request_nonce) != 12:
        raise ValueError(f"request nonce must be 12 bytes, got {len(request_nonce)}")
    if not 0 <= acked < 1 << 64:
        raise ValueError(f"acked {acked} is outside 0..2**64-1")
    agent = agent_id.encode("ascii")
    return _MSG_LABEL + bytes([len(agent)]) + agent + request_nonce + _U64.pack(acked)


def _raw_tag(key: bytes | Key, message: bytes) -> bytes:
    # libsodium's one-shot SHA-256, no Python HMAC objects (a gateway tags every answer, issue 16), and no
    # OpenSSL in the agent (wire/digest.py)
    ack_key = hmac_sha256(key_bytes(key), _KEY_LABEL)
    return hmac_sha256(ack_key, message)[:ACK_TAG_BYTES]


def ack_tag(key: bytes | Key, *, agent_id: str, request_nonce: bytes, acked: int) -> str:
    """The tag the gateway puts in its answer (JSON field ``"tag"``) for ``acked`` in reply to the batch
    whose header nonce is ``request_nonce``."""
    raw = _raw_tag(key, _message(agent_id, request_nonce, acked))
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def verify_ack(key: bytes | Key, *, agent_id: str, request_nonce: bytes, acked: int, tag: object) -> None:
    """Raise ``AuthenticationFailed`` unless ``tag`` is the gateway's tag for exactly this answer."""
    if not isinstance(tag, str) or len(tag) != 22:
        raise AuthenticationFailed(f"acknowledgement for agent {agent_id!r} has no valid tag (acked {acked})")
    try:
        got = base64.urlsafe_b64decode(tag + "==")
    except (binascii.Error, ValueError):
        raise AuthenticationFailed(f"acknowledgement tag for agent {agent_id!r} is not base64url") from None
    want = _raw_tag(key, _message(agent_id, request_nonce, acked))
    if not equal(got, want):
        raise AuthenticationFailed(
            f"acknowledgement of seq {acked} for agent {agent_id!r} does not authenticate: not from the "
            "gateway holding this agent's key, or not an answer to this request"
        )


def compact_ack(acked: int, tag: str) -> bytes:
    """The compact answer's body for ``acked`` and its ``tag`` (as ``ack_tag`` writes it): 24 bytes."""
    if not 0 <= acked < 1 << 64:
        raise ValueError(f"acked {acked} is outside 0..2**64-1")
    raw = base64.urlsafe_b64decode(tag + "==")
    if len(tag) != 22 or len(raw) != ACK_TAG_BYTES:
        raise ValueError(f"tag {tag!r} is not {ACK_TAG_BYTES} bytes in 22 base64url characters")
    return _COMPACT.pack(acked, raw)


def parse_compact_ack(body: bytes) -> tuple[int, str]:
    """``(acked, tag)`` from a compact answer's body, the tag written as ``ack_tag`` does (for
    ``verify_ack``); ``ValueError`` unless ``body`` is exactly ``COMPACT_ACK_BYTES`` long. Nothing is trusted
    before ``verify_ack``."""
    if len(body) != COMPACT_ACK_BYTES:
        raise ValueError(f"compact answer of {len(body)} bytes, expected {COMPACT_ACK_BYTES}")
    acked, raw = _COMPACT.unpack(body)
    return acked, base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
