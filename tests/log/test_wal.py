"""The WAL inspection: a torn tail (partial frame, broken checksum chain, frames without their commit) is
found before SQLite's recovery silently drops it, reported in one WARNING and counted; an intact WAL,
including stale frames of an earlier generation, is not."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from flowtunnel.datagram import Datagram
from flowtunnel.log import DurableLog, LogConfig
from flowtunnel.log.wal import FRAME_HEADER_BYTES, _checksum, _checksum_frame, inspect_wal

PAGE = 4096
FRAME = FRAME_HEADER_BYTES + PAGE


def datagrams(start: int, n: int) -> list[Datagram]:
    return [Datagram(received_ns=1_700_000_000_000_000_000 + i, exporter="192.0.2.1", exporter_port=2055,
                     local_port=2055, payload=f"dg-{i}".encode() * 10) for i in range(start, start + n)]


def crash_image(tmp_path: Path, *, restart_wal: bool = False) -> Path:
    """The database and WAL as ``kill -9`` leaves them after three appends of 5 (never checkpointed, unless
    ``restart_wal``: then a checkpoint restarted the WAL, leaving stale frames past the new end)."""
    live = DurableLog(LogConfig(path=tmp_path / "live" / "spool.sqlite", page_size=PAGE))
    try:
        if restart_wal:
            live.append(datagrams(100, 3000))
            live._db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
        for first in (0, 5, 10):
            live.append(datagrams(first, 5))
        into = tmp_path / "crash"
        into.mkdir()
        for suffix in ("", "-wal"):
            shutil.copyfile(f"{live.path}{suffix}", f"{into / live.path.name}{suffix}")
    finally:
        live.close()
    return into / "spool.sqlite"


def wal_of(db: Path) -> Path:
    return Path(f"{db}-wal")


def cut(db: Path, nbytes: int) -> int:
    wal = wal_of(db)
    size = wal.stat().st_size
    with wal.open("r+b") as fh:
        fh.truncate(size - nbytes)
    return size - nbytes


def test_an_intact_wal_has_no_torn_tail(tmp_path: Path) -> None:
    db = crash_image(tmp_path)
    assert wal_of(db).stat().st_size > FRAME
    assert inspect_wal(wal_of(db)) is None
    assert inspect_wal(tmp_path / "absent-wal") is None


def test_stale_frames_of_an_earlier_generation_are_not_a_torn_tail(tmp_path: Path) -> None:
    db = crash_image(tmp_path, restart_wal=True)
    assert wal_of(db).stat().st_size > 20 * FRAME  # the old generation is still in the file
    assert inspect_wal(wal_of(db)) is None


def test_a_partial_last_frame_is_torn(tmp_path: Path) -> None:
    db = crash_image(tmp_path)
    size = cut(db, 100)
    tail = inspect_wal(wal_of(db))
    assert tail is not None
    assert tail.reason == "partial frame"
    assert tail.wal_bytes == size
    assert tail.discarded_frames >= 1
    assert FRAME - 100 <= tail.discarded_bytes < size - 32
    assert (tail.discarded_bytes + 100) % FRAME == 0  # exactly the last transaction's frames


def test_a_frame_with_a_broken_checksum_is_torn(tmp_path: Path) -> None:
    db = crash_image(tmp_path)
    wal = wal_of(db)
    data = bytearray(wal.read_bytes())
    data[-PAGE // 2] ^= 0xFF  # inside the page of the last frame: the sector that never reached the card
    wal.write_bytes(bytes(data))
    tail = inspect_wal(wal)
    assert tail is not None
    assert tail.reason == "bad checksum"
    assert tail.discarded_bytes % FRAME == 0
    assert tail.discarded_bytes >= FRAME


def test_frames_without_their_commit_frame_are_torn(tmp_path: Path) -> None:
    db = crash_image(tmp_path)
    cut(db, FRAME)  # the commit frame of the last transaction, which wrote more than one page
    tail = inspect_wal(wal_of(db))
    assert tail is not None
    assert tail.reason == "uncommitted frames"
    assert tail.discarded_bytes == tail.discarded_frames * FRAME


def test_a_torn_tail_is_logged_once_and_counted_across_reopens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = crash_image(tmp_path)
    cut(db, 100)
    with caplog.at_level(logging.INFO, logger="flowtunnel"):
        with DurableLog(LogConfig(path=db)) as lg:
            assert lg.stats().torn_tails == 1
            assert lg.last_seq() == 10  # the torn transaction is gone, the rest is there
        with DurableLog(LogConfig(path=db)) as lg:  # closed cleanly: nothing torn this time
            assert lg.stats().torn_tails == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(db) in warnings[0]
    assert "torn" in warnings[0]
    assert "partial frame" in warnings[0]


def test_an_intact_log_opens_without_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = crash_image(tmp_path)
    with caplog.at_level(logging.INFO, logger="flowtunnel"), DurableLog(LogConfig(path=db)) as lg:
        assert lg.last_seq() == 15
        assert lg.stats().torn_tails == 0
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_the_vectorised_frame_checksum_equals_sqlites_word_by_word_definition() -> None:
    rnd = random.Random(5)
    for big in (False, True):
        data = rnd.randbytes(8 + PAGE)
        words = np.frombuffer(data, dtype=">u4" if big else "<u4")
        start = (rnd.getrandbits(32), rnd.getrandbits(32))
        assert _checksum_frame(words, *start) == _checksum(data, big, *start)
