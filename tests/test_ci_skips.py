"""Under CI, a test that skips because a peer or test data is missing fails instead (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MISSING_RE
from tests.corpus import IANA_CSV, VENDOR
from tests.peers import require

ROOT = Path(__file__).resolve().parents[1]
PROBE = "FLOWTUNNEL_TEST_SKIP_PROBE"
COLLECT_PROBE = "FLOWTUNNEL_TEST_COLLECT_SKIP_PROBE"

if os.environ.get(COLLECT_PROBE):
    # As tests/scaleout/conftest.py does for the nats extra: the whole module skips while it is collected.
    pytest.importorskip("flowtunnel_no_such_module", reason="the flowtunnel-no-such extra is not installed")


def test_probe_missing_peer() -> None:
    """Skips for a missing peer when run by the test below; passes otherwise."""
    if os.environ.get(PROBE):
        require("flowtunnel-no-such-peer")


def _run_probe(ci: str | None, probe: str = PROBE) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env[probe] = "1"
    if ci is not None:
        env["CI"] = ci
    target = str(Path(__file__).relative_to(ROOT))
    if probe == PROBE:
        target += "::test_probe_missing_peer"  # (the collection probe skips the whole file: no test to name)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", target],
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


def test_a_module_skipped_while_collected_fails_under_ci() -> None:
    """A skip raised while a module or conftest is collected (``pytest.importorskip`` at module level) is a
    collection report, not a test's: it passed under CI before."""
    done = _run_probe(None, COLLECT_PROBE)
    assert done.returncode == 5, done.stdout + done.stderr  # a developer's box: skipped, no test ran
    assert "1 skipped" in done.stdout
    done = _run_probe("true", COLLECT_PROBE)
    assert done.returncode == 2, done.stdout + done.stderr  # "Interrupted: 1 error during collection"
    assert "peer or test data is missing" in done.stdout
    assert "flowtunnel-no-such extra is not installed" in done.stdout


@pytest.mark.parametrize("reason", [
    "could not import 'dukpy': No module named 'dukpy'",  # pytest.importorskip's own reason
    "liblzma not loadable",
    "nats-server 2.9.10 lacks the clustered compare-and-set fix of 2.9.21: not installed in a usable version",
])
def test_missing_libraries_count_as_missing_peers(reason: str) -> None:
    assert MISSING_RE.search(reason)


@pytest.mark.parametrize("path", [VENDOR / "LICENSE.pmacct-test-automation", VENDOR / "README.md", IANA_CSV])
def test_test_data_is_in_the_repository(path: Path) -> None:
    assert path.is_file()
    assert len(list(VENDOR.glob("*.pcap"))) == 13
