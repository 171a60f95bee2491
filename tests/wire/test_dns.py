"""The DNS rung's framing: names that survive resolvers, answers, and bounded reassembly."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowtunnel.wire.dns import (
    MAX_NAME,
    Answer,
    DnsNameError,
    FragmentQuery,
    Kind,
    Reassembler,
    ReassemblyLimits,
    capacity,
    decode_answer,
    decode_name,
    encode_answer,
    encode_name,
    normalise_zone,
    split_batch,
)

ZONE = "t.example.org"


def frag(data: bytes, *, index: int = 0, count: int = 1, session: int = 7, batch: int = 1,
         salt: int = 0) -> FragmentQuery:
    return FragmentQuery(kind=Kind.FRAGMENT, session=session, batch=batch, index=index, count=count,
                         salt=salt, data=data)


def test_a_full_fragment_fills_but_never_exceeds_a_name() -> None:
    size = capacity(ZONE)
    name = encode_name(frag(b"\xff" * size), ZONE)
    assert len(name) <= MAX_NAME
    assert all(len(label) <= 63 for label in name.split("."))
    with pytest.raises(ValueError, match="at most"):
        encode_name(frag(b"\xff" * (size + 1)), ZONE)


def test_capacity_of_a_typical_zone() -> None:
    # 253 - 13 (zone) - 1 - 17 (meta) = 222 characters for data and a dot after each data label: 4 labels,
    # 218 base32 characters, 136 bytes (134 with version 1's 20-character meta label).
    assert capacity(ZONE) == 136


@given(data=st.binary(min_size=1, max_size=136), session=st.integers(0, 2**32 - 1),
       batch=st.integers(0, 65535), salt=st.integers(0, 15), seed=st.integers(0, 2**32))
@settings(max_examples=200)
def test_names_round_trip_through_0x20_case_randomisation(data: bytes, session: int, batch: int, salt: int,
                                                          seed: int) -> None:
    q = frag(data, session=session, batch=batch, salt=salt, index=3, count=9)
    name = encode_name(q, ZONE)
    rnd = random.Random(seed)
    mixed = "".join(c.upper() if rnd.random() < 0.5 else c for c in name) + "."
    assert decode_name(mixed, "T.Example.ORG.") == q


def test_a_poll_has_no_data_labels() -> None:
    q = FragmentQuery(kind=Kind.POLL, session=1, batch=2, index=0, count=5, salt=9)
    name = encode_name(q, ZONE)
    assert name.count(".") == ZONE.count(".") + 1
    assert decode_name(name, ZONE) == q


def test_intermediate_names_of_a_minimising_resolver_are_not_errors() -> None:
    name = encode_name(frag(b"x" * 100), ZONE)
    labels = name.split(".")
    # The resolver asks for the zone, then one more label at a time, left to right toward the full name.
    assert decode_name(ZONE, ZONE) is None
    meta_and_zone = ".".join(labels[-4:])
    assert decode_name(meta_and_zone, ZONE) is None
    assert decode_name("www." + ZONE, ZONE) is None  # a random single label: NODATA, not an error


@pytest.mark.parametrize(
    ("make", "cause"),
    [
        (lambda meta: "0000." + meta, "dns-bad-name"),  # '0' is not base32
        (lambda meta: "ab." + "a" * 20, "dns-bad-version"),  # all-zero-ish meta decodes to version 0
    ],
)
def test_bad_names_are_the_peers_fault(make: object, cause: str) -> None:
    meta = encode_name(frag(b"abc"), ZONE).split(".")[-4]
    assert callable(make)
    with pytest.raises(DnsNameError) as info:
        decode_name(make(meta) + "." + ZONE, ZONE)
    assert info.value.cause == cause
    assert info.value.peer_fault


def test_fragment_index_out_of_range_is_refused() -> None:
    good = encode_name(frag(b"abc", index=1, count=2), ZONE)
    q = decode_name(good, ZONE)
    assert q is not None
    assert q.index == 1
    with pytest.raises(ValueError, match="inconsistent"):
        encode_name(frag(b"abc", index=2, count=2), ZONE)


def test_zone_must_be_a_domain_name() -> None:
    with pytest.raises(ValueError, match="not a valid domain"):
        normalise_zone("bad_zone!")
    with pytest.raises(ValueError, match="leave room"):
        normalise_zone(".".join(["a" * 60] * 4))
    assert normalise_zone("T.Example.Org.") == ZONE


def test_answers_round_trip_and_garbage_is_refused() -> None:
    a = Answer(kind="a", fields={"acked": "123", "tag": "AbC-_x" * 3, "acc": "4", "dup": "0", "st": "200"},
               window=8, gap_ms=50)
    text = encode_answer(a)
    assert len(text) <= 255
    assert decode_answer(text) == a
    assert decode_answer(text).int("acked") == 123
    bad_answers = ["", "hello world", "ft1 z win=1", "ft1 a win=x gap=1", "ft1 a acked 12",
                   "ft1 a k=" + "v" * 300]
    for bad in bad_answers:
        with pytest.raises(DnsNameError) as info:
            decode_answer(bad)
        assert info.value.cause == "dns-bad-answer"
    assert Answer(kind="a", fields={"acked": "²"}).int("acked", -1) == -1


def test_reassembly_in_any_order_with_duplicates() -> None:
    body = bytes(range(256)) * 5
    pieces = split_batch(body, ZONE)
    assert len(pieces) == -(-len(body) // capacity(ZONE))
    r = Reassembler()
    order = [*range(len(pieces)), 0, 3]
    random.Random(1).shuffle(order)
    done = None
    for i in order:
        if done is not None:
            break
        p = r.add(frag(pieces[i], index=i, count=len(pieces)), now=0.0)
        if p.body is not None:
            done = p.body
    assert done == body
    assert r.pending_batches == 0
    assert r.pending_bytes == 0


def test_reassembly_is_bounded_and_counts_what_it_drops() -> None:
    r = Reassembler(ReassemblyLimits(max_pending_batches=3, max_pending_per_session=2, max_pending_bytes=1000,
                                     max_batch_bytes=500, max_age=10))
    for session in range(10):
        for batch in range(5):
            r.add(frag(b"x" * 100, count=2, session=session, batch=batch), now=float(session))
    assert r.pending_batches <= 3
    assert r.pending_bytes <= 1000
    assert r.counters["dns-evicted"] > 0
    with pytest.raises(DnsNameError) as info:
        r.add(frag(b"y" * 100, count=10_000, session=99), now=0)
    assert info.value.cause == "dns-too-large"
    for i in range(3):
        r.add(frag(b"z" * 134, index=i, count=6, session=50), now=20)
    with pytest.raises(DnsNameError) as too_large:
        r.add(frag(b"z" * 134, index=3, count=6, session=50), now=20)
    assert too_large.value.cause == "dns-too-large"
    assert r.expire(now=1000) >= 1
    assert r.pending_batches == 0
    assert r.counters["dns-expired"] >= 1


def test_a_changed_fragment_count_restarts_the_batch() -> None:
    r = Reassembler()
    r.add(frag(b"a", index=0, count=3), now=0)
    p = r.add(frag(b"b", index=0, count=2), now=0)
    assert (p.have, p.count) == (1, 2)
    assert r.counters["dns-inconsistent"] == 1


def test_protocol_md_vector() -> None:
    q = FragmentQuery(kind=Kind.FRAGMENT, session=0x01020304, batch=7, index=1, count=3, salt=0xE,
                      data=b"hello flowtunnel")
    assert encode_name(q, ZONE) == "nbswy3dpebtgy33xor2w43tfnq.iaebagbaaa4aaiab6.t.example.org"
    poll = FragmentQuery(kind=Kind.POLL, session=0x01020304, batch=7, index=0, count=3, salt=1)
    assert encode_name(poll, ZONE) == "jaebagbaaa4aaaabr.t.example.org"


def test_version_1_names_are_still_read() -> None:
    # the protocol.md vector of version 1 (a 12-byte meta label of 20 characters, 2 bytes less data per name)
    q = decode_name("nbswy3dpebtgy33xor2w43tfnq.caaqeayeaadqaaiaapxq.t.example.org", ZONE)
    assert q == FragmentQuery(kind=Kind.FRAGMENT, session=0x01020304, batch=7, index=1, count=3, salt=0xEF,
                              data=b"hello flowtunnel")
    poll = decode_name("ceaqeayeaadqaaaaamaq.t.example.org", ZONE)
    assert poll == FragmentQuery(kind=Kind.POLL, session=0x01020304, batch=7, index=0, count=3, salt=1)


def test_meta_fields_are_bounded_by_their_bits() -> None:
    for field, value in (("salt", 16), ("index", 1 << 14), ("count", 1 << 14), ("batch", 1 << 16),
                         ("session", 1 << 32)):
        kw = {"session": 7, "batch": 1, "index": 0, "count": 1, "salt": 0} | {field: value}
        if field == "index":
            kw["count"] = (1 << 14) - 1
        with pytest.raises(ValueError, match=f"{field} {value} is outside"):
            encode_name(FragmentQuery(kind=Kind.FRAGMENT, data=b"x", **kw), ZONE)
    # the largest values fit a 253-character name and come back
    q = frag(b"\xff" * 136, session=(1 << 32) - 1, batch=65535, index=(1 << 14) - 2, count=(1 << 14) - 1,
             salt=15)
    name = encode_name(q, ZONE)
    assert len(name) == 253
    assert decode_name(name, ZONE) == q
    assert encode_answer(Answer(kind="p", fields={"have": "2", "of": "3"}, window=8, gap_ms=20)) == (
        "ft1 p win=8 gap=20 have=2 of=3"
    )
