"""wire/digest.py over libsodium: the same bytes as hashlib and hmac (which the agent no longer loads)."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest

from flowtunnel.wire.digest import blake2b_256, equal, hmac_sha256, sha256

# RFC 4231 test case 2 and 6 (a key longer than the block)
RFC4231 = [
    (b"Jefe", b"what do ya want for nothing?",
     "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
    (b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First",
     "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"),
]


@pytest.mark.parametrize(("key", "message", "want"), RFC4231)
def test_hmac_sha256_matches_rfc_4231(key: bytes, message: bytes, want: str) -> None:
    assert hmac_sha256(key, message).hex() == want


@pytest.mark.parametrize("size", [0, 1, 31, 32, 63, 64, 65, 200])
def test_same_bytes_as_hashlib_and_hmac(size: int) -> None:
    data = os.urandom(size)
    key = os.urandom(size)
    assert sha256(data) == hashlib.sha256(data).digest()
    assert blake2b_256(data) == hashlib.blake2b(data, digest_size=32).digest()
    assert hmac_sha256(key, data) == hmac.digest(key, data, "sha256")


def test_equal_is_equality_and_lengths_differ_unequal() -> None:
    assert equal(b"abc", b"abc")
    assert not equal(b"abc", b"abd")
    assert not equal(b"abc", b"abc\0")
    assert not equal(b"", b"\0")
    assert equal(b"", b"")
