"""The bundled dictionary earns its place: softflowd exports (from a trace it was not trained on) seal
smaller with it than with plain zstd, most of all in the small batches of a caught-up agent."""

from __future__ import annotations

import pytest

from flowtunnel.datagram import Datagram
from flowtunnel.wire import Codec, seal_batch
from tests.conftest import require
from tests.peers import TraceSummary, capture_softflowd


def sealed_bytes(datagrams: list[Datagram], per_batch: int, codec: Codec) -> int:
    return sum(
        len(seal_batch(agent_id="a", key=bytes(32), first_seq=1 + i, datagrams=datagrams[i : i + per_batch],
                       nonce=bytes(12), codec=codec))
        for i in range(0, len(datagrams), per_batch)
    )


@pytest.mark.parametrize("version", [5, 9, 10])
def test_dictionary_beats_plain_zstd_on_small_batches(trace: TraceSummary, version: int) -> None:
    require("softflowd")
    export = capture_softflowd(trace.path, version)
    datagrams = [
        Datagram(received_ns=1_764_000_000_000_000_000 + i * 2_000_000, exporter="127.0.0.1",
                 exporter_port=40000, local_port=2055, payload=p)
        for i, p in enumerate(export.payloads)
    ]
    raw = sum(len(d.payload) + 28 for d in datagrams)
    for per_batch in (1, 10):
        plain = sealed_bytes(datagrams, per_batch, Codec.ZSTD)
        with_dict = sealed_bytes(datagrams, per_batch, Codec.ZSTD_DICT)
        assert with_dict < plain, (per_batch, with_dict / raw, plain / raw)
    # one datagram per batch (the worst case for compression) still fits in under half the UDP bytes
    assert sealed_bytes(datagrams, 1, Codec.ZSTD_DICT) < 0.5 * raw
