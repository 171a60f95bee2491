"""softflowd's stream crosses agent → bad link → gateway under each fault: journal exactly once and in order,
forward sink at least once, no key in any log.

Each scenario is described in tests/reliability/scenarios.py; the harness (harness.py) runs real processes
and counts. Replay a failure with ``FLOWTUNNEL_SEED=<seed> pytest tests/reliability -k <name>``; the soak
variants run with ``pytest -m soak tests/reliability`` (each bounded by ``FLOWTUNNEL_SOAK_SECONDS``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import require
from tests.reliability.harness import Scenario, describe, run_scenario
from tests.reliability.scenarios import quick_scenarios, seed, soak_scenarios

_UNFAULTED = {"baseline", "gprs-link"}


@pytest.mark.parametrize("scenario", quick_scenarios(seed()), ids=lambda s: s.name)
async def test_scenario_delivers_every_datagram_once_in_order(scenario: Scenario, tmp_path: Path) -> None:
    require("softflowd", "nfcapd")
    outcome = await run_scenario(scenario, tmp_path / scenario.name)
    assert outcome.ok, describe(outcome)
    assert outcome.sent > 0
    assert outcome.delivered == outcome.sent
    if scenario.name not in _UNFAULTED:
        assert outcome.faults > 0, f"{scenario.name}: the fault plan injected nothing"


@pytest.mark.soak
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("scenario", soak_scenarios(seed()), ids=lambda s: s.name)
async def test_soak_delivers_every_datagram_once_in_order(scenario: Scenario, tmp_path: Path) -> None:
    require("softflowd")
    outcome = await run_scenario(scenario, tmp_path / scenario.name)
    assert outcome.ok, describe(outcome)
    assert outcome.faults > 0
