"""Shared pytest setup: makes ``import tests.peers`` work from every test directory, and shared fixtures.

``tests`` is a package (``tests/__init__.py`` and one in each sub-directory), so pytest's default import
mode puts the repository root on ``sys.path``; the explicit insert below keeps that true under
``--import-mode=importlib`` and when a single test file is run from another directory.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Generator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.peers import TraceSummary, make_trace, require  # noqa: E402

__all__ = ["MISSING_RE", "require", "trace"]

#: Skip reasons that mean "a peer or test data is missing" (``tests.peers.require``, data checks). On a
#: developer's box such a test skips; under CI (env ``CI`` true) it fails, so a fresh CI machine that lacks a
#: peer or a data file cannot pass by skipping what it was meant to test.
MISSING_RE = re.compile(
    # "could not import": pytest.importorskip's reason; "not loadable": a system library (liblzma)
    r"not installed|not found|missing (peer|data)|no vendor corpus|could not import|not loadable",
    re.IGNORECASE,
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _fail_missing_under_ci(report: pytest.TestReport | pytest.CollectReport) -> None:
    if report.skipped and _in_ci() and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if MISSING_RE.search(reason):
            report.outcome = "failed"
            report.longrepr = f"skipped under CI because a peer or test data is missing: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    _fail_missing_under_ci(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, pytest.CollectReport,
                                                                         pytest.CollectReport]:
    """The same for a whole module or directory skipped while collected (``pytest.importorskip`` at module
    level, as tests/scaleout/conftest.py does for the nats extra): a collection error under CI."""
    report = yield
    _fail_missing_under_ci(report)
    return report


@pytest.fixture(scope="session")
def trace(tmp_path_factory: pytest.TempPathFactory) -> TraceSummary:
    """A 2000-flow synthetic packet trace (TCP/UDP/ICMP, IPv4 and IPv6), made once per test session."""
    return make_trace(tmp_path_factory.mktemp("trace") / "trace.pcap", flows=2000, seed=1)
