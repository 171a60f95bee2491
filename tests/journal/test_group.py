"""Group commit of the SQLite journal: batches of many agents waiting at once share one commit, each is
answered only once its commit is durable, a large batch is spread over commits shared with the others, and a
failed commit fails every batch it held with nothing written."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from flowtunnel.datagram import Datagram
from flowtunnel.journal import JournalNotify, JournalPartial, SqliteAgentJournal, hwm_key
from flowtunnel.log import DurableLog, FullPolicy, LogConfig, LogError, QuotaFull


def _dgs(agent: int, n: int, *, size: int = 40) -> list[Datagram]:
    return [
        Datagram(received_ns=1_000 + i, exporter="127.0.0.1", exporter_port=9, local_port=2055,
                 payload=f"{agent}:{i}:".encode().ljust(size, b"x"))
        for i in range(n)
    ]


@pytest.fixture
def log(tmp_path: Path) -> Iterator[DurableLog]:
    with DurableLog(LogConfig(path=tmp_path / "journal.sqlite", quota_bytes=0, disk_quota_bytes=64 << 20,
                              full_policy=FullPolicy.REFUSE_NEW)) as journal:
        yield journal


def _by_agent(log: DurableLog) -> dict[str, list[tuple[int | None, bytes]]]:
    out: dict[str, list[tuple[int | None, bytes]]] = {}
    for e in log.read(after=0, limit=1_000_000, max_bytes=1 << 30):
        out.setdefault(e.stream, []).append((e.stream_seq, e.datagram.payload))
    return out


async def test_many_agents_at_once_share_a_few_commits_and_each_batch_is_journaled_once(
    log: DurableLog,
) -> None:
    commits: list[int] = []
    journal = SqliteAgentJournal(log, JournalNotify(), on_commit=commits.append)
    agents = 50
    results = await asyncio.gather(*(
        journal.append(f"a{i}", 1, _dgs(i, 3), hwm=0, appended_ns=1) for i in range(agents)
    ))
    # One commit per batch before: 50. Now the first batch commits alone and the 49 that queued meanwhile
    # share the next one.
    assert log.stats().commits == len(commits) < agents // 5
    assert sum(commits) == agents
    stored = _by_agent(log)
    for i, res in enumerate(results):
        assert stored[f"a{i}"] == [(s + 1, d.payload) for s, d in enumerate(_dgs(i, 3))]
        assert res.last_seq - res.first_seq == 2
        assert log.get_state(hwm_key(f"a{i}")) == 3
    assert journal.notify.last_seq == log.last_seq() == agents * 3
    journal.close()  # its commit thread, before the log closes


async def test_a_large_batch_is_spread_over_commits_shared_with_the_others(log: DurableLog) -> None:
    # One agent's 2,000-datagram batch in one commit held every other agent's batch behind it (others' p99
    # 2.8x with a flooding agent, bench/fleet.py). Now it adds at most agent_bytes to each commit.
    journal = SqliteAgentJournal(log, JournalNotify(), agent_bytes=1024)
    big = _dgs(0, 200, size=100)  # ~150 bytes of journal each: 7 per commit, about 29 commits
    order: list[str] = []

    async def append(agent: str, dgs: list[Datagram]) -> None:
        await journal.append(agent, 1, dgs, hwm=0)
        order.append(agent)

    await asyncio.gather(append("flood", big), *(append(f"a{i}", _dgs(i, 2)) for i in range(1, 6)))
    assert order[-1] == "flood"  # everybody else was answered before it
    stored = _by_agent(log)
    assert stored["flood"] == [(s + 1, d.payload) for s, d in enumerate(big)]
    seqs = {e.stream: e.seq for e in log.read(after=0, limit=1_000_000)}  # last journal seq per agent
    assert all(seqs[f"a{i}"] < seqs["flood"] for i in range(1, 6))
    assert log.get_state(hwm_key("flood")) == 200
    assert log.stats().commits > 200 * 150 // 1024
    journal.close()  # its commit thread, before the log closes


class _Gate:
    """Holds the first group commit until the test lets it go (``release``; ``calls`` counts commits); with
    ``fail_second``, makes the second fail inside its transaction (after some of its parts were inserted): a
    failing disk, as SQLite reports it."""

    def __init__(self, log: DurableLog, monkeypatch: pytest.MonkeyPatch, *, fail_second: bool = True) -> None:
        self.release = threading.Event()
        self.calls = 0
        real_group = log.append_group
        real_rows = DurableLog._rows
        self.rows_calls = 0

        def append_group(parts: Sequence[Any]) -> Any:
            self.calls += 1
            if self.calls == 1:
                assert self.release.wait(20)
            return real_group(parts)

        def rows(*args: Any) -> Any:
            if self.calls == 2:
                self.rows_calls += 1
                if self.rows_calls == 3:
                    raise sqlite3.OperationalError("disk I/O error")
            return real_rows(*args)

        monkeypatch.setattr(log, "append_group", append_group)
        if fail_second:
            monkeypatch.setattr(log, "_rows", rows)


async def test_a_failed_commit_fails_every_batch_it_held_and_writes_none_of_them(
    log: DurableLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = SqliteAgentJournal(log, JournalNotify())
    gate = _Gate(log, monkeypatch)
    first = asyncio.ensure_future(journal.append("a0", 1, _dgs(0, 2), hwm=0))
    while gate.calls < 1:  # noqa: ASYNC110 - the commit runs in a worker thread
        await asyncio.sleep(0.005)
    rest = [asyncio.ensure_future(journal.append(f"a{i}", 1, _dgs(i, 2), hwm=0)) for i in range(1, 6)]
    while journal.group.waiting < 6:  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    gate.release.set()
    assert (await first).last_seq == 2
    outcomes = await asyncio.gather(*rest, return_exceptions=True)
    assert all(isinstance(o, LogError) and "disk I/O error" in str(o) for o in outcomes), outcomes
    assert gate.calls == 2  # one commit for the five,
    assert gate.rows_calls == 3  # which failed after two of its five parts
    assert list(_by_agent(log)) == ["a0"]
    assert all(log.get_state(hwm_key(f"a{i}")) is None for i in range(1, 6))
    # The log is still usable: the same batches go through on their retry.
    await asyncio.gather(*(journal.append(f"a{i}", 1, _dgs(i, 2), hwm=0) for i in range(1, 6)))
    assert sorted(_by_agent(log)) == [f"a{i}" for i in range(6)]
    journal.close()  # its commit thread, before the log closes


async def test_a_batch_split_over_commits_that_fails_midway_reports_what_is_durable(
    log: DurableLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = SqliteAgentJournal(log, JournalNotify(), agent_bytes=1024)
    real_group = log.append_group
    calls = 0

    def append_group(parts: Sequence[Any]) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise LogError("injected: disk I/O error", path=str(log.path))
        return real_group(parts)

    monkeypatch.setattr(log, "append_group", append_group)
    with pytest.raises(JournalPartial) as info:
        await journal.append("flood", 1, _dgs(0, 40, size=100), hwm=0)
    per_commit = 1024 // 150
    assert info.value.committed == 2 * per_commit
    assert log.get_state(hwm_key("flood")) == 2 * per_commit == len(_by_agent(log)["flood"])
    assert info.value.last_seq == log.last_seq()
    journal.close()  # its commit thread, before the log closes


async def test_a_batch_too_large_for_what_the_quota_leaves_is_refused_before_any_commit(
    tmp_path: Path,
) -> None:
    with DurableLog(LogConfig(path=tmp_path / "j.sqlite", quota_bytes=20_000,
                              full_policy=FullPolicy.REFUSE_NEW)) as small:
        journal = SqliteAgentJournal(small, JournalNotify(), agent_bytes=1024)
        with pytest.raises(QuotaFull):
            await journal.append("flood", 1, _dgs(0, 200, size=100), hwm=0)
        assert small.stats().entries == 0
        assert small.get_state(hwm_key("flood")) is None
        # Within one commit the quota is checked per batch: the one that fits is journaled.
        res = await asyncio.gather(
            journal.append("a", 1, _dgs(1, 5, size=100), hwm=0),
            journal.append("b", 1, _dgs(2, 5, size=100), hwm=0),
        )
        assert [r.last_seq - r.first_seq for r in res] == [4, 4]
        journal.close()  # its commit thread, before the log closes


async def test_a_cancelled_waiter_neither_blocks_the_others_nor_leaves_anything_counted(
    log: DurableLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = SqliteAgentJournal(log, JournalNotify())
    gate = _Gate(log, monkeypatch, fail_second=False)
    leader = asyncio.ensure_future(journal.append("a0", 1, _dgs(0, 2), hwm=0))
    while gate.calls < 1:  # noqa: ASYNC110 - the commit runs in a worker thread
        await asyncio.sleep(0.005)
    waiting = asyncio.ensure_future(journal.append("a1", 1, _dgs(1, 2), hwm=0))
    other = asyncio.ensure_future(journal.append("a2", 1, _dgs(2, 2), hwm=0))
    await asyncio.sleep(0.01)
    waiting.cancel()  # not in a commit yet: never written
    leader.cancel()  # its commit has begun: it completes, and the others still get their turn
    gate.release.set()
    assert (await other).last_seq - (await other).first_seq == 1
    for task in (leader, waiting):
        with pytest.raises(asyncio.CancelledError):
            await task
    async with asyncio.timeout(10):
        await journal.notify.wait(3)  # the leader's commit, which nobody waits for, is done too
    assert sorted(_by_agent(log)) == ["a0", "a2"]
    assert log.get_state(hwm_key("a0")) == 2
    assert journal.group.waiting == 0
    assert journal.group._queued_bytes == 0
    journal.close()  # its commit thread, before the log closes


@pytest.fixture
async def busy_executor() -> AsyncIterator[None]:
    """The event loop's default executor (one worker) taken by other work for the whole test: a status file
    being built, a large batch being opened."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
    free = threading.Event()
    taken = loop.run_in_executor(None, free.wait, 30)
    yield
    free.set()
    await taken


