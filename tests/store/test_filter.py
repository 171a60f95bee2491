"""The nfdump-style filter compiler: what each primitive selects, how errors point at the fault, and that
hostile text never reaches the SQL (values travel as parameters) nor crashes or hangs the compiler."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from collections.abc import Iterator

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowtunnel.store import QueryError, top_sql
from flowtunnel.store.filter import (
    MAX_DEPTH,
    MAX_FILTER_CHARS,
    MAX_PRIMITIVES,
    CompiledFilter,
    FilterError,
    compile_filter,
    parse_stat,
    restrict_sql,
)
from flowtunnel.store.query import TOP_KEYS
from flowtunnel.store.schema import FLOW_COLUMNS

# name: (src, dst, sport, dport, proto, flags, packets, bytes, in_if, out_if, src_as, dst_as, next_hop, tos,
#        version, duration ms, extra)
ROWS = {
    "web": ("10.1.2.3", "192.0.2.7", 51000, 443, 6, 0x1A, 10, 15_000, 1, 2, 65000, 0, "10.0.0.254", 0, 9,
            120, None),
    "dns6": ("2001:db8::1", "2001:db8:1::5", 53, 4000, 17, 0, 1, 80, 3, 4, 0, 0, None, 32, 10, 0, None),
    "ping6": ("fe80::1:2", "::1", None, None, 58, None, 2, 100, None, None, None, None, None, None, 10, 5,
              '{"icmpTypeCodeIPv6": 32768}'),
    "syn": ("172.16.5.4", "10.200.0.1", 5000, 80, 6, 0x02, 3, 180, 5, 6, 1, 2, None, 0, 5, 1000, None),
    "ping": ("192.168.1.1", "10.0.0.9", 0, 2048, 1, 0, 1, 84, 1, 1, 0, 0, None, 0, 5, 0, None),
    "gre": ("198.51.100.1", "203.0.113.9", 0, 0, 47, 0, 2_000_000, 1_500_000_000, 2, 2, 0, 0, None, 184, 10,
            10, None),
}


@pytest.fixture(scope="module")
def conn() -> Iterator[duckdb.DuckDBPyConnection]:
    c = duckdb.connect()
    c.execute("SET TimeZone = 'UTC'")
    columns = ", ".join(f"{n} {t.replace(' NOT NULL', '')}" for n, t in FLOW_COLUMNS)
    c.execute(f"CREATE TABLE flows ({columns})")
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for name, r in ROWS.items():
        c.execute(
            "INSERT INTO flows (agent, exporter, version, src_addr, dst_addr, src_port, dst_port, protocol, "
            "tcp_flags, packets, bytes, in_if, out_if, src_as, dst_as, next_hop, tos, flow_start, flow_end, "
            "extra, received) VALUES (?, '127.0.0.1', " + ", ".join(["?"] * 19) + ")",
            [name, r[14], *r[:14], start, start + dt.timedelta(milliseconds=r[15]), r[16], start],
        )
    yield c
    c.close()


def select(conn: duckdb.DuckDBPyConnection, text: str) -> set[str]:
    flt = compile_filter(text)
    rows = conn.execute(f"SELECT agent FROM flows WHERE {flt.where}", list(flt.params)).fetchall()
    return {r[0] for r in rows}


ALL = set(ROWS)


@pytest.mark.parametrize(("text", "expected"), [
    ("", ALL),
    ("  # only a comment\n", ALL),
    ("any", ALL),
    ("not any", set()),
    ("proto tcp", {"web", "syn"}),
    ("PROTO TCP", {"web", "syn"}),
    ("proto 47", {"gre"}),
    ("proto icmp6", {"ping6"}),
    ("ipv6", {"dns6", "ping6"}),
    ("inet", ALL - {"dns6", "ping6"}),
    ("host 10.0.0.9", {"ping"}),
    ("src host 10.0.0.9", set()),
    ("ip 2001:db8::1", {"dns6"}),
    ("host 2001:0DB8:0000::0001", {"dns6"}),
    ("net 10.0.0.0/8", {"web", "syn", "ping"}),
    ("src net 10/8", {"web"}),
    ("dst net 10.200.0.0/16", {"syn"}),
    ("net 10.1.2.3/8", {"web", "syn", "ping"}),
    ("net 10.0.0.0 255.0.0.0", {"web", "syn", "ping"}),
    ("net 172.16.0.0 255.240.0.0", {"syn"}),
    ("net 2001:db8::/32", {"dns6"}),
    ("dst net 2001:db8:1::/48", {"dns6"}),
    ("net ::/0", {"dns6", "ping6"}),
    ("net 0.0.0.0/0", ALL - {"dns6", "ping6"}),
    ("src and dst net 10/8", set()),
    ("src or dst net 172.16/12", {"syn"}),
    ("ip in [ 10.1.2.3 2001:db8::/32 ]", {"web", "dns6"}),
    ("dst ip in [192.0.2.7, ::1]", {"web", "ping6"}),
    ("port 80", {"syn"}),
    ("port 53", {"dns6"}),
    ("not port 80", ALL - {"syn"}),
    ("dst port > 1024", {"dns6", "ping", "ping6"}),
    ("dst port gt 1024", {"dns6", "ping", "ping6"}),
    ("src port >= 51000", {"web"}),
    ("dst port == 0x50", {"syn"}),
    ("port in [ 80, 53 ]", {"syn", "dns6"}),
    ("dst port 32768", {"ping6"}),  # ICMPv6 echo: nfdump's type*256+code in the destination port
    ("icmp-type 8", {"ping"}),
    ("icmp-type 128", {"ping6"}),
    ("icmp-code 0", {"ping", "ping6"}),
    ("as 65000", {"web"}),
    ("as 0", ALL - {"syn"}),
    ("not as 0", {"syn"}),
    ("src as < 10", ALL - {"web"}),
    ("dst as in [2 3]", {"syn"}),
    ("in if 3", {"dns6"}),
    ("out if 6", {"syn"}),
    ("if 2", {"web", "gre"}),
    ("bytes > 1k", {"web", "gre"}),
    ("bytes > 15000", {"gre"}),
    ("bytes >= 1G", {"gre"}),
    ("bytes < 1g", ALL - {"gre"}),
    ("packets > 1M", {"gre"}),
    ("in packets 1", {"dns6", "ping"}),
    ("flows 1", ALL),
    ("flows > 1", set()),
    ("flags S", {"web", "syn"}),
    ("flags SA", {"web"}),
    ("flags AS", {"web"}),
    ("flags sa", {"web"}),
    ("flags S and not flags AFRPU", {"syn"}),
    ("not flags SA", ALL - {"web", "syn"}),  # nfdump: not TCP, or none of S and A
    ("flags 2", {"syn"}),
    ("flags > 2", {"web"}),
    ("tos 32", {"dns6"}),
    ("src tos > 100", {"gre"}),
    ("next ip 10.0.0.254", {"web"}),
    ("next ip in [10.0.0.254 10.0.0.253]", {"web"}),
    ("router ip 127.0.0.1", ALL),
    ("nfversion 5", {"syn", "ping"}),
    ("duration > 100", {"web", "syn"}),
    ("duration 0", {"dns6", "ping"}),
    ("proto tcp and port 80", {"syn"}),
    ("proto tcp && port 80", {"syn"}),
    ("port 80 or port 53", {"syn", "dns6"}),
    ("port 80 || port 53 || proto 47", {"syn", "dns6", "gre"}),
    ("not proto tcp and not proto udp", {"ping6", "ping", "gre"}),
    ("!(proto tcp or proto udp)", {"ping6", "ping", "gre"}),
    ("not port 80 and proto tcp", {"web"}),
    ("proto udp or proto tcp and port 80", {"dns6", "syn"}),  # and binds tighter than or
    ("(proto udp or proto tcp) and port 80", {"syn"}),
    ("not not proto tcp", {"web", "syn"}),
    ("proto tcp and (flags R || bytes > 10k) and not src as 0", {"web"}),
    ("proto\ttcp\nand\n  dst port 443 # https\n", {"web"}),
])
def test_filter_selects(conn: duckdb.DuckDBPyConnection, text: str, expected: set[str]) -> None:
    assert select(conn, text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("prot tcp", "unknown keyword 'prot' at column 1; did you mean 'proto'?"),
    ("proto tcp and prot udp", "unknown keyword 'prot' at column 15; did you mean 'proto'?"),
    ("proto tcp and\n  dstt port 80", "unknown keyword 'dstt' at line 2 column 3; did you mean 'dst'?"),
    ("nexthop 10.0.0.1", "unknown keyword 'nexthop' at column 1; did you mean 'next'?"),
    ("proto tcpp", "unknown protocol 'tcpp' at column 7; give its number, e.g. 'proto 47'"),
    ("proto 256", "protocol number 256 is out of range 0..255 at column 7"),
    ("port 65536", "port 65536 is out of range 0..65535 at column 6"),
    ("port", "filter ends where port was expected at column 5"),
    ("port eq", "filter ends where port was expected at column 8"),
    ("host 10.0", "incomplete IPv4 address '10.0' at column 6; give all four parts"),
    ("host 10.0.0.256", "invalid IPv4 address '10.0.0.256' at column 6"),
    ("host 2001:db8:::1", "invalid IPv6 address '2001:db8:::1' at column 6"),
    ("host example.org", "'example.org' is not an IP address (host names are not resolved) at column 6; "
                         "give the address, e.g. 'host 192.0.2.7'"),
    ("net 10.0.0.0/33", "prefix length 33 is too long for '10.0.0.0' at column 5"),
    ("net 10.0/24", "prefix length 24 is too long for '10.0' at column 5"),
    ("net 2001:db8:: ffff::", "the 'net ADDRESS MASK' form is for IPv4 only: use ADDRESS/BITS at column 5"),
    ("(proto tcp", "'(' is never closed at column 1"),
    ("proto tcp)", "unbalanced ')' at column 10"),
    ("proto tcp port 80", "expected 'and', 'or' or the end of the filter, found 'port' at column 11"),
    ("proto tcp and",
     "filter ends where a primitive (proto, host, net, port, ...) was expected at column 14"),
    ("flags SZ", "unknown TCP flag 'Z' in 'SZ' at column 7; flags are letters of FSRPAUX"),
    ("out bytes > 1", "'out bytes' is not supported: the store keeps no reverse counters at column 5"),
    ("dst tos 4", "only the source ToS is stored: use 'tos' or 'src tos' at column 5"),
    ("src if 3", "'src' cannot qualify 'if': use in or out at column 5"),
    ("vlan 4", "'vlan' filters are not supported: the store keeps no such field at column 1"),
    ("payload content 'x'", "quoted string \"'x'\" is not supported (no payload filters) at column 17"),
    ("@include /etc/passwd", "@include is not supported (filters cannot read files) at column 1"),
    ("port 99999999999999999999999", "number '99999999999999999999999' exceeds the 64-bit maximum "
                                     "18446744073709551615 at column 6"),
    ("port != 80", "expected port, found '!' at column 6"),
    ("port in []", "empty list at column 9"),
    ("\u03c1ort 80", "unexpected character '\\u03c1' at column 1"),
])
def test_errors_point_at_the_offending_token(text: str, message: str) -> None:
    with pytest.raises(FilterError) as info:
        compile_filter(text)
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_error_carries_line_column_token_and_hint() -> None:
    with pytest.raises(FilterError) as info:
        compile_filter("proto tcp and\n   prot udp")
    err = info.value
    assert (err.line, err.column, err.token, err.hint) == (2, 4, "prot", "did you mean 'proto'?")
    assert isinstance(err, QueryError)  # the query paths and the CLI report it like any bad query


# ---------------------------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize("text", [
    "host 1.2.3.4'; DROP TABLE flows; --",
    "port 80 or 1=1",
    "port 80) OR (1=1",
    "net 10.0.0.0/8 UNION SELECT * FROM duckdb_settings()",
    "proto tcp; COPY flows TO '/tmp/x.csv'",
    "host \"1.2.3.4\"",
    "port 80 -- comment",
    "port 80 /* c */",
    "proto read_csv('x')",
    "dst port 80 and src_addr = src_addr",
])
def test_sql_in_a_filter_is_refused(conn: duckdb.DuckDBPyConnection, text: str) -> None:
    with pytest.raises(FilterError):
        compile_filter(text)
    assert conn.execute("SELECT count(*) FROM flows").fetchone() == (len(ROWS),)


def test_values_travel_as_parameters_never_in_the_sql() -> None:
    flt = compile_filter("host 10.9.8.7 and dst port 4242 and as 31337 and net 2001:db8:abcd::/48 and "
                         "ip in [192.0.2.55] and bytes > 7777")
    for value in ("10.9.8.7", "4242", "31337", "abcd", "192.0.2.55", "7777"):
        assert value not in flt.where
    assert "10.9.8.7" in flt.params
    assert 4242 in flt.params
    assert ["192.0.2.55"] in flt.params


@pytest.mark.parametrize("text", [
    "host \uff46\uff45\uff18\uff10::1",
    "proto \uff54\uff43\uff50",
    "port 8\uff10",
    "port 80 and host 10.0.0.1\u202e",
    "host 10.0.0.1\x00",
    "port 80 \U0001f4a9",
    "\x1b[31mproto tcp",
    "\u03c1ort 80",
])
def test_unicode_is_refused_with_the_character_escaped(text: str) -> None:
    with pytest.raises(FilterError) as info:
        compile_filter(text)
    message = str(info.value)
    assert message.isprintable()
    assert message.isascii()


def test_length_is_bounded() -> None:
    compile_filter(" " * MAX_FILTER_CHARS)
    with pytest.raises(FilterError, match=f"exceeds the limit of {MAX_FILTER_CHARS}"):
        compile_filter("any " + " " * MAX_FILTER_CHARS)


@pytest.mark.parametrize("text", [
    "(" * 10_000 + "any" + ")" * 10_000,
    "not " * 10_000 + "any",
    "! " * 10_000 + "any",
])
def test_nesting_is_bounded(text: str) -> None:
    with pytest.raises(FilterError, match=f"deeper than {MAX_DEPTH} levels"):
        compile_filter(text)


def test_nesting_up_to_the_limit_compiles_and_runs(conn: duckdb.DuckDBPyConnection) -> None:
    text = "(" * MAX_DEPTH + "proto tcp" + ")" * MAX_DEPTH
    assert select(conn, text) == {"web", "syn"}
    assert select(conn, "not " * MAX_DEPTH + "proto tcp") == {"web", "syn"}


def test_primitives_are_bounded_and_a_long_chain_runs(conn: duckdb.DuckDBPyConnection) -> None:
    with pytest.raises(FilterError, match=f"more than {MAX_PRIMITIVES} primitives"):
        compile_filter(" or ".join(["port 1"] * (MAX_PRIMITIVES + 1)))
    # The longest allowed chain stays within DuckDB's expression depth (the SQL tree is balanced).
    chain = " or ".join([*(f"port {i}" for i in range(10_000, 10_000 + MAX_PRIMITIVES - 1)), "port 443"])
    assert select(conn, chain) == {"web"}
    chain = " and ".join(["not port 1"] * (MAX_PRIMITIVES - 1) + ["proto 47"])
    assert select(conn, chain) == {"gre"}


def test_a_long_list_is_one_parameter(conn: duckdb.DuckDBPyConnection) -> None:
    ports = " ".join(str(p) for p in range(10_000, 18_000))
    flt = compile_filter(f"dst port in [ {ports} 443 ]")
    assert len(flt.params) == 1
    assert select(conn, f"dst port in [ {ports} 443 ]") == {"web"}
    hosts = " ".join(f"10.9.{i // 256}.{i % 256}" for i in range(5000))
    assert select(conn, f"src ip in [ {hosts} 10.1.2.3 ]") == {"web"}


@pytest.mark.parametrize("text", [
    "port 1 or " * 10_000, "(" * MAX_FILTER_CHARS, "a" * MAX_FILTER_CHARS, "port in [ " + "1 " * 49_000 + "]",
    "ip in [ " + "10.0.0.1/32 " * 8000 + "]", "proto tcp and " * 8000,
])
def test_worst_case_input_is_refused(text: str) -> None:
    # Each refusal comes from a bound (length, nesting, primitives, list size), not from a deep recursion.
    with pytest.raises(FilterError):
        compile_filter(text[:MAX_FILTER_CHARS])


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_compiles_or_fails_with_a_filter_error(text: str) -> None:
    try:
        flt = compile_filter(text)
    except FilterError as exc:
        message = str(exc)
    else:
        assert isinstance(flt, CompiledFilter)
        return
    assert "\n" not in message


_WORDS = st.sampled_from([
    "proto", "tcp", "udp", "icmp", "6", "src", "dst", "host", "ip", "net", "port", "as", "if", "in", "out",
    "bytes", "packets", "flags", "SA", "tos", "and", "or", "not", "(", ")", "[", "]", ",", "/", ">", "<", "=",
    "10.0.0.1", "10.0.0.0/8", "2001:db8::1", "::/0", "80", "1k", "0x10", "any", "next", "255.0.0.0", "eq",
    "&&", "||", "!", "#", "\n",
])


@settings(max_examples=400, deadline=None)
@given(st.lists(_WORDS, max_size=14))
def test_whatever_compiles_runs_in_duckdb(conn: duckdb.DuckDBPyConnection, words: list[str]) -> None:
    try:
        flt = compile_filter(" ".join(words))
    except FilterError:
        return
    conn.execute(f"SELECT count(*) FROM flows WHERE {flt.where}", list(flt.params)).fetchall()


# ---------------------------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(("sql", "expected"), [
    ("SELECT agent FROM flows", {"web", "syn"}),
    ("  -- a comment\n/* another */ select agent from flows", {"web", "syn"}),
    ("WITH t AS (SELECT agent FROM flows) SELECT agent FROM t", {"web", "syn"}),
    ("with recursive t AS (SELECT agent FROM flows) SELECT agent FROM t", {"web", "syn"}),
    ("SELECT agent FROM flows WHERE bytes > 1000", {"web"}),
])
def test_restrict_sql_makes_flows_hold_only_the_filtered_rows(
    conn: duckdb.DuckDBPyConnection, sql: str, expected: set[str]
) -> None:
    text, params = restrict_sql(sql, compile_filter("proto tcp"))
    assert {r[0] for r in conn.execute(text, params).fetchall()} == expected


def test_restrict_sql_keeps_explain(conn: duckdb.DuckDBPyConnection) -> None:
    text, params = restrict_sql("EXPLAIN SELECT count(*) FROM flows", compile_filter("port 80"))
    assert text.startswith("EXPLAIN WITH flows AS")
    conn.execute(text, params).fetchall()


def test_top_sql_applies_the_filter(conn: duckdb.DuckDBPyConnection) -> None:
    sql, params = top_sql(by="dst_port", order="flows", now=dt.datetime.now(dt.UTC),
                          flow_filter=compile_filter("proto tcp"))
    assert {r[0] for r in conn.execute(sql, params).fetchall()} == {443, 80}


@pytest.mark.parametrize(("spec", "expected"), [
    ("srcip/bytes", ("src_addr", "bytes")),
    ("dstport/flows", ("dst_port", "flows")),
    ("proto/packets", ("protocol", "packets")),
    ("srcas", ("src_as", None)),
    ("DSTAS/Bytes", ("dst_as", "bytes")),
    ("inif", ("in_if", None)),
    ("nhip", ("next_hop", None)),
    ("router", ("exporter", None)),
    ("dst_port", ("dst_port", None)),
])
def test_parse_stat_knows_nfdump_spellings(spec: str, expected: tuple[str, str | None]) -> None:
    assert parse_stat(spec, TOP_KEYS) == expected


@pytest.mark.parametrize(("spec", "message"), [
    ("srcip/bps", "cannot order by 'bps': choose one of bytes, packets, flows"),
    ("geo", "cannot rank by 'geo'"),
])
def test_parse_stat_names_the_choices(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_stat(spec, TOP_KEYS)


_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ntop(addr: _IP) -> str:
    return socket.inet_ntop(socket.AF_INET if addr.version == 4 else socket.AF_INET6, addr.packed)


# Addresses near interesting boundaries: zero runs (where '::' moves), all-ones groups, IPv4 octet edges.
_V6_GROUPS = st.sampled_from([0, 0, 0, 1, 0xDB8, 0x2001, 0xFE80, 0xFFFF, 0x8000, 0x7FFF, 0x10])
_V6 = st.lists(_V6_GROUPS, min_size=8, max_size=8).map(
    lambda gs: ipaddress.IPv6Address(sum(g << (16 * (7 - i)) for i, g in enumerate(gs)))
)
_V4_OCTETS = st.sampled_from([0, 1, 10, 15, 16, 31, 32, 127, 128, 172, 192, 255])
_V4 = st.lists(_V4_OCTETS, min_size=4, max_size=4).map(lambda os: ipaddress.IPv4Address(bytes(os)))


@settings(max_examples=600, deadline=None)
@given(st.one_of(
    st.tuples(_V4, _V4, st.integers(0, 32)),
    st.tuples(_V6, _V6, st.integers(0, 128)),
))
def test_net_matches_exactly_the_addresses_inside(
    conn: duckdb.DuckDBPyConnection,
    case: tuple[_IP, _IP, int],
) -> None:
    """The fast text-prefix form and the fixed-width form agree with ``ipaddress`` on every address,
    including those inet_ntop writes with '::' in any place or with a dotted IPv4 tail."""
    addr, base, bits = case
    network = ipaddress.ip_network(f"{base}/{bits}", strict=False)
    flt = compile_filter(f"src net {network.network_address}/{bits}")
    sql = f"SELECT count(*) FROM (SELECT CAST(? AS VARCHAR) AS src_addr) WHERE {flt.where}"
    row = conn.execute(sql, [_ntop(addr), *flt.params]).fetchone()
    assert row == (int(addr in network),), (_ntop(addr), str(network))


def test_ipv6_networks_that_need_the_slow_form_count_more(conn: duckdb.DuckDBPyConnection) -> None:
    # 2001:db8:0:N::/64 has a zero group inside its prefix: matched through the large fixed-width form.
    nets = [f"src net 2001:db8:0:{i:x}::/64" for i in range(1, 17)]
    assert select(conn, " or ".join(nets)) == set()
    with pytest.raises(FilterError, match="counts 16"):
        compile_filter(" or ".join([*nets, "src net 2001:db8:0:99::/64"]))
    # Fast-form networks count one each.
    compile_filter(" or ".join(f"src net 2001:db8:{i:x}::/48" for i in range(1, MAX_PRIMITIVES + 1)))
