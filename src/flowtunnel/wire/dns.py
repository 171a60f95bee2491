"""The DNS rung's framing (pure: no sockets, no clock, no randomness): sealed batches cut into query names,
reassembled at the gateway, answered in TXT records.

Only DNS gets out of some networks (hotel Wi-Fi before login, locked-down APNs), and only the query *name*
survives every resolver on the way up, so a sealed batch (the same bytes as a POST body) is cut into
fragments that each ride in one name under the gateway's zone::

    <data>.<data>.<data>.<meta>.<zone>        at most 253 characters in all, labels at most 63

- data labels: the fragment's bytes in lowercase base32 without padding (RFC 4648 alphabet). Base32 is
  case-insensitive, so resolvers that randomise the case of names (0x20, unbound's ``use-caps-for-id``)
  change nothing.
- meta label: 85 bits in base32 (17 characters): version and kind, a per-run session id, the batch number
  within the session, fragment index and count, and a salt the agent draws per query so that no cache
  between the agent and the gateway can answer for the gateway (every retry is a fresh name). Version 1
  names (a 12-byte, 20-character meta label: 2 bytes fewer per name) are still read.

The gateway answers a TXT query with one short text record (``ft1 <kind> key=value ...``, section 9 of
docs/protocol.md): progress for a fragment, the ingest answer (acked + tag, as the POST answer) once a batch
is complete, an error, and in every answer the flow-control hints ``win`` (outstanding queries the agent may
keep) and ``gap`` (milliseconds between queries). Names that are only a suffix of a full name, and any query
type other than TXT, are what QNAME-minimising resolvers ask on their way down: they get NODATA (NOERROR, no
answer), never NXDOMAIN, which would stop the resolver there (RFC 8020).

``Reassembler`` holds the gateway's fragments with every size and count bounded; ``now`` is passed in.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import IntEnum

from flowtunnel.errors import FlowtunnelError

__all__ = [
    "MAX_FRAGMENTS",
    "MAX_NAME",
    "MAX_SALT",
    "META_BITS",
    "Answer",
    "DnsNameError",
    "FragmentQuery",
    "Kind",
    "Reassembler",
    "ReassemblyLimits",
    "capacity",
    "decode_answer",
    "decode_name",
    "encode_answer",
    "encode_name",
    "normalise_zone",
    "split_batch",
]

MAX_NAME = 253  # characters of a name in text form without the trailing dot (255 octets on the wire)
MAX_LABEL = 63
VERSION = 2
#: version 2 meta, most significant first: version 3 | kind 2 | session 32 | batch 16 | index 14 | count 14 |
#: salt 4 = 85 bits, 17 base32 characters with no padding bit
_META_FIELDS = (("version", 3), ("kind", 2), ("session", 32), ("batch", 16), ("index", 14), ("count", 14),
                ("salt", 4))
META_BITS = sum(bits for _, bits in _META_FIELDS)  # 85
_META_CHARS = META_BITS // 5  # 17
_V1_META = struct.Struct(">BIHHHB")  # version 1: version << 4 | kind, session, batch, index, count, salt
_V1_META_CHARS = 20
_B32 = re.compile(r"^[a-z2-7]+$")
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MAX_FRAGMENTS = (1 << 14) - 1
MAX_SALT = (1 << 4) - 1


class Kind(IntEnum):
    """What a query asks for."""

    FRAGMENT = 0  # one piece of a sealed batch
    POLL = 1  # the answer for a batch whose completing answer was lost (no data labels)


class DnsNameError(FlowtunnelError):
    """A query name under the zone is not a flowtunnel name (the peer's fault): wrong version, bad base32,
    fields out of range. ``cause`` is the counter name."""

    peer_fault = True

    def __init__(self, message: str, *, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


def normalise_zone(zone: str) -> str:
    """``zone`` in lowercase without the trailing dot; ``ValueError`` (the caller's mistake) unless it is a
    valid host name leaving room for at least one data label."""
    z = zone.strip().rstrip(".").lower()
    labels = z.split(".") if z else []
    if not labels or any(not _LABEL.match(label) for label in labels):
        raise ValueError(f"DNS zone {zone!r} is not a valid domain name (letters, digits, hyphens, dots)")
    if len(z) > MAX_NAME - _META_CHARS - 2 - 17:
        raise ValueError(f"DNS zone {zone!r} is {len(z)} characters: at most {MAX_NAME - _META_CHARS - 19} "
                         "leave room for data in a 253-character name")
    return z


def capacity(zone: str) -> int:
    """Payload bytes one query name carries under ``zone`` (136 under a 13-character zone)."""
    room = MAX_NAME - len(normalise_zone(zone)) - 1 - _META_CHARS  # "<data>.<meta>.<zone>"
    # ``room`` holds the data characters plus one dot after each data label.
    labels = (room + MAX_LABEL) // (MAX_LABEL + 1)
    chars = room - labels
    return chars * 5 // 8


def split_batch(body: bytes, zone: str) -> list[bytes]:
    """The fragments of a sealed batch, each fitting one name under ``zone``."""
    size = capacity(zone)
    if not body:
        raise ValueError("cannot fragment an empty body")
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    if len(pieces) > MAX_FRAGMENTS:
        raise ValueError(f"body of {len(body)} bytes needs {len(pieces)} fragments: at most {MAX_FRAGMENTS}")
    return pieces


@dataclass(frozen=True, slots=True, kw_only=True)
class FragmentQuery:
    """A decoded query name. ``data`` is empty for a poll."""

    kind: Kind
    session: int
    batch: int
    index: int
    count: int
    salt: int
    data: bytes = b""


def _b32encode(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _b32decode(text: str) -> bytes:
    pad = -len(text) % 8
    return base64.b32decode(text.upper() + "=" * pad)


_B32_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_B32_VALUE = {c: i for i, c in enumerate(_B32_ALPHABET)}


def _pack_meta(values: dict[str, int]) -> str:
    n = 0
    for name, bits in _META_FIELDS:
        n = n << bits | values[name]
    return "".join(_B32_ALPHABET[n >> 5 * (_META_CHARS - 1 - i) & 31] for i in range(_META_CHARS))


def _unpack_meta(text: str) -> dict[str, int]:
    n = 0
    for c in text:
        n = n << 5 | _B32_VALUE[c]
    out: dict[str, int] = {}
    for name, bits in reversed(_META_FIELDS):
        out[name] = n & (1 << bits) - 1
        n >>= bits
    return out


def encode_name(query: FragmentQuery, zone: str) -> str:
    """The query name (no trailing dot) carrying ``query`` under ``zone``."""
    z = normalise_zone(zone)
    values = {"version": VERSION, "kind": int(query.kind), "session": query.session, "batch": query.batch,
              "index": query.index, "count": query.count, "salt": query.salt}
    for name, bits in _META_FIELDS:
        if not 0 <= values[name] < 1 << bits:
            raise ValueError(f"{name} {values[name]} is outside 0..{(1 << bits) - 1}")
    if query.kind is Kind.FRAGMENT and not (query.count >= 1 and query.index < query.count and query.data):
        raise ValueError(
            f"fragment {query.index} of {query.count} with {len(query.data)} bytes is inconsistent")
    if query.kind is Kind.POLL and query.data:
        raise ValueError("a poll carries no data")
    meta = _pack_meta(values)
    text = _b32encode(query.data)
    labels = [text[i : i + MAX_LABEL] for i in range(0, len(text), MAX_LABEL)]
    name = ".".join([*labels, meta, z])
    if len(name) > MAX_NAME:
        raise ValueError(f"fragment of {len(query.data)} bytes makes a {len(name)}-character name: "
                         f"at most {capacity(z)} bytes fit under {z!r}")
    return name


def decode_name(name: str, zone: str) -> FragmentQuery | None:
    """Decode a query name under ``zone`` (case-insensitive, trailing dot optional).

    Returns ``None`` for names that are not full flowtunnel names but may be a QNAME-minimising resolver's
    intermediate step (the zone itself, or fewer labels than a name has): the caller answers NODATA.
    Raises ``DnsNameError`` for names that claim to be one and are not; ``ValueError`` if ``name`` is not
    under ``zone`` at all (the caller should have checked).
    """
    z = normalise_zone(zone)
    n = name.rstrip(".").lower()
    if n == z:
        return None
    if not n.endswith("." + z):
        raise ValueError(f"name {name!r} is not under zone {z!r}")
    if len(n) > MAX_NAME:
        raise DnsNameError(f"name of {len(n)} characters exceeds {MAX_NAME}", cause="dns-bad-name")
    labels = n[: -len(z) - 1].split(".")
    meta_text = labels[-1]
    if len(meta_text) not in (_META_CHARS, _V1_META_CHARS) or not _B32.match(meta_text):
        if len(labels) == 1:
            return None  # a resolver walking down, or a random name: NODATA either way
        raise DnsNameError(f"meta label {meta_text[:24]!r} is not {_META_CHARS} base32 characters",
                           cause="dns-bad-name")
    if len(meta_text) == _META_CHARS:
        meta = _unpack_meta(meta_text)
        version, kind, session, batch, index, count, salt = (meta[name] for name, _ in _META_FIELDS)
        expected = VERSION
    else:  # a version 1 agent's name
        try:
            head, session, batch, index, count, salt = _V1_META.unpack(_b32decode(meta_text))
        except (binascii.Error, struct.error) as exc:
            raise DnsNameError(f"meta label does not decode: {exc}", cause="dns-bad-name") from None
        version, kind = head >> 4, head & 0x0F
        expected = 1
    if version != expected:
        raise DnsNameError(f"name version {version} is not {expected} (a {len(meta_text)}-character meta "
                           "label)", cause="dns-bad-version")
    if kind not in (Kind.FRAGMENT, Kind.POLL):
        raise DnsNameError(f"query kind {kind} is unknown", cause="dns-bad-name")
    data_text = "".join(labels[:-1])
    if kind == Kind.POLL:
        if data_text:
            raise DnsNameError("a poll carries data labels", cause="dns-bad-name")
        return FragmentQuery(kind=Kind.POLL, session=session, batch=batch, index=0, count=count, salt=salt)
    if not data_text:
        return None  # the meta label alone: an intermediate name on a minimising resolver's way down
    if count == 0 or index >= count:
        raise DnsNameError(f"fragment index {index} of {count} is out of range", cause="dns-bad-name")
    if not _B32.match(data_text) or any(len(label) > MAX_LABEL or not label for label in labels[:-1]):
        raise DnsNameError("data labels are not base32", cause="dns-bad-name")
    try:
        data = _b32decode(data_text)
    except binascii.Error as exc:
        raise DnsNameError(f"data labels do not decode: {exc}", cause="dns-bad-name") from None
    return FragmentQuery(kind=Kind.FRAGMENT, session=session, batch=batch, index=index, count=count,
                         salt=salt, data=data)


# -- answers ------------------------------------------------------------------------------------------------

_ANSWER_KINDS = frozenset({"p", "a", "e", "u"})
_VALUE = re.compile(r"^[A-Za-z0-9_.:-]{0,64}$")
MAX_ANSWER = 255  # one TXT character-string


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """One TXT answer. ``kind``: ``p`` progress of a batch (``have`` of ``of`` fragments), ``a`` the
    ingest answer of a complete batch (``acked``, ``tag``, ``st`` 200, ``acc``, ``dup``), ``e`` an error
    (``st`` as HTTP would have it, ``code``, optional ``acked``/``ra`` retry-after), ``u`` unknown batch (the
    gateway has no state for a poll: resend). ``window`` and ``gap_ms`` are flow-control hints in every
    answer."""

    kind: str
    fields: dict[str, str] = field(default_factory=dict)
    window: int = 0
    gap_ms: int = 0

    def int(self, key: str, default: int = 0) -> int:
        value = self.fields.get(key)
        if value is None or not value.isascii() or not value.isdigit() or len(value) > 20:
            return default
        return int(value)


def encode_answer(answer: Answer) -> str:
    if answer.kind not in _ANSWER_KINDS:
        raise ValueError(f"answer kind {answer.kind!r} is not one of {sorted(_ANSWER_KINDS)}")
    parts = ["ft1", answer.kind, f"win={answer.window}", f"gap={answer.gap_ms}"]
    for key, value in answer.fields.items():
        if not re.match(r"^[a-z]{1,8}$", key) or not _VALUE.match(value):
            raise ValueError(f"answer field {key!r}={value!r} is not allowed in a TXT answer")
        parts.append(f"{key}={value}")
    text = " ".join(parts)
    if len(text) > MAX_ANSWER:
        raise ValueError(f"answer of {len(text)} characters exceeds {MAX_ANSWER}")
    return text


def decode_answer(text: str) -> Answer:
    """Parse a TXT answer; ``DnsNameError`` (cause ``dns-bad-answer``) for anything that is not one (a
    resolver that rewrites answers, a portal's DNS hijack)."""
    parts = text.split(" ")
    if len(text) > MAX_ANSWER or len(parts) < 2 or parts[0] != "ft1" or parts[1] not in _ANSWER_KINDS:
        raise DnsNameError(f"TXT answer {text[:40]!r} is not a flowtunnel answer", cause="dns-bad-answer")
    fields: dict[str, str] = {}
    for part in parts[2:]:
        key, sep, value = part.partition("=")
        if not sep or not re.match(r"^[a-z]{1,8}$", key) or not _VALUE.match(value):
            raise DnsNameError(f"TXT answer field {part[:40]!r} is malformed", cause="dns-bad-answer")
        fields[key] = value
    window = fields.pop("win", "0")
    gap = fields.pop("gap", "0")
    if not (window.isdigit() and gap.isdigit() and len(window) <= 6 and len(gap) <= 6):
        raise DnsNameError("TXT answer flow-control hints are malformed", cause="dns-bad-answer")
    return Answer(kind=parts[1], fields=fields, window=int(window), gap_ms=int(gap))


# -- reassembly (gateway) -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ReassemblyLimits:
    """Bounds on what fragments may cost the gateway: everything a resolver relays is attacker-controlled."""

    max_batch_bytes: int = 1 << 20  # a batch body carried over DNS (its fragments' sum)
    max_pending_batches: int = 4096  # incomplete batches held, all sessions together
    max_pending_per_session: int = 64
    max_pending_bytes: int = 32 << 20  # fragment bytes held, all together
    max_age: float = 300.0  # seconds an incomplete batch is kept after its last fragment

    def __post_init__(self) -> None:
        names = ("max_batch_bytes", "max_pending_batches", "max_pending_per_session", "max_pending_bytes")
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_age <= 0:
            raise ValueError("max_age must be positive")


@dataclass(slots=True)
class _Pending:
    count: int
    pieces: dict[int, bytes]
    size: int
    touched: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Progress:
    """What ``Reassembler.add`` made of a fragment: ``body`` once the batch is complete (the caller ingests
    it), else ``have`` of ``count`` fragments held. ``duplicate`` when this fragment was already held."""

    have: int
    count: int
    body: bytes | None = None
    duplicate: bool = False


class Reassembler:
    """Fragments per (session, batch) until a batch is complete; bounded in batches, bytes and age.

    Resource handling: when a bound would be exceeded the oldest incomplete batch is evicted (counted in
    ``counters["dns-evicted"]``); a batch that would exceed ``max_batch_bytes`` raises ``DnsNameError``
    (``dns-too-large``) and is dropped. ``expire(now)`` drops batches idle longer than ``max_age``
    (``dns-expired``). Fragments of the same batch may come in any order and repeatedly.
    """

    def __init__(self, limits: ReassemblyLimits | None = None) -> None:
        self.limits = limits or ReassemblyLimits()
        self._pending: OrderedDict[tuple[int, int], _Pending] = OrderedDict()
        self._per_session: dict[int, int] = {}
        self._bytes = 0
        self.counters: dict[str, int] = {"dns-evicted": 0, "dns-expired": 0, "dns-too-large": 0,
                                         "dns-inconsistent": 0}

    @property
    def pending_batches(self) -> int:
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def add(self, query: FragmentQuery, now: float) -> Progress:
        if query.kind is not Kind.FRAGMENT:
            raise ValueError("only fragments are reassembled")
        limits = self.limits
        key = (query.session, query.batch)
        pending = self._pending.get(key)
        if pending is not None and pending.count != query.count:
            # The agent restarted numbering for this batch id (a new run reusing the session is unlikely but
            # the bytes are the peer's): start over rather than mix two batches.
            self.counters["dns-inconsistent"] += 1
            self._drop(key)
            pending = None
        if pending is None:
            if query.count > limits.max_batch_bytes:  # every fragment holds at least one byte
                self.counters["dns-too-large"] += 1
                raise DnsNameError(f"batch of {query.count} fragments exceeds max_batch_bytes "
                                   f"{limits.max_batch_bytes}", cause="dns-too-large")
            if self._per_session.get(query.session, 0) >= limits.max_pending_per_session:
                self._evict_session(query.session)
            while len(self._pending) >= limits.max_pending_batches:
                self._evict_oldest()
            pending = _Pending(count=query.count, pieces={}, size=0, touched=now)
            self._pending[key] = pending
            self._per_session[query.session] = self._per_session.get(query.session, 0) + 1
        self._pending.move_to_end(key)
        pending.touched = now
        if query.index in pending.pieces:
            return Progress(have=len(pending.pieces), count=pending.count, duplicate=True)
        if pending.size + len(query.data) > limits.max_batch_bytes:
            self.counters["dns-too-large"] += 1
            self._drop(key)
            raise DnsNameError(f"batch exceeds max_batch_bytes {limits.max_batch_bytes}",
                               cause="dns-too-large")
        while self._bytes + len(query.data) > limits.max_pending_bytes and len(self._pending) > 1:
            self._evict_oldest(keep=key)
        pending.pieces[query.index] = query.data
        pending.size += len(query.data)
        self._bytes += len(query.data)
        if len(pending.pieces) < pending.count:
            return Progress(have=len(pending.pieces), count=pending.count)
        body = b"".join(pending.pieces[i] for i in range(pending.count))
        self._drop(key)
        return Progress(have=pending.count, count=pending.count, body=body)

    def expire(self, now: float) -> int:
        """Drop batches idle for longer than ``max_age``; returns how many."""
        dropped = 0
        while self._pending:
            key, pending = next(iter(self._pending.items()))
            if now - pending.touched <= self.limits.max_age:
                break
            self._drop(key)
            dropped += 1
        self.counters["dns-expired"] += dropped
        return dropped

    def _evict_session(self, session: int) -> None:
        for key in self._pending:
            if key[0] == session:
                self._drop(key)
                self.counters["dns-evicted"] += 1
                return

    def _evict_oldest(self, keep: tuple[int, int] | None = None) -> None:
        for key in self._pending:
            if key != keep:
                self._drop(key)
                self.counters["dns-evicted"] += 1
                return

    def _drop(self, key: tuple[int, int]) -> None:
        pending = self._pending.pop(key)
        self._bytes -= pending.size
        left = self._per_session[key[0]] - 1
        if left:
            self._per_session[key[0]] = left
        else:
            del self._per_session[key[0]]
