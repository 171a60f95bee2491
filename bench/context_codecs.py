"""Offline: would a "codec 6" (codec 5's columnar + field-delta record block, compressed with zstd against the
cross-batch context of docs/protocol.md section 3.3) beat what the agent seals a quiet site with today?

Replays the softflowd v9 stream ``bench/wire.py`` uses (first ``--datagrams`` datagrams of the
100,000-conversation trace) in batches of 2, 3, 10 and 20 datagrams, through the project's own encoders
(``wire.columnar``, ``wire.deltas``, ``wire.batch``), and prints body bytes (sealed: batch header, agent id
and AEAD tag included) over raw UDP bytes (payload + 28), and CPU ms per batch. No HTTP heads: add those from
``bench/wire.py``'s per-request table. Contexts chain the last 32 KiB of the previous record blocks exactly as
``wire.context_of`` does. The "LZMA2 + context" row is an *estimate* (``len(lzma(context + block)) -
len(lzma(context))``): no such codec exists; it bounds what codec 5 with a context could give.

Run from the repository root: ``python bench/context_codecs.py [--flows N] [--datagrams N]``.
"""

from __future__ import annotations

import argparse
import functools
import lzma
import sys
import time
from collections.abc import Callable, Sequence

import zstandard

from _common import raw_udp_bytes, softflowd_streams
from flowtunnel.datagram import Datagram
from flowtunnel.wire import HEADER, TAG_BYTES, Codec, TemplateLengths, columnar
from flowtunnel.wire.batch import context_of, seal_batch_and_context
from flowtunnel.wire.codec import LZMA_DICT_SIZE, bundled_dictionaries, default_dictionary_id
from flowtunnel.wire.records import encode_block

AGENT = "bench-agent"
SEAL = HEADER.size + len(AGENT) + TAG_BYTES  # what sealing adds to the compressed record block
SIZES = ((2, 2.0), (3, 2.0), (10, 10.0), (20, 10.0))  # datagrams per batch, datagrams/s
INFO = {"acked": 1, "spool_first": 1, "clock_ms": 1_795_000_000_000, "backlog": 0, "backlog_age": 0}


def _datagrams(payloads: Sequence[bytes], rate: float) -> list[Datagram]:
    step = int(1e9 / rate)
    return [Datagram(received_ns=1_795_000_000_000_000_000 + i * step, exporter="127.0.0.1",
                     exporter_port=40000, local_port=2055, payload=p) for i, p in enumerate(payloads)]


def _zstd(block: bytes, level: int, dictionary: bytes, full: bool) -> int:
    kind = zstandard.DICT_TYPE_FULLDICT if full else zstandard.DICT_TYPE_RAWCONTENT
    d = zstandard.ZstdCompressionDict(dictionary, dict_type=kind) if dictionary else None
    cctx = zstandard.ZstdCompressor(level=level, dict_data=d, write_checksum=bool(dictionary),
                                    write_dict_id=False, write_content_size=True)
    return len(cctx.compress(block)) + SEAL


def _lzma(data: bytes) -> int:
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": LZMA_DICT_SIZE, "lc": 1}]
    return len(lzma.compress(data, format=lzma.FORMAT_RAW, filters=filters))


def _lzma_marginal(context: bytes, block: bytes) -> int:
    """What ``block`` costs after ``context`` in one LZMA2 stream (an estimate of a context codec 5)."""
    return _lzma(context + block) - _lzma(context) + SEAL


