"""The generated IANA table is committed; it must match what tools/gen_iana.py makes from tests/data/iana."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from flowtunnel.netflow import _iana
from tests.corpus import IANA_CSV

ROOT = Path(__file__).resolve().parents[2]
CSV = IANA_CSV


def _generator() -> object:
    spec = importlib.util.spec_from_file_location("gen_iana", ROOT / "tools" / "gen_iana.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_iana"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_module_is_up_to_date() -> None:
    gen = _generator()
    expected = gen.generate(CSV.read_text(encoding="utf-8"), CSV.name)  # type: ignore[attr-defined]
    committed = (ROOT / "src" / "flowtunnel" / "netflow" / "_iana.py").read_text(encoding="utf-8")
    assert committed == expected, "run: python tools/gen_iana.py (see its docstring)"


def test_generator_cli_writes_module(tmp_path: Path) -> None:
    gen = _generator()
    csv_path = tmp_path / "ie.csv"
    csv_path.write_text(
        "id,name,dataType,dataSemantics,units,status\n"
        "1,octetDeltaCount,unsigned64,deltaCounter,octets,current\n"
        "105-127,Assigned for NetFlow v9 compatibility,,,,\n",
        encoding="utf-8",
    )
    out = tmp_path / "out.py"
    assert gen.main(["--csv", str(csv_path), "--out", str(out)]) == 0  # type: ignore[attr-defined]
    namespace: dict[str, object] = {}
    exec(out.read_text(encoding="utf-8"), namespace)
    assert namespace["ELEMENTS"] == {
        1: ("octetDeltaCount", "unsigned64", "deltaCounter", "octets", "current")
    }
    assert "GENERATED" in out.read_text(encoding="utf-8")
    assert gen.main(["--csv", str(tmp_path / "missing.csv"), "--out", str(out)]) == 2  # type: ignore[attr-defined]


def test_known_names() -> None:
    assert _iana.ELEMENTS[8][:2] == ("sourceIPv4Address", "ipv4Address")
    assert _iana.ELEMENTS[152][:2] == ("flowStartMilliseconds", "dateTimeMilliseconds")
