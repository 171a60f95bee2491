"""SHA-256, HMAC-SHA256, BLAKE2b-256 and constant-time comparison over libsodium (PyNaCl), without OpenSSL.

Why not ``hashlib``/``hmac``: importing either loads OpenSSL's libcrypto and its providers, ~3.6 MB of an
agent's RSS (issue 14: <= 32 MB on a field box), for a few digests a second. The agent already loads
libsodium to seal its batches; these are the same functions (FIPS 180-4, RFC 2104, RFC 7693), byte for
byte (``tests/wire/test_digest.py`` checks them against ``hashlib`` and ``hmac``).
"""

from __future__ import annotations

from nacl.bindings import crypto_generichash_blake2b_salt_personal, crypto_hash_sha256, sodium_memcmp

__all__ = ["blake2b_256", "equal", "hmac_sha256", "sha256"]

_BLOCK = 64  # SHA-256's block size: RFC 2104's B
_IPAD = bytes([0x36]) * _BLOCK
_OPAD = bytes([0x5C]) * _BLOCK


def sha256(data: bytes) -> bytes:
    """SHA-256 of ``data`` (32 bytes)."""
    return crypto_hash_sha256(bytes(data))


def blake2b_256(data: bytes) -> bytes:
    """Unkeyed BLAKE2b with a 32-byte digest (``hashlib.blake2b(data, digest_size=32)``)."""
    return crypto_generichash_blake2b_salt_personal(bytes(data), digest_size=32)


def _xor(key: bytes, pad: bytes) -> bytes:
    return (int.from_bytes(key, "big") ^ int.from_bytes(pad, "big")).to_bytes(_BLOCK, "big")


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    """HMAC-SHA256 (RFC 2104): ``hmac.digest(key, message, "sha256")``."""
    if len(key) > _BLOCK:
        key = crypto_hash_sha256(bytes(key))
    key = bytes(key).ljust(_BLOCK, b"\0")
    inner = crypto_hash_sha256(_xor(key, _IPAD) + bytes(message))
    return crypto_hash_sha256(_xor(key, _OPAD) + inner)


def equal(a: bytes, b: bytes) -> bool:
    """Constant-time comparison (``hmac.compare_digest``); different lengths are unequal."""
    return sodium_memcmp(bytes(a), bytes(b))
