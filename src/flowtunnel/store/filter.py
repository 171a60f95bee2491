"""nfdump-style flow filters compiled to a parameterised SQL condition over the store's ``flows`` table.

People who live in nfdump think in its filters (``proto tcp and dst port 443 and net 10.0.0.0/8``), not in
SQL. This module reads that language, as nfdump 1.7 defines it (its ``grammar.y``/``scanner.l``), and turns a
filter into a SQL boolean expression plus its parameters: every value a user typed travels as a ``?``
parameter, never inside the SQL text, and every SQL fragment comes from a fixed table below.

Pure (no I/O, no DNS): ``compile_filter(text)`` returns a ``CompiledFilter`` or raises ``FilterError``, which
names the offending token, its line and column and, when one is near, the keyword that was meant
("unknown keyword 'prot' at column 1; did you mean 'proto'?").

Semantics follow nfdump's filter engine, including its less obvious choices:

* ``not`` binds tighter than ``and``, which binds tighter than ``or``; keywords are case-insensitive.
* Without ``src``/``dst`` a primitive matches either side (``port 80`` is src port 80 or dst port 80), and
  ``not port 80`` negates that whole disjunction.
* ``flags SA`` means: the flow is TCP and *all* of S and A are set; under a ``not`` it becomes "not TCP, or
  *none* of them set" (nfdump evaluates an inverted flags test as "any flag set" and negates that).
* A field the exporter did not send counts as 0 (nfdump's records are zero-filled), so ``not as 0`` does not
  match flows without AS numbers.
* Number suffixes k, m, g, t scale by 1000 (nfdump's scanner), not 1024.
* IPv4 addresses never match IPv6 flows and vice versa.

Limits (hostile input): ``MAX_FILTER_CHARS`` characters, ``MAX_DEPTH`` nested parentheses/``not``,
``MAX_PRIMITIVES`` primitives and ``MAX_LIST_ITEMS`` entries per ``in [ ... ]`` list.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from flowtunnel.store.errors import QueryError

__all__ = [
    "MAX_DEPTH",
    "MAX_FILTER_CHARS",
    "MAX_LIST_ITEMS",
    "MAX_PRIMITIVES",
    "NFDUMP_DST_PORT",
    "NFDUMP_SRC_PORT",
    "STAT_KEYS",
    "STAT_ORDERS",
    "CompiledFilter",
    "FilterError",
    "compile_filter",
    "parse_stat",
    "restrict_sql",
]

MAX_FILTER_CHARS: Final = 100_000
MAX_DEPTH: Final = 64
MAX_PRIMITIVES: Final = 256
MAX_LIST_ITEMS: Final = 10_000
_U64_MAX: Final = (1 << 64) - 1


class FilterError(QueryError):
    """A filter that does not parse or asks for something the store cannot answer.

    ``column`` and ``line`` are 1-based and point at the offending token; ``hint`` is a suggestion or ``""``.
    The message is one line, fit for a CLI error or a web form.
    """

    def __init__(
        self, message: str, *, line: int = 1, column: int = 1, token: str = "", hint: str = ""
    ) -> None:
        self.reason = message
        self.line = line
        self.column = column
        self.token = token
        self.hint = hint
        where = f"at column {column}" if line == 1 else f"at line {line} column {column}"
        text = f"{message} {where}"
        if hint:
            text += f"; {hint}"
        super().__init__(text)


@dataclass(frozen=True, slots=True, kw_only=True)
class CompiledFilter:
    """A filter as a SQL condition over ``flows`` columns (``where``) and its positional parameters."""

    text: str
    where: str
    params: tuple[object, ...]

    def select_sql(self, columns: str = "*") -> tuple[str, list[object]]:
        """``SELECT columns FROM flows WHERE <filter>`` and its parameters."""
        return f"SELECT {columns} FROM flows WHERE {self.where}", list(self.params)


# ------------------------------------------------------------------------------------------------ scanner

# Token kinds.
_NUM: Final = "number"
_STR: Final = "string"  # nfdump's STRING: [a-zA-Z0-9_:.-]+ that is neither a number nor a keyword
_KW: Final = "keyword"
_OP: Final = "op"  # comparators and punctuation
_END: Final = "end"

# nfdump's keywords (scanner.l), lower case, mapped to the token they stand for.
_KEYWORDS: Final[dict[str, str]] = {
    "any": "any", "ip": "ip", "host": "ip", "tunip": "tunip", "if": "if", "mac": "mac", "mpls": "mpls",
    "in": "in", "ident": "ident", "out": "out", "flags": "flags", "nfversion": "nfversion", "count": "count",
    "proto": "proto", "tun": "tun", "tos": "tos", "dir": "dir", "flowdir": "dir", "net": "net",
    "port": "port", "as": "as", "geo": "geo", "packets": "packets", "bytes": "bytes",
    "flowlabel": "flowlabel", "flows": "flows", "bpp": "bpp", "bps": "bps", "pps": "pps",
    "duration": "duration", "ipv4": "ipv4",
    "inet": "ipv4", "ipv6": "ipv6", "inet6": "ipv6", "icmp-type": "icmp-type", "icmp-code": "icmp-code",
    "engine-type": "engine-type", "engine-id": "engine-id", "src": "src", "dst": "dst", "next": "next",
    "prev": "prev", "previous": "prev", "ingress": "ingress", "egress": "egress", "bgpnext": "bgpnext",
    "router": "router", "vlan": "vlan", "mask": "mask", "fwdstat": "fwdstat", "client": "client",
    "server": "server", "app": "app", "latency": "latency", "sysid": "sysid", "observation": "observation",
    "domain": "domain", "point": "point", "id": "id", "asa": "asa", "event": "event", "denied": "denied",
    "xevent": "xevent", "xip": "xip", "xnet": "xnet", "xport": "xport", "acl": "acl", "ace": "ace",
    "xace": "xace", "nat": "nat", "vrf": "vrf", "nport": "nport", "pblock": "pblock", "start": "start",
    "end": "end", "step": "step", "size": "size", "nip": "nip", "payload": "payload", "content": "content",
    "regex": "regex", "ja3": "ja3",
    "and": "and", "or": "or", "not": "not",
    "eq": "=", "gt": ">", "lt": "<", "ge": ">=", "le": "<=",
    "ignore": "reason", "invalid": "reason", "create": "reason", "add": "reason", "term": "reason",
    "delete": "reason", "deny": "reason",
}
# Keywords that start a primitive or qualify one: what "did you mean" offers.
_SUGGEST: Final = sorted(
    k for k, v in _KEYWORDS.items() if v not in ("reason", "=", ">", "<", ">=", "<=") and len(k) > 1
)
_OPS: Final[dict[str, str]] = {
    "&&": "and", "||": "or", "!": "not", "==": "=", "=": "=", ">=": ">=", "<=": "<=", ">": ">", "<": "<",
    "(": "(", ")": ")", "[": "[", "]": "]", ",": ",", "/": "/", "%": "%",
}
_WORD_RE: Final = re.compile(r"[a-zA-Z0-9_:.\-]+")
_DEC_RE: Final = re.compile(r"[0-9]+([kmgtKMGT]?)")
_HEX_RE: Final = re.compile(r"0[xX][0-9A-Fa-f]+")
_SCALE: Final = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
_OP_RE: Final = re.compile(r"&&|\|\||==|>=|<=|[!=<>()\[\],/%]")


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str
    value: str  # keyword/op: canonical name; string: the text; number: the text
    text: str  # as written
    pos: int
    number: int = 0


def _show(text: str) -> str:
    """A token as an error message shows it: quoted, at most 40 characters, anything but printable ASCII
    escaped (a Cyrillic letter that looks like 'p' shows as '\\u0440')."""
    shown = text if len(text) <= 40 else text[:37] + "..."
    return repr(shown) if shown.isascii() and shown.isprintable() else ascii(shown)


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text

    def where(self, pos: int) -> tuple[int, int]:
        line = self.text.count("\n", 0, pos) + 1
        start = self.text.rfind("\n", 0, pos) + 1
        return line, pos - start + 1

    def error(self, message: str, pos: int, token: str = "", hint: str = "") -> FilterError:
        line, column = self.where(pos)
        return FilterError(message, line=line, column=column, token=token, hint=hint)

    def tokens(self) -> list[_Token]:
        text = self.text
        out: list[_Token] = []
        i = 0
        n = len(text)
        while i < n:
            ch = text[i]
            if ch in " \t\r\n":
                i += 1
                continue
            if ch == "#":  # a comment runs to the end of the line
                nl = text.find("\n", i)
                i = n if nl < 0 else nl
                continue
            if ch == "@":
                raise self.error("@include is not supported (filters cannot read files)", i, "@")
            if ch in "'\"":
                end = text.find(ch, i + 1)
                word = text[i : end + 1 if end >= 0 else n]
                raise self.error(
                    f"quoted string {_show(word)} is not supported (no payload filters)", i, word
                )
            m = _WORD_RE.match(text, i)
            if m:
                out.append(self._word(m.group(), i))
                i = m.end()
                continue
            m = _OP_RE.match(text, i)
            if m:
                out.append(_Token(_OP, _OPS[m.group()], m.group(), i))
                i = m.end()
                continue
            raise self.error(f"unexpected character {_show(ch)}", i, ch)
        out.append(_Token(_END, "", "", n))
        return out

    def _word(self, word: str, pos: int) -> _Token:
        dec = _DEC_RE.fullmatch(word)
        if dec:
            value = int(word[: len(word) - len(dec.group(1))]) * _SCALE[dec.group(1).lower()]
            return self._number(word, pos, value)
        if _HEX_RE.fullmatch(word):
            return self._number(word, pos, int(word, 16))
        kw = _KEYWORDS.get(word.lower())
        if kw is not None:
            kind = _OP if kw in ("and", "or", "not", "=", ">", "<", ">=", "<=") else _KW
            return _Token(kind, kw, word, pos)
        return _Token(_STR, word, word, pos)

    def _number(self, word: str, pos: int, value: int) -> _Token:
        if value > _U64_MAX:
            raise self.error(f"number {_show(word)} exceeds the 64-bit maximum {_U64_MAX}", pos, word)
        return _Token(_NUM, word, word, pos, value)


# ------------------------------------------------------------------------------------------------ tree


@dataclass(frozen=True, slots=True)
class _Leaf:
    """One SQL condition; ``negated`` is nfdump's meaning of ``not`` this leaf when it is not plain NOT."""

    sql: str
    params: tuple[object, ...]
    negated: tuple[str, tuple[object, ...]] | None = None


