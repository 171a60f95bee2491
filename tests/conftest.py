"""Shared pytest setup: makes ``import tests.peers`` work from every test directory, and shared fixtures.

``tests`` is a package (``tests/__init__.py`` and one in each sub-directory), so pytest's default import
mode puts the repository root on ``sys.path``; the explicit insert below keeps that true under
``--import-mode=importlib`` and when a single test file is run from another directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.peers import TraceSummary, make_trace, require  # noqa: E402

__all__ = ["require", "trace"]


@pytest.fixture(scope="session")
def trace(tmp_path_factory: pytest.TempPathFactory) -> TraceSummary:
    """A 2000-flow synthetic packet trace (TCP/UDP/ICMP, IPv4 and IPv6), made once per test session."""
    return make_trace(tmp_path_factory.mktemp("trace") / "trace.pcap", flows=2000, seed=1)
