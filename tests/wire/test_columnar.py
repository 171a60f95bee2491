"""Codec 3 (columnar): byte-exact reconstruction whatever the datagrams and record lengths, real exporter
output included, a better ratio than row-wise zstd on softflowd batches, and a hostile section refused."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import dpkt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowtunnel.datagram import Datagram
from flowtunnel.wire import Codec, LimitExceeded, MalformedRecords, WireError, open_batch, seal_batch
from flowtunnel.wire.columnar import (
    TemplateLengths,
    _check_layout,
    _uvarints,
    max_steps,
    observation_domain,
    payload_decoder,
    payload_encoder,
    template_layouts,
    template_lengths,
)
from flowtunnel.wire.records import decode_block, encode_block, read_uvarint, write_uvarint
from tests.conftest import require
from tests.corpus import VENDOR
from tests.peers import TraceSummary, capture_softflowd

KEY = bytes(range(32))


def as_datagrams(payloads: list[bytes]) -> list[Datagram]:
    return [
        Datagram(received_ns=1_764_000_000_000_000_000 + i * 2_000_000, exporter="127.0.0.1",
                 exporter_port=40000, local_port=2055, payload=p)
        for i, p in enumerate(payloads)
    ]


def round_trip(datagrams: list[Datagram], record_length: object = None, **kw: object) -> bytes:
    body = seal_batch(agent_id="a", key=KEY, first_seq=1, datagrams=datagrams, nonce=bytes(12),
                      codec=Codec.COLUMNAR, record_length=record_length, **kw)  # type: ignore[arg-type]
    assert open_batch(body, key=KEY).datagrams == tuple(datagrams)
    return body


# -- datagrams shaped like exports (so the transposition paths run), with arbitrary contents -------------


@st.composite
def v5_datagram(draw: st.DrawFn) -> bytes:
    count = draw(st.integers(0, 30))
    body = draw(st.binary(min_size=20 + 48 * count, max_size=20 + 48 * count))
    return struct.pack(">HH", 5, count) + body


@st.composite
def set_datagram(draw: st.DrawFn) -> bytes:
    version = draw(st.sampled_from([9, 10]))
    hlen = 20 if version == 9 else 16
    sets = b""
    for _ in range(draw(st.integers(0, 4))):
        set_id = draw(st.sampled_from([0, 1, 2, 3, 256, 257, 300, 65535]))
        body = draw(st.binary(max_size=200))
        declared = draw(st.sampled_from([len(body) + 4, len(body) + 4, 0, 3, len(body) + 10]))
        sets += struct.pack(">HH", set_id, declared & 0xFFFF) + body
    header = struct.pack(">HH", version, draw(st.integers(0, 0xFFFF))) + draw(st.binary(min_size=hlen - 4,
                                                                                          max_size=hlen - 4))
    return header + sets + draw(st.binary(max_size=5))


payloads_st = st.lists(
    st.one_of(v5_datagram(), set_datagram(), st.binary(max_size=100), st.just(b""), st.just(b"\x00\x05")),
    max_size=25,
)


@given(payloads_st, st.one_of(st.none(), st.integers(-5, 70_000)))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_datagrams_come_back_byte_for_byte(payloads: list[bytes], length: int | None) -> None:
    # a record length only has to be useful, never right: any answer must reverse exactly
    round_trip(as_datagrams(payloads), None if length is None else (lambda _p, _s: length))


@given(payloads_st)
@settings(max_examples=100, deadline=None)
def test_the_template_guess_from_the_batch_reverses_too(payloads: list[bytes]) -> None:
    round_trip(as_datagrams(payloads))


# -- real exporters --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "extra"), [(5, ()), (9, ()), (10, ()), (10, ("-b",))])
def test_softflowd_batches_round_trip_and_beat_row_wise_zstd(
    trace: TraceSummary, version: int, extra: tuple[str, ...]
) -> None:
    require("softflowd")
    datagrams = as_datagrams(capture_softflowd(trace.path, version, extra).payloads)
    lengths = TemplateLengths()
    for d in datagrams:
        lengths.learn(d.payload)
    if version != 5:
        assert len(lengths) >= 1  # softflowd's templates were understood
    raw = sum(len(d.payload) + 28 for d in datagrams)
    columnar = row = 0
    for i in range(0, len(datagrams), 50):
        chunk = datagrams[i : i + 50]
        columnar += len(round_trip(chunk, lengths.record_length))
        row += len(seal_batch(agent_id="a", key=KEY, first_seq=1, datagrams=chunk, nonce=bytes(12),
                              codec=Codec.ZSTD_DICT))
    assert columnar < 0.9 * row, (columnar / raw, row / raw)
    # without the agent's cache, templates found in the batch itself are used
    round_trip(datagrams)


def _vendor_payloads(path: Path) -> list[bytes]:
    out: list[bytes] = []
    with path.open("rb") as f:
        for _, frame in dpkt.pcap.Reader(f):
            ip = dpkt.ethernet.Ethernet(frame).data
            udp = ip.data if isinstance(ip, dpkt.ip.IP | dpkt.ip6.IP6) else None
            if isinstance(udp, dpkt.udp.UDP):
                out.append(bytes(udp.data))
    return out


@pytest.mark.parametrize("name", sorted(p.name for p in VENDOR.glob("*.pcap")))
def test_vendor_captures_round_trip(name: str) -> None:
    payloads = _vendor_payloads(VENDOR / name)
    lengths = TemplateLengths()
    for p in payloads:
        lengths.learn(p)
    datagrams = as_datagrams(payloads)
    for i in range(0, len(datagrams), 200):
        round_trip(datagrams[i : i + 200], lengths.record_length)
        round_trip(datagrams[i : i + 200])


def test_a_templates_record_length_is_looked_up_once_per_datagram_and_the_layout_is_the_same() -> None:
    """issue 14: the sealer asked the template cache for the record length of every data set of every
    datagram (softflowd v9 puts ~5 sets of a template in a datagram of ~11), ~15 % of a 1,000 flows/s
    agent's sealing; once per template and datagram now, and the record block is the one the per-set lookups
    built (a reference encoder, below, asks for every set)."""
    tl = TemplateLengths()
    rec = struct.pack(">IIHH", 1, 2, 3, 4)
    template = struct.pack(">HHHH", 0, 24, 256, 4) + struct.pack(">HHHHHHHH", 8, 4, 12, 4, 7, 2, 11, 2)
    sets = b"".join(struct.pack(">HH", 256, 4 + len(rec) * k) + rec * k for k in (1, 3, 2))
    other = struct.pack(">HH", 300, 4 + 8) + bytes(8)  # a template not known: verbatim
    payloads = [struct.pack(">HHIIII", 9, 4, 1, 2, s, 7) + body
                for s, body in enumerate([template + sets, sets + other + sets, sets])]
    for p in payloads:
        tl.learn(p)
    asked: list[tuple[int, int]] = []

    def record_length(payload: bytes, set_id: int) -> int | None:
        asked.append((payloads.index(payload), set_id))
        return tl.record_length(payload, set_id)

    block = encode_block(as_datagrams(payloads), None, payload_encoder(record_length))
    assert sorted(asked) == [(0, 256), (1, 256), (1, 300), (2, 256)]
    assert block == encode_block(as_datagrams(payloads), None, _reference_encoder(tl.record_length))
    assert decode_block(block, 3, max_datagram=65535, max_exporters=8,
                        payload_decoder=payload_decoder(1 << 20))[0] == as_datagrams(payloads)


def _reference_encoder(record_length: object) -> Callable[[Sequence[bytes]], bytes]:
    """Codec 3's payload encoder as it was before issue 14's lookups per datagram: a length per set."""
    from flowtunnel.wire import columnar

    class PerSet(columnar._Encoder):
        def _plan(self, payload: bytes) -> list[tuple[int, tuple[object, ...], int, int]]:
            size = len(payload)
            version = struct.unpack_from(">H", payload)[0]
            hlen = 20 if version == 9 else 16
            runs: list[tuple[int, tuple[object, ...], int, int]] = [(0, columnar._V9_HEADER, hlen, 1)]
            p = hlen
            while p + 4 <= size:
                set_id, slen = struct.unpack_from(">HH", payload, p)
                if slen < 4 or p + slen > size:
                    break
                runs.append((p, columnar._SET_HEADER, 4, 1))
                n = self._length_for(payload, version, set_id) if set_id >= 256 else None
                if n is not None and slen - 4 >= n:
                    runs.append((p + 4, ("data", version, set_id, n), n, (slen - 4) // n))
                p += slen
            return runs if len(runs) + 1 <= max_steps(size) else []

    def encode(payloads: Sequence[bytes]) -> bytes:
        enc = PerSet(record_length, payloads)  # type: ignore[arg-type]
        for p in payloads:
            enc.add(p)
        return enc.section()

    return encode


def test_template_lengths_reads_v9_and_ipfix_templates() -> None:
    # v9: template 256 with fields of 4 + 4 + 2 bytes; options template 257: scope 4 bytes, option 2 bytes
    tmpl = struct.pack(">HH", 256, 3) + struct.pack(">HHHHHH", 8, 4, 12, 4, 7, 2)
    opts = struct.pack(">HHH", 257, 4, 4) + struct.pack(">HHHH", 1, 4, 34, 2) + b"\x00\x00"
    v9 = (struct.pack(">HHIIII", 9, 2, 0, 0, 0, 42) + struct.pack(">HH", 0, 4 + len(tmpl)) + tmpl
          + struct.pack(">HH", 1, 4 + len(opts)) + opts)
    assert template_lengths(v9) == {(9, 42, 256): 10, (9, 42, 257): 6}
    # IPFIX: template 300 with an enterprise field of 8 bytes and a 2-byte field; 301 has a variable field
    t300 = struct.pack(">HH", 300, 2) + struct.pack(">HHI", 0x8001, 8, 9) + struct.pack(">HH", 7, 2)
    t301 = struct.pack(">HH", 301, 1) + struct.pack(">HH", 82, 65535)
    sets = struct.pack(">HH", 2, 4 + len(t300) + len(t301)) + t300 + t301
    ipfix = struct.pack(">HHIII", 10, 16 + len(sets), 0, 0, 7) + sets
    assert template_lengths(ipfix) == {(10, 7, 300): 10}
    # The same templates with their element ids (the enterprise element keeps its enterprise bit)
    assert template_layouts(v9) == {(9, 42, 256): ((8, 4), (12, 4), (7, 2)), (9, 42, 257): ((1, 4), (34, 2))}
    assert template_layouts(ipfix) == {(10, 7, 300): ((0x8001, 8), (7, 2))}
    assert observation_domain(v9, 9) == 42
    assert observation_domain(ipfix, 10) == 7
    cache = TemplateLengths(max_entries=1)
    cache.learn(v9)
    assert len(cache) == 1
    cache.learn(ipfix)
    assert cache.record_length(ipfix, 300) == 10
    assert cache.record_length(b"short", 300) is None


# -- hostile sections ------------------------------------------------------------------------------------


def _section_block(section: bytes, lengths: list[int]) -> bytes:
    """A record block with ``len(lengths)`` records from one source whose payload section is ``section``."""
    head = encode_block(as_datagrams([bytes(n) for n in lengths]), None, lambda _p: b"")
    return head + section


def test_a_section_claiming_huge_groups_is_refused_before_allocating() -> None:
    # one group of record length 65535; datagram 0 claims 2**40 records of it
    layout = bytearray([0, 1]) + bytearray([0x80, 0x80, 0x80, 0x80, 0x80, 0x20])  # vlen 0, group 1, k huge
    section = bytes([1]) + bytes([0xFF, 0xFF, 0x03]) + bytes([len(layout)]) + layout + bytes([0])
    with pytest.raises(MalformedRecords, match="exceeds its length"):
        decode_block(_section_block(section, [100]), 1, max_datagram=65535, max_exporters=4,
                     payload_decoder=payload_decoder(1 << 20))


def test_a_section_with_too_few_column_bytes_is_refused() -> None:
    # one group of length 4, the datagram is 2 records of it, but only 3 column bytes follow
    layout = bytes([0, 1, 2, 0, 0])
    section = bytes([1, 4, len(layout)]) + layout + bytes([0]) + b"abc"
    with pytest.raises(LimitExceeded, match="columnar groups need 8 bytes"):
        decode_block(_section_block(section, [8]), 1, max_datagram=65535, max_exporters=4,
                     payload_decoder=payload_decoder(1 << 20))


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_mutated_columnar_blocks_raise_only_wire_errors(data: st.DataObject) -> None:
    payloads = [struct.pack(">HH", 5, 1) + bytes(range(20)) + bytes(range(48)), b"\x00\x0a" + bytes(30)]
    block = bytearray(encode_block(as_datagrams(payloads), None, payload_encoder(None)))
    for _ in range(data.draw(st.integers(1, 4))):
        block[data.draw(st.integers(0, len(block) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(WireError):
        decode_block(
            bytes(block), 2, max_datagram=65535, max_exporters=4, payload_decoder=payload_decoder(1 << 20)
        )


def test_a_layout_step_of_zero_records_is_refused() -> None:
    # group 0 (length 4); datagram 0: (0 verbatim, group 0, 0 records) then (4 verbatim, end)
    layout = bytes([0, 1, 0, 4, 0])
    section = bytes([1, 4, len(layout)]) + layout + bytes([4]) + b"abcd"
    with pytest.raises(MalformedRecords, match="0 records"):
        decode_block(_section_block(section, [4]), 1, max_datagram=65535, max_exporters=4,
                     payload_decoder=payload_decoder(1 << 20))


def test_a_datagram_may_not_take_more_layout_steps_than_its_size_allows() -> None:
    # a 64-byte datagram as 64 one-byte records, one per step: more steps than max_steps(64) = 10
    layout = bytes([0, 1, 1]) * 64 + bytes([0, 0])
    section = bytearray([1, 1])
    write_uvarint(len(layout), section)
    section += layout + bytes([0]) + bytes(64)
    with pytest.raises(MalformedRecords, match="194 values, more than the 30 its datagrams can use"):
        decode_block(_section_block(bytes(section), [64]), 1, max_datagram=65535, max_exporters=4,
                     payload_decoder=payload_decoder(1 << 20))


def test_a_datagram_of_many_tiny_sets_is_carried_verbatim_and_comes_back() -> None:
    sets = struct.pack(">HH", 256, 4) * 300  # 300 empty data sets
    payload = struct.pack(">HHIIII", 9, 0, 0, 0, 0, 1) + sets
    body = round_trip(as_datagrams([payload] * 3), lambda _p, _s: 4)
    assert len(body) < len(payload)  # and still compressed


def test_steps_are_bounded_per_datagram_even_within_the_batch_budget() -> None:
    # datagram 0 (64 bytes) as 16 steps of one 4-byte record each, datagram 1 (640 bytes) in one step:
    # the batch's value budget (3 * (10 + 28)) allows it, the per-datagram bound (10 steps) does not
    layout = bytes([0, 1, 1]) * 16 + bytes([0, 0]) + bytes([0, 1, 160, 1, 0, 0])
    section = bytearray([1, 4])
    write_uvarint(len(layout), section)
    section += layout + bytes([0]) + bytes(64 + 640)
    with pytest.raises(MalformedRecords, match="datagram 0 of 64 bytes takes over 10 layout steps"):
        decode_block(_section_block(bytes(section), [64, 640]), 2, max_datagram=65535, max_exporters=4,
                     payload_decoder=payload_decoder(1 << 20))


@given(st.lists(st.integers(0, (1 << 63) - 1), max_size=50))
def test_the_vectorised_varint_reader_agrees_with_the_writer(values: list[int]) -> None:
    buf = bytearray()
    for v in values:
        write_uvarint(v, buf)
    assert _uvarints(memoryview(bytes(buf)), len(values)) == values


def test_the_vectorised_varint_reader_refuses_cut_and_overlong_varints() -> None:
    with pytest.raises(MalformedRecords, match="ends inside a varint"):
        _uvarints(memoryview(b"\x01\x80"), 10)
    with pytest.raises(MalformedRecords, match="longer than 9 bytes"):
        _uvarints(memoryview(b"\xff" * 9 + b"\x01"), 10)
    with pytest.raises(MalformedRecords, match="3 values, more than the 2"):
        _uvarints(memoryview(b"\x01\x02\x03"), 2)


# -- the vectorised decoder against the step-by-step reference -------------------------------------------


def _reference_section(block: memoryview, pos: int, lengths: Sequence[int]) -> tuple[list[bytes], int]:
    """Section 4 of docs/protocol.md decoded the plain way, one layout step at a time (the decoder before it
    was vectorised): the oracle for the fast path."""

    def uvarint(at: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            if at >= len(block):
                raise MalformedRecords("cut varint")
            b = block[at]
            at += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value, at

    n_groups, pos = uvarint(pos)
    glen = []
    for _ in range(n_groups):
        n, pos = uvarint(pos)
        glen.append(n)
    ops_len, pos = uvarint(pos)
    ops_end = pos + ops_len
    tokens = []
    while pos < ops_end:
        v, pos = uvarint(pos)
        tokens.append(v)
    resid_len, pos = uvarint(pos)
    resid = bytes(block[pos : pos + resid_len])
    pos += resid_len
    need = [0] * n_groups
    t = 0
    steps: list[list[tuple[int, int, int]]] = []
    for _ in lengths:
        mine = []
        while True:
            vlen, gref = tokens[t], tokens[t + 1]
            t += 2
            k = 0
            if gref:
                k = tokens[t]
                t += 1
                need[gref - 1] += k
            mine.append((vlen, gref, k))
            if not gref:
                break
        steps.append(mine)
    rows = []
    for k, n in zip(need, glen, strict=True):
        col = bytes(block[pos : pos + k * n])
        rows.append(bytes(col[j * k + r] for r in range(k) for j in range(n)))
        pos += k * n
    cursor = [0] * n_groups
    out = []
    rp = 0
    for mine in steps:
        parts = []
        for vlen, gref, k in mine:
            parts.append(resid[rp : rp + vlen])
            rp += vlen
            if gref:
                g = gref - 1
                parts.append(rows[g][cursor[g] : cursor[g] + k * glen[g]])
                cursor[g] += k * glen[g]
        out.append(b"".join(parts))
    return out, pos


def _outcome(block: bytes, count: int, *, vectorised: bool = True) -> object:
    """Payloads or the error class, with the vectorised path forced on for any batch size (or off)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("flowtunnel.wire.columnar.FAST_MIN_DATAGRAMS", 0 if vectorised else 1 << 30)
        mp.setattr("flowtunnel.wire.records.FAST_MIN_RECORDS", 0 if vectorised else 1 << 30)
        try:
            datagrams, _ = decode_block(block, count, max_datagram=65535, max_exporters=4,
                                        payload_decoder=payload_decoder(1 << 20))
        except WireError as exc:
            return type(exc)
    return [d.payload for d in datagrams]


