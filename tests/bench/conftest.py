"""Puts ``bench/`` on ``sys.path`` so the tests import the bench scripts as their runner does
(``python bench/X.py`` runs with ``bench/`` as the script directory, and the scripts import ``_common``
from it)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
