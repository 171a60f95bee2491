"""A torn tail of the SQLite write-ahead log (power cut mid-write, a lying SD card): the spool or journal
reopens consistent, only the torn transaction is lost, and the loss is visible.

The WAL is cut inside its last frame, which invalidates exactly the last transaction (SQLite only replays
frames up to the last intact commit frame).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from flowtunnel.datagram import Datagram
from flowtunnel.log import DurableLog, LogConfig
from tests.conftest import require
from tests.linkemu import Mode
from tests.reliability.harness import exported, log_lines, stack

TEAR = 100  # bytes cut from the end of the WAL: inside the last frame (frames are 24 + page size bytes)


def datagrams(start: int, n: int) -> list[Datagram]:
    return [Datagram(received_ns=1_700_000_000_000_000_000 + i, exporter="192.0.2.1", exporter_port=2055,
                     local_port=2055, payload=f"dg-{i}".encode() * 10) for i in range(start, start + n)]


def crash_image(log_path: Path, into: Path) -> Path:
    """Copy the database and its WAL as a crash leaves them (the log is still open, never checkpointed)."""
    into.mkdir()
    for suffix in ("", "-wal"):
        shutil.copyfile(f"{log_path}{suffix}", f"{into / log_path.name}{suffix}")
    return into / log_path.name


def tear(db: Path) -> int:
    wal = Path(f"{db}-wal")
    size = wal.stat().st_size
    assert size > TEAR + 32, "nothing in the WAL to tear"
    with wal.open("r+b") as fh:
        fh.truncate(size - TEAR)
    return size


def torn_log(tmp_path: Path) -> Path:
    live = DurableLog(LogConfig(path=tmp_path / "live" / "spool.sqlite"))
    try:
        for first in (0, 5, 10):
            live.append(datagrams(first, 5))
        image = crash_image(live.path, tmp_path / "crash")
    finally:
        live.close()
    tear(image)
    return image


def test_torn_wal_reopens_consistent_without_the_last_transaction(tmp_path: Path) -> None:
    log = DurableLog(LogConfig(path=torn_log(tmp_path)))
    try:
        entries = log.read(after=0, limit=100)
        assert [e.datagram.payload for e in entries] == [d.payload for d in datagrams(0, 10)]
        assert log.last_seq() == 10
        assert log.stats().entries == 10  # the bookkeeping was torn with the rows: they agree
        res = log.append(datagrams(100, 1))
        assert res.first_seq == 11
    finally:
        log.close()


def test_torn_wal_is_reported_with_one_clear_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression (found by this suite): SQLite drops a torn WAL tail silently; the log now says so."""
    path = torn_log(tmp_path)
    with caplog.at_level(logging.INFO, logger="flowtunnel"):
        DurableLog(LogConfig(path=path)).close()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1
    assert str(path) in lines[0]


async def _torn_journal(tmp_path: Path) -> tuple[list[int], list[bytes], list[bytes], dict[str, Any], str]:
    """60 datagrams acknowledged, gateway killed, journal WAL torn, gateway back, 40 more. Returns the
    agent seqs in the journal, their payloads, the payloads sent, the agent's status and its log."""
    payloads, _ = await asyncio.to_thread(exported, 9, 2000)
    # no sinks: the journal's last transaction is then the last batch (a sink's cursor commit would be)
    async with stack(tmp_path, agent_args=("--status-interval", "200ms"), forward=False) as st:
        await st.send(payloads[:60])
        await st.drained(60)
        await st.gateway.kill9()
        await asyncio.to_thread(tear, st.gateway.journal_path)
        await st.gateway.start()
        await st.send(payloads[60:100])
        await st.drained(100)
        await asyncio.sleep(0.5)  # one more status.json
        status = json.loads((st.agent.spool / "status.json").read_text())
        await st.stop()
        journal = await asyncio.to_thread(st.journal)
    mine = [(seq, p) for stream, seq, p in journal if stream == st.agent_id]
    return [s for s, _ in mine], [p for _, p in mine], list(payloads[:100]), status, st.agent.log_text()


async def test_torn_journal_tail_loses_only_that_batch(tmp_path: Path) -> None:
    require("softflowd")
    seqs, delivered, sent, _, _ = await _torn_journal(tmp_path)
    torn = sorted(set(range(1, 101)) - set(seqs))
    assert torn, "the tear removed nothing (did the journal checkpoint?)"
    assert torn == list(range(torn[0], 61))  # only the last journal transaction before the kill
    assert seqs == sorted(set(seqs))
    assert delivered == [sent[s - 1] for s in seqs]


async def test_torn_journal_tail_is_counted_by_the_agent(tmp_path: Path) -> None:
    """Regression (found by this suite): an agent idle across the restart used to miss the loss, and the
    gateway took the gap for the agent's own drops."""
    require("softflowd")
    seqs, _, _, status, agent_log = await _torn_journal(tmp_path)
    torn = 100 - len(seqs)
    assert torn > 0
    assert status["upload"]["gateway_lost"] == torn
    lost_lines = [line for line in log_lines(agent_log, "ERROR") if "lost at the gateway" in line]
    assert len(lost_lines) == 1


async def test_torn_spool_tail_loses_only_the_last_commit(tmp_path: Path) -> None:
    require("softflowd")
    payloads, _ = await asyncio.to_thread(exported, 9, 2000)
    async with stack(tmp_path) as st:
        await st.send(payloads[:20])
        await st.drained(20)
        st.link.set_mode(Mode.REFUSE)  # keep the next datagrams in the spool
        await st.send(payloads[20:50])
        await st.spooled(50)
        await st.agent.kill9()
        await asyncio.to_thread(tear, st.agent.spool / "spool.sqlite")
        await st.agent.start()
        kept = st.agent.spool_progress()[0]
        st.link.set_mode(Mode.FORWARD)
        await st.send(payloads[50:80])
        await st.drained(kept + 30)
        await st.stop()
        journal = await asyncio.to_thread(st.journal)
    delivered = [p for stream, _, p in journal if stream == st.agent_id]
    assert 20 <= kept < 50
    assert delivered == list(payloads[:kept]) + list(payloads[50:80])  # a contiguous tail lost, no more