@dataclass(frozen=True, slots=True)
class _Not:
    child: _Node


@dataclass(frozen=True, slots=True)
class _Bool:
    op: str  # "AND" | "OR"
    children: tuple[_Node, ...]


_Node = _Leaf | _Not | _Bool

_TRUE: Final = _Leaf("TRUE", ())


def _all(*nodes: _Node) -> _Node:
    return nodes[0] if len(nodes) == 1 else _Bool("AND", nodes)


def _any(*nodes: _Node) -> _Node:
    return nodes[0] if len(nodes) == 1 else _Bool("OR", nodes)


# Numeric columns read as nfdump reads a missing field: 0.
def _num(column: str) -> str:
    return f"coalesce({column}, 0)"


def _swapped(column: str) -> str:
    return f"((({column}) & 255) * 256 + (({column}) // 256) % 256)"


_IS_ICMP: Final = "coalesce(protocol, 0) IN (1, 58)"
# Ports as nfdump's collector keeps them. For ICMP it sets the source port to 0 and puts type*256+code in
# the destination port, from the exporter's icmpTypeCode field (v9: IPv4 only; IPFIX: either), its separate
# type and code fields (v9), or a byte-swapped source port (a Cisco habit, v5 and IPFIX); v9 without them
# gets 0. The ICMP fields live in ``extra``: one JSON extraction binds them all (as ``j``).
_ICMP_FIELDS: Final = ("icmpTypeCodeIPv4", "icmpTypeCodeIPv6", "icmpTypeIPv4", "icmpCodeIPv4", "icmpTypeIPv6",
                       "icmpCodeIPv6")
