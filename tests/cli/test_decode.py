"""``flowtunnel decode``: records on stdout as JSON lines or a table, problems on stderr, exit codes."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import dpkt
import pytest

from flowtunnel.capture import CaptureReader, find_netflow
from flowtunnel.cli import main
from flowtunnel.netflow import Decoder, ProtocolError, encode_ipfix, encode_v5
from flowtunnel.netflow.templates import FieldSpec, Template
from tests.peers import SoftflowdExport, TraceSummary, capture_softflowd, make_trace, require, write_pcap

FLOW_TEMPLATE = Template(
    256,
    (
        FieldSpec(8, 4),  # sourceIPv4Address
        FieldSpec(12, 4),  # destinationIPv4Address
        FieldSpec(7, 2),  # sourceTransportPort
        FieldSpec(11, 2),  # destinationTransportPort
        FieldSpec(4, 1),  # protocolIdentifier
        FieldSpec(1, 8),  # octetDeltaCount
        FieldSpec(2, 8),  # packetDeltaCount
        FieldSpec(152, 8),  # flowStartMilliseconds
        FieldSpec(153, 8),  # flowEndMilliseconds
        FieldSpec(82, 65535),  # interfaceName, variable length
    ),
)
OPTIONS_TEMPLATE = Template(257, (FieldSpec(149, 4), FieldSpec(34, 4)), scope_count=1)
START_MS = 1_700_000_000_000

FLOWS: list[dict[str, object]] = [
    {
        "sourceIPv4Address": "192.0.2.10",
        "destinationIPv4Address": "198.51.100.20",
        "sourceTransportPort": 40000 + i,
        "destinationTransportPort": 443,
        "protocolIdentifier": 6,
        "octetDeltaCount": 1_234_567 * (i + 1),
        "packetDeltaCount": 900 + i,
        "flowStartMilliseconds": START_MS + i,
        "flowEndMilliseconds": START_MS + 2500 + i,
        "interfaceName": 'eth"0\\ \x01',  # needs JSON escaping
    }
    for i in range(3)
]


def _ipfix_capture(path: Path) -> None:
    """A capture with good IPFIX, a set whose template never comes, a broken set and a DNS datagram."""
    good = encode_ipfix(
        templates=[FLOW_TEMPLATE, OPTIONS_TEMPLATE],
        data=[
            (FLOW_TEMPLATE, FLOWS),
            (OPTIONS_TEMPLATE, [{"observationDomainId": 7, "samplingInterval": 1}]),
        ],
        export_time=1_700_000_010,
        domain=7,
    )
    orphan_template = Template(300, (FieldSpec(8, 4),))
    orphan = encode_ipfix(
        data=[(orphan_template, [{"sourceIPv4Address": "192.0.2.99"}])], domain=7, sequence=4
    )
    # A valid message whose last set claims more bytes than there are: the set is bad, the datagram is not.
    valid = encode_ipfix(data=[(FLOW_TEMPLATE, FLOWS[:1])], domain=7, sequence=5)
    broken = valid + struct.pack("!HH", 256, 200)
    broken = broken[:2] + struct.pack("!H", len(broken)) + broken[4:]
    dns = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01"
    write_pcap([good, orphan, broken], path.with_suffix(".part"), dst_port=4739)
    frames = _frames(path.with_suffix(".part"))
    write_pcap([dns], path.with_suffix(".dns"), dst_port=53)
    frames += _frames(path.with_suffix(".dns"))
    with path.open("wb") as f:
        writer = dpkt.pcap.Writer(f, linktype=dpkt.pcap.DLT_EN10MB)
        for ts, frame in frames:
            writer.writepkt(frame, ts)


def _frames(path: Path) -> list[tuple[float, bytes]]:
    with path.open("rb") as f:
        return [(float(ts), bytes(frame)) for ts, frame in dpkt.pcap.Reader(f)]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory: pytest.TempPathFactory) -> TraceSummary:
    return make_trace(tmp_path_factory.mktemp("trace") / "trace.pcap", flows=300, seed=5)


@pytest.fixture(scope="module")
def v9_export(small_trace: TraceSummary) -> SoftflowdExport:
    require("softflowd")
    return capture_softflowd(small_trace.path, 9)


def test_json_has_iana_keys_meta_and_typed_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pcap = tmp_path / "ipfix.pcap"
    _ipfix_capture(pcap)
    code, out, err = _run(["decode", str(pcap)], capsys)
    assert code == 0
    records = _json_lines(out)
    # The three flows, then the first one again from the datagram whose second set is broken.
    for rec, sent in zip(records, [*FLOWS, FLOWS[0]], strict=True):
        assert rec["_version"] == 10
        assert rec["_exporter"] == "192.0.2.1:50000"
        assert rec["_domain"] == 7
        assert rec["_template"] == 256
        assert "_options" not in rec
        assert {k: rec[k] for k in sent} == sent
    assert err.splitlines()[-1].startswith(f"flowtunnel decode: {pcap}: 4 flow records, 1 options records")


def test_problems_are_reported_on_stderr_and_exit_is_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pcap = tmp_path / "ipfix.pcap"
    _ipfix_capture(pcap)
    code, out, err = _run(["decode", str(pcap)], capsys)
    assert code == 0
    lines = err.splitlines()
    # The broken set: one line naming the datagram, its exporter, and the set's length problem.
    (bad_set,) = [line for line in lines if "frame 3 " in line]
    assert "192.0.2.1:50000" in bad_set
    assert "256" in bad_set
    (no_template,) = [line for line in lines if "no template 300" in line]
    assert "held set" in no_template
    summary = lines[-1]
    assert "4 flow records" in summary  # the broken datagram's first set still decoded
    assert "1 bad sets" in summary
    assert "1 data sets without template" in summary
    assert "1 other UDP datagrams" in summary
    assert len(_json_lines(out)) == 4


def test_options_records_only_on_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pcap = tmp_path / "ipfix.pcap"
    _ipfix_capture(pcap)
    _, out, _ = _run(["decode", "--options", str(pcap)], capsys)
    options = [r for r in _json_lines(out) if r.get("_options")]
    assert options == [
        {
            "_version": 10, "_exporter": "192.0.2.1:50000", "_domain": 7, "_template": 257, "_options": True,
            "observationDomainId": 7, "samplingInterval": 1,
        }
    ]


def test_port_narrows_the_search(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    v5 = encode_v5([FLOWS[0]], sys_uptime_ms=10_000, unix_secs=1_700_000_000)
    write_pcap([v5], tmp_path / "a.pcap", dst_port=2055)
    write_pcap([v5, v5], tmp_path / "b.pcap", dst_port=9995)
    frames = _frames(tmp_path / "a.pcap") + _frames(tmp_path / "b.pcap")
    with (tmp_path / "mixed.pcap").open("wb") as f:
        writer = dpkt.pcap.Writer(f)
        for ts, frame in frames:
            writer.writepkt(frame, ts)
    _, out_all, _ = _run(["decode", str(tmp_path / "mixed.pcap")], capsys)
    _, out_9995, err = _run(["decode", "--port", "9995", str(tmp_path / "mixed.pcap")], capsys)
    assert len(_json_lines(out_all)) == 3
    v5_records = _json_lines(out_9995)
    assert len(v5_records) == 2
    assert v5_records[0]["_template"] is None
    assert v5_records[0]["octetDeltaCount"] == FLOWS[0]["octetDeltaCount"]
    assert "1 other UDP datagrams" in err


def test_table_is_aligned_with_readable_units(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pcap = tmp_path / "ipfix.pcap"
    _ipfix_capture(pcap)
    code, out, _ = _run(["decode", "--format", "table", str(pcap)], capsys)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == [
        "START", "(UTC)", "DURATION", "PROTO", "SOURCE", "DESTINATION", "PACKETS", "BYTES", "FLAGS",
        "EXPORTER",
    ]
    assert len(rows) == 4
    assert rows[0].startswith("2023-11-14 22:13:20.000")
    assert "2.500 s" in rows[0]
    assert "192.0.2.10:40000" in rows[0]
    assert "1.2 MB" in rows[0]
    assert "2.5 MB" in rows[1]
    # Aligned: every column starts at the same offset on every line.
    starts = header.index("EXPORTER")
    assert all(row[starts:] == "192.0.2.1:50000" for row in rows)


def test_pcapng_decodes_like_pcap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], v9_export: SoftflowdExport
) -> None:
    pcap = tmp_path / "export.pcap"
    write_pcap(v9_export.datagrams, pcap, dst_port=2055)
    pcapng = tmp_path / "export.pcapng"
    with pcapng.open("wb") as f:
        writer = dpkt.pcapng.Writer(f, linktype=dpkt.pcap.DLT_EN10MB)
        for ts, frame in _frames(pcap):
            writer.writepkt(frame, ts)
    _, from_pcap, _ = _run(["decode", str(pcap)], capsys)
    _, from_pcapng, err = _run(["decode", str(pcapng)], capsys)
    assert from_pcapng == from_pcap
    assert len(from_pcap.splitlines()) == v9_export.stats.records
    assert "no errors" in err


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_text("timestamp,src,dst\n"), "not a pcap or pcapng capture"),
        (lambda p: p.write_bytes(b""), "not a pcap or pcapng capture (starts with an empty file"),
    ],
    ids=["missing", "directory", "text", "empty"],
)
def test_bad_files_give_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any, message: str
) -> None:
    path = tmp_path / "capture.pcap"
    make(path)
    code, out, err = _run(["decode", str(path)], capsys)
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith(f"flowtunnel decode: error: {path}")
    assert message in err


def test_unsupported_link_type_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "wifi.pcap"
    with path.open("wb") as f:
        dpkt.pcap.Writer(f, linktype=dpkt.pcap.DLT_IEEE802_11_RADIO).writepkt(b"\x00" * 40, 0.0)
    code, _, err = _run(["decode", str(path)], capsys)
    assert code == 2
    assert "link type 127 is not supported" in err


def test_whole_process_exit_codes_and_help(tmp_path: Path, v9_export: SoftflowdExport) -> None:
    pcap = tmp_path / "export.pcap"
    write_pcap(v9_export.datagrams, pcap, dst_port=2055)
    cmd = [sys.executable, "-m", "flowtunnel", "decode"]
    ok = subprocess.run([*cmd, str(pcap)], capture_output=True, text=True, timeout=120, check=False)
    assert ok.returncode == 0
    assert len(ok.stdout.splitlines()) == v9_export.stats.records
    assert ok.stderr.count("\n") == 1
    with pcap.open("rb") as stdin:  # tcpdump -w - | flowtunnel decode -
        piped = subprocess.run([*cmd, "-"], stdin=stdin, capture_output=True, text=True, check=False)
    assert piped.returncode == 0
    assert piped.stdout == ok.stdout
    missing = subprocess.run([*cmd, str(tmp_path / "nope.pcap")], capture_output=True, text=True, check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"flowtunnel decode: error: {tmp_path / 'nope.pcap'}: no such file"
    helped = subprocess.run([*cmd, "--help"], capture_output=True, text=True, check=False)
    assert helped.returncode == 0
    for phrase in ("_exporter", "_domain", "_template", "--format", "--port", "table", "Exit status"):
        assert phrase in helped.stdout


def _expected_lines(pcap: Path, *, include_options: bool) -> list[dict[str, Any]]:
    """What each JSON line must hold: the head fields, then ``Record.to_dict()``, for ``Decoder.decode``'s
    records in file order (flow records, then options records, per datagram)."""
    decoder = Decoder()
    expected: list[dict[str, Any]] = []
    with CaptureReader(pcap) as reader:
        for found in find_netflow(reader):
            exporter = found.datagram.exporter
            try:
                msg = decoder.decode(found.datagram.payload, exporter)
            except ProtocolError:
                continue
            for rec in [*msg.records, *(msg.options_records if include_options else [])]:
                head: dict[str, Any] = {
                    "_version": msg.version, "_exporter": exporter, "_domain": rec.domain,
                    "_template": None if msg.version == 5 else rec.template_id,
                }
                if rec.options:
                    head["_options"] = True
                expected.append(head | rec.to_dict())
    return expected


def _assert_lines_are_records(pcap: Path, out: str, *, include_options: bool = False) -> None:
    lines = out.splitlines()
    expected = _expected_lines(pcap, include_options=include_options)
    assert len(lines) == len(expected)
    for line, want in zip(lines, expected, strict=True):
        got = json.loads(line)
        assert got == want
        assert list(got) == list(want)  # same key order too


def test_json_lines_are_the_decoded_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], v9_export: SoftflowdExport
) -> None:
    pcap = tmp_path / "export.pcap"
    write_pcap(v9_export.datagrams, pcap, dst_port=2055)  # v9: sysUpTime times made absolute
    _, out, _ = _run(["decode", str(pcap)], capsys)
    assert len(out.splitlines()) == v9_export.stats.records
    _assert_lines_are_records(pcap, out)
    escaped = tmp_path / "ipfix.pcap"  # a string that needs JSON escaping, options records
    _ipfix_capture(escaped)
    _, out, _ = _run(["decode", "--options", str(escaped)], capsys)
    assert '"interfaceName":"eth\\"0\\\\ \\u0001"' in out
    _assert_lines_are_records(escaped, out, include_options=True)


def test_json_follows_exporters_and_redefined_templates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two exporters with the same template (the codec may share its compiled form), then one of them
    redefines the template id with other fields and types: every line has its own exporter and keys."""
    fixed = Template(256, FLOW_TEMPLATE.fields[:9])
    other = Template(256, (FieldSpec(8, 4), FieldSpec(4, 1), FieldSpec(82, 65535), FieldSpec(1, 4)))
    flows = [{k: v for k, v in f.items() if k != "interfaceName"} for f in FLOWS]
    redefined = [{"sourceIPv4Address": "192.0.2.77", "protocolIdentifier": 17, "interfaceName": "ge-0/0/1",
                  "octetDeltaCount": 99}]
    a, b = ("192.0.2.1", 50000), ("2001:db8::5", 50001)
    datagrams = [
        (encode_ipfix(templates=[fixed], data=[(fixed, flows)], domain=1, sequence=0), a),
        (encode_ipfix(templates=[fixed], data=[(fixed, flows[:2])], domain=1, sequence=0), b),
        (encode_ipfix(templates=[other], data=[(other, redefined)], domain=1, sequence=3), a),
        (encode_ipfix(data=[(fixed, flows[2:])], domain=1, sequence=2), b),
    ]
    pcap = tmp_path / "two.pcap"
    write_pcap(datagrams, pcap, dst_port=4739)
    _, out, err = _run(["decode", str(pcap)], capsys)
    assert "no errors" in err
    records = _json_lines(out)
    assert [r["_exporter"] for r in records] == ["192.0.2.1:50000"] * 3 + ["[2001:db8::5]:50001"] * 2 + [
        "192.0.2.1:50000"
    ] + ["[2001:db8::5]:50001"]
    assert records[5] == {"_version": 10, "_exporter": "192.0.2.1:50000", "_domain": 1, "_template": 256,
                          **redefined[0]}
    assert records[6]["octetDeltaCount"] == FLOWS[2]["octetDeltaCount"]
    _assert_lines_are_records(pcap, out)
