"""Hand-made hostile bytes for the security tests: zstd bombs, batches sealed around them, odd headers.

``seal_packed`` seals an arbitrary compressed block with a real key, so the tests can show what the gateway
does with input that passes authentication (a rogue or compromised agent) rather than input the AEAD tag
already stops.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from flowtunnel.wire import HEADER, MAGIC, TAG_BYTES, VERSION, Codec

__all__ = [
    "ZSTD_MAGIC",
    "header_with_agent",
    "hostile_datagrams",
    "seal_packed",
    "template_flood_ipfix",
    "template_flood_v9",
    "zstd_rle_frame",
]

ZSTD_MAGIC = struct.pack("<I", 0xFD2FB528)
_BLOCK = 128 * 1024  # zstd's largest block


def zstd_rle_frame(total: int, *, declare: int | None, window_log: int = 17, byte: int = 0) -> bytes:
    """A valid zstd frame inflating to ``total`` copies of ``byte`` in RLE blocks (4 bytes per 128 KiB).

    ``declare`` is the content size written in the frame header (None: no content size at all), which may
    lie; ``window_log`` sets the window the frame asks the decoder for.
    """
    if declare is None:
        out = bytearray(ZSTD_MAGIC + bytes([0x00, (window_log - 10) << 3]))
    else:
        out = bytearray(ZSTD_MAGIC + bytes([0xC0, (window_log - 10) << 3]) + struct.pack("<Q", declare))
    left = total
    while True:
        size = min(_BLOCK, left)
        left -= size
        last = 1 if left == 0 else 0
        out += ((size << 3) | (1 << 1) | last).to_bytes(3, "little") + bytes([byte])
        if last:
            return bytes(out)


def seal_packed(
    *,
    agent_id: str,
    key: bytes,
    packed: bytes,
    raw_len: int,
    count: int,
    first_seq: int = 1,
    codec: Codec = Codec.ZSTD,
    dict_id: int = 0,
    nonce: bytes = b"\x07" * 12,
) -> bytes:
    """A correctly authenticated batch whose sealed block is ``packed`` (whatever it holds)."""
    agent = agent_id.encode("ascii")
    header = HEADER.pack(
        MAGIC, VERSION, 0, int(codec), len(agent), dict_id, first_seq, count, raw_len,
        len(packed) + TAG_BYTES, nonce,
    ) + agent
    return header + ChaCha20Poly1305(key).encrypt(nonce, packed, header)


def header_with_agent(agent: bytes, *, sealed: bytes = b"\x00" * TAG_BYTES) -> bytes:
    """A batch whose header carries the raw bytes ``agent`` as agent id (length byte clamped to 255)."""
    header = HEADER.pack(
        MAGIC, VERSION, 0, int(Codec.ZSTD), min(len(agent), 255), 0, 0, 0, 2, len(sealed), b"\x00" * 12,
    )
    return header + agent + sealed


_V9_HEADER = struct.Struct(">HHIIII")
_IPFIX_HEADER = struct.Struct(">HHIII")
_SET = struct.Struct(">HH")
_FIELD = struct.Struct(">HH")


def template_flood_v9(rng: random.Random, *, templates: int = 60, domain: int | None = None) -> bytes:
    """A v9 datagram defining ``templates`` random templates (ids 256-65535) in one template set."""
    body = bytearray()
    for _ in range(templates):
        nfields = rng.randint(1, 8)
        body += _FIELD.pack(rng.randint(256, 65535), nfields)
        for _ in range(nfields):
            body += _FIELD.pack(rng.randint(1, 300), rng.choice([1, 2, 4, 8, 16]))
    sets = _SET.pack(0, 4 + len(body)) + body
    source = rng.randint(0, 2**32 - 1) if domain is None else domain
    return _V9_HEADER.pack(9, templates, 1000, 1_700_000_000, rng.randint(0, 2**32 - 1), source) + sets


def template_flood_ipfix(rng: random.Random, *, templates: int = 60, domain: int | None = None) -> bytes:
    """An IPFIX message defining ``templates`` random templates, some with enterprise fields."""
    body = bytearray()
    for _ in range(templates):
        nfields = rng.randint(1, 8)
        body += _FIELD.pack(rng.randint(256, 65535), nfields)
        for _ in range(nfields):
            if rng.random() < 0.3:
                body += _FIELD.pack(0x8000 | rng.randint(1, 500), rng.choice([1, 4, 65535]))
                body += struct.pack(">I", rng.randint(1, 2**32 - 1))
            else:
                body += _FIELD.pack(rng.randint(1, 300), rng.choice([1, 2, 4, 8, 65535]))
    sets = _SET.pack(2, 4 + len(body)) + body
    source = rng.randint(0, 2**32 - 1) if domain is None else domain
    return _IPFIX_HEADER.pack(10, 16 + len(sets), 1_700_000_000, rng.randint(0, 2**32 - 1), source) + sets


def hostile_datagrams(rng: random.Random, count: int, *, genuine: Sequence[bytes] = ()) -> list[bytes]:
    """A seeded mix of what a hostile LAN can send to the agent's UDP port."""
    out: list[bytes] = []
    kinds = ["random", "empty", "v5-lie", "v9-short", "ipfix-lie", "flood-v9", "flood-ipfix", "flipped"]
    for _ in range(count):
        kind = rng.choice(kinds if genuine else kinds[:-1])
        if kind == "random":
            out.append(rng.randbytes(rng.randint(1, 1400)))
        elif kind == "empty":
            out.append(b"")
        elif kind == "v5-lie":
            out.append(struct.pack(">HH", 5, rng.randint(0, 65535)) + rng.randbytes(rng.randint(0, 200)))
        elif kind == "v9-short":
            out.append(struct.pack(">H", 9) + rng.randbytes(rng.randint(0, 17)))
        elif kind == "ipfix-lie":
            out.append(struct.pack(">HH", 10, rng.randint(0, 65535)) + rng.randbytes(rng.randint(12, 300)))
        elif kind == "flood-v9":
            out.append(template_flood_v9(rng))
        elif kind == "flood-ipfix":
            out.append(template_flood_ipfix(rng))
        else:
            data = bytearray(rng.choice(genuine))
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(len(data))] ^= rng.randint(1, 255)
            out.append(bytes(data))
    return out
