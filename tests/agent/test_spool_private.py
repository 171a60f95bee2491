"""The agent's spool directory is private from the start, like the gateway's data directory (issue 17.5)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowtunnel.agent.service import SPOOL_FILE, AgentService
from flowtunnel.errors import ConfigError
from tests.agent.test_service import config, running
from tests.peers import free_tcp_port


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("loose_umask")
async def test_the_spool_and_its_database_are_private(tmp_path: Path) -> None:
    """Before: the spool directory 0755 and spool.sqlite (datagrams in clear) 0644."""
    cfg = config(tmp_path, f"http://127.0.0.1:{free_tcp_port()}", bytes(32), shutdown_timeout=0)
    async with running(cfg):
        spool = tmp_path / "spool"
        assert stat.S_IMODE(spool.stat().st_mode) == 0o700
        for name in (SPOOL_FILE, SPOOL_FILE + "-wal", "status.json"):
            assert stat.S_IMODE((spool / name).stat().st_mode) == 0o600, name


async def test_a_group_writable_spool_is_refused(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir(mode=0o700)
    (tmp_path / "spool").chmod(0o777)
    cfg = config(tmp_path, "http://127.0.0.1:1", bytes(32), shutdown_timeout=0)
    with pytest.raises(ConfigError, match=r"spool directory .* is writable by group or others \(mode 0777\)"):
        await AgentService(cfg).start()
    assert list((tmp_path / "spool").iterdir()) == []
