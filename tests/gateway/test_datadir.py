"""The gateway's data directory: private from the start (0700 directories, 0600 files, whatever the
umask), someone else's or a group-writable one refused in one line, and one gateway per directory (issue
17.5, 15.3)."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from flowtunnel.cli import main
from flowtunnel.datadir import DirLock, prepare_private_dir
from flowtunnel.errors import ConfigError
from flowtunnel.gateway.config import GatewayConfig
from flowtunnel.gateway.service import LOCK_FILE, Gateway
from tests.gateway.test_udp_forward import TPL_A, v9_stream, wrap
from tests.gateway.util import drained, enroll, post_batch, seal, start_gateway
from tests.peers import UdpCapture

AGENT = "site-a"


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The common default umask (files 0644, directories 0755), restored afterwards."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of everything below ``root`` (and of ``root``), by relative path."""
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        out[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return out


@pytest.mark.usefixtures("loose_umask")
async def test_every_file_and_directory_of_a_running_gateway_is_private(tmp_path: Path) -> None:
    """Before: journal.sqlite and store/flows.duckdb 0644 in a 0755 store/."""
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    with UdpCapture() as cap:
        gw = await start_gateway(data, store=True, forward=(cap.url,))
        try:
            async with aiohttp.ClientSession() as session:
                body = seal(AGENT, key, 1, wrap(v9_stream(TPL_A, 1, datagrams=3, per=4)))
                assert (await post_batch(session, gw.url, body, agent=AGENT))[0] == 200
            await drained(gw, "udp-forward")
            await drained(gw, "store")
            async with asyncio.timeout(20):
                while not (data / "status.json").exists():  # noqa: ASYNC110 - written by housekeeping
                    await asyncio.sleep(0.05)
            running = modes(data)
        finally:
            await gw.stop()
        cap.wait_for(3)
    stopped = modes(data)
    assert os.umask(0o022) == 0o022  # the gateway's umask 077 ended with it
    for name in ("journal.sqlite", "journal.sqlite-wal", "journal.sqlite-shm", "registry.sqlite", LOCK_FILE,
                 "store", "store/flows.duckdb", "forward-map.json"):
        assert name in running, sorted(running)
    assert "status.json" in stopped
    for what in (running, stopped):
        loose = {name: f"{mode:04o}" for name, mode in what.items() if mode & 0o077}
        assert loose == {}


@pytest.mark.usefixtures("loose_umask")
def test_enroll_creates_the_data_directory_private(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "new" / "gw"
    assert main(["enroll", AGENT, "--data", str(data), "--format", "json"]) == 0
    capsys.readouterr()
    assert modes(data) == {".": 0o700, "registry.sqlite": 0o600}


def test_an_old_readable_data_directory_is_tightened(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    (data / "store").mkdir(parents=True)
    for path, mode in ((data, 0o755), (data / "store", 0o755)):
        path.chmod(mode)
    for name in ("journal.sqlite", "status.json", "store/flows.duckdb"):
        (data / name).write_bytes(b"")
        (data / name).chmod(0o644)
    prepare_private_dir(data, what="data directory")
    assert modes(data) == {".": 0o700, "store": 0o700, "journal.sqlite": 0o600, "status.json": 0o600,
                           "store/flows.duckdb": 0o600}


async def test_a_group_writable_data_directory_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / "gw"
    data.mkdir()
    data.chmod(0o775)
    refused = r"is writable by group or others \(mode 0775\): refusing it"
    with pytest.raises(ConfigError, match=refused) as info:
        await start_gateway(data)
    assert "\n" not in str(info.value)
    assert not (data / "journal.sqlite").exists()
    assert main(["enroll", AGENT, "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "writable by group or others" in err
    assert not (data / "registry.sqlite").exists()


async def test_a_data_directory_of_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "gw"
    data.mkdir(mode=0o700)
    owner = data.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)
    with pytest.raises(ConfigError, match=rf"belongs to uid {owner}, not to this user \(uid {owner + 1}\)"):
        await start_gateway(data)
    assert list(data.iterdir()) == []


async def test_a_second_gateway_in_one_process_is_refused_and_the_first_keeps_going(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    key = enroll(data, AGENT)
    gw = await start_gateway(data)
    try:
        with pytest.raises(ConfigError, match=rf"is in use by another gateway \(pid {os.getpid()}, lock "):
            await start_gateway(data)
        async with aiohttp.ClientSession() as session:
            assert (await post_batch(session, gw.url, seal(AGENT, key, 1, []), agent=AGENT))[0] == 200
    finally:
        await gw.stop()
    # Released on stop: the next gateway starts.
    gw = await start_gateway(data)
    await gw.stop()


def test_the_lock_is_reusable_by_other_processes_kinds(tmp_path: Path) -> None:
    with DirLock.acquire(tmp_path, "sink.lock", what="store sink") as lock:
        assert lock.held
        assert (tmp_path / "sink.lock").read_text() == f"{os.getpid()}\n"
        assert stat.S_IMODE((tmp_path / "sink.lock").stat().st_mode) == 0o600
        with pytest.raises(ConfigError, match=r"in use by another store sink \(pid \d+"):
            DirLock.acquire(tmp_path, "sink.lock", what="store sink")
    assert not lock.held
    DirLock.acquire(tmp_path, "sink.lock", what="store sink").release()


def _gateway(data: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with log.open("wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "flowtunnel", "gateway", "--listen", "127.0.0.1:0", "--data", str(data),
             "--no-store"],
            stdout=fh, stderr=fh, stdin=subprocess.DEVNULL, env=env,
        )


def test_a_second_gateway_process_on_the_same_data_directory_exits_naming_the_first(tmp_path: Path) -> None:
    """Before: the second gateway started, listened and accepted batches next to the first."""
    data = tmp_path / "gw"
    enroll(data, AGENT)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = _gateway(data, first_log)
    try:
        deadline = time.monotonic() + 60
        while "listening on" not in first_log.read_text(errors="replace"):
            assert first.poll() is None, first_log.read_text(errors="replace")
            assert time.monotonic() < deadline, "the first gateway did not start"
            time.sleep(0.05)
        second = _gateway(data, second_log)
        try:
            code = second.wait(timeout=60)
        except subprocess.TimeoutExpired:
            second.kill()
            second.wait()
            pytest.fail(f"a second gateway ran on the same data directory:\n{second_log.read_text()}")
        err = second_log.read_text(errors="replace")
        assert code != 0
        assert err.count("\n") == 1, err
        assert f"is in use by another gateway (pid {first.pid}" in err
        assert first.poll() is None  # the first one is untouched
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0, first_log.read_text(errors="replace")


async def test_a_gateway_and_a_sink_process_never_run_one_sink_on_the_same_files(tmp_path: Path) -> None:
    """A gateway with its own journal runs its sinks in process; a 'flowtunnel sink' of the same kind given
    its data directory (or its --parquet directory) would write the same store or state files. Before: both
    ran. Now either one is refused in one line naming the other."""
    data, out = tmp_path / "gw", tmp_path / "pq"
    gw = await start_gateway(data, store=True, parquet=out)
    try:
        sink = [sys.executable, "-m", "flowtunnel", "sink"]
        nats = "nats://127.0.0.1:1"  # never reached: the lock is taken before the journal is opened
        for cmd, holder in (([*sink, "store", "--journal", nats, "--data", str(data)], "store sink"),
                            ([*sink, "parquet", "--journal", nats, "--out", str(out), "--data",
                              str(tmp_path / "elsewhere")], "parquet sink parquet")):
            done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=60,
                                           check=False)
            assert done.returncode != 0
            assert done.stderr.count("\n") == 1, done.stderr
            assert f"is in use by another {holder} (pid {os.getpid()}" in done.stderr
    finally:
        await gw.stop()
    # The other way round: a sink process holds the store's files; the gateway refuses to start, and starts
    # once it is gone.
    held = rf"is in use by another store sink \(pid {os.getpid()}"
    with DirLock.acquire(data, "sink-store.lock", what="store sink"), pytest.raises(ConfigError, match=held):
        await start_gateway(data, store=True)
    # Refused after the journal was opened: its threads are gone too (before: left running).
    assert not [t.name for t in threading.enumerate() if t.name.startswith("checkpoint ")
                or t.name == "journal-commit"]
    gw = await start_gateway(data, store=True)
    await gw.stop()


async def test_a_parquet_sink_whose_output_is_fixed_later_takes_its_lock_then(tmp_path: Path) -> None:
    """A file where the parquet directory should be does not stop the gateway (the sink is restarted until
    the path is fixed); the sink's lock is taken when it can start, so a 'flowtunnel sink parquet' on that
    directory is refused from then on."""
    data, out = tmp_path / "gw", tmp_path / "pq"
    out.write_text("")
    gw = Gateway(GatewayConfig(listen="127.0.0.1:0", data=data, store=False, parquet=out,
                               status_interval=0.2))
    gw.sink_restart_delay = 0.1
    await gw.start()
    try:
        lock = out / "_flowtunnel" / "parquet.lock"
        await asyncio.sleep(0.3)
        out.unlink()
        deadline = time.monotonic() + 30
        while not lock.exists():
            assert time.monotonic() < deadline, "the parquet sink did not take its lock"
            await asyncio.sleep(0.05)
        with pytest.raises(ConfigError, match=rf"in use by another parquet sink parquet \(pid {os.getpid()}"):
            DirLock.acquire(lock.parent, lock.name, what="parquet sink parquet")
    finally:
        await gw.stop()
