"""How far each of issue 14's byte goals is from what the benchmark's own data allows: the datagrams of each
goal's row compressed (a) in batches of the size the agent uses at that row's rate and latency, each alone,
(b) all in one piece, with no latency limit at all, by generic compressors (the best case of any
batching that uses them) and by flowtunnel's codec 5 (field deltas + LZMA2 preset 6, the agent's best per
batch), (c) through the agent's stream compression (offline) in the same batches, and (d) so in ever larger
batches until they would meet the goal: the ``--latency`` that would reach it at that rate.

Bodies only (the sealed batch: header, agent id, tag included for codec 5; bare compressed bytes for the
generic ones), over raw UDP bytes (payload + 28 per datagram); "body needed" is the goal minus the HTTP heads
per raw byte that the row's live run measured (``Row.heads``, docs/benchmarks.md), so a body above it cannot
meet the goal on that transport. Pure computation: no agent, no gateway, no timing.

Run from the repository root: ``python bench/bounds.py [--quick]``.
"""

from __future__ import annotations

import argparse
import bz2
import lzma
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import zstandard

from _common import Stream, md_table, softflowd_streams, utc_now, vendor_streams
from flowtunnel.datagram import Datagram
from flowtunnel.wire import Codec, SealStream, TemplateLengths, seal_stream_batch
from flowtunnel.wire.batch import HEADER, TAG_BYTES
from flowtunnel.wire.columnar import observation_domain, template_layouts
from flowtunnel.wire.lzstream import StreamEncoder
from flowtunnel.wire.records import encode_block
from wire import _batches, _datagrams, _sealed


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    """One byte goal: which datagrams, in batches of how many, and the heads its live run measured."""

    stream: str
    mode: str
    first: int | None  # the first N datagrams of the stream (None: all)
    batch: int  # datagrams a batch at that rate and latency
    rate: float  # datagrams/s
    goal: float
    heads: float  # HTTP heads per raw UDP byte in the live run (POST rung)


ROWS = (
    Row(stream="softflowd v9", mode="2/s", first=60, batch=3, rate=2.0, goal=0.30, heads=0.045),
    Row(stream="softflowd v9", mode="10/s", first=300, batch=10, rate=10.0, goal=0.18, heads=0.012),
    Row(stream="softflowd v9", mode="fast", first=None, batch=475, rate=500.0, goal=0.20, heads=0.000),
    Row(stream="Cisco IPFIX", mode="1 s", first=None, batch=378, rate=500.0, goal=0.05, heads=0.002),
)

GENERIC: dict[str, Callable[[bytes], int]] = {
    "xz -9e": lambda b: len(lzma.compress(b, preset=9 | lzma.PRESET_EXTREME)),
    "zstd -22": lambda b: len(zstandard.ZstdCompressor(level=22).compress(b)),
    "bzip2 -9": lambda b: len(bz2.compress(b, 9)),
}


SIZES = (5, 10, 15, 20, 30, 40, 50, 60, 80, 100, 150, 200, 300, 500, 750, 1000, 1500)


def raw_udp(payloads: Sequence[bytes]) -> int:
    return sum(len(p) + 28 for p in payloads)


def streamed(batches: Sequence[Sequence[Datagram]]) -> int:
    """The agent's stream compression (docs/protocol.md 3.4) over ``batches``: one stream, verbatim payloads
    below 4 datagrams a batch and codec 5's layout from 4, as the agent seals at a quiet site."""
    stream, lengths, total, seq = SealStream(1), TemplateLengths(), 0, 1
    for i, batch in enumerate(batches):
        for d in batch:
            lengths.learn(d.payload)
        codec = Codec.LZMA if len(batch) < 4 else Codec.DELTA_LZMA
        total += len(seal_stream_batch(agent_id="bench", key=bytes(range(32)), first_seq=seq,
                                       datagrams=list(batch), nonce=i.to_bytes(12, "big"), stream=stream,
                                       codec=codec, record_length=lengths.record_length))
        seq += len(batch)
    return total


# ---------------------------------------------------------------------------- field classes (an estimate)
# What a codec could gain by giving each class of field its own LZMA2 stream across batches (so each
# stream's adaptive statistics learn one kind of value) and by laying records out field by field (whole
# field values together, not byte columns), with each address and port XORed with its partner field of the
# record before (softflowd and most firewalls write a conversation's two directions one after the other).
# An estimate only: it counts frame bytes (one sync flush per stream per batch included), not a sealed
# batch; no decoder exists for it.

#: IPFIX information element ids by class (NetFlow v9 numbers the common fields the same way)
_ADDRESS = frozenset({8, 12, 15, 18, 27, 28, 62, 63, 225, 226, 281, 282})
_TIME = frozenset({21, 22, 150, 151, 152, 153, 154, 155, 156, 157, 158, 159})
_COUNTER = frozenset({1, 2, 3, 23, 24, 85, 86, 298, 299})
_PORT = frozenset({7, 11, 180, 181, 182, 183, 227, 228})
_PAIRS = ((8, 12), (27, 28), (225, 226), (7, 11), (180, 181), (182, 183), (227, 228))
_U16X2 = struct.Struct(">HH")
#: (version, observation domain, template id) -> its fields as (element id, width) pairs
Templates = dict[tuple[int, int, int], tuple[tuple[int, int], ...]]


def learn_templates(payload: bytes, known: Templates) -> None:
    """Add the fixed-length templates of one datagram to ``known``."""
    known.update(template_layouts(payload))


def _field_class(ie: int, width: int) -> str:
    for name, ids in (("address", _ADDRESS), ("time", _TIME), ("counter", _COUNTER), ("port", _PORT)):
        if ie in ids:
            return name
    return "byte" if width == 1 else "other"


