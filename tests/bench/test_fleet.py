"""The fleet simulator (bench/fleet.py) in a quick form: 50 agents for 10 s against a real gateway process,
misbehaving share included. Only correctness is checked (exactly once per agent in the journal, no refusal of
a well-behaved agent), never a timing; the full 2,000-agent scenarios stay in bench/ (docs/benchmarks.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet import FleetConfig, run_fleet
from tests.peers import require

pytestmark = pytest.mark.slow


def test_fleet_quick_exactly_once_and_bad_share_costs_the_others_nothing(tmp_path: Path) -> None:
    require("softflowd")
    config = FleetConfig(agents=50, seconds=10.0, processes=2, bad_share=0.2, outage=(1.0, 4.0), drain=40.0)
    report = run_fleet(config, tmp_path, log=lambda *_: None)
    kinds = report.by_kind
    assert kinds.get("good", 0) >= 30, kinds
    assert len(kinds) >= 4, kinds  # the seed gives most kinds of misbehaving agent
    assert report.generated > 0
    assert (report.lost, report.duplicates, report.wrong_payload) == (0, 0, 0), report.summary()
    assert report.undrained == [], report.summary()
    # Well-behaved agents were never refused (their failures would be counted by cause); outages on their own
    # link send nothing, so they count no failure either.
    assert report.failures == {}, report.failures
    assert report.refused_over_30s == 0
