"""``export --parquet`` never destroys the previous good export: a ``kill -9`` mid-way leaves it whole."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from flowtunnel.store import export
from flowtunnel.store.db import FlowDatabase
from tests.peers import free_tcp_port

ROWS = 1_000_000


def _fill(data: Path, rows: int) -> None:
    """A stopped store holding ``rows`` flows over two days (random-looking, so Parquet stays large)."""
    db = FlowDatabase(data / "store" / "flows.duckdb")
    try:
        db._conn.execute(  # the writer's own connection: tests may write directly
            "INSERT INTO flows (agent, exporter, version, flow_start, flow_end, src_addr, dst_addr, "
            "src_port, dst_port, protocol, packets, bytes, received) "
            "SELECT 'site-a', '127.0.0.1', 10, "
            "TIMESTAMPTZ '2026-12-01 00:00:00+00' + to_seconds(i % 172800), "
            "TIMESTAMPTZ '2026-12-01 00:00:01+00' + to_seconds(i % 172800), "
            "'10.' || (hash(i) % 256) || '.' || (hash(i * 7) % 256) || '.' || (i % 256), "
            "'192.0.2.' || (i % 250), (hash(i) % 65535)::INTEGER, (i % 1024)::INTEGER, 6, "
            "hash(i * 3) % 1000, hash(i * 5) % 1000000, now() FROM range(?) t(i)",
            [rows],
        )
    finally:
        db.close()


def _export(data: Path, target: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flowtunnel", "export", "--data", str(data), "--parquet", str(target)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _digests(target: Path) -> dict[str, str]:
    return {
        str(p.relative_to(target)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(target.rglob("*")) if p.is_file()
    }


def _stats(target: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in target.rglob("*") if p.is_file()}


def _parquet_rows(target: Path) -> int:
    conn = duckdb.connect()
    try:
        row = conn.execute(f"SELECT count(*) FROM read_parquet('{target}/*/*.parquet')").fetchone()
    finally:
        conn.close()
    return int(row[0]) if row else 0


def test_a_killed_export_leaves_the_previous_export_intact(tmp_path: Path) -> None:
    data, target = tmp_path / "data", tmp_path / "pq"
    _fill(data, ROWS)
    first = _export(data, target)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    good = _digests(target)
    assert len(good) == 2
    before = _stats(target)

    second = _export(data, target)
    # Kill it while it writes Parquet: once a file appears in its staging directory (or, had it written in
    # place as it used to, once a file of the previous export changes).
    deadline = time.monotonic() + 120
    while second.poll() is None and time.monotonic() < deadline:
        staged = list(tmp_path.glob(f"{export.STAGING_PREFIX}*/parts/*/*.parquet"))
        if staged or _stats(target) != before:
            second.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    second.communicate(timeout=60)
    assert second.returncode == -signal.SIGKILL, "the export finished before it could be killed mid-way"

    assert _digests(target) == good  # byte for byte, nothing added, nothing cut
    assert _parquet_rows(target) == ROWS

    third = _export(data, target)
    out, err = third.communicate(timeout=120)
    assert third.returncode == 0, err
    assert out.startswith(f"exported {ROWS} flows")
    assert _parquet_rows(target) == ROWS
    assert not list(tmp_path.glob(f"{export.STAGING_PREFIX}*")), "the killed export's staging was not removed"


def test_install_replaces_a_day_whole_and_leaves_other_days(tmp_path: Path) -> None:
    target, staging = tmp_path / "pq", tmp_path / "staging"
    (target / "day=2026-12-01").mkdir(parents=True)
    (target / "day=2026-12-01" / "data_0.parquet").write_bytes(b"old 0")
    (target / "day=2026-12-01" / "data_1.parquet").write_bytes(b"old 1")  # an earlier, larger export
    (target / "day=2026-11-30").mkdir()
    (target / "day=2026-11-30" / "data_0.parquet").write_bytes(b"older day")
    (staging / "day=2026-12-01").mkdir(parents=True)
    (staging / "day=2026-12-01" / "data_0.parquet").write_bytes(b"new 0")
    export.install_partitions(staging, target)
    assert _contents(target) == {
        "day=2026-11-30/data_0.parquet": b"older day", "day=2026-12-01/data_0.parquet": b"new 0",
    }


def test_install_copies_then_renames_across_filesystems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target, staging = tmp_path / "pq", tmp_path / "staging"
    (target / "day=2026-12-01").mkdir(parents=True)
    (target / "day=2026-12-01" / "data_0.parquet").write_bytes(b"old")
    (staging / "day=2026-12-01").mkdir(parents=True)
    (staging / "day=2026-12-01" / "data_0.parquet").write_bytes(b"new")
    real = os.replace
    renamed: list[tuple[str, str]] = []

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(src).parent.parent == staging:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        renamed.append((Path(src).name, Path(dst).name))
        real(src, dst)

    monkeypatch.setattr("flowtunnel.store.export.os.replace", replace)
    export.install_partitions(staging, target)
    assert _contents(target) == {"day=2026-12-01/data_0.parquet": b"new"}
    assert renamed == [(".flowtunnel-tmp-data_0.parquet", "data_0.parquet")]


def _contents(target: Path) -> dict[str, bytes]:
    return {str(p.relative_to(target)): p.read_bytes() for p in sorted(target.rglob("*")) if p.is_file()}


def test_a_gateway_killed_during_an_export_through_its_socket_leaves_the_previous_export_intact(
    tmp_path: Path,
) -> None:
    data, target = tmp_path / "data", tmp_path / "pq"
    data.mkdir(mode=0o700)
    _fill(data, ROWS)
    first = _export(data, target)  # the gateway is not running yet: directly
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    good = _digests(target)
    before = _stats(target)
    port = free_tcp_port()
    with (tmp_path / "gateway.log").open("wb") as log:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "flowtunnel", "gateway", "--listen", f"127.0.0.1:{port}",
             "--data", str(data)],
            stdout=log, stderr=subprocess.STDOUT,
        )
    staging = data / "store" / "export-staging"
    try:
        deadline = time.monotonic() + 60
        while not (data / "store" / "query.sock").exists():
            assert gateway.poll() is None, (tmp_path / "gateway.log").read_text()
            assert time.monotonic() < deadline, "the gateway's query socket did not appear"
            time.sleep(0.02)
        second = _export(data, target)  # through the socket: the gateway writes the files
        deadline = time.monotonic() + 120
        while second.poll() is None and time.monotonic() < deadline:
            if list(staging.glob("*/parts/*/*.parquet")) or _stats(target) != before:
                gateway.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        gateway.wait(30)
        second.communicate(timeout=60)
        assert gateway.returncode == -signal.SIGKILL, "the export finished before the gateway could be killed"
        assert second.returncode == 1
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait(30)
    assert _digests(target) == good
    assert _parquet_rows(target) == ROWS


def test_a_direct_export_is_private_whatever_the_callers_umask(tmp_path: Path) -> None:
    """Flows in clear: through the gateway's socket an export was 0600 (the gateway's umask), run directly it
    took the caller's umask (0644 files under 022). Now 0600 files and 0700 directories either way."""
    data, target = tmp_path / "data", tmp_path / "pq"
    _fill(data, 1000)
    done = subprocess.run(
        ["sh", "-c", 'umask 022; exec "$@"', "sh", sys.executable, "-m", "flowtunnel", "export", "--data",
         str(data), "--parquet", str(target)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    made = [target, *target.rglob("*")]
    assert len(made) >= 3
    for path in made:
        want = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(path.stat().st_mode) == want, path