_J: Final = {name: f"TRY_CAST(j[{i + 1}] AS BIGINT)" for i, name in enumerate(_ICMP_FIELDS)}
_FROM_PORTS: Final = (
    f"CASE WHEN coalesce(src_port, 0) <> 0 THEN {_swapped('src_port')} ELSE coalesce(dst_port, 0) END"
)
_ICMP_PORT: Final = (
    "list_transform([json_extract_string(extra, ["
    + ", ".join(f"'$.{name}'" for name in _ICMP_FIELDS)
    + "])], lambda j: CASE "
    f"WHEN version = 9 THEN coalesce(nullif({_J['icmpTypeCodeIPv4']}, 0), "
    f"256 * coalesce({_J['icmpTypeIPv4']}, {_J['icmpTypeIPv6']}, 0) "
    f"+ coalesce({_J['icmpCodeIPv4']}, {_J['icmpCodeIPv6']}, 0)) "
    f"WHEN version = 10 THEN coalesce(nullif(coalesce({_J['icmpTypeCodeIPv4']}, "
    f"{_J['icmpTypeCodeIPv6']}), 0), {_FROM_PORTS}) ELSE {_FROM_PORTS} END)[1]"
)
NFDUMP_SRC_PORT: Final = f"(CASE WHEN {_IS_ICMP} THEN 0 ELSE coalesce(src_port, 0) END)"
NFDUMP_DST_PORT: Final = f"(CASE WHEN {_IS_ICMP} THEN {_ICMP_PORT} ELSE coalesce(dst_port, 0) END)"
_SRC_PORT: Final = NFDUMP_SRC_PORT
_DST_PORT: Final = NFDUMP_DST_PORT
_IS_V6: Final = "(strpos(coalesce(src_addr, ''), ':') > 0 OR strpos(coalesce(dst_addr, ''), ':') > 0)"


def _v4_number(column: str) -> str:
    """SQL: the IPv4 address in text ``column`` as a BIGINT, NULL for anything else (IPv6, NULL)."""
    parts = " + ".join(
        f"TRY_CAST(split_part({column}, '.', {i + 1}) AS BIGINT) * {1 << (8 * (3 - i))}" for i in range(4)
    )
    return f"(CASE WHEN strpos({column}, ':') = 0 AND {column} LIKE '%.%.%.%' THEN {parts} END)"


def _v6_fixed(column: str) -> str:
    """SQL: the IPv6 address in text ``column`` in fixed-width form (8 groups of 4 lower-case hex digits),
    whose text order is the address order; NULL for IPv4 and NULL.

    ``list_transform([x], lambda v: ...)[1]`` names an intermediate value once instead of repeating its SQL.
    """
    # inet_ntop writes ::ffff:a.b.c.d and ::a.b.c.d with a dotted tail: make it two hex groups.
    quad = "list_transform([regexp_extract(v, '[0-9.]+$')], lambda q: printf('%x:%x', " + ", ".join(
        f"TRY_CAST(split_part(q, '.', {2 * i + 1}) AS INTEGER) * 256 + "
        f"TRY_CAST(split_part(q, '.', {2 * i + 2}) AS INTEGER)" for i in range(2)
    ) + "))[1]"
    hexed = (
        f"list_transform([lower({column})], lambda v: CASE WHEN strpos(v, '.') > 0 "
        f"THEN regexp_replace(v, '[0-9.]+$', '') || {quad} ELSE v END)[1]"
    )

    def groups(part: str) -> str:
        colons = f"length({part}) - length(replace({part}, ':', ''))"
        return f"(CASE WHEN {part} = '' THEN 0 ELSE {colons} + 1 END)"

    left, right = "split_part(t, '::', 1)", "split_part(t, '::', 2)"
    fill = f"rtrim(repeat('0:', 8 - {groups(left)} - {groups(right)}), ':')"
    full = (
        f"CASE WHEN strpos(t, '::') > 0 THEN concat_ws(':', nullif({left}, ''), nullif({fill}, ''), "
        f"nullif({right}, '')) ELSE t END"
    )
    fixed = (
        f"list_transform([{hexed}], lambda t: array_to_string(list_transform(string_split({full}, ':'), "
        "lambda g: lpad(g, 4, '0')), ':'))[1]"
    )
    return f"(CASE WHEN strpos({column}, ':') > 0 THEN {fixed} END)"


@dataclass(frozen=True, slots=True)
class _Address:
    """An address or network from a filter: its family, canonical text and bounds in SQL-comparable form."""

    version: int
    text: str  # canonical text as the store writes it (inet_ntop)
    low: object  # v4: int; v6: fixed-width text
    high: object
    prefix: int

    @property
    def is_host(self) -> bool:
        return self.prefix == (32 if self.version == 4 else 128)


def _fixed(addr: ipaddress.IPv6Address) -> str:
    return addr.exploded