class _Run:
    """Totals of body bytes and CPU seconds by variant."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}
        self.cpu: dict[str, float] = {}

    def add(self, name: str, size: int, cpu: float) -> None:
        self.bytes[name] = self.bytes.get(name, 0) + size
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu


def _timed(fn: Callable[[], int]) -> tuple[int, float]:
    started = time.process_time()
    out = fn()
    return out, time.process_time() - started


def run(payloads: Sequence[bytes], size: int, rate: float) -> dict[str, tuple[float, float]]:
    """Ratio of raw UDP and CPU ms per batch, by variant, for batches of ``size`` datagrams."""
    items = _datagrams(payloads, rate)
    batches = [items[i : i + size] for i in range(0, len(items), size)]
    coldict = bundled_dictionaries()[default_dictionary_id(3)].as_bytes()
    lengths = TemplateLengths()
    totals = _Run()
    today_ctx: bytes | None = None  # the agent's context as it chains it today
    delta_ctx = b""  # a context chaining the delta-columnar blocks alone
    both_ctx: bytes | None = None  # the agent's context with codec 6 tried too
    for i, batch in enumerate(batches):
        for d in batch:
            lengths.learn(d.payload)

        def seal(*, codec: Codec | None, level: int, context: bytes | None = None,
                 b: Sequence[Datagram] = batch, first: int = 1 + i * size) -> tuple[bytes, bytes]:
            return seal_batch_and_context(
                agent_id=AGENT, key=bytes(32), first_seq=first, datagrams=list(b), nonce=bytes(12),
                agent_info=INFO, record_length=lengths.record_length, field_widths=lengths.field_widths,
                codec=codec, level=level, context=context,
            )

        started = time.process_time()
        c5 = seal(codec=Codec.DELTA_LZMA, level=6)
        c5_cpu = time.process_time() - started
        totals.add("codec 5 (field deltas + LZMA2 preset 6)", len(c5[0]), c5_cpu)

        def agent_tries(ctx: bytes | None, c5: tuple[bytes, bytes] = c5) -> list[tuple[bytes, bytes]]:
            # uploader._seal at a quiet site (TIGHT): level 15 below 4 datagrams, else level 6 and codec 5,
            # then the context in the columnar layout
            tries = [seal(codec=None, level=6), c5] if size >= 4 else [seal(codec=None, level=15)]
            if ctx:
                tries.append(seal(codec=Codec.COLUMNAR, context=ctx, level=6 if size >= 4 else 15))
            return tries

        started = time.process_time()
        best = min(agent_tries(today_ctx), key=lambda t: len(t[0]))
        today_ctx = best[1]
        totals.add("agent today (TIGHT: its tries, smallest kept)", len(best[0]),
                   time.process_time() - started + (c5_cpu if size >= 4 else 0.0))

        started = time.process_time()
        encoder = columnar.payload_encoder(lengths.record_length, field_widths=lengths.field_widths,
                                           deltas=True)
        block = encode_block(list(batch), INFO, encoder)
        enc_cpu = time.process_time() - started
        variants: list[tuple[str, Callable[[], int]]] = [
            ("delta layout, zstd-19, no dictionary", functools.partial(_zstd, block, 19, b"", False)),
            ("delta layout, zstd-19, columnar dictionary",
             functools.partial(_zstd, block, 19, coldict, True)),
            ("delta layout, zstd-15, context", functools.partial(_zstd, block, 15, delta_ctx, False)),
            ("delta layout, zstd-19, context", functools.partial(_zstd, block, 19, delta_ctx, False)),
            ("delta layout, zstd-15, columnar dictionary + context",
             functools.partial(_zstd, block, 15, coldict + delta_ctx, True)),
            ("delta layout, zstd-19, columnar dictionary + context (codec 6)",
             functools.partial(_zstd, block, 19, coldict + delta_ctx, True)),
            ("delta layout, zstd-22, columnar dictionary + context",
             functools.partial(_zstd, block, 22, coldict + delta_ctx, True)),
            ("estimate: delta layout, LZMA2 preset 6 + context (no such codec)",
             functools.partial(_lzma_marginal, delta_ctx, block)),
        ]
        for name, fn in variants:
            n, cpu = _timed(fn)
            totals.add(name, n, cpu + enc_cpu)
        delta_ctx = context_of(block, delta_ctx or None)

        started = time.process_time()
        tries = agent_tries(both_ctx)
        if both_ctx:
            n6 = _zstd(block, 19, coldict + both_ctx, True)
            tries.append((b"\0" * n6, context_of(block, both_ctx)))
        best = min(tries, key=lambda t: len(t[0]))
        both_ctx = best[1]
        totals.add("agent today + codec 6 tried, smallest kept", len(best[0]),
                   time.process_time() - started + enc_cpu + (c5_cpu if size >= 4 else 0.0))
    raw = raw_udp_bytes([d.payload for d in items])
    return {k: (v / raw, totals.cpu[k] * 1000 / len(batches)) for k, v in totals.bytes.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flows", type=int, default=100_000,
                        help="conversations in the trace (default 100000)")
    parser.add_argument("--datagrams", type=int, default=300, help="datagrams replayed (default 300)")
    args = parser.parse_args(argv)
    payloads = softflowd_streams(args.flows, versions=(9,))[0].payloads[: args.datagrams]
    results = {size: run(payloads, size, rate) for size, rate in SIZES}
    names = list(results[SIZES[0][0]])
    print(f"softflowd v9, {len(payloads)} datagrams, {raw_udp_bytes(payloads):,} raw UDP bytes; "
          "body / raw UDP and CPU ms per batch")
    print()
    print("| variant | " + " | ".join(f"{s} datagrams" for s, _ in SIZES) + " |")
    print("|---|" + "---:|" * len(SIZES))
    for name in names:
        cells = " | ".join(f"{results[s][name][0]:.3f} / {results[s][name][1]:.1f} ms" for s, _ in SIZES)
        print(f"| {name} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
