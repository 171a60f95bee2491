"""Acceptance: every vendor capture decodes to the same flow records as tshark's cflow dissector.

Per record: exporter, addresses, ports, protocol, octets and packets, compared as multisets. The captures are
real Cisco exports (``tests/data/vendor``, see its README).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.corpus import VENDOR
from tests.netflow_acceptance._compare import multiset_diff, our_key, ours, tshark_key
from tests.peers import require, tshark_records

CAPTURES = sorted(VENDOR.glob("*.pcap"))
PORTS = (9991, 9992)


@pytest.mark.parametrize("pcap", CAPTURES, ids=[p.name for p in CAPTURES])
def test_flow_records_equal_tshark(pcap: Path) -> None:
    require("tshark")
    records, summary = ours(pcap)
    theirs = tshark_records(pcap, ports=PORTS, include_options=True)
    flows = [r for r in theirs if not r["options"]]
    assert records, f"no flow records decoded from {pcap.name}"
    ours_set, theirs_set = Counter(map(our_key, records)), Counter(map(tshark_key, flows))
    assert ours_set == theirs_set, multiset_diff(ours_set, theirs_set)
    assert summary.options_records == len(theirs) - len(flows)
    # Templates always precede their data in these files: nothing may be left undecoded.
    assert (summary.undecodable, summary.set_errors, summary.no_template) == (0, 0, 0)