def _ntop(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    return socket.inet_ntop(family, addr.packed)


_SLOW_PREFIX_COST: Final = 16


def _fast_prefix(net: _Address) -> bool:
    """Whether ``_prefix_leaf`` can use the text-prefix form (always for IPv4)."""
    if net.version == 4 or net.prefix == 0:
        return True
    groups = [int(g, 16) for g in str(net.low).split(":")]
    return all(groups[: (net.prefix - 1) // 16])


def _prefix_leaf(column: str, net: _Address) -> _Leaf:
    """``column`` (address text as ``inet_ntop`` writes it) lies in the network ``net``.

    Fast form: the address text starts with the network's leading parts as text (every part the prefix
    fixes whole, e.g. ``'172.'`` for 172.16.0.0/12), and the next part, read as a number, lies in the range
    the remaining prefix bits allow (16..31). That is exact for IPv4 and for IPv6 networks whose leading
    fixed groups are non-zero (no ``::`` can start inside them); other IPv6 networks compare the address in
    fixed-width form (slower), behind the same kind of text pre-check.
    """
    if net.version == 4:
        low = int(str(net.low))
        octets = [(low >> (24 - 8 * i)) & 0xFF for i in range(4)]
        if net.prefix == 0:
            return _Leaf(f"(strpos({column}, ':') = 0 AND {column} LIKE '%.%')", ())
        if net.prefix % 8 == 0 and net.prefix < 32:
            # Whole octets: the text prefix alone is exact (canonical dotted quads; no IPv6 text starts
            # with digits and a dot), and skips parsing the next octet of every row.
            return _Leaf(f"starts_with({column}, ?)", ("".join(f"{o}." for o in octets[:net.prefix // 8]),))
        fixed = (net.prefix - 1) // 8  # octets taken whole as text
        text = "".join(f"{o}." for o in octets[:fixed])
        span = 8 * (fixed + 1) - net.prefix  # bits of the next octet the prefix leaves free
        lo = octets[fixed] >> span << span
        part = f"TRY_CAST(split_part({column}, '.', {fixed + 1}) AS INTEGER)"
        hi = lo | ((1 << span) - 1)
        if not text:
            return _Leaf(f"(strpos({column}, ':') = 0 AND {part} BETWEEN ? AND ?)", (lo, hi))
        return _Leaf(f"(starts_with({column}, ?) AND {part} BETWEEN ? AND ?)", (text, lo, hi))
    groups = [int(g, 16) for g in str(net.low).split(":")]
    if net.prefix == 0:
        return _Leaf(f"strpos({column}, ':') > 0", ())
    fixed = (net.prefix - 1) // 16
    lead = groups[:fixed]
    if _fast_prefix(net):
        text = "".join(f"{g:x}:" for g in lead)
        span = 16 * (fixed + 1) - net.prefix
        lo = groups[fixed] >> span << span
        rest = f"split_part(substr({column}, {len(text) + 1}), ':', 1)"
        part = f"(CASE WHEN {rest} = '' THEN 0 ELSE TRY_CAST('0x' || {rest} AS INTEGER) END)"
        check = f"strpos({column}, ':') > 0" if not text else f"starts_with({column}, ?)"
        params: tuple[object, ...] = (text,) if text else ()
        return _Leaf(f"({check} AND {part} BETWEEN ? AND ?)", (*params, lo, lo | ((1 << span) - 1)))
    nonzero = []
    for g in lead:
        if not g:
            break
        nonzero.append(f"{g:x}:")
    text = "".join(nonzero)
    return _Leaf(
        f"(starts_with({column}, ?) AND {_v6_fixed(column)} BETWEEN ? AND ?)", (text, net.low, net.high)
    )


# ------------------------------------------------------------------------------------------------ parser

_DIRECTIONS: Final = ("src", "dst", "src_or_dst", "src_and_dst", "in", "out", "unspec")


class _Parser:
    """Recursive descent over nfdump's grammar; builds the tree of ``_Leaf``/``_Not``/``_Bool``."""

    def __init__(self, text: str) -> None:
        self.scanner = _Scanner(text)
        self.toks = self.scanner.tokens()
        self.i = 0
        self.depth = 0
        self.primitives = 0

    # -- helpers
    @property
    def tok(self) -> _Token:
        return self.toks[self.i]

    def peek(self, ahead: int = 1) -> _Token:
        return self.toks[min(self.i + ahead, len(self.toks) - 1)]

    def advance(self) -> _Token:
        tok = self.toks[self.i]
        if tok.kind != _END:
            self.i += 1
        return tok

    def at(self, kind: str, value: str | None = None) -> bool:
        tok = self.tok
        return tok.kind == kind and (value is None or tok.value == value)

    def error(self, message: str, tok: _Token | None = None, hint: str = "") -> FilterError:
        tok = tok or self.tok
        return self.scanner.error(message, tok.pos, tok.text, hint)

    def unexpected(self, wanted: str) -> FilterError:
        tok = self.tok
        if tok.kind == _END:
            return self.error(f"filter ends where {wanted} was expected")
        return self.error(f"expected {wanted}, found {_show(tok.text)}")

    def expect_op(self, value: str, wanted: str) -> _Token:
        if not self.at(_OP, value):
            raise self.unexpected(wanted)
        return self.advance()

    def count(self, n: int = 1) -> None:
        self.primitives += n
        if self.primitives > MAX_PRIMITIVES:
            raise self.error(
                f"filter has more than {MAX_PRIMITIVES} primitives (use 'in [ ... ]' lists; an IPv6 network "
                f"with a zero group in its prefix counts {_SLOW_PREFIX_COST})"
            )

    # -- expressions
    def parse(self) -> _Node:
        if self.at(_END):
            return _TRUE
        node = self.expr()
        if not self.at(_END):
            tok = self.tok
            if tok.kind == _OP and tok.value == ")":
                raise self.error("unbalanced ')'")
            raise self.error(f"expected 'and', 'or' or the end of the filter, found {_show(tok.text)}")
        return node

    def expr(self) -> _Node:
        items = [self.conj()]
        while self.at(_OP, "or"):
            self.advance()
            items.append(self.conj())
        return _any(*items)

    def conj(self) -> _Node:
        items = [self.unary()]
        while self.at(_OP, "and"):
            self.advance()
            items.append(self.unary())
        return _all(*items)

    def nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"filter nests deeper than {MAX_DEPTH} levels of parentheses and 'not'")

    def unary(self) -> _Node:
        if self.at(_OP, "not"):
            self.advance()
            self.nest()
            node: _Node = _Not(self.unary())
            self.depth -= 1
            return node
        if self.at(_OP, "("):
            opening = self.advance()
            self.nest()
            node = self.expr()
            if not self.at(_OP, ")"):
                if self.at(_END):
                    raise self.error("'(' is never closed", opening)
                raise self.unexpected("')'")
            self.advance()
            self.depth -= 1
            if self.at(_OP, "%"):
                raise self.error("flow labels ('%label') are not supported")
            return node
        return self.term()

    # -- primitives
    def term(self) -> _Node:
        tok = self.tok
        if tok.kind == _STR:
            close = difflib.get_close_matches(tok.text.lower(), _SUGGEST, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else ""
            raise self.error(f"unknown keyword {_show(tok.text)}", hint=hint)
        if tok.kind == _END:
            raise self.error("filter ends where a primitive (proto, host, net, port, ...) was expected")
        if tok.kind != _KW:
            raise self.error(f"expected a primitive (proto, host, net, port, ...), found {_show(tok.text)}")
        self.count()
        simple: dict[str, Callable[[], _Node]] = {
            "any": self.any_, "ipv4": self.family, "ipv6": self.family, "proto": self.proto,
            "flags": self.flags, "flows": self.flows, "duration": self.duration, "nfversion": self.nfversion,
            "icmp-type": self.icmp, "icmp-code": self.icmp, "router": self.router,
        }
        if tok.value in simple:
            return simple[tok.value]()
        if tok.value == "next" and self.peek().kind == _KW and self.peek().value == "ip":
            return self.next_ip()
        direction = self.dqual()
        what = self.tok
        handlers: dict[str, Callable[[str, _Token], _Node]] = {
            "ip": self.ip, "net": self.net, "port": self.port, "as": self.as_, "if": self.if_,
            "packets": self.counter, "bytes": self.counter, "tos": self.tos,
        }
        if what.kind == _KW and what.value in handlers:
            self.advance()
            return handlers[what.value](direction, what)
        if what.kind == _KW and what.value in _UNSUPPORTED:
            reason = _UNSUPPORTED[what.value]
            raise self.error(f"{_show(what.text)} filters are not supported: {reason}", what)
        if direction != "unspec":
            raise self.unexpected("host, net, port, as, if, packets, bytes or tos")
        if what.kind == _KW and what.value in _UNSUPPORTED_START:
            raise self.error(
                f"{_show(what.text)} filters are not supported: {_UNSUPPORTED_START[what.value]}", what
            )
        raise self.error(f"{_show(what.text)} cannot start a primitive", what)

    def dqual(self) -> str:
        tok = self.tok
        if tok.kind != _KW or tok.value not in ("src", "dst", "in", "out", "prev", "next"):
            return "unspec"
        self.advance()
        if tok.value in ("src", "dst"):
            other = "dst" if tok.value == "src" else "src"
            nxt, after = self.tok, self.peek()
            if nxt.kind == _OP and nxt.value in ("or", "and") and after.kind == _KW and after.value == other:
                self.advance()
                self.advance()
                return "src_or_dst" if nxt.value == "or" else "src_and_dst"
            return tok.value
        if tok.value in ("in", "out"):
            nxt = self.tok
            if nxt.kind == _KW and nxt.value in ("src", "dst"):
                raise self.error(f"'{tok.value} {nxt.value}' (MAC address direction) is not supported", nxt)
            return tok.value
        what = self.tok
        raise self.error(
            f"'{tok.text} {what.text}' is not supported: the store keeps no previous/next AS", tok
        )

    def sided(self, direction: str, keyword: _Token, make: Callable[[str], _Node]) -> _Node:
        """The primitive for the source (``make("src")``), the destination, or both as ``direction`` says;
        only the sides asked for are built (each counts against the primitive limit)."""
        if direction in ("src", "dst"):
            return make(direction)
        if direction == "src_and_dst":
            return _all(make("src"), make("dst"))
        if direction in ("unspec", "src_or_dst"):
            return _any(make("src"), make("dst"))
        raise self.error(f"'{direction}' cannot qualify {_show(keyword.text)}: use src or dst", keyword)

    def comp(self) -> str:
        if self.tok.kind == _OP and self.tok.value in ("=", ">", "<", ">=", "<="):
            return self.advance().value
        return "="

    def number(self, what: str, maximum: int = _U64_MAX) -> int:
        tok = self.tok
        if tok.kind != _NUM:
            raise self.unexpected(what)
        self.advance()
        if tok.number > maximum:
            raise self.error(f"{what} {tok.number} is out of range 0..{maximum}", tok)
        return tok.number

    def any_(self) -> _Node:
        self.advance()
        return _TRUE

    def family(self) -> _Node:
        tok = self.advance()
        return _Leaf(_IS_V6, ()) if tok.value == "ipv6" else _Not(_Leaf(_IS_V6, ()))

    def proto(self) -> _Node:
        self.advance()
        return _Leaf(f"{_num('protocol')} = ?", (self.protocol(),))

    def protocol(self) -> int:
        tok = self.tok
        if tok.kind == _NUM:
            return self.number("protocol number", 255)
        if tok.kind in (_STR, _KW):
            number = _PROTOCOLS.get(tok.text.lower())
            if number is None:
                raise self.error(
                    f"unknown protocol {_show(tok.text)}", hint="give its number, e.g. 'proto 47'"
                )
            self.advance()
            return number
        raise self.unexpected("a protocol name or number")

    def flags(self) -> _Node:
        self.advance()
        tcp = _Leaf(f"{_num('protocol')} = 6", ())
        tok = self.tok
        if tok.kind == _NUM or (tok.kind == _OP and tok.value in ("=", ">", "<", ">=", "<=")):
            op = self.comp()
            value = self.number("TCP flags value", 63)
            return _all(tcp, _Leaf(f"{_num('tcp_flags')} & 63 {op} ?", (value,)))
        if tok.kind == _STR or (tok.kind == _KW and tok.value == "as"):  # 'AS' lexes as a keyword
            self.advance()
            mask = 0
            for ch in tok.text.upper():
                if ch not in _FLAG_BITS:
                    raise self.error(
                        f"unknown TCP flag {ch!r} in {_show(tok.text)}", tok,
                        hint="flags are letters of FSRPAUX",
                    )
                mask |= _FLAG_BITS[ch]
            return _all(
                tcp,
                _Leaf(
                    f"{_num('tcp_flags')} & ? = ?", (mask, mask),
                    negated=(f"{_num('tcp_flags')} & ? = 0", (mask,)),
                ),
            )
        raise self.unexpected("TCP flags (letters of FSRPAUX) or a number")

    def flows(self) -> _Node:
        self.advance()
        op = self.comp()
        return _Leaf(f"1 {op} ?", (self.number("flow count"),))

    def duration(self) -> _Node:
        self.advance()
        op = self.comp()
        value = self.number("duration in milliseconds")
        span = "coalesce(epoch_ms(flow_end) - epoch_ms(flow_start), 0)"
        return _Leaf(f"{span} {op} ?", (value,))

    def nfversion(self) -> _Node:
        self.advance()
        op = self.comp()
        return _Leaf(f"{_num('version')} {op} ?", (self.number("NetFlow version", 10),))

    def icmp(self) -> _Node:
        tok = self.advance()
        value = self.number(f"ICMP {tok.value[5:]}", 255)
        part = f"{_DST_PORT} // 256" if tok.value == "icmp-type" else f"{_DST_PORT} % 256"
        return _all(_Leaf(_IS_ICMP, ()), _Leaf(f"{part} = ?", (value,)))

    def router(self) -> _Node:
        self.advance()
        if not (self.tok.kind == _KW and self.tok.value == "ip"):
            raise self.unexpected("'ip' after 'router'")
        self.advance()
        addr = self.address(host=True)
        return _Leaf("exporter = ?", (addr.text,))

    def next_ip(self) -> _Node:
        self.advance()
        self.advance()
        if self.at(_KW, "in"):
            self.advance()
            return self.in_list("next_hop", *self.address_list())
        addr = self.address(host=True)
        return _Leaf("next_hop = ?", (addr.text,))

    # -- address primitives
    def address(self, *, host: bool) -> _Address:
        tok = self.tok
        if tok.kind not in (_STR, _NUM):
            raise self.unexpected("an IP address")
        self.advance()
        return self.parse_address(tok, host=host)

    def parse_address(self, tok: _Token, *, host: bool, prefix: int | None = None) -> _Address:
        text = tok.text
        if ":" in text:
            try:
                v6 = ipaddress.IPv6Address(text)
            except ValueError:
                raise self.error(f"invalid IPv6 address {_show(text)}", tok) from None
            bits = 128 if prefix is None else prefix
            if bits > 128:
                raise self.error(f"prefix length {bits} exceeds 128 for IPv6 address {_show(text)}", tok)
            net6 = ipaddress.IPv6Network((int(v6) >> (128 - bits) << (128 - bits), bits))
            return _Address(6, _ntop(net6.network_address), _fixed(net6.network_address),
                            _fixed(net6.broadcast_address), bits)
        if any(c.isalpha() for c in text):
            raise self.error(
                f"{_show(text)} is not an IP address (host names are not resolved)", tok,
                hint="give the address, e.g. 'host 192.0.2.7'",
            )
        parts = text.split(".")
        if len(parts) > 4 or any(not p.isdigit() or int(p) > 255 for p in parts):
            raise self.error(f"invalid IPv4 address {_show(text)}", tok)
        if host and prefix is None and len(parts) != 4:
            raise self.error(f"incomplete IPv4 address {_show(text)}", tok, hint="give all four parts")
        value = 0
        for i in range(4):
            value = (value << 8) | (int(parts[i]) if i < len(parts) else 0)
        bits = 32 if prefix is None else prefix
        if bits > 8 * len(parts):
            raise self.error(f"prefix length {bits} is too long for {_show(text)}", tok)
        low = value >> (32 - bits) << (32 - bits) if bits else 0
        high = low | ((1 << (32 - bits)) - 1)
        return _Address(4, _ntop(ipaddress.IPv4Address(low)), low, high, bits)

    def match(self, column: str, addr: _Address) -> _Leaf:
        if addr.is_host:
            return _Leaf(f"{column} = ?", (addr.text,))
        if not _fast_prefix(addr):
            # The fixed-width IPv6 form is a large expression: DuckDB takes ~30 ms to plan each.
            self.count(_SLOW_PREFIX_COST - 1)
        return _prefix_leaf(column, addr)

    def ip(self, direction: str, keyword: _Token) -> _Node:
        if self.at(_KW, "in"):
            self.advance()
            hosts, nets = self.address_list()
            return self.sided(direction, keyword, lambda side: self.in_list(f"{side}_addr", hosts, nets))
        addr = self.address(host=True)
        return self.sided(direction, keyword, lambda side: self.match(f"{side}_addr", addr))

    def address_list(self) -> tuple[list[str], list[_Address]]:
        """``[ a b/n c, ... ]`` after ``in``: the hosts' canonical texts and the networks."""
        opening = self.expect_op("[", "'[' to open the address list")
        hosts: list[str] = []
        nets: list[_Address] = []
        while not self.at(_OP, "]"):
            if self.at(_OP, ","):
                self.advance()
                continue
            tok = self.tok
            if tok.kind not in (_STR, _NUM):
                raise self.unexpected("an IP address or ']'")
            self.advance()
            if self.at(_OP, "/"):
                self.advance()
                bits = self.number("prefix length", 128)
                nets.append(self.parse_address(tok, host=False, prefix=bits))
                self.count()
            else:
                hosts.append(self.parse_address(tok, host=True).text)
            if len(hosts) + len(nets) > MAX_LIST_ITEMS:
                raise self.error(f"list has more than {MAX_LIST_ITEMS} entries", tok)
        if not hosts and not nets:
            raise self.error("empty list", opening)
        self.advance()
        return sorted(set(hosts)), nets

    def in_list(self, column: str, hosts: list[str], nets: list[_Address]) -> _Node:
        # Hosts travel as one list parameter; each network is one range test.
        parts: list[_Node] = []
        if hosts:
            parts.append(_Leaf(f"list_contains(?::VARCHAR[], {column})", (hosts,)))
        parts.extend(self.match(column, net) for net in nets)
        return _any(*parts)

    def net(self, direction: str, keyword: _Token) -> _Node:
        tok = self.tok
        if tok.kind not in (_STR, _NUM):
            raise self.unexpected("a network (address/bits or address mask)")
        self.advance()
        if self.at(_OP, "/"):
            self.advance()
            bits = self.number("prefix length", 128)
            addr = self.parse_address(tok, host=False, prefix=bits)
            return self.sided(direction, keyword, lambda side: self.match(f"{side}_addr", addr))
        if self.tok.kind in (_STR, _NUM):
            mask_tok = self.advance()
            if ":" in tok.text:
                raise self.error("the 'net ADDRESS MASK' form is for IPv4 only: use ADDRESS/BITS", tok)
            addr = self.parse_address(tok, host=True)
            mask = self.parse_address(mask_tok, host=True)
            if mask.version != 4:
                raise self.error(f"invalid netmask {_show(mask_tok.text)}", mask_tok)
            value = int(str(addr.low)) & int(str(mask.low))
            return self.sided(
                direction, keyword,
                lambda side: _Leaf(f"({_v4_number(side + '_addr')} & ?) = ?", (mask.low, value)),
            )
        raise self.unexpected("'/BITS' or a netmask after the network address")

    # -- numeric primitives
    def numeric_list(self, what: str, maximum: int) -> list[int]:
        opening = self.expect_op("[", "'[' to open the list")
        values: list[int] = []
        while not self.at(_OP, "]"):
            if self.at(_OP, ","):
                self.advance()
                continue
            values.append(self.number(what, maximum))
            if len(values) > MAX_LIST_ITEMS:
                raise self.error(f"list has more than {MAX_LIST_ITEMS} entries")
        if not values:
            raise self.error("empty list", opening)
        self.advance()
        return sorted(set(values))

    def compared(
        self, direction: str, keyword: _Token, src: str, dst: str, what: str, maximum: int, cast: str
    ) -> _Node:
        columns = {"src": src, "dst": dst}
        if self.at(_KW, "in"):
            self.advance()
            values = self.numeric_list(what, maximum)
            return self.sided(
                direction, keyword,
                lambda side: _Leaf(f"list_contains(?::{cast}[], {columns[side]})", (values,)),
            )
        op = self.comp()
        value = self.number(what, maximum)
        return self.sided(direction, keyword, lambda side: _Leaf(f"{columns[side]} {op} ?", (value,)))

    def port(self, direction: str, keyword: _Token) -> _Node:
        return self.compared(direction, keyword, _SRC_PORT, _DST_PORT, "port", 65535, "BIGINT")

    def as_(self, direction: str, keyword: _Token) -> _Node:
        return self.compared(
            direction, keyword, _num("src_as"), _num("dst_as"), "AS number", 0xFFFFFFFF, "BIGINT"
        )

    def if_(self, direction: str, keyword: _Token) -> _Node:
        value = self.number("interface number", 0xFFFFFFFF)
        src = _Leaf(f"{_num('in_if')} = ?", (value,))
        dst = _Leaf(f"{_num('out_if')} = ?", (value,))
        if direction == "in":
            return src
        if direction == "out":
            return dst
        if direction == "unspec":
            return _any(src, dst)
        raise self.error(f"'{direction.replace('_', ' ')}' cannot qualify 'if': use in or out", keyword)

    def counter(self, direction: str, keyword: _Token) -> _Node:
        if direction == "out":
            raise self.error(
                f"'out {keyword.text}' is not supported: the store keeps no reverse counters", keyword
            )
        if direction not in ("unspec", "in"):
            raise self.error(f"{_show(keyword.text)} takes no src/dst qualifier", keyword)
        op = self.comp()
        value = self.number(f"{keyword.value} count")
        return _Leaf(f"{_num(keyword.value)} {op} ?", (value,))

    def tos(self, direction: str, keyword: _Token) -> _Node:
        if direction not in ("unspec", "src"):
            raise self.error("only the source ToS is stored: use 'tos' or 'src tos'", keyword)
        op = self.comp()
        return _Leaf(f"{_num('tos')} {op} ?", (self.number("ToS", 255),))


_FLAG_BITS: Final = {"F": 1, "S": 2, "R": 4, "P": 8, "A": 16, "U": 32, "X": 63}

_PROTOCOLS: Final[dict[str, int]] = {
    "icmp": 1, "igmp": 2, "ggp": 3, "ipip": 4, "st": 5, "tcp": 6, "cbt": 7, "egp": 8, "igp": 9, "pup": 12,
    "udp": 17, "rdp": 27, "dccp": 33, "ipv6": 41, "rsvp": 46, "gre": 47, "esp": 50, "ah": 51, "icmp6": 58,
    "eigrp": 88, "ospf": 89, "etherip": 97, "encap": 98, "pim": 103, "ipcomp": 108, "vrrp": 112,
    "l2tp": 115, "isis4": 124, "sctp": 132, "udp-l": 136,
}

_NOT_STORED: Final = "the store keeps no such field"
_UNSUPPORTED: Final[dict[str, str]] = {
    "tunip": _NOT_STORED, "mac": _NOT_STORED, "vlan": _NOT_STORED, "mask": _NOT_STORED,
    "geo": "no geo database", "xnet": _NOT_STORED, "xport": _NOT_STORED, "xip": _NOT_STORED,
    "nip": _NOT_STORED, "nport": _NOT_STORED,
}
_UNSUPPORTED_START: Final[dict[str, str]] = {
    "ident": _NOT_STORED, "count": "record numbers depend on read order", "tun": _NOT_STORED,
    "dir": _NOT_STORED, "flowlabel": "flow labels are not supported", "bpp": "not implemented",
    "bps": "not implemented", "pps": "not implemented", "engine-type": _NOT_STORED,
    "engine-id": _NOT_STORED, "bgpnext": "next_hop holds the IP next hop (or the BGP one when only that "
    "was exported): use 'next ip'", "fwdstat": _NOT_STORED, "client": _NOT_STORED, "server": _NOT_STORED,
    "app": _NOT_STORED, "sysid": _NOT_STORED, "observation": _NOT_STORED, "asa": "no NSEL events",
    "nat": "no NAT events", "pblock": "no NAT events", "payload": "no payloads", "mpls": _NOT_STORED,
    "ingress": "no NSEL events", "egress": "no NSEL events",
}


# ------------------------------------------------------------------------------------------------ SQL


def _emit(node: _Node, negate: bool, params: list[object]) -> str:
    """SQL for ``node`` (negated when ``negate``), negation pushed to the leaves as nfdump does it."""
    if isinstance(node, _Not):
        return _emit(node.child, not negate, params)
    if isinstance(node, _Bool):
        op = node.op if not negate else ("OR" if node.op == "AND" else "AND")
        return _balanced(node.children, op, negate, params)
    if node is _TRUE:
        return "FALSE" if negate else "TRUE"
    if negate and node.negated is not None:
        sql, values = node.negated
        params.extend(values)
        return f"coalesce({sql}, FALSE)"
    params.extend(node.params)
    leaf = f"coalesce({node.sql}, FALSE)"
    return f"NOT {leaf}" if negate else leaf


def _balanced(nodes: tuple[_Node, ...], op: str, negate: bool, params: list[object]) -> str:
    # A balanced tree keeps DuckDB's expression depth logarithmic in the number of primitives.
    if len(nodes) == 1:
        return _emit(nodes[0], negate, params)
    mid = len(nodes) // 2
    left = _balanced(nodes[:mid], op, negate, params)
    right = _balanced(nodes[mid:], op, negate, params)
    return f"({left} {op} {right})"


def compile_filter(text: str) -> CompiledFilter:
    """Parse the nfdump-style ``text`` and return its SQL condition over ``flows`` with parameters.

    An empty filter (or only whitespace and comments) selects every flow. Error handling: ``FilterError``
    (a ``QueryError``) with the line, column and token at fault; nothing is ever executed here.
    """
    if not isinstance(text, str):
        raise FilterError(f"a filter is text, got {type(text).__name__}")
    if len(text) > MAX_FILTER_CHARS:
        raise FilterError(
            f"filter of {len(text)} characters exceeds the limit of {MAX_FILTER_CHARS}",
            column=MAX_FILTER_CHARS + 1,
        )
    tree = _Parser(text).parse()
    params: list[object] = []
    where = _emit(tree, False, params)
    return CompiledFilter(text=text, where=where, params=tuple(params))


def restrict_sql(sql: str, flt: CompiledFilter) -> tuple[str, list[object]]:
    """``sql`` (one SELECT/EXPLAIN over ``flows``) rewritten so that ``flows`` holds only the filter's rows.

    The filter becomes a common table expression named ``flows`` over the stored table, so the user's SQL
    runs unchanged; the filter's parameters come first (they precede the user's SQL in the text).
    """
    cte = f"flows AS (SELECT * FROM main.flows WHERE {flt.where})"
    body = _strip_leading_comments(sql)
    prefix = ""
    m = re.match(r"(?is)explain(\s+analyze)?\s+", body)
    if m:
        prefix, body = body[: m.end()], body[m.end() :]
    m = re.match(r"(?is)with(\s+recursive)?\s+", body)
    rewritten = f"{body[: m.end()]}{cte}, {body[m.end() :]}" if m else f"WITH {cte} {body}"
    return prefix + rewritten, list(flt.params)


def _strip_leading_comments(sql: str) -> str:
    body = sql.lstrip()
    while True:
        if body.startswith("--"):
            nl = body.find("\n")
            body = "" if nl < 0 else body[nl + 1 :].lstrip()
        elif body.startswith("/*"):
            end = body.find("*/")
            body = "" if end < 0 else body[end + 2 :].lstrip()
        else:
            return body


# ------------------------------------------------------------------------------------------------ -s stats

# nfdump's ``-s`` statistic names → store columns (for ``flowtunnel top``).
STAT_KEYS: Final[dict[str, str]] = {
    "srcip": "src_addr", "dstip": "dst_addr", "srcport": "src_port", "dstport": "dst_port",
    "proto": "protocol", "srcas": "src_as", "dstas": "dst_as", "inif": "in_if", "outif": "out_if",
    "nhip": "next_hop", "router": "exporter", "tos": "tos", "srctos": "tos",
}
STAT_ORDERS: Final = ("bytes", "packets", "flows")


def parse_stat(spec: str, columns: tuple[str, ...]) -> tuple[str, str | None]:
    """``srcip/bytes`` (nfdump's ``-s``) or a column name → (column, order or None); ``ValueError`` names
    the choices. ``columns`` are the store columns that can be ranked."""
    key, _, order = spec.strip().lower().partition("/")
    column = STAT_KEYS.get(key, key)
    if column not in columns:
        names = sorted({*STAT_KEYS, *columns})
        raise ValueError(f"cannot rank by {key!r}: choose one of {', '.join(names)}")
    if not order:
        return column, None
    if order not in STAT_ORDERS:
        raise ValueError(f"cannot order by {order!r}: choose one of {', '.join(STAT_ORDERS)}")
    return column, order