def _split(payload: bytes, known: Templates, records: dict[tuple[int, int, int], list[bytes]]) -> bytes:
    """The datagram's records of known templates into ``records``; the rest (headers, templates, padding)
    back as bytes."""
    version = payload[1]
    pos = 20 if version == 9 else 16
    domain = observation_domain(payload, version)
    rest = bytearray(payload[:pos])
    while pos + 4 <= len(payload):
        set_id, length = _U16X2.unpack_from(payload, pos)
        if length < 4:
            break
        fields = known.get((version, domain, set_id))
        body = payload[pos + 4 : pos + length]
        if fields is None:
            rest += payload[pos : pos + length]
        else:
            n = sum(w for _, w in fields)
            k = len(body) // n
            rest += payload[pos : pos + 4] + body[k * n :]
            rows = records.setdefault((version, domain, set_id), [])
            rows.extend(body[i * n : (i + 1) * n] for i in range(k))
        pos += length
    rest += payload[pos:]
    return bytes(rest)


def _class_parts(fields: tuple[tuple[int, int], ...], rows: list[bytes]) -> list[tuple[str, bytes]]:
    """(class, field-major bytes) of each field of ``rows``, addresses and ports XORed with the partner
    field of the record before."""
    offsets, at = [], 0
    for _, width in fields:
        offsets.append(at)
        at += width
    columns = [[row[o : o + w] for row in rows] for o, (_, w) in zip(offsets, fields, strict=True)]
    index = {ie: i for i, (ie, _) in enumerate(fields)}
    out = [b"".join(c) for c in columns]
    for a, b in _PAIRS:
        i, j = index.get(a), index.get(b)
        if i is None or j is None or fields[i][1] != fields[j][1]:
            continue
        for x, y in ((i, j), (j, i)):
            prev = [bytes(fields[y][1]), *columns[y][:-1]]
            out[x] = b"".join(bytes(p ^ q for p, q in zip(v, u, strict=True))
                              for v, u in zip(columns[x], prev, strict=True))
    return [(_field_class(ie, w), data) for (ie, w), data in zip(fields, out, strict=True)]


def field_classes(batches: Sequence[Sequence[Datagram]]) -> tuple[int, int]:
    """Bytes of ``batches`` as sealed stream batches would be: (one stream, field-major; a stream per
    class). Each batch: the seal's bytes (header, agent id, tag) and its frames, the record block's
    per-datagram part (times, sources, lengths) in the "other" class."""
    known: Templates = {}
    one, per_class = StreamEncoder(), dict[str, StreamEncoder]()
    seal = HEADER.size + len("bench") + TAG_BYTES
    single = streams = 0
    for batch in batches:
        records: dict[tuple[int, int, int], list[bytes]] = {}
        rests = [encode_block(batch, None, lambda _: b"")]
        for d in batch:
            learn_templates(d.payload, known)
            rests.append(_split(d.payload, known, records) if d.payload[1:2] in (b"\x09", b"\x0a")
                         else d.payload)
        single += seal
        streams += seal
        parts = [("other", b"".join(rests))]
        for key, rows in records.items():
            parts += _class_parts(known[key], rows)
        single += len(one.frame(b"".join(data for _, data in parts)))
        by_class: dict[str, list[bytes]] = {}
        for name, data in parts:
            by_class.setdefault(name, []).append(data)
        for name, chunks in by_class.items():
            block = b"".join(chunks)
            if block:
                streams += len(per_class.setdefault(name, StreamEncoder()).frame(block))
    return single, streams


def measure(row: Row, payloads: Sequence[bytes]) -> list[object]:
    raw = raw_udp(payloads)
    items = _datagrams(payloads, 10.0)
    codec5 = _sealed(Codec.DELTA_LZMA, 6, True)
    batched = codec5(_batches(items, row.batch)) / raw
    whole = codec5([items]) / raw
    stream = streamed(_batches(items, row.batch)) / raw
    single, classes = (n / raw for n in field_classes(_batches(items, row.batch)))
    generic = {name: fn(b"".join(payloads)) / raw for name, fn in GENERIC.items()}
    needed = row.goal - row.heads
    # the shortest latency whose batches (through the stream) would do: the --latency trade at this rate
    reach = "-"
    if stream <= needed:
        reach = f"{row.batch / row.rate:g} s (as run)"
    else:
        for size in SIZES:
            if row.batch < size < len(items) and streamed(_batches(items, size)) / raw <= needed:
                reach = f"{size / row.rate:g} s ({size} a batch)"
                break
        else:
            reach = f"over {min(len(items), SIZES[-1]) / row.rate:g} s"
    return [
        row.stream, row.mode, f"{len(payloads):,}", f"{needed:.3f}", f"{batched:.3f}", f"{stream:.3f}",
        f"{single:.3f}", f"{classes:.3f}",
        *(f"{v:.3f}" for v in generic.values()), f"{whole:.3f}", reach,
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small trace (20,000 conversations)")
    args = parser.parse_args()
    streams: list[Stream] = [*softflowd_streams(20_000 if args.quick else 100_000, versions=(9,)),
                             *vendor_streams()]
    rows = []
    for row in ROWS:
        stream = next(s for s in streams if s.name.startswith(row.stream))
        payloads = stream.payloads[: row.first] if row.first is not None else stream.payloads
        rows.append(measure(row, payloads))
    head = ["stream", "mode", "datagrams", "body needed", "codec 5, agent's batches",
            "agent's stream, same batches", "field-major + pairs, one stream (estimate)",
            "a stream per field class (estimate)",
            *(f"{n}, one piece" for n in GENERIC), "codec 5, one piece",
            "latency whose batches reach it (stream)"]
    print(f"`python bench/bounds.py{' --quick' if args.quick else ''}`, {utc_now()}\n")
    print(md_table(head, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
