"""Information Element names and value types: how one field's bytes become a Python value and back.

Names and abstract data types come from the IANA registry (generated ``_iana`` module). Value representation:

* unsigned/signed integers → ``int`` (reduced-size encoding accepted for any length; RFC 7011 §6.2);
* float32/float64 → ``float``; boolean → ``bool`` (1 is true, anything else false);
* ipv4Address/ipv6Address → text (``"192.0.2.1"``, ``"2001:db8::1"``); full size only (4 / 16 bytes);
* macAddress → ``"00:11:22:33:44:55"``;
* dateTimeSeconds/Milliseconds/Microseconds/Nanoseconds → ``int`` since the Unix epoch (UTC) in the unit the
  data type names (NTP-format micro/nanoseconds are converted). Integers keep the hot path cheap and lose no
  precision; ``format_timestamp`` renders them as ISO-8601 text for people;
* string → ``str`` (UTF-8, invalid bytes replaced, trailing NUL padding removed);
* octetArray, the structured list types and every unknown or enterprise field → lowercase hex text.

Unknown IANA ids are keyed ``"unknown_<id>"``, enterprise-specific fields ``"<pen>.<id>"`` (e.g.
``"9.12235"``); both are kept as hex so nothing is lost and a collector can still interpret them.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flowtunnel.netflow._iana import ELEMENTS

__all__ = [
    "V4_INT_MEMO",
    "V6_MEMO",
    "FieldCodec",
    "FieldTypeError",
    "MemoTable",
    "data_type",
    "field_codec",
    "field_key",
    "format_timestamp",
    "ie_id_for_name",
    "ipv4_text",
    "ipv6_text",
    "is_timestamp",
    "parse_field_key",
    "units",
]

NTP_EPOCH_OFFSET = 2_208_988_800  # seconds from 1900-01-01 to 1970-01-01
VARIABLE_LENGTH = 65535

_ID_BY_NAME: dict[str, int] = {entry[0]: ie_id for ie_id, entry in ELEMENTS.items()}

# Unit of each absolute time data type, as a divisor to seconds.
_TIME_DIVISOR = {
    "dateTimeSeconds": 1,
    "dateTimeMilliseconds": 1_000,
    "dateTimeMicroseconds": 1_000_000,
    "dateTimeNanoseconds": 1_000_000_000,
}


def field_key(ie_id: int, pen: int = 0) -> str:
    """The record key for an Information Element: its IANA name, ``"<pen>.<id>"`` or ``"unknown_<id>"``."""
    if pen:
        return f"{pen}.{ie_id}"
    entry = ELEMENTS.get(ie_id)
    return entry[0] if entry is not None else f"unknown_{ie_id}"


def parse_field_key(key: str) -> tuple[int, int]:
    """Inverse of ``field_key``: ``(ie_id, pen)``. Raises ``ValueError`` for a key that names nothing."""
    ie_id = _ID_BY_NAME.get(key)
    if ie_id is not None:
        return ie_id, 0
    if key.startswith("unknown_") and key[8:].isdigit():
        return int(key[8:]), 0
    pen, dot, rest = key.partition(".")
    if dot and pen.isdigit() and rest.isdigit():
        return int(rest), int(pen)
    raise ValueError(f"field name {key!r} is neither an IANA name, 'unknown_<id>' nor '<pen>.<id>'")


def ie_id_for_name(name: str) -> int | None:
    """The IANA element id of ``name``, or ``None``."""
    return _ID_BY_NAME.get(name)


def data_type(ie_id: int, pen: int = 0) -> str:
    """IANA abstract data type of the element; ``"octetArray"`` for unknown and enterprise elements."""
    if pen:
        return "octetArray"
    entry = ELEMENTS.get(ie_id)
    return entry[1] if entry is not None else "octetArray"


def units(name: str) -> str:
    """IANA units of the element ``name`` (``"octets"``, ``"packets"``, ``"milliseconds"``...) or ``""``."""
    ie_id = _ID_BY_NAME.get(name)
    return ELEMENTS[ie_id][3] if ie_id is not None else ""


def is_timestamp(name: str) -> bool:
    """Whether the record key ``name`` holds an absolute time (an int since the epoch in the type's unit)."""
    ie_id = _ID_BY_NAME.get(name)
    return ie_id is not None and ELEMENTS[ie_id][1] in _TIME_DIVISOR


def format_timestamp(name: str, value: int) -> str:
    """ISO-8601 UTC for the absolute time ``value`` of field ``name``, e.g. ``2026-11-26T05:18:08.123Z``."""
    ie_id = _ID_BY_NAME.get(name)
    divisor = _TIME_DIVISOR.get(ELEMENTS[ie_id][1], 0) if ie_id is not None else 0
    if not divisor:
        raise ValueError(f"field {name!r} is not an absolute time")
    seconds, frac = divmod(value, divisor)
    try:
        text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return str(value)
    if divisor == 1:
        return text + "Z"
    digits = len(str(divisor)) - 1
    return f"{text}.{frac:0{digits}d}Z"


# --- converters (struct output or raw bytes -> python value) ---------------------------------------------


def _hex(raw: bytes) -> str:
    return raw.hex()


def _uint(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


def _sint(raw: bytes) -> int:
    return int.from_bytes(raw, "big", signed=True)


def _string(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").rstrip("\x00")


def _mac(raw: bytes) -> str:
    return raw.hex(":")


class _AddressCache(dict[bytes, str]):
    """Memo of address bytes -> text: flows repeat addresses, and a hit runs at C speed in ``map``.

    Bounded: cleared when it reaches ``limit`` entries (cheaper than LRU bookkeeping on the hot path).
    """

    def __init__(self, family: int, limit: int = 65536) -> None:
        super().__init__()
        self._family = family
        self._limit = limit

    def __missing__(self, raw: bytes) -> str:
        if len(self) >= self._limit:
            self.clear()
        text = self[raw] = socket.inet_ntop(self._family, raw)
        return text


@dataclass(frozen=True, slots=True)
class MemoTable:
    """An address memo for the generated record builders (``templates.make_row_converter``): a plain
    ``dict`` subscripted in place, and ``fill`` for a miss.

    A plain dict, unlike ``_AddressCache``, is subscripted by the interpreter's specialised dict path, which
    is a good part of decoding a record with three addresses; the builder catches the ``KeyError`` of a miss
    and redoes its data set through ``fill`` (bounded like ``_AddressCache``: cleared at ``limit``).
    """

    table: dict[Any, str]
    fill: Callable[[Any], str]


def _memo_table(to_text: Callable[[Any], str], limit: int = 65536) -> MemoTable:
    table: dict[Any, str] = {}

    def fill(value: Any) -> str:
        text = table.get(value)
        if text is None:
            if len(table) >= limit:
                table.clear()
            text = table[value] = to_text(value)
        return text

    return MemoTable(table, fill)


_V4_CACHE = _AddressCache(socket.AF_INET)
_V6_CACHE = _AddressCache(socket.AF_INET6)
V4_INT_MEMO = _memo_table(lambda value: socket.inet_ntop(socket.AF_INET, value.to_bytes(4, "big")))
"""uint32 -> dotted text: the builders unpack IPv4 fields as ``I`` (an int hashes cheaper than 4 bytes)."""
V6_MEMO = _memo_table(lambda raw: socket.inet_ntop(socket.AF_INET6, raw))
"""16 address bytes -> RFC 5952 text, for the builders."""
ipv4_text: Callable[[bytes], str] = _V4_CACHE.__getitem__
"""4 address bytes -> dotted text (memoised)."""
ipv6_text: Callable[[bytes], str] = _V6_CACHE.__getitem__
"""16 address bytes -> RFC 5952 text (memoised)."""


def _bool(value: int) -> bool:
    return value == 1


def _ntp_us(value: int) -> int:
    return ((value >> 32) - NTP_EPOCH_OFFSET) * 1_000_000 + (((value & 0xFFFFFFFF) * 1_000_000) >> 32)


def _ntp_ns(value: int) -> int:
    return ((value >> 32) - NTP_EPOCH_OFFSET) * 1_000_000_000 + (((value & 0xFFFFFFFF) * 1_000_000_000) >> 32)


def _raw_uint_then(conv: Callable[[int], object]) -> Callable[[bytes], object]:
    return lambda raw: conv(int.from_bytes(raw, "big"))


_UINT_CODE = {1: "B", 2: "H", 4: "I", 8: "Q"}
_SINT_CODE = {1: "b", 2: "h", 4: "i", 8: "q"}


class FieldTypeError(ValueError):
    """A field's length does not suit its data type (e.g. a 3-byte IPv4 address)."""


@dataclass(frozen=True, slots=True)
class FieldCodec:
    """How to read and write one template field.

    ``code`` is the struct format of the field when fixed-length; ``conv`` maps the struct value to the Python
    value (``None``: the struct value already is it); ``from_bytes`` maps raw bytes (variable-length fields);
    ``to_bytes(value, length)`` encodes (``length`` None: variable length, natural size).
    """

    key: str
    data_type: str
    code: str
    conv: Callable[[Any], object] | None
    from_bytes: Callable[[bytes], object]
    to_bytes: Callable[[object, int | None], bytes]


def _int_of(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"field {key} wants an int, got {type(value).__name__}")
    return value


def _bytes_of(value: object, key: str) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise ValueError(f"field {key} wants hex text or bytes, got {value!r}") from None
    raise TypeError(f"field {key} wants hex text or bytes, got {type(value).__name__}")


def _fit(raw: bytes, length: int | None, key: str, pad: bytes = b"\x00") -> bytes:
    if length is None or len(raw) == length:
        return raw
    if len(raw) > length:
        raise ValueError(f"field {key}: value of {len(raw)} bytes exceeds field length {length}")
    return raw + pad * (length - len(raw))


def _natural_size(dtype: str) -> int:
    for size, suffix in ((1, "8"), (2, "16"), (4, "32"), (8, "64")):
        if dtype.endswith(suffix):
            return size
    return 8


def field_codec(ie_id: int, length: int, pen: int = 0) -> FieldCodec:
    """The codec of a template field. Raises ``FieldTypeError`` when the length cannot hold the type."""
    key = field_key(ie_id, pen)
    dtype = data_type(ie_id, pen)
    var = length == VARIABLE_LENGTH

    def bad(rule: str) -> FieldTypeError:
        return FieldTypeError(f"field {key} (id {ie_id}) of type {dtype} has length {length}; {rule}")

    if dtype.startswith(("unsigned", "dateTime", "signed")):
        signed = dtype.startswith("signed")
        natural = (
            4 if dtype == "dateTimeSeconds" else 8 if dtype.startswith("dateTime") else _natural_size(dtype)
        )
        post: Callable[[int], object] | None = None
        if dtype == "dateTimeMicroseconds":
            post = _ntp_us
        elif dtype == "dateTimeNanoseconds":
            post = _ntp_ns
        code_map = _SINT_CODE if signed else _UINT_CODE
        raw_conv: Callable[[bytes], object] = _sint if signed else _uint
        if post is not None:
            if length != 8 and not var:
                raise bad("NTP timestamps take 8 bytes")
            raw_conv = _raw_uint_then(post)

        def enc_int(value: object, size: int | None) -> bytes:
            number = _int_of(value, key)
            if post is _ntp_us:
                number = ((number // 1_000_000 + NTP_EPOCH_OFFSET) << 32) | (
                    ((number % 1_000_000) << 32) + 999_999
                ) // 1_000_000
            elif post is _ntp_ns:
                number = ((number // 1_000_000_000 + NTP_EPOCH_OFFSET) << 32) | (
                    ((number % 1_000_000_000) << 32) + 999_999_999
                ) // 1_000_000_000
            try:
                return number.to_bytes(natural if size is None else size, "big", signed=signed)
            except OverflowError:
                raise ValueError(f"field {key}: {value} does not fit in {size or natural} bytes") from None

        if not var and length in code_map:
            return FieldCodec(key, dtype, code_map[length], post, raw_conv, enc_int)
        return FieldCodec(key, dtype, f"{length}s", raw_conv, raw_conv, enc_int)

    if dtype in ("float32", "float64"):
        if length not in (4, 8):
            raise bad("floats take 4 or 8 bytes")
        fmt = struct.Struct("!f" if length == 4 else "!d")

        def enc_float(value: object, size: int | None) -> bytes:
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise TypeError(f"field {key} wants a float, got {type(value).__name__}")
            return fmt.pack(value)

        def float_raw(raw: bytes) -> object:
            return fmt.unpack(raw)[0] if len(raw) == fmt.size else raw.hex()

        return FieldCodec(key, dtype, "f" if length == 4 else "d", None, float_raw, enc_float)

    if dtype == "boolean":
        if length != 1:
            raise bad("booleans take 1 byte")

        def enc_bool(value: object, size: int | None) -> bytes:
            return b"\x01" if value else b"\x02"

        return FieldCodec(key, dtype, "B", _bool, lambda raw: raw == b"\x01", enc_bool)

    if dtype in ("ipv4Address", "ipv6Address"):
        family, size = (socket.AF_INET, 4) if dtype == "ipv4Address" else (socket.AF_INET6, 16)
        if length != size:
            raise bad(f"addresses take exactly {size} bytes")

        def enc_addr(value: object, _size: int | None) -> bytes:
            if not isinstance(value, str):
                raise TypeError(f"field {key} wants address text, got {type(value).__name__}")
            try:
                return socket.inet_pton(family, value)
            except OSError:
                raise ValueError(f"field {key}: {value!r} is not an {dtype}") from None

        conv = ipv4_text if size == 4 else ipv6_text
        return FieldCodec(key, dtype, f"{size}s", conv, conv, enc_addr)

    if dtype == "macAddress":
        if length != 6:
            raise bad("MAC addresses take 6 bytes")

        def enc_mac(value: object, _size: int | None) -> bytes:
            if not isinstance(value, str):
                raise TypeError(f"field {key} wants MAC text, got {type(value).__name__}")
            try:
                raw = bytes.fromhex(value.replace(":", "").replace("-", ""))
            except ValueError:
                raw = b""
            if len(raw) != 6:
                raise ValueError(f"field {key}: {value!r} is not a MAC address")
            return raw

        return FieldCodec(key, dtype, "6s", _mac, _mac, enc_mac)

    if dtype == "string":

        def enc_str(value: object, size: int | None) -> bytes:
            if not isinstance(value, str):
                raise TypeError(f"field {key} wants str, got {type(value).__name__}")
            return _fit(value.encode("utf-8"), size, key)

        return FieldCodec(key, dtype, "0s" if var else f"{length}s", _string, _string, enc_str)

    # octetArray, basicList/subTemplateList/subTemplateMultiList, unknown and enterprise elements.
    def enc_octets(value: object, size: int | None) -> bytes:
        raw = _bytes_of(value, key)
        if size is not None and len(raw) != size:
            raise ValueError(f"field {key}: value of {len(raw)} bytes, field length is {size}")
        return raw

    return FieldCodec(key, dtype, "0s" if var else f"{length}s", _hex, _hex, enc_octets)
