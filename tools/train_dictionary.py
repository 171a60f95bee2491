"""Train the zstd dictionaries shipped in ``src/flowtunnel/wire/``: ``netflow-v1.zdict`` (codec 2) and
``netflow-columnar-v1.zdict`` (codec 3).

Samples: the export datagrams softflowd sends (NetFlow v5, v9, IPFIX and bidirectional IPFIX) for synthetic
traces made by ``tests.peers.make_trace`` with seeds that the tests and benchmarks do not use, plus the UDP
payloads of the vendor captures in ``tests/data/vendor`` except the held-out ones (``*-b.pcap``), so
benchmarks on those measure a dictionary that never saw them. Run from the repository root:

    /work/venv/bin/python tools/train_dictionary.py [--out-dir DIR] [--size 65536] [--vendor DIR]

The columnar dictionary is trained on record blocks of 1 to 20 datagrams laid out by codec 3. Retraining
changes the bytes of every batch sealed with a dictionary: give new files a new ``--suffix`` and new ids
(``--row-id``, ``--columnar-id``), add them to ``wire.codec`` next to the old ones (gateways must know
every id agents may still use), and regenerate the test vectors in docs/protocol.md
(``tools/protocol_vectors.py``).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import dpkt
import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.peers import capture_softflowd, make_trace  # noqa: E402

from flowtunnel.datagram import Datagram  # noqa: E402
from flowtunnel.wire.columnar import TemplateLengths, payload_encoder  # noqa: E402
from flowtunnel.wire.records import encode_block  # noqa: E402

#: zstd dictionary ids ("FT" + n), in zstd's private range (32768 .. 2**31-1)
ROW_DICT_ID = 0x46540001  # netflow-v1.zdict: datagrams as they are (codec 2)
COLUMNAR_DICT_ID = 0x46540003  # netflow-columnar-v1.zdict: record blocks as codec 3 lays them out
TRAIN_SEEDS = (9001, 9002, 9003)
SOFTFLOWD_RUNS: tuple[tuple[int, tuple[str, ...]], ...] = ((5, ()), (9, ()), (10, ()), (10, ("-b",)))


def vendor_payloads(directory: Path, *, held_out: str = "-b.pcap") -> list[bytes | bytearray | memoryview]:
    """UDP payloads of the vendor pcaps (IPFIX/v9 to ports 9991/9992), skipping held-out files."""
    out: list[bytes | bytearray | memoryview] = []
    for path in sorted(directory.glob("*.pcap")):
        if path.name.endswith(held_out):
            continue
        with path.open("rb") as f:
            for _, frame in dpkt.pcap.Reader(f):
                eth = dpkt.ethernet.Ethernet(frame)
                ip = eth.data
                udp = ip.data if isinstance(ip, dpkt.ip.IP | dpkt.ip6.IP6) else None
                if isinstance(udp, dpkt.udp.UDP) and udp.dport in (9991, 9992, 2055, 4739):
                    out.append(bytes(udp.data))
    return out


def softflowd_payloads(workdir: Path) -> list[list[bytes]]:
    """One list of datagrams per softflowd run (so batches can be cut from consecutive datagrams)."""
    out: list[list[bytes]] = []
    for i, seed in enumerate(TRAIN_SEEDS):
        trace = make_trace(workdir / f"train-{seed}.pcap", flows=3000, seed=seed, ipv6_share=0.1 + 0.15 * i)
        for version, extra in SOFTFLOWD_RUNS:
            out.append(capture_softflowd(trace.path, version, extra).payloads)
    return out


def columnar_samples(runs: list[list[bytes]], seed: int = 0) -> list[bytes | bytearray | memoryview]:
    """Record blocks as codec 3 builds them, for batches of 1 to 20 consecutive datagrams: the dictionary
    matters most for small batches, where zstd has little history of its own."""
    rnd = random.Random(seed)
    out: list[bytes | bytearray | memoryview] = []
    for payloads in runs:
        lengths = TemplateLengths()
        for p in payloads:
            lengths.learn(p)
        datagrams = [
            Datagram(received_ns=1_764_000_000_000_000_000 + i * 2_000_000, exporter="127.0.0.1",
                     exporter_port=40000, local_port=2055, payload=p)
            for i, p in enumerate(payloads)
        ]
        pos = 0
        while pos < len(datagrams):
            n = rnd.choice((1, 1, 2, 3, 5, 8, 13, 20))
            block = encode_block(datagrams[pos : pos + n], {"backlog": rnd.randrange(5000)},
                                 payload_encoder(lengths.record_length))
            out.append(block)
            pos += n
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "src/flowtunnel/wire")
    ap.add_argument("--size", type=int, default=65536, help="dictionary size in bytes")
    ap.add_argument("--row-id", type=lambda s: int(s, 0), default=ROW_DICT_ID)
    ap.add_argument("--columnar-id", type=lambda s: int(s, 0), default=COLUMNAR_DICT_ID)
    ap.add_argument("--suffix", default="v1", help="netflow[-columnar]-SUFFIX.zdict")
    ap.add_argument("--vendor", type=Path, default=ROOT / "tests/data/vendor")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="train-dict-") as tmp:
        runs = softflowd_payloads(Path(tmp))
    rows: list[bytes | bytearray | memoryview] = [p for run in runs for p in run]
    n_sfd = len(rows)
    if args.vendor.is_dir():
        vendor = vendor_payloads(args.vendor)
        rows += vendor
        runs.append([bytes(p) for p in vendor])
    else:
        print(f"warning: vendor corpus {args.vendor} not found, training on softflowd only", file=sys.stderr)
    jobs = (
        (f"netflow-{args.suffix}.zdict", args.row_id, rows),
        (f"netflow-columnar-{args.suffix}.zdict", args.columnar_id, columnar_samples(runs)),
    )
    for name, dict_id, samples in jobs:
        print(f"{name}: training on {len(samples)} samples ({n_sfd} softflowd datagrams), "
              f"{sum(map(len, samples))} bytes", file=sys.stderr)
        d = zstandard.train_dictionary(args.size, samples, dict_id=dict_id, level=6, threads=1, steps=16)
        out = args.out_dir / name
        out.write_bytes(d.as_bytes())
        print(f"wrote {out}: {len(d.as_bytes())} bytes, dict id {d.dict_id():#x}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
