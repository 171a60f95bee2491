"""docs/protocol.md's test vectors are what the code does: each opens to its datagrams, and the codec-0
vectors (no compression, so independent of the zstd version) re-seal to exactly the documented bytes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flowtunnel.datagram import Datagram
from flowtunnel.wire import (
    FLAG_CONTEXT,
    FLAG_STREAM,
    FLAG_STREAM_START,
    HEADER,
    Codec,
    OpenStream,
    UnknownContext,
    context_id,
    context_of,
    open_batch,
    peek_header,
    seal_batch,
)
from flowtunnel.wire.columnar import payload_encoder
from flowtunnel.wire.records import encode_block, verbatim_payloads

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


@dataclass
class DocVector:
    title: str
    fields: dict[str, str] = field(default_factory=dict)
    datagrams: list[Datagram] = field(default_factory=list)


def parse_vectors() -> list[DocVector]:
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("<!-- vectors:begin") : text.index("<!-- vectors:end -->")]
    out: list[DocVector] = []
    for m in re.finditer(r"### (Vector \d+[^\n]*)\n\n```text\n(.*?)```", section, re.S):
        vec = DocVector(title=m.group(1))
        meta: dict[str, str] = {}
        last = ""
        for line in m.group(2).splitlines():
            if line.startswith(" "):  # continuation of a wrapped hex value
                vec.fields[last] += line.strip()
                continue
            name, _, value = line.partition(" ")
            value = value.strip()
            if name == "datagram":
                meta = dict(kv.split("=", 1) for kv in value.split())
                continue
            if name == "payload":
                name = f"payload{len(vec.datagrams)}"
                vec.datagrams.append(Datagram(
                    received_ns=int(meta["received_ns"]), exporter=meta["exporter"],
                    exporter_port=int(meta["exporter_port"]), local_port=int(meta["local_port"]), payload=b"",
                ))
            vec.fields[name] = value
            last = name
        vec.datagrams = [
            Datagram(received_ns=d.received_ns, exporter=d.exporter, exporter_port=d.exporter_port,
                     local_port=d.local_port, payload=bytes.fromhex(vec.fields[f"payload{i}"]))
            for i, d in enumerate(vec.datagrams)
        ]
        out.append(vec)
    return out


VECTORS = parse_vectors()


def test_the_document_has_the_vectors() -> None:
    assert len(VECTORS) >= 3
    assert {int(v.fields["codec"]) for v in VECTORS} >= {0, 1, 2, 3, 4, 5, 6}
    assert any("context" in v.fields for v in VECTORS)
    assert any("after" in v.fields for v in VECTORS)  # a stream frame continuing another vector's stream


def _stream_of(number: int) -> OpenStream | None:
    """The stream the documented stream vector ``number`` (1-based) leaves, opened from its start."""
    vec = VECTORS[number - 1]
    before = _stream_of(int(vec.fields["after"])) if "after" in vec.fields else None
    sealed, key = bytes.fromhex(vec.fields["sealed"]), bytes.fromhex(vec.fields["key"])
    return open_batch(sealed, key=key, stream=before).stream


@pytest.mark.parametrize("vec", VECTORS, ids=[v.title.split(":")[0] for v in VECTORS])
def test_vector_opens_to_its_datagrams(vec: DocVector) -> None:
    f = vec.fields
    key = bytes.fromhex(f["key"])
    sealed = bytes.fromhex(f["sealed"])
    info = dict((k, int(v)) for k, v in (kv.split("=") for kv in f.get("agent_info", "").split(",") if kv))
    hdr = peek_header(sealed)
    assert sealed[: hdr.header_len] == bytes.fromhex(f["header"])
    assert hdr.header_len == HEADER.size + len(f["agent_id"])
    assert hdr.dict_id == int(f["dict_id"], 16)
    contexts = None
    if "context" in f:
        context = bytes.fromhex(f["context"])
        # the context the documented vector 1 leaves, named by its id
        assert context == context_of(bytes.fromhex(VECTORS[0].fields["block"]))
        assert hdr.flags == int(f["flags"], 16) == FLAG_CONTEXT
        assert hdr.dict_id == context_id(context)
        with pytest.raises(UnknownContext):
            open_batch(sealed, key=key)
        with pytest.raises(UnknownContext):
            open_batch(sealed, key=key, contexts={hdr.dict_id: context[:-1] + bytes([context[-1] ^ 0xFF])})
        contexts = {hdr.dict_id: context}
    stream = None
    if hdr.flags & FLAG_STREAM:
        assert hdr.flags == int(f["flags"], 16)
        assert bool(hdr.flags & FLAG_STREAM_START) == ("after" not in f)
        if "after" in f:  # a continuation opens only after the frames before it, in that stream
            with pytest.raises(UnknownContext):
                open_batch(sealed, key=key)
            stream = _stream_of(int(f["after"]))
    batch = open_batch(sealed, key=key, contexts=contexts, stream=stream)
    assert batch.agent_id == f["agent_id"]
    assert batch.first_seq == int(f["first_seq"])
    assert batch.header.codec == int(f["codec"])
    assert batch.header.nonce == bytes.fromhex(f["nonce"])
    assert list(batch.datagrams) == vec.datagrams
    assert dict(batch.agent_info) == info
    columnar = int(f["codec"]) in (Codec.COLUMNAR, Codec.COLUMNAR_LZMA, Codec.DELTA_LZMA)
    deltas = int(f["codec"]) == Codec.DELTA_LZMA
    encoder = payload_encoder(None, deltas=deltas) if columnar else verbatim_payloads
    assert encode_block(vec.datagrams, info, encoder) == bytes.fromhex(f["block"])
    if int(f["codec"]) == Codec.NONE:
        resealed = seal_batch(
            agent_id=f["agent_id"], key=key, first_seq=int(f["first_seq"]), datagrams=vec.datagrams,
            nonce=bytes.fromhex(f["nonce"]), agent_info=info, codec=Codec.NONE,
        )
        assert resealed.hex() == f["sealed"]
