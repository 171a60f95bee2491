"""The agent's spool disk fills up (a real 1 MiB filesystem, not a quota) while the uplink is down: the agent
keeps running with bounded memory, counts every datagram it cannot keep, and once the uplink is back it
delivers everything it kept, exactly once and in order."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.linkemu import Mode
from tests.reliability.harness import exported, log_lines, stack


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root: CI runs as root; skipped elsewhere)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


async def test_full_spool_disk_drops_are_counted_and_the_rest_arrives(tmp_path: Path, small_fs: Path) -> None:
    """Regression (found by this suite): with the disk full, SQLite could not even write the cursor commit or
    trim, so the agent stalled for as long as the disk stayed full."""
    require("softflowd")
    payloads, _ = await asyncio.to_thread(exported, 9, 2000)
    stream = list(payloads) * 8  # ~1.5 MB: more than the disk holds
    async with stack(tmp_path, spool=small_fs / "spool",
                     agent_args=("--buffer-datagrams", "200", "--status-interval", "200ms")) as st:
        st.link.set_mode(Mode.REFUSE)
        await st.send(stream, rate=600)
        await asyncio.sleep(1.0)
        assert st.agent.running, st.agent.log_text()[-3000:]
        st.link.set_mode(Mode.FORWARD)
        await st.drained(1, within=30)
        more = list(payloads[:50])  # the disk has room again once the backlog is trimmed
        await st.send(more, rate=200)
        await asyncio.sleep(1.0)
        await st.drained(1, within=30)
        await asyncio.sleep(1.0)  # a status.json written after the drain
        status = json.loads((st.agent.spool / "status.json").read_text())
        await st.stop()
        journal = await asyncio.to_thread(st.journal)
    sent = stream + more
    delivered = [p for stream_id, _, p in journal if stream_id == st.agent_id]
    dropped = sum(status["drops"].values())
    assert 0 < len(delivered) < len(sent)
    assert delivered[-len(more):] == more
    assert len(delivered) + dropped == len(sent), (len(delivered), status["drops"])
    it = iter(sent)
    assert all(any(p == q for q in it) for p in delivered)  # in order, no duplicates
    warnings = [line for line in log_lines(st.agent.log_text(), "WARNING") if "spool" in line]
    assert 1 <= len(warnings) <= 5