@given(payloads_st, st.one_of(st.none(), st.integers(1, 70)))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_vectorised_decoder_rebuilds_what_the_reference_does(
    payloads: list[bytes], length: int | None
) -> None:
    block = encode_block(as_datagrams(payloads), None,
                         payload_encoder(None if length is None else (lambda _p, _s: length)))
    slow, _ = decode_block(block, len(payloads), max_datagram=65535, max_exporters=4,
                           payload_decoder=_reference_section)
    assert [d.payload for d in slow] == payloads
    assert _outcome(block, len(payloads), vectorised=True) == payloads
    assert _outcome(block, len(payloads), vectorised=False) == payloads


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_a_mutated_layout_is_refused_exactly_when_the_checks_say_so(data: st.DataObject) -> None:
    # mutate only the layout and verbatim varints of a real section, so most mutants stay parseable and the
    # fast path's own checks (not the varint reader's) decide; each outcome must match a reference that
    # runs the documented checks step by step (a refusal names the same error class)
    payloads = [struct.pack(">HH", 5, 2) + bytes(range(20)) + bytes(range(96)), b"\x00\x0a" + bytes(30),
                struct.pack(">HH", 5, 1) + bytes(20 + 48)]
    block = bytearray(encode_block(as_datagrams(payloads), None, payload_encoder(None)))
    head = len(encode_block(as_datagrams(payloads), None, lambda _p: b""))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(head, min(len(block) - 1, head + 40)))
        block[at] = data.draw(st.sampled_from([0, 1, 2, 3, 4, 24, 48, 0x80, data.draw(st.integers(0, 255))]))
    got = _outcome(bytes(block), 3)
    assert _outcome(bytes(block), 3, vectorised=False) == got
    try:
        expected: object = [d.payload for d in decode_block(
            bytes(block), 3, max_datagram=65535, max_exporters=4, payload_decoder=_checked_reference
        )[0]]
    except WireError as exc:
        expected = type(exc)
    assert got == expected


def _checked_reference(block: memoryview, pos: int, lengths: Sequence[int]) -> tuple[list[bytes], int]:
    """The reference decoder behind the documented checks (the fast path must agree with both)."""
    start = pos
    n_groups, pos = read_uvarint(block, pos, "groups")
    if n_groups > 4096:
        raise MalformedRecords("groups")
    glen = []
    for _ in range(n_groups):
        n, pos = read_uvarint(block, pos, "length")
        if not 1 <= n <= 65535:
            raise MalformedRecords("length")
        glen.append(n)
    ops_len, pos = read_uvarint(block, pos, "layout")
    if ops_len > len(block) - pos:
        raise MalformedRecords("layout")
    ops = block[pos : pos + ops_len]
    pos += ops_len
    resid_len, pos = read_uvarint(block, pos, "verbatim")
    if resid_len > len(block) - pos:
        raise MalformedRecords("verbatim")
    pos += resid_len
    tokens = _uvarints(ops, sum(3 * max_steps(n) for n in lengths))
    _check_layout(tokens, lengths, glen, resid_len, len(block) - pos, 1 << 20)
    return _reference_section(block, start, lengths)
