"""Fixtures of the CLI tests: softflowd's v9 export of the session trace in a store, stopped or with its sink
still running (holding the database, so commands must go through the query socket)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flowtunnel.gateway.notify import JournalNotify
from flowtunnel.runtime import TaskSet
from flowtunnel.store import StoreSink
from tests.conftest import require
from tests.peers import SoftflowdExport, TraceSummary, capture_softflowd
from tests.store._support import fill_journal, run_sink_until, to_datagrams, wait_caught_up


@pytest.fixture(scope="module")
def export(trace: TraceSummary) -> SoftflowdExport:
    require("softflowd")
    return capture_softflowd(trace.path, 9)


@pytest.fixture
async def stopped_store(tmp_path: Path, export: SoftflowdExport) -> Path:
    journal = fill_journal(tmp_path / "journal.sqlite", to_datagrams(export.datagrams))
    await run_sink_until(StoreSink(data_dir=tmp_path / "data"), journal)
    journal.close()
    return tmp_path / "data"


@pytest.fixture
async def running_store(tmp_path: Path, export: SoftflowdExport) -> AsyncIterator[Path]:
    """A sink that has stored the whole capture and keeps running (holding the database) meanwhile."""
    journal = fill_journal(tmp_path / "journal.sqlite", to_datagrams(export.datagrams))
    sink = StoreSink(data_dir=tmp_path / "data")
    tasks = TaskSet()
    tasks.spawn(sink.run(journal, JournalNotify(journal.last_seq())), name="store-sink")
    try:
        async with asyncio.timeout(60):
            await wait_caught_up(sink, journal.last_seq())
        yield tmp_path / "data"
    finally:
        await tasks.close()
        journal.close()
