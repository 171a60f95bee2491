"""The gateway's proof of identity for ``GET /v1/probe`` (captive portal detection), shared by both sides.

A captive portal answers every request itself (a 200 login page, a redirect), so an agent cannot tell from an
HTTP status alone whether it reached its gateway. The probe makes the gateway prove it holds the agent's key:
the agent sends a fresh random nonce, the gateway answers a MAC over (agent id, nonce) under a key derived
from the agent key; only the real gateway can compute it, and an old answer does not fit a new nonce.

    K_probe = HMAC-SHA256(agent key, "flowtunnel probe key v1")
    M       = "flowtunnel-probe-v1" || 0x00 || agent_id || 0x00 || nonce
    mac     = HMAC-SHA256(K_probe, M)              (32 bytes; base64url without padding in JSON: 43 chars)

Byte layout and a test vector: docs/protocol.md, section 7.3.
"""

from __future__ import annotations

import base64
import binascii
import re

from flowtunnel.wire.digest import equal, hmac_sha256
from flowtunnel.wire.errors import AuthenticationFailed, MalformedHeader
from flowtunnel.wire.keys import Key, key_bytes, validate_agent_id

__all__ = [
    "PROBE_MAC_BYTES",
    "PROBE_NONCE_MAX",
    "PROBE_NONCE_MIN",
    "decode_probe_nonce",
    "encode_b64url",
    "probe_mac",
    "probe_mac_text",
    "verify_probe",
]

PROBE_NONCE_MIN = 16
PROBE_NONCE_MAX = 32
PROBE_MAC_BYTES = 32
_KEY_LABEL = b"flowtunnel probe key v1"
_MSG_LABEL = b"flowtunnel-probe-v1\x00"
_B64URL_RE = re.compile(r"^[A-Za-z0-9_-]*$")


def encode_b64url(raw: bytes) -> str:
    """base64url without padding (the text form of probe nonces and MACs)."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _decode_b64url(text: str, *, what: str) -> bytes:
    if not _B64URL_RE.match(text) or len(text) % 4 == 1:
        raise MalformedHeader(f"{what} is not base64url without padding ({len(text)} characters)")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise MalformedHeader(f"{what} is not base64url without padding") from None


def decode_probe_nonce(text: str) -> bytes:
    """The nonce bytes of a probe's ``nonce`` parameter; ``MalformedHeader`` if it is not base64url (no
    padding) of 16..32 bytes."""
    if len(text) > 64:
        raise MalformedHeader(f"probe nonce of {len(text)} characters exceeds 43 (32 bytes)")
    raw = _decode_b64url(text, what="probe nonce")
    if not PROBE_NONCE_MIN <= len(raw) <= PROBE_NONCE_MAX:
        raise MalformedHeader(
            f"probe nonce of {len(raw)} bytes is outside {PROBE_NONCE_MIN}..{PROBE_NONCE_MAX}"
        )
    return raw


def probe_mac(key: bytes | Key, agent_id: str, nonce: bytes) -> bytes:
    """The 32-byte MAC the gateway answers to a probe of ``agent_id`` with ``nonce`` (16..32 bytes)."""
    validate_agent_id(agent_id)
    if not PROBE_NONCE_MIN <= len(nonce) <= PROBE_NONCE_MAX:
        raise ValueError(f"probe nonce of {len(nonce)} bytes is outside {PROBE_NONCE_MIN}..{PROBE_NONCE_MAX}")
    probe_key = hmac_sha256(key_bytes(key), _KEY_LABEL)
    message = _MSG_LABEL + agent_id.encode("ascii") + b"\x00" + bytes(nonce)
    return hmac_sha256(probe_key, message)


def probe_mac_text(key: bytes | Key, agent_id: str, nonce: bytes) -> str:
    """``probe_mac`` as it travels in the answer's ``"mac"`` field (43 base64url characters)."""
    return encode_b64url(probe_mac(key, agent_id, nonce))


def verify_probe(key: bytes | Key, agent_id: str, nonce: bytes, mac: object) -> None:
    """Raise ``AuthenticationFailed`` unless ``mac`` (the answer's ``"mac"`` field, any JSON value) is the
    gateway's MAC for this agent and nonce: the answer came from a gateway holding the agent's key."""
    if not isinstance(mac, str) or len(mac) != 43:
        raise AuthenticationFailed(f"probe answer for agent {agent_id!r} has no valid mac")
    try:
        got = _decode_b64url(mac, what="probe mac")
    except MalformedHeader:
        raise AuthenticationFailed(f"probe answer mac for agent {agent_id!r} is not base64url") from None
    if not equal(got, probe_mac(key, agent_id, nonce)):
        raise AuthenticationFailed(
            f"probe answer for agent {agent_id!r} does not authenticate: not from a gateway holding this "
            "agent's key (a captive portal or another server), or not an answer to this nonce"
        )
