"""The WAL folded back outside the commits (``LogConfig.background_checkpoint``): a commit never waits for
a checkpoint's copy and sync, the WAL still restarts and stays within its limit, and the log survives
kill -9."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowtunnel.datagram import Datagram
from flowtunnel.log import DurableLog, FullPolicy, LogConfig
from flowtunnel.log.checkpointer import Checkpointer
from tests.log.kill9 import kill_9_rounds


def _batch(rng: random.Random, n: int = 20, size: int = 1400) -> list[Datagram]:
    return [Datagram(received_ns=1, exporter="127.0.0.1", exporter_port=1, local_port=2,
                     payload=rng.randbytes(size)) for _ in range(n)]


@pytest.fixture
def held_passes(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The checkpoint thread's passes wait for this event before they start (a checkpoint slow to run)."""
    release = threading.Event()
    real = Checkpointer._checkpoint_pass

    def held(self: Checkpointer) -> tuple[int, int] | None:
        release.wait(30)
        return real(self)

    monkeypatch.setattr(Checkpointer, "_checkpoint_pass", held)
    yield release
    release.set()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("background", [False, True])
def test_with_background_checkpoints_no_commit_folds_the_wal_back(
    tmp_path: Path, held_passes: threading.Event, background: bool
) -> None:
    """The fleet's gateway: about once a second the commit crossing SQLite's wal_autocheckpoint also copied
    the WAL into the database and synced it (p99 61-413 ms against 21-88 ms for the others), and every
    batch waiting for that commit waited with it."""
    path = tmp_path / "journal.sqlite"
    rng = random.Random(7)
    with DurableLog(LogConfig(path=path, quota_bytes=0, checkpoint_pages=64,
                              background_checkpoint=background)) as lg:
        db_sizes = {_size(path)}
        for _ in range(40):  # 1.1 MB: over four checkpoint intervals of 256 KiB, below the WAL's 16 MiB
            lg.append(_batch(rng))
            db_sizes.add(_size(path))
        wal = _size(Path(f"{path}-wal"))
        if not background:  # SQLite's own: the commits crossing the interval grew the database file
            assert len(db_sizes) > 1
            return
        # Nothing but the thread folds the WAL back, and its passes are held: the database file did not move.
        assert len(db_sizes) == 1
        assert wal > 1_000_000
        held_passes.set()
        deadline = time.monotonic() + 20
        while _size(path) < 1_000_000:
            assert time.monotonic() < deadline, "the checkpoint thread never folded the WAL back"
            time.sleep(0.02)
        # The next commits restart the WAL from its beginning: it does not grow any more.
        for _ in range(40):
            lg.append(_batch(rng))
            time.sleep(0.01)
        assert _size(Path(f"{path}-wal")) <= wal
        assert lg.stats().entries == 80 * 20


def test_a_commit_folds_back_a_wal_over_its_limit_when_the_thread_lags(
    tmp_path: Path, held_passes: threading.Event
) -> None:
    path = tmp_path / "journal.sqlite"
    limit = 1 << 20
    rng = random.Random(8)
    with DurableLog(LogConfig(path=path, quota_bytes=0, checkpoint_pages=64, wal_limit_bytes=limit,
                              background_checkpoint=True)) as lg:
        peak = 0
        for _ in range(150):  # 4.2 MB of datagrams with the thread's passes held all along
            lg.append(_batch(rng))
            peak = max(peak, _size(Path(f"{path}-wal")))
        assert peak <= limit + 200_000  # the limit, and the commit that crossed it
        assert lg.stats().entries == 3000
        held_passes.set()  # closing waits for the thread's pass


@pytest.mark.parametrize(("quota", "policy"), [(2 << 20, FullPolicy.DROP_OLDEST),
                                               (2 << 20, FullPolicy.REFUSE_NEW)])
def test_the_disk_quota_still_bounds_every_file_with_background_checkpoints(
    tmp_path: Path, quota: int, policy: FullPolicy
) -> None:
    directory = tmp_path / "journal"
    rng = random.Random(quota)
    peak = 0
    with DurableLog(LogConfig(path=directory / "journal.sqlite", quota_bytes=0, disk_quota_bytes=quota,
                              full_policy=policy, background_checkpoint=True)) as lg:
        for _ in range(3 * quota // (1400 * 50) + 20):
            lg.append(_batch(rng, 50))
            peak = max(peak, sum(p.stat().st_blocks * 512 for p in directory.iterdir()))
        stats = lg.stats()
        assert stats.disk_bytes <= quota
        assert stats.bytes >= quota // 3
        assert (stats.dropped_oldest if policy is FullPolicy.DROP_OLDEST else stats.refused) > 0
    assert peak <= quota, f"peak {peak} bytes over the {quota}-byte disk quota"


def test_kill_9_during_background_checkpoints_leaves_every_committed_batch_whole(tmp_path: Path) -> None:
    """Checkpoints every 64 KiB from the thread, commits going on meanwhile, the writer killed at random."""
    kill_9_rounds(tmp_path / "journal.sqlite", settings="checkpoint_pages=16, background_checkpoint=True",
                  pad=600, seed=4321, pause=(0.05, 0.4))


def test_closing_stops_the_thread_and_folds_the_wal_back(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    before = {t.name for t in threading.enumerate()}
    lg = DurableLog(LogConfig(path=path, quota_bytes=0, background_checkpoint=True))
    assert "checkpoint journal.sqlite" in {t.name for t in threading.enumerate()} - before
    lg.append(_batch(random.Random(1)))
    lg.close()
    assert "checkpoint journal.sqlite" not in {t.name for t in threading.enumerate()}
    assert not Path(f"{path}-wal").exists()  # the last connection closed folded it back and removed it
