"""The agent's upload path does not import aiohttp (the gateway's server library): its HTTP is its own client
over h11/wsproto; aiohttp comes in only with ``--metrics-listen`` or a PAC file fetched over HTTP."""

from __future__ import annotations

import subprocess
import sys


def test_the_agent_path_imports_no_aiohttp() -> None:
    code = ("import sys; import flowtunnel.cli.agent; from flowtunnel.agent.service import run_agent; "
            "from flowtunnel.agent.uploader import Uploader; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
