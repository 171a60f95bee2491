"""The wire bench's baselines are real protocol bytes: the firepass-style request goes through a real
tinyproxy (Basic auth) to a real HTTP server, which gets the datagram back from the base64 body; the
DNS-tunnel
query and response parse with dpkt and the query name carries the chunk in base32 within DNS's limits. The
offline
transforms seal batches that open back to the same datagrams."""

from __future__ import annotations

import base64
import http.server
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import dpkt
import pytest

import wire
from _common import raw_udp_bytes
from flowtunnel.wire import Codec, open_batch, seal_batch
from tests.peers import Tinyproxy, require


class _Recorder(http.server.BaseHTTPRequestHandler):
    bodies: list[tuple[str, bytes]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        _Recorder.bodies.append((self.path, self.rfile.read(length)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    _Recorder.bodies = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def test_firepass_request_is_accepted_by_a_real_proxy_and_carries_the_datagram(
    tmp_path: Path, http_server: int
) -> None:
    require("tinyproxy")
    payload = os.urandom(1377)
    user, password = wire.FIREPASS_PROXY_AUTH.split(":")
    request = wire.firepass_request(payload, host="127.0.0.1", port=http_server)
    assert request.startswith(f"POST http://127.0.0.1:{http_server}/".encode())
    with Tinyproxy(tmp_path, auth=(user, password)) as proxy:
        answer = _exchange(proxy.port, request)
    assert answer.startswith(b"HTTP/1.")
    assert b" 200 " in answer.split(b"\r\n")[0]
    [(path, body)] = _Recorder.bodies
    assert path.startswith(wire.FIREPASS_PATH)
    assert base64.b64decode(body) == payload
    # what is counted is exactly what was sent: head + base64 body
    head, _, sent_body = request.partition(b"\r\n\r\n")
    assert sent_body == body
    assert len(request) == len(head) + 4 + len(base64.b64encode(payload))


def test_firepass_bytes_count_every_request_and_response() -> None:
    payloads = [b"a" * 10, b"b" * 200]
    expected = sum(len(wire.firepass_request(p)) for p in payloads) + 2 * len(wire.firepass_response())
    assert wire.firepass_bytes(payloads) == expected
    response = dpkt.http.Response(wire.firepass_response())
    assert response.status == "200"


def test_dns_query_carries_the_chunk_in_base32_labels_within_dns_limits() -> None:
    chunk = os.urandom(wire.DNS_PAYLOAD_PER_QUERY)
    query = wire.dns_query(chunk, qid=7)
    msg = dpkt.dns.DNS(query)
    assert msg.id == 7
    [question] = msg.qd
    assert question.type == dpkt.dns.DNS_TXT
    labels = question.name.split(".")
    zone = wire.DNS_ZONE.split(".")
    assert labels[-len(zone) :] == zone
    data_labels = labels[: -len(zone)]
    assert all(len(label) <= 63 for label in labels)
    assert len(question.name) + 2 <= 255  # wire form: a length byte per label and the root
    text = "".join(data_labels).upper()
    decoded = base64.b32decode(text + "=" * (-len(text) % 8))
    assert decoded[wire.DNS_CLIENT_ID + wire.DNS_FRAMING :] == chunk
    assert len(msg.ar) == 1  # EDNS0 OPT


def test_dns_response_echoes_the_question_and_answers_txt() -> None:
    query = wire.dns_query(b"x" * 50, qid=99)
    msg = dpkt.dns.DNS(wire.dns_response(query))
    assert msg.id == 99
    assert msg.qr == dpkt.dns.DNS_R
    assert msg.qd[0].name == dpkt.dns.DNS(query).qd[0].name
    [answer] = msg.an
    assert answer.type == dpkt.dns.DNS_TXT


def test_dns_sizes_per_query_as_documented() -> None:
    # 8-byte client id + 2 framing bytes + 134 bytes = 144 bytes -> 231 base32 chars in 4 labels (+4 length
    # bytes), zone t.example.com (15 bytes with the root): name 250; header 12, type/class 4, OPT 11.
    query = wire.dns_query(bytes(wire.DNS_PAYLOAD_PER_QUERY))
    assert len(query) == 12 + 250 + 4 + 11
    # response: header, echoed question, answer (pointer, type, class, ttl, rdlength, empty TXT), OPT
    assert len(wire.dns_response(query)) == 12 + 254 + 2 + 10 + 1 + 11


def test_dns_chunks_reassemble_the_length_prefixed_stream() -> None:
    payloads = [os.urandom(n) for n in (1, 133, 134, 135, 1400)]
    chunks = wire.dns_chunks(payloads)
    assert all(len(c) <= wire.DNS_PAYLOAD_PER_QUERY for c in chunks)
    stream = b"".join(chunks)
    pos, out = 0, []
    while pos < len(stream):
        n = int.from_bytes(stream[pos : pos + 2], "big")
        out.append(stream[pos + 2 : pos + 2 + n])
        pos += 2 + n
    assert out == payloads
    per_query = len(wire.dns_query(bytes(134))) + len(wire.dns_response(wire.dns_query(bytes(134)))) + 56
    assert wire.dns_bytes([bytes(132)]) == per_query  # 2 + 132 = one full query


@pytest.mark.parametrize("codec", [Codec.ZSTD_DICT, Codec.COLUMNAR, None])
def test_offline_sealing_round_trips(codec: Codec | None) -> None:
    payloads = [bytes([5]) + bytes(23) + os.urandom(48) for _ in range(20)]
    items = wire._datagrams(payloads, 500.0)
    for batch in wire._batches(items, 7):
        body = seal_batch(
            agent_id="bench", key=wire._KEY, first_seq=1, datagrams=list(batch), nonce=wire._NONCE,
            codec=codec,
        )
        opened = open_batch(body, key=wire._KEY)
        assert list(opened.datagrams) == list(batch)
    total = wire._sealed(codec, 6, True)(wire._batches(items, 7))
    assert total > 0


def test_raw_udp_bytes_adds_ip_and_udp_headers() -> None:
    assert raw_udp_bytes([b"x" * 100, b"y" * 50]) == 150 + 2 * 28
