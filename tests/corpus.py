"""Where the test data lives: the vendor capture corpus and the IANA registry CSV, both inside the repository
(``tests/data/``), so a fresh clone runs every test without anything next to it."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DATA", "IANA_CSV", "VENDOR"]

DATA = Path(__file__).resolve().parent / "data"
#: Real Cisco v9/IPFIX captures, MIT-licensed (see ``tests/data/vendor/README.md`` and its LICENSE file).
VENDOR = DATA / "vendor"
#: IANA's "IPFIX Information Elements" registry, the input of ``tools/gen_iana.py``.
IANA_CSV = DATA / "iana" / "ipfix-information-elements.csv"
