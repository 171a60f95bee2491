"""DurableLog: order, never-reused sequence numbers, cursors and state, quota policies, crash and disk-full
safety, corrupt files."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowtunnel.datagram import Datagram
from flowtunnel.log import (
    ENTRY_OVERHEAD,
    MIN_DISK_QUOTA,
    DurableLog,
    Entry,
    FullPolicy,
    LogConfig,
    LogCorrupt,
    LogError,
    LogFull,
    LogLocked,
    QuotaFull,
)
from tests.log.kill9 import kill_9_rounds


def dg(i: int, size: int = 100, exporter: str = "192.0.2.1") -> Datagram:
    return Datagram(
        received_ns=1_764_000_000_000_000_000 + i, exporter=exporter, exporter_port=40000 + i % 7,
        local_port=2055, payload=i.to_bytes(4, "big") * (size // 4),
    )


def cost(d: Datagram, stream: str = "") -> int:
    return len(d.payload) + len(d.exporter) + len(stream) + ENTRY_OVERHEAD


@pytest.fixture
def log(tmp_path: Path) -> Iterator[DurableLog]:
    with DurableLog(LogConfig(path=tmp_path / "log.sqlite", quota_bytes=0)) as lg:
        yield lg


def test_append_then_read_returns_the_datagrams_in_order_with_fresh_seqs(log: DurableLog) -> None:
    res = log.append([dg(i) for i in range(10)], stream="site-a", stream_seqs=list(range(500, 510)))
    assert (res.first_seq, res.last_seq, res.appended, res.dropped, res.refused) == (1, 10, 10, 0, 0)
    got = log.read(after=0)
    assert [e.seq for e in got] == list(range(1, 11))
    assert [e.datagram for e in got] == [dg(i) for i in range(10)]
    assert {e.stream for e in got} == {"site-a"}
    assert [e.stream_seq for e in got] == list(range(500, 510))
    assert [e.seq for e in log.read(after=7)] == [8, 9, 10]
    assert log.read(after=10) == []


def test_read_honours_limit_and_max_bytes_but_returns_at_least_one_entry(log: DurableLog) -> None:
    log.append([dg(i, size=1000) for i in range(10)])
    assert len(log.read(after=0, limit=3)) == 3
    assert len(log.read(after=0, max_bytes=2500)) == 2
    assert len(log.read(after=0, max_bytes=10)) == 1
    with pytest.raises(ValueError, match="limit"):
        log.read(after=0, limit=0)


def test_cache_kib_sets_the_connections_page_cache_on_every_open(tmp_path: Path) -> None:
    """The agent's spool caps SQLite's page cache (issue 14's peak RSS); by default it is SQLite's own."""
    path = tmp_path / "log.sqlite"
    with DurableLog(LogConfig(path=path, quota_bytes=0)) as lg:
        assert lg._db.execute("PRAGMA cache_size").fetchone()[0] == -2000
    for _ in range(2):  # a new file and an existing one
        with DurableLog(LogConfig(path=path, quota_bytes=0, cache_kib=256)) as lg:
            lg.append([dg(i) for i in range(50)])
            assert lg._db.execute("PRAGMA cache_size").fetchone()[0] == -256
    with pytest.raises(ValueError, match="cache_kib"):
        LogConfig(path=path, cache_kib=0)


def test_seqs_are_never_reused_after_trim_and_reopen(tmp_path: Path) -> None:
    cfg = LogConfig(path=tmp_path / "log.sqlite", quota_bytes=0)
    with DurableLog(cfg) as lg:
        lg.append([dg(i) for i in range(5)])
        assert lg.trim(5) == 5
        assert lg.stats().entries == 0
    with DurableLog(cfg) as lg:
        assert lg.last_seq() == 5
        assert lg.stats().first_seq == 6
        assert lg.append([dg(9)]).first_seq == 6


def test_a_trim_with_a_cursor_commits_both_in_one_transaction_or_neither(tmp_path: Path) -> None:
    """The agent's uploader records the gateway's mark and trims what it holds after every batch: one
    transaction (one fsync) for both, not two; and a trim that fails leaves the mark where it was."""
    cfg = LogConfig(path=tmp_path / "log.sqlite", quota_bytes=0)
    with DurableLog(cfg) as lg:
        lg.append([dg(i) for i in range(6)])
        commits: list[str] = []
        lg._db.set_trace_callback(lambda sql: commits.append(sql) if sql.strip() == "COMMIT" else None)
        assert lg.trim(2, cursor="gateway") == 2
        assert len(commits) == 1
        lg._db.set_trace_callback(None)
        lg._db.execute("CREATE TRIGGER no_delete BEFORE DELETE ON entries "
                       "BEGIN SELECT RAISE(ABORT, 'no'); END")
        with pytest.raises(LogError):
            lg.trim(4, cursor="gateway")
        assert lg.cursor("gateway") == 2
        lg._db.execute("DROP TRIGGER no_delete")
    with DurableLog(cfg) as lg:
        assert lg.cursor("gateway") == 2
        assert [e.seq for e in lg.read(after=0)] == [3, 4, 5, 6]


def test_state_is_committed_with_the_entries_and_listed_by_prefix(log: DurableLog) -> None:
    log.append([dg(1)], stream="a", stream_seqs=[7], state={"hwm:a": 7, "other": 1})
    log.set_state("hwm:b", 3)
    assert log.get_state("hwm:a") == 7
    assert log.get_state("missing") is None
    assert log.states("hwm:") == {"hwm:a": 7, "hwm:b": 3}
    log.delete_state("hwm:b")
    assert log.states("hwm:") == {"hwm:a": 7}


def test_cursors_persist_across_reopen(tmp_path: Path) -> None:
    cfg = LogConfig(path=tmp_path / "log.sqlite", quota_bytes=0)
    with DurableLog(cfg) as lg:
        lg.append([dg(i) for i in range(3)])
        assert lg.cursor("udp") == 0
        lg.commit_cursor("udp", 2)
        lg.commit_cursor("store", 3)
    with DurableLog(cfg) as lg:
        assert lg.cursor("udp") == 2
        assert lg.cursors() == {"udp": 2, "store": 3}
        assert lg.count_after(lg.cursor("udp")) == 1


def test_advance_seq_moves_the_next_seq_forward_only(log: DurableLog) -> None:
    log.append([dg(1)])
    assert log.advance_seq(100) == 100
    assert log.advance_seq(50) == 100
    assert log.append([dg(2)]).first_seq == 100
    assert log.last_seq() == 100


def test_renumber_moves_every_entry_above_the_mark_in_order_and_persists(tmp_path: Path) -> None:
    cfg = LogConfig(path=tmp_path / "spool.sqlite", quota_bytes=0)
    with DurableLog(cfg) as lg:
        lg.append([dg(i) for i in range(5)])
        lg.trim(1)
        lg.advance_seq(8)  # a gap after the last entry (seqs 6, 7 handed out, never stored)
        before = lg.stats()
        assert lg.renumber(1001) == 4
        entries = lg.read(0, limit=100)
        assert [e.seq for e in entries] == [1001, 1002, 1003, 1004]
        assert [e.datagram for e in entries] == [dg(i) for i in range(1, 5)]
        assert lg.append([dg(9)]).first_seq == 1007  # the trailing gap moved with the entries
        after = lg.stats()
        assert (after.entries, after.bytes) == (before.entries + 1, before.bytes + cost(dg(9)))
    with DurableLog(cfg) as lg:
        assert [e.seq for e in lg.read(0, limit=100)] == [1001, 1002, 1003, 1004, 1007]
        assert lg.last_seq() == 1007
        # below the next seq, entries still go above everything handed out, in order
        assert lg.renumber(5) == 5
        assert [e.seq for e in lg.read(0, limit=100)] == [1008, 1009, 1010, 1011, 1014]


def test_renumber_of_an_empty_log_only_advances_the_next_seq(log: DurableLog) -> None:
    assert log.renumber(50) == 0
    assert log.append([dg(1)]).first_seq == 50
    log.trim(50)
    assert log.renumber(10) == 0
    assert log.append([dg(2)]).first_seq == 51


def test_a_crash_during_renumber_leaves_every_entry_at_its_old_seq_or_every_one_at_its_new(
    tmp_path: Path,
) -> None:
    """The image of the log as a crash leaves it: the WAL with the renumbering transaction complete, or torn
    inside its last frame (SQLite then replays nothing of it). No image mixes old and new seqs."""
    live = DurableLog(LogConfig(path=tmp_path / "live" / "spool.sqlite", quota_bytes=0))
    try:
        live.append([dg(i) for i in range(300)])  # several pages, so the transaction spans many WAL frames
        live.renumber(10_000)
        images = []
        for name in ("whole", "torn"):
            into = tmp_path / name
            into.mkdir()
            for suffix in ("", "-wal"):
                data = Path(f"{live.path}{suffix}").read_bytes()
                if name == "torn" and suffix == "-wal":
                    data = data[:-100]  # inside the last frame: the commit frame of the renumbering
                (into / f"spool.sqlite{suffix}").write_bytes(data)
            images.append(into / "spool.sqlite")
    finally:
        live.close()
    for image, first in zip(images, (10_000, 1), strict=True):
        with DurableLog(LogConfig(path=image, quota_bytes=0)) as lg:
            entries = lg.read(0, limit=1000)
            assert [e.seq for e in entries] == list(range(first, first + 300)), image
            assert [e.datagram for e in entries] == [dg(i) for i in range(300)]
            assert lg.last_seq() == first + 299


def test_drop_oldest_keeps_the_newest_within_quota_and_counts_the_drops(tmp_path: Path) -> None:
    one = cost(dg(0))
    cfg = LogConfig(path=tmp_path / "log.sqlite", quota_bytes=10 * one, full_policy=FullPolicy.DROP_OLDEST)
    with DurableLog(cfg) as lg:
        assert lg.append([dg(i) for i in range(8)]).dropped == 0
        res = lg.append([dg(i) for i in range(8, 12)])
        assert (res.first_seq, res.last_seq, res.appended, res.dropped) == (9, 12, 4, 2)
        assert [e.seq for e in lg.read(0)] == list(range(3, 13))
        st = lg.stats()
        assert (st.entries, st.bytes, st.dropped_oldest, st.first_seq) == (10, 10 * one, 2, 3)
    with DurableLog(cfg) as lg:
        assert lg.stats().dropped_oldest == 2


def test_a_group_larger_than_the_quota_drops_its_own_head_but_consumes_the_seqs(tmp_path: Path) -> None:
    one = cost(dg(0))
    cfg = LogConfig(path=tmp_path / "log.sqlite", quota_bytes=3 * one, full_policy=FullPolicy.DROP_OLDEST)
    with DurableLog(cfg) as lg:
        lg.append([dg(0)])
        res = lg.append([dg(i) for i in range(1, 6)])
        assert (res.first_seq, res.last_seq, res.appended, res.dropped) == (2, 6, 3, 3)
        assert [e.seq for e in lg.read(0)] == [4, 5, 6]
        assert lg.stats().dropped_oldest == 3


def test_refuse_new_stores_the_prefix_that_fits_and_counts_the_rest(tmp_path: Path) -> None:
    one = cost(dg(0))
    cfg = LogConfig(path=tmp_path / "log.sqlite", quota_bytes=5 * one, full_policy=FullPolicy.REFUSE_NEW)
    with DurableLog(cfg) as lg:
        lg.append([dg(i) for i in range(3)])
        res = lg.append([dg(i) for i in range(3, 7)])
        assert (res.first_seq, res.last_seq, res.appended, res.refused) == (4, 5, 2, 2)
        assert lg.append([dg(9)]).refused == 1
        assert lg.last_seq() == 5  # refused datagrams take no seq
        assert lg.stats().refused == 3
        lg.trim(2)
        assert lg.append([dg(10)]).first_seq == 6
    with DurableLog(cfg) as lg:
        assert lg.stats().refused == 3


def test_refuse_new_atomic_stores_nothing_and_raises_quota_full(tmp_path: Path) -> None:
    one = cost(dg(0), "agent")
    cfg = LogConfig(path=tmp_path / "log.sqlite", quota_bytes=3 * one, full_policy=FullPolicy.REFUSE_NEW)
    with DurableLog(cfg) as lg:
        lg.append([dg(0), dg(1)], stream="agent", state={"hwm:agent": 2})
        with pytest.raises(QuotaFull, match="refuse-new") as info:
            lg.append([dg(2), dg(3)], stream="agent", state={"hwm:agent": 4}, atomic=True)
        assert isinstance(info.value, LogFull)
        assert lg.get_state("hwm:agent") == 2
        st = lg.stats()
        assert (st.entries, st.last_seq, st.refused) == (2, 2, 0)


def test_disk_use_follows_the_quota_after_trims(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    cfg = LogConfig(
        path=path, quota_bytes=2 << 20, full_policy=FullPolicy.DROP_OLDEST, wal_limit_bytes=1 << 20
    )
    with DurableLog(cfg) as lg:
        for k in range(40):  # 40 x 100 x 1000 bytes = 4 MB through a 2 MB quota
            lg.append([dg(k * 100 + i, size=1000) for i in range(100)])
        assert lg.stats().bytes <= 2 << 20
        lg.trim(lg.last_seq())
    # closing checkpoints the WAL, which is when the vacuumed pages leave the main file
    assert path.stat().st_size < 1 << 20


def _batch_payload(batch: int, index: int, size: int) -> bytes:
    return batch.to_bytes(4, "big") + index.to_bytes(4, "big") + bytes(size)


def test_kill_9_at_random_instants_leaves_every_committed_batch_whole(tmp_path: Path) -> None:
    kill_9_rounds(tmp_path / "spool.sqlite", settings="check_on_open=False", pad=0, seed=1234,
                  pause=(0.0, 0.3))


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, so the disk fills long before any quota (needs root; skipped otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_raises_log_full_and_leaves_the_log_consistent(tiny_disk: Path) -> None:
    mnt = tiny_disk
    cfg = LogConfig(
        path=mnt / "spool.sqlite", quota_bytes=0, wal_limit_bytes=256 << 10, reserve_bytes=512 << 10,
        checkpoint_pages=64, full_policy=FullPolicy.REFUSE_NEW,
    )
    stored = 0
    with DurableLog(cfg) as lg:
        full: LogFull | None = None
        for k in range(10_000):
            try:
                lg.append([dg(k * 10 + i, size=2000) for i in range(10)], state={"n": stored + 10})
            except LogFull as exc:
                full = exc
                break
            stored += 10
        assert full is not None
        assert "disk full" in str(full)
        assert lg.stats().entries == stored
        assert lg.get_state("n") == stored
    with DurableLog(cfg) as lg:  # reopens clean (quick_check passes)
        assert lg.stats().entries == stored
        assert len(lg.read(0, limit=100_000, max_bytes=1 << 30)) == stored
        lg.trim(lg.last_seq() - 20)
        lg.append([dg(1)])  # room again after the trim


def test_drop_oldest_still_applies_when_the_disk_fills_before_the_quota(tiny_disk: Path) -> None:
    cfg = LogConfig(path=tiny_disk / "spool.sqlite", quota_bytes=0, wal_limit_bytes=256 << 10,
                    reserve_bytes=512 << 10, checkpoint_pages=64, full_policy=FullPolicy.DROP_OLDEST)
    with DurableLog(cfg) as lg:
        dropped = 0
        for k in range(1000):  # 20 MB through a 4 MiB disk
            res = lg.append([dg(k * 10 + i, size=2000) for i in range(10)], state={"n": k})
            assert res.appended == 10
            dropped += res.dropped
        st = lg.stats()
        assert dropped > 0
        assert st.dropped_oldest == dropped
        assert st.entries + st.dropped_oldest == 10_000
        assert st.last_seq == 10_000
        assert [e.seq for e in lg.read(st.last_seq - 10)] == list(range(st.last_seq - 9, st.last_seq + 1))
    with DurableLog(cfg) as lg:
        assert lg.stats().dropped_oldest == dropped


@pytest.fixture
def mib_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: smaller than the default reserve and WAL checkpoint interval (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    mnt = tmp_path / "mib"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> Path:
    """Take every free byte of the filesystem holding ``path`` (as another process's file would)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (4096, 1):  # whole blocks, then what is left of the last one
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return path


@pytest.mark.parametrize("size", [1000, 30_000])
@pytest.mark.parametrize("policy", [FullPolicy.DROP_OLDEST, FullPolicy.REFUSE_NEW])
def test_on_a_full_1mib_disk_cursors_and_trims_still_commit_and_the_episode_is_logged_once(
    mib_disk: Path, policy: FullPolicy, size: int, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = LogConfig(path=mib_disk / "spool.sqlite", quota_bytes=0, full_policy=policy)  # default sizes
    with caplog.at_level(logging.INFO, logger="flowtunnel.log"), DurableLog(cfg) as lg:
        assert 0 < lg._reserve_path.stat().st_size <= (1 << 20) // 16  # sized to the filesystem
        offered = refused = 0
        errors: list[str] = []
        for k in range(3_000_000 // (10 * size)):  # 3 MB through a 1 MiB disk
            batch = [dg(k * 10 + i, size=size) for i in range(10)]
            offered += 10
            try:
                lg.append(batch)
            except LogFull as exc:
                errors.append(str(exc))
                refused += 10
        st = lg.stats()
        assert st.disk_full
        assert all("kept free for trims and cursor commits" in e for e in errors)
        assert bool(errors) == (policy is FullPolicy.REFUSE_NEW)
        if policy is FullPolicy.DROP_OLDEST:
            assert st.dropped_oldest > 0
            assert st.entries + st.dropped_oldest == offered
        else:
            assert st.entries + refused == offered
        # Someone else takes the rest of the disk: a consumer can still record its progress and trim.
        filler = fill(mib_disk / "filler")
        upto = st.last_seq - 2
        for _ in range(3):
            lg.commit_cursor("gateway", upto)
            lg.set_state("acked", upto)
        assert lg.trim(upto - 1) == st.entries - 3
        assert lg.trim(upto, cursor="uploader") == 1  # the cursor in the careful path too
        filler.unlink()
        lg.append([dg(1)])
        assert not lg.stats().disk_full
        assert lg._reserve_path.exists()  # taken back once there was room
    with DurableLog(cfg) as lg:
        assert lg.cursor("gateway") == lg.cursor("uploader") == upto
        assert lg.get_state("acked") == upto
        assert lg.stats().entries == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "disk full" in warnings[0]
    assert str(cfg.path) in warnings[0]
    cleared = [r.getMessage() for r in caplog.records if "room again" in r.getMessage()]
    assert len(cleared) == 1


def test_a_file_that_is_not_a_database_raises_log_corrupt_with_the_path(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite"
    path.write_bytes(b"this is not sqlite" * 300)
    with pytest.raises(LogCorrupt, match=str(path)) as info:
        DurableLog(LogConfig(path=path))
    assert info.value.path == str(path)


def test_another_sqlite_database_is_not_taken_for_a_log(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (name TEXT)")
    db.close()
    with pytest.raises(LogCorrupt, match="not a flowtunnel log"):
        DurableLog(LogConfig(path=path))


@pytest.mark.parametrize("damage", ["scribbled-pages", "truncated"])
def test_a_damaged_database_file_is_detected_on_open(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "spool.sqlite"
    with DurableLog(LogConfig(path=path, quota_bytes=0)) as lg:
        lg.append([dg(i, size=3000) for i in range(200)])
    data = bytearray(path.read_bytes())
    assert len(data) > 200 * 3000
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:  # a torn write: the first bytes of 20 pages (b-tree headers, overflow chain pointers) garbled
        rnd = random.Random(7)
        for page in range(20, 40):
            data[page * 4096 : page * 4096 + 16] = rnd.randbytes(16)
    path.write_bytes(bytes(data))
    with pytest.raises(LogCorrupt, match=str(path)):
        DurableLog(LogConfig(path=path))


def test_threads_share_one_log_safely(log: DurableLog) -> None:
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            for k in range(30):
                log.append([dg(t * 1000 + k * 10 + i) for i in range(10)])
                log.read(after=max(0, log.last_seq() - 5))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    seqs = [e.seq for e in log.read(0, limit=10_000)]
    assert seqs == list(range(1, 1201))


def test_closed_log_raises_and_config_is_validated(tmp_path: Path) -> None:
    lg = DurableLog(LogConfig(path=tmp_path / "x.sqlite"))
    lg.close()
    lg.close()
    with pytest.raises(LogError, match="closed"):
        lg.append([dg(1)])
    with pytest.raises(ValueError, match="synchronous"):
        LogConfig(path=tmp_path / "y", synchronous="off")
    with pytest.raises(ValueError, match="quota_bytes"):
        LogConfig(path=tmp_path / "y", quota_bytes=-1)
    with (
        DurableLog(LogConfig(path=tmp_path / "z.sqlite")) as other,
        pytest.raises(ValueError, match="stream_seqs"),
    ):
        other.append([dg(1)], stream_seqs=[1, 2])


def test_a_database_held_by_another_writer_raises_log_locked_after_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    with DurableLog(LogConfig(path=path, quota_bytes=0, busy_timeout=0.2)) as lg:
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
            with pytest.raises(LogLocked, match="locked by another connection"):
                lg.append([dg(1)])
            other.execute("ROLLBACK")
            assert lg.append([dg(1)]).first_seq == 1  # nothing was consumed by the failed attempt
        finally:
            other.close()


def _page_size(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA page_size").fetchone()[0])
    finally:
        db.close()


def test_a_new_log_takes_16k_pages_and_an_existing_one_keeps_its_own(tmp_path: Path) -> None:
    big, small = tmp_path / "big.sqlite", tmp_path / "small.sqlite"
    with DurableLog(LogConfig(path=big)) as lg:
        lg.append([dg(i, size=1400) for i in range(50)])
    with DurableLog(LogConfig(path=small, page_size=4096)) as lg:
        lg.append([dg(i, size=1400) for i in range(50)])
    assert (_page_size(big), _page_size(small)) == (16384, 4096)
    # reopened with another page size, a log keeps its file's (and its entries)
    with DurableLog(LogConfig(path=small, page_size=65536)) as lg:
        lg.append([dg(50)])
        assert [e.datagram for e in lg.read(0, limit=100)] == [dg(i, size=1400) for i in range(50)] + [dg(50)]
    assert _page_size(small) == 4096
    with pytest.raises(ValueError, match="page_size 3000"):
        LogConfig(path=big, page_size=3000)


def test_on_a_small_filesystem_a_new_log_keeps_4k_pages(mib_disk: Path) -> None:
    # 16 KiB pages on 1 MiB would leave the reserve, the WAL bound and the floors a handful of pages each
    with DurableLog(LogConfig(path=mib_disk / "log.sqlite", quota_bytes=0)) as lg:
        lg.append([dg(i) for i in range(10)])
    assert _page_size(mib_disk / "log.sqlite") == 4096


def test_read_entries_are_ordinary_frozen_dataclasses(log: DurableLog) -> None:
    # read builds them without their __init__ (for speed): they must behave exactly like constructed ones
    log.append([dg(1), dg(2)], stream="site-a", stream_seqs=[7, 8])
    first = log.read(0)[0]
    assert first == Entry(1, "site-a", 7, dg(1))
    assert hash(first) == hash(Entry(1, "site-a", 7, dg(1)))
    assert hash(first.datagram) == hash(dg(1))
    assert repr(first.datagram) == repr(dg(1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.datagram.payload = b""  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.seq = 5  # type: ignore[misc]


def test_every_counter_survives_a_reopen_after_appends_that_change_some_of_them(tmp_path: Path) -> None:
    # an append writes only the counters it changed, in one statement: the others must stay as they were
    one = cost(dg(0))
    path = tmp_path / "log.sqlite"
    with DurableLog(LogConfig(path=path, quota_bytes=4 * one, full_policy=FullPolicy.DROP_OLDEST)) as lg:
        lg.append([dg(i) for i in range(6)])  # drops 2
        lg.append([dg(6)])  # drops 1 more
    with DurableLog(LogConfig(path=path, quota_bytes=4 * one, full_policy=FullPolicy.REFUSE_NEW)) as lg:
        assert lg.append([dg(7)]).refused == 1
        lg.append([])
        before = lg.stats()
    with DurableLog(LogConfig(path=path, quota_bytes=4 * one, full_policy=FullPolicy.REFUSE_NEW)) as lg:
        st = lg.stats()
        assert dataclasses.replace(st, file_bytes=0, disk_bytes=0) == dataclasses.replace(
            before, file_bytes=0, disk_bytes=0
        )
        assert (st.last_seq, st.entries, st.bytes, st.dropped_oldest, st.refused) == (7, 4, 4 * one, 3, 1)


def test_appended_time_is_stored_per_entry_and_a_version_1_log_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    with DurableLog(LogConfig(path=path, quota_bytes=0)) as lg:
        lg.append([dg(1), dg(2)], stream="a", appended_ns=123)
    # What a version 1 log looks like: no appended_ns column.
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE entries DROP COLUMN appended_ns")
    db.execute("UPDATE meta SET value = 1 WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with DurableLog(LogConfig(path=path, quota_bytes=0)) as lg:
        lg.append([dg(3)], stream="a", appended_ns=456)
        lg.append([dg(4)], stream="a")
        entries = lg.read(after=0)
    assert [e.appended_ns for e in entries] == [None, None, 456, None]
    assert [e.datagram for e in entries] == [dg(1), dg(2), dg(3), dg(4)]
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (2,)
    db.close()


def _du(directory: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in directory.iterdir())


@pytest.mark.parametrize(("quota", "size", "group", "policy"), [
    (2 << 20, 1400, 50, FullPolicy.DROP_OLDEST),
    (2 << 20, 1400, 2000, FullPolicy.DROP_OLDEST),  # groups larger than the quota
    (2 << 20, 300, 200, FullPolicy.REFUSE_NEW),
    (MIN_DISK_QUOTA, 1400, 20, FullPolicy.DROP_OLDEST),
    (8 << 20, 9000, 40, FullPolicy.DROP_OLDEST),  # overflow pages
])
def test_disk_quota_bounds_every_file_of_the_log(
    tmp_path: Path, quota: int, size: int, group: int, policy: FullPolicy
) -> None:
    """Issue 17.9: with a 2 MiB quota the spool directory peaked at 7,356 KiB (database 2.26 MB, WAL
    4.17 MB, reserve 1 MB): the quota counted payload bytes only. Now it bounds them all."""
    directory = tmp_path / "spool"
    rng = random.Random(size)
    peak = 0
    with DurableLog(LogConfig(path=directory / "spool.sqlite", quota_bytes=0, disk_quota_bytes=quota,
                              full_policy=policy)) as lg:
        for _ in range(3 * quota // (size * group) + 20):
            batch = [Datagram(received_ns=1, exporter="127.0.0.1", exporter_port=1, local_port=2,
                              payload=rng.randbytes(size)) for _ in range(group)]
            res = lg.append(batch)
            assert res.appended + res.dropped + res.refused >= len(batch) or res.appended == 0
            peak = max(peak, _du(directory))
        stats = lg.stats()
        assert stats.disk_bytes <= quota
        assert stats.disk_quota_bytes == quota
        # ... and the quota is used: the data kept is at least a third of it.
        assert stats.bytes >= quota // 3
        if policy is FullPolicy.DROP_OLDEST:
            assert stats.dropped_oldest > 0
        else:
            assert stats.refused > 0
    assert peak <= quota, f"peak {peak} bytes over the {quota}-byte disk quota"


def test_disk_quota_refuses_settings_it_cannot_keep(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"disk_quota_bytes 100000 is below the minimum of 524288"):
        LogConfig(path=tmp_path / "log.sqlite", disk_quota_bytes=100_000)
