"""Under CI, a test that skips because a peer or test data is missing fails instead (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.corpus import IANA_CSV, VENDOR
from tests.peers import require

ROOT = Path(__file__).resolve().parents[1]
PROBE = "FLOWTUNNEL_TEST_SKIP_PROBE"


def test_probe_missing_peer() -> None:
    """Skips for a missing peer when run by the test below; passes otherwise."""
    if os.environ.get(PROBE):
        require("flowtunnel-no-such-peer")


def _run_probe(ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env[PROBE] = "1"
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
         f"{Path(__file__).relative_to(ROOT)}::test_probe_missing_peer"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )


def test_missing_peer_skips_on_a_developer_box() -> None:
    done = _run_probe(None)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 skipped" in done.stdout


def test_missing_peer_fails_under_ci() -> None:
    done = _run_probe("true")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 failed" in done.stdout
    assert "peer or test data is missing: Skipped: not installed: flowtunnel-no-such-peer" in done.stdout


@pytest.mark.parametrize("path", [VENDOR / "LICENSE.pmacct-test-automation", VENDOR / "README.md", IANA_CSV])
def test_test_data_is_in_the_repository(path: Path) -> None:
    assert path.is_file()
    assert len(list(VENDOR.glob("*.pcap"))) == 13
