"""Fixtures of the zoo: the softflowd v9 capture every end-to-end scenario replays into the agent."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import require
from tests.peers import TraceSummary, capture_softflowd, write_pcap


@pytest.fixture(scope="session")
def v9_capture(tmp_path_factory: pytest.TempPathFactory, trace: TraceSummary) -> tuple[Path, list[bytes]]:
    """softflowd's NetFlow v9 export of the session trace, as a pcap ``flowtunnel replay`` sends, and the
    payloads in order (what the gateway's journal must hold, exactly)."""
    require("softflowd")
    export = capture_softflowd(trace.path, 9)
    path = tmp_path_factory.mktemp("zoo") / "v9.pcap"
    write_pcap(export.payloads, path, dst_port=2055)
    return path, export.payloads
