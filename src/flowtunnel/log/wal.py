"""Inspection of a SQLite write-ahead log file before SQLite opens it, to make a torn tail visible.

SQLite replays WAL frames up to the last intact commit frame and silently ignores the rest: a power cut or a
lying SD card that tore the last transaction costs that transaction without a word. ``inspect_wal`` walks the
file the way SQLite's recovery does (header, then frames of 24 + page_size bytes whose salts match the header
and whose cumulative checksums chain) and reports what recovery will discard.

Frames with other salts after the valid ones are normal (the WAL was restarted from its beginning after a
checkpoint and older frames remain beyond the new end): they are not reported. Format: sqlite.org/fileformat2
section 4 ("The Write-Ahead Log").
"""

from __future__ import annotations

import functools
import os
import struct
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy loads only when a WAL is left to inspect (the agent's memory budget counts)
    import numpy as np
    import numpy.typing as npt

__all__ = ["WalTail", "inspect_wal"]

WAL_HEADER_BYTES = 32
FRAME_HEADER_BYTES = 24
_MAGIC_LE = 0x377F0682  # checksums over little-endian words
_MAGIC_BE = 0x377F0683  # checksums over big-endian words
#: magic, version, page size, checkpoint seq, salt1, salt2, checksum1, checksum2
_HEADER = struct.Struct(">IIIIIIII")
#: page number, database pages after commit (0 = not a commit frame), salt1, salt2, checksum1, checksum2
_FRAME = struct.Struct(">IIIIII")
_MASK = 0xFFFFFFFF


@dataclass(frozen=True, slots=True, kw_only=True)
class WalTail:
    """What SQLite's recovery will discard from the end of a WAL file.

    ``discarded_bytes`` and ``discarded_frames`` (a trailing partial frame counts as one) follow the last
    intact commit frame; ``reason`` says why they do not count: ``"partial frame"``, ``"bad checksum"``,
    ``"uncommitted frames"`` or ``"bad header"``.
    """

    wal_path: Path
    wal_bytes: int
    discarded_bytes: int
    discarded_frames: int
    reason: str


def _checksum(data: bytes | memoryview, big_endian: bool, s0: int, s1: int) -> tuple[int, int]:
    """SQLite's WAL checksum: over 32-bit word pairs, s0 += x0 + s1; s1 += x1 + s0 (mod 2**32)."""
    words = array("I")
    words.frombytes(data)
    if big_endian != (sys.byteorder == "big"):
        words.byteswap()
    it = iter(words)
    for x0, x1 in zip(it, it, strict=True):
        s0 = (s0 + x0 + s1) & _MASK
        s1 = (s1 + x1 + s0) & _MASK
    return s0, s1


@functools.lru_cache(maxsize=4)
def _powers(n: int) -> npt.NDArray[np.uint64]:
    """M**0 .. M**n (mod 2**32) for the step matrix M = [[1, 1], [1, 2]], newest power first."""
    import numpy as np

    out = np.empty((n + 1, 2, 2), dtype=np.uint64)
    a, b, c, d = 1, 0, 0, 1
    for j in range(n + 1):
        out[n - j] = ((a, b), (c, d))
        a, b, c, d = (a + c) & _MASK, (b + d) & _MASK, (a + 2 * c) & _MASK, (b + 2 * d) & _MASK
    return out


def _checksum_frame(words: npt.NDArray[np.uint32], s0: int, s1: int) -> tuple[int, int]:
    """``_checksum`` over a frame's words at numpy speed (a WAL may hold tens of thousands of frames).

    One step is linear: (s0, s1) <- M (s0, s1) + (x0, x0 + x1), so after n steps the state is
    M**n (s0, s1) + sum_k M**(n-1-k) u_k. uint64 arithmetic wraps modulo 2**64, a multiple of 2**32, so the
    sums stay exact modulo 2**32 without overflow checks.
    """
    import numpy as np

    pairs = words.astype(np.uint64).reshape(-1, 2)
    n = len(pairs)
    powers = _powers(n)  # powers[j] = M**(n - j)
    u0 = pairs[:, 0]
    u1 = pairs[:, 0] + pairs[:, 1]
    rest = powers[1:]  # M**(n-1-k) for k = 0 .. n-1
    c0 = int(np.sum(rest[:, 0, 0] * u0 + rest[:, 0, 1] * u1, dtype=np.uint64))
    c1 = int(np.sum(rest[:, 1, 0] * u0 + rest[:, 1, 1] * u1, dtype=np.uint64))
    m = powers[0]
    return ((int(m[0, 0]) * s0 + int(m[0, 1]) * s1 + c0) & _MASK,
            (int(m[1, 0]) * s0 + int(m[1, 1]) * s1 + c1) & _MASK)


def inspect_wal(wal_path: Path) -> WalTail | None:
    """Read ``wal_path`` (no locks taken) and return the torn tail SQLite would drop, or None when the file is
    absent, empty, or ends at an intact commit (possibly followed by stale frames of an earlier generation).

    Call it before any connection opens the database: a log written by another live process at the same
    time may show its transaction in flight as a torn tail. Reads one frame at a time. ``OSError`` from
    reading propagates.
    """
    try:
        fh = wal_path.open("rb")
    except FileNotFoundError:
        return None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            return None
        header = fh.read(WAL_HEADER_BYTES)
        if len(header) < WAL_HEADER_BYTES:
            return WalTail(wal_path=wal_path, wal_bytes=size, discarded_bytes=size, discarded_frames=0,
                           reason="bad header")
        magic, _version, page_size, _ckpt, salt1, salt2, c0, c1 = _HEADER.unpack(header)
        big = magic == _MAGIC_BE
        valid_page = 512 <= page_size <= 65536 and page_size & (page_size - 1) == 0
        s0, s1 = (0, 0)
        if magic in (_MAGIC_LE, _MAGIC_BE):
            s0, s1 = _checksum(header[:24], big, 0, 0)
        if magic not in (_MAGIC_LE, _MAGIC_BE) or not valid_page or (s0, s1) != (c0, c1):
            frames = -(-(size - WAL_HEADER_BYTES) // (FRAME_HEADER_BYTES + page_size)) if valid_page else 0
            return WalTail(wal_path=wal_path, wal_bytes=size, discarded_bytes=size, discarded_frames=frames,
                           reason="bad header")
        import numpy as np

        dtype = np.dtype(">u4" if big else "<u4")
        frame_bytes = FRAME_HEADER_BYTES + page_size
        committed_end = off = WAL_HEADER_BYTES
        pending = 0  # intact frames after the last commit frame
        while off < size:
            frame = fh.read(frame_bytes)
            if len(frame) < frame_bytes:
                return WalTail(wal_path=wal_path, wal_bytes=size, discarded_bytes=size - committed_end,
                               discarded_frames=pending + 1, reason="partial frame")
            _page, commit, f_salt1, f_salt2, f0, f1 = _FRAME.unpack_from(frame)
            if (f_salt1, f_salt2) != (salt1, salt2):
                break  # a frame of an earlier generation: the current one ended before it
            words = np.frombuffer(frame[:8] + frame[FRAME_HEADER_BYTES:], dtype=dtype)
            s0, s1 = _checksum_frame(words, s0, s1)
            if (s0, s1) != (f0, f1):
                return WalTail(wal_path=wal_path, wal_bytes=size,
                               discarded_bytes=off + frame_bytes - committed_end,
                               discarded_frames=pending + 1, reason="bad checksum")
            off += frame_bytes
            if commit:
                committed_end, pending = off, 0
            else:
                pending += 1
    if pending:
        return WalTail(wal_path=wal_path, wal_bytes=size, discarded_bytes=off - committed_end,
                       discarded_frames=pending, reason="uncommitted frames")
    return None
