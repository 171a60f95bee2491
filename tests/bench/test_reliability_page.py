"""bench/reliability.py rewrites only what it measured in docs/reliability.md: the intro, ``## Results`` and
``## Open gaps``; the sections written by hand between them are kept (a re-run used to drop them)."""

from __future__ import annotations

from pathlib import Path

import reliability
from tests.reliability.harness import failed_outcome
from tests.reliability.scenarios import quick_scenarios

ROOT = Path(__file__).resolve().parents[2]


def _render(page: str | None) -> str:
    outcome = failed_outcome(quick_scenarios()[0], RuntimeError("no nats"), 1.0)
    return reliability.render([outcome], command="python bench/reliability.py", seed=1, variant="quick",
                              page=page)


def test_a_run_replaces_intro_results_and_gaps_and_keeps_the_hand_written_sections() -> None:
    page = ("# old title\n\nold intro\n\n## Results\n\n| old | table |\n\n## Faults outside the table\n\n"
            "hand one\n\n## Scale-out (JetStream journal)\n\nhand two\n\n## Open gaps\n\nold gaps\n")
    text = _render(page)
    assert "old intro" not in text
    assert "old | table" not in text
    assert "old gaps" not in text
    assert text.startswith("# Reliability: what breaking things on purpose showed\n")
    assert "`baseline`" in text
    assert "FAIL: did not run to the end (RuntimeError: no nats)" in text
    assert "## Faults outside the table\n\nhand one\n" in text
    assert "## Scale-out (JetStream journal)\n\nhand two\n" in text
    heads = [line for line in text.splitlines() if line.startswith("## ")]
    assert heads == ["## Results", "## Faults outside the table", "## Scale-out (JetStream journal)",
                     "## Open gaps"]
    assert _render(text).count("hand one") == 1  # a second run changes nothing of the hand-written text


def test_a_page_without_the_generated_sections_gets_them_around_its_own() -> None:
    text = _render("# t\n\nintro\n\n## Findings\n\nhand\n")
    heads = [line for line in text.splitlines() if line.startswith("## ")]
    assert heads == ["## Results", "## Findings", "## Open gaps"]
    assert "hand\n" in text
    assert [h for h in _render(None).splitlines() if h.startswith("## ")] == ["## Results", "## Open gaps"]


def test_the_page_in_the_repository_keeps_every_section_through_a_run() -> None:
    page = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    text = _render(page)
    before = [line for line in page.splitlines() if line.startswith("## ")]
    assert [line for line in text.splitlines() if line.startswith("## ")] == before
    hand = page[page.index("## Faults outside the table"):page.index("## Open gaps")]
    assert hand in text