@pytest.mark.usefixtures("busy_executor")
async def test_commits_and_marks_do_not_queue_behind_the_default_executors_work(log: DurableLog) -> None:
    """Issue 16's fleet: commit rounds waited for a worker thread of the default executor (p99 9-46 ms), and
    at start-up 2,000 agents' first mark reads went through it too, sharing it with the commits."""
    log.append(_dgs(9, 1), stream="a9", state={hwm_key("a9"): 5})  # journaled before this gateway started
    journal = SqliteAgentJournal(log, JournalNotify())
    async with asyncio.timeout(10):
        assert await journal.hwm("a9") == 5
        assert await journal.hwm("a0") == 0
        res = await journal.append("a0", 1, _dgs(0, 2), hwm=0)
        assert (res.first_seq, res.last_seq) == (2, 3)
        assert await journal.hwm("a0") == 2
    journal.close()


async def test_the_next_commit_starts_while_the_event_loop_is_busy(
    log: DurableLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop used to start each commit once the previous one was settled on it: on a busy gateway the
    journal sat idle between commits (40 of 75 s in a fleet trace) while requests waited for it."""
    journal = SqliteAgentJournal(log, JournalNotify())
    gate = _Gate(log, monkeypatch, fail_second=False)
    first = asyncio.ensure_future(journal.append("a0", 1, _dgs(0, 2), hwm=0))
    while gate.calls < 1:  # noqa: ASYNC110 - the commit runs in its thread
        await asyncio.sleep(0.005)
    rest = [asyncio.ensure_future(journal.append(f"a{i}", 1, _dgs(i, 2), hwm=0)) for i in range(1, 6)]
    while journal.group.waiting < 6:  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    threading.Timer(0.05, gate.release.set).start()
    deadline = time.monotonic() + 10
    while gate.calls < 2 and time.monotonic() < deadline:  # the loop busy (not awaiting): the thread goes on
        time.sleep(0.01)  # noqa: ASYNC251 - blocking the loop on purpose
    assert gate.calls == 2
    assert (await first).last_seq == 2
    assert [r.last_seq - r.first_seq for r in await asyncio.gather(*rest)] == [1] * 5
    assert log.stats().commits == 2
    journal.close()


async def test_a_mark_asked_for_during_its_agents_commit_is_the_one_after_that_commit(
    log: DurableLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mark read while a commit holding the agent's datagrams is under way (its waiter cancelled, the
    agent's retry arriving) must not be the one before it: the retry would journal them a second time."""
    journal = SqliteAgentJournal(log, JournalNotify())
    gate = threading.Event()
    real = log.append_group

    def append_group(parts: Sequence[Any]) -> Any:
        assert gate.wait(20)
        return real(parts)

    monkeypatch.setattr(log, "append_group", append_group)
    first = asyncio.ensure_future(journal.append("a0", 1, _dgs(0, 2), hwm=0))
    await asyncio.sleep(0.05)  # the commit thread took it, and waits at the gate
    first.cancel()
    mark = asyncio.ensure_future(journal.hwm("a0"))
    await asyncio.sleep(0.05)
    assert not mark.done()
    gate.set()
    async with asyncio.timeout(10):
        assert await mark == 2
    assert log.get_state(hwm_key("a0")) == 2
    journal.close()


async def test_after_close_an_append_is_refused_and_the_thread_is_gone(log: DurableLog) -> None:
    def threads() -> int:
        return sum(t.name == "journal-commit" for t in threading.enumerate())

    before = threads()
    journal = SqliteAgentJournal(log, JournalNotify())
    await journal.append("a0", 1, _dgs(0, 2), hwm=0)
    assert threads() == before + 1
    journal.close()
    journal.close()
    assert threads() == before
    with pytest.raises(LogError, match="closing"):
        await journal.append("a1", 1, _dgs(1, 2), hwm=0)


async def test_a_commit_whose_outcome_cannot_be_handed_over_fails_its_batches_and_the_thread_goes_on(
    log: DurableLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = SqliteAgentJournal(log, JournalNotify())
    real = log.append_group
    calls = 0

    def append_group(parts: Sequence[Any]) -> Any:
        nonlocal calls
        calls += 1
        out = real(parts)
        return out[:-1] if calls == 1 else out  # a bug: one outcome short, after a durable commit

    monkeypatch.setattr(log, "append_group", append_group)
    with pytest.raises(LogError, match="group commit failed"):
        await journal.append("a0", 1, _dgs(0, 2), hwm=0)
    assert await journal.hwm("a0") == 2  # read again from the log: the retry is deduplicated
    res = await journal.append("a1", 1, _dgs(1, 2), hwm=0)
    assert res.last_seq == 4
    journal.close()
