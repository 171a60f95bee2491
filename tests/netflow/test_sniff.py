"""sniff(): recognise export datagrams by version and header sanity, reject other UDP payloads."""

from __future__ import annotations

from flowtunnel.netflow import FieldSpec, Template, encode_ipfix, encode_v5, encode_v9, sniff

T = Template(256, (FieldSpec(8, 4), FieldSpec(2, 4)))


def test_sniff_accepts_each_version() -> None:
    assert sniff(encode_v5([{}] * 30, sys_uptime_ms=0, unix_secs=0)) == 5
    assert sniff(encode_v9(templates=[T], data=[(T, [{}])])) == 9
    assert sniff(encode_v9()) == 9  # header only
    assert sniff(encode_ipfix(templates=[T], data=[(T, [{}])])) == 10


def test_sniff_rejects_lookalikes() -> None:
    v5 = encode_v5([{}], sys_uptime_ms=0, unix_secs=0)
    assert sniff(v5 + b"\x00") is None  # length != 24 + 48 * count
    assert sniff(b"\x00\x05\x00\x1f" + bytes(24 + 31 * 48 - 4)) is None  # count 31
    ipfix = encode_ipfix(templates=[T])
    assert sniff(ipfix + b"\x00\x00") is None  # length field != payload length
    assert sniff(ipfix[:16] + b"\x00\x05\x00\x08" + ipfix[20:]) is None  # set id 5 is reserved
    v9 = encode_v9(templates=[T])
    assert sniff(v9[:20] + b"\x00\x00\x01\x00") is None  # FlowSet longer than the datagram
    assert sniff(v9[:2] + b"\xff\xff" + v9[4:]) is None  # count beyond what the bytes could hold
    assert sniff(b"") is None
    assert (
        sniff(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03www\x07example\x03com\x00") is None
    )  # DNS
    assert sniff(bytes(100)) is None


def test_export_sequence_reads_v5_and_v9_headers() -> None:
    from flowtunnel.netflow.sniff import check_datagram, export_sequence

    v5 = encode_v5([{}, {}], sys_uptime_ms=7, unix_secs=0, sequence=41, engine_type=1, engine_id=2)
    assert check_datagram(v5) is None
    assert export_sequence(v5) == (5, 2, 41, 0x0102, 7)
    v9 = encode_v9(templates=[T], sequence=9, source_id=3, sys_uptime_ms=5)
    assert export_sequence(v9) == (9, 1, 9, 3, 5)
    assert export_sequence(encode_ipfix(templates=[T])) is None
    assert check_datagram(v5 + b"\x00") == "v5_length"


def test_wire_and_netflow_constants_have_one_home() -> None:
    """The batch content type, the agent-id offset and NetFlow header parsing are defined once (issue 14)."""
    from pathlib import Path

    import flowtunnel

    root = Path(flowtunnel.__file__).parent
    homes: dict[str, list[str]] = {"vnd.flowtunnel.batch": [], "_AGENT_LEN_OFFSET": [], "_V9_SEQ_SOURCE": [],
                                   "def has_templates": [], "def check_datagram": []}
    for path in root.rglob("*.py"):
        text = path.read_text()
        for needle, where in homes.items():
            if needle in text:
                where.append(path.relative_to(root).as_posix())
    assert homes == {"vnd.flowtunnel.batch": ["wire/batch.py"], "_AGENT_LEN_OFFSET": [], "_V9_SEQ_SOURCE": [],
                     "def has_templates": ["netflow/sniff.py"], "def check_datagram": ["netflow/sniff.py"]}
