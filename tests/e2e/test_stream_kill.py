"""kill -9 of either side while a quiet site's batches go as frames of a compression stream (docs/protocol.md
section 3.4): real ``flowtunnel agent`` and ``flowtunnel gateway`` processes, the datagrams paced like a quiet
exporter so the agent seals stream frames; the journal must end with every datagram exactly once, in order,
and the stream must go on (a new one) after the restart.

The v9 datagrams carry their index as the export packet sequence, which proves order and uniqueness."""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from flowtunnel.wire import lzstream
from tests.agent.chain import AgentProc, GatewayProc, enroll_agent, journal, v9_sequence, wait_until
from tests.agent.test_uploader import v9_export
from tests.peers import free_udp_port

pytestmark = pytest.mark.skipif(not lzstream.SUPPORTED, reason="liblzma not loadable")

AGENT = "site-s"
RATE = 8.0  # datagrams/s of ~950 bytes: a quiet site, sealed as stream frames (policy.TIGHT)
QUIET = ["--latency", "0.5s"]
N = 80


def send(payloads: Sequence[bytes], port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for p in payloads:
            sock.sendto(p, ("127.0.0.1", port))
            time.sleep(1 / RATE)


def quiet_agent(spool: Path, gw: GatewayProc, key: str, port: int) -> AgentProc:
    return AgentProc(spool, gateway=gw.url, agent_id=AGENT, key=key, port=port, extra=QUIET).start()


def stream_batches(agent: AgentProc) -> int:
    return int(((agent.status() or {}).get("upload") or {}).get("stream_batches", 0))


def _check_journal(data: Path) -> None:
    entries = journal(data, AGENT)
    assert [seq for seq, _ in entries] == list(range(1, N + 1))
    assert [v9_sequence(d.payload) for _, d in entries] == list(range(N))


def test_kill_9_agent_mid_stream_of_stream_frames(tmp_path: Path) -> None:
    payloads = [d.payload for d in v9_export(N, seed=5)]
    data = tmp_path / "gw"
    key = enroll_agent(data, AGENT)
    spool = tmp_path / "spool"
    port = free_udp_port()
    with GatewayProc(data).start() as gw:
        with quiet_agent(spool, gw, key, port) as agent:
            send(payloads[: N // 2], port)
            wait_until(lambda: agent.spooled_last_seq() == N // 2, "first half spooled")
            wait_until(lambda: stream_batches(agent) >= 3, "stream frames acknowledged")
            agent.kill9()
        with quiet_agent(spool, gw, key, port) as agent:
            send(payloads[N // 2 :], port)
            wait_until(lambda: gw.acked(AGENT) == N, "everything acknowledged")
            assert stream_batches(agent) >= 3  # the new process streams too, in a stream of its own
            assert agent.stop() == 0
        assert gw.stop() == 0
    _check_journal(data)


def test_kill_9_gateway_mid_stream_of_stream_frames(tmp_path: Path) -> None:
    payloads = [d.payload for d in v9_export(N, seed=6)]
    data = tmp_path / "gw"
    key = enroll_agent(data, AGENT)
    port = free_udp_port()
    gw = GatewayProc(data).start()
    with gw, AgentProc(tmp_path / "spool", gateway=gw.url, agent_id=AGENT, key=key, port=port,
                       extra=QUIET).start() as agent:
        send(payloads[: N // 2], port)
        wait_until(lambda: stream_batches(agent) >= 3, "stream frames acknowledged")
        gw.kill9()
        before = stream_batches(agent)
        gw.start()  # same port, same data directory, no stream held
        send(payloads[N // 2 :], port)
        wait_until(lambda: gw.acked(AGENT) == N, "everything acknowledged after the restart")
        assert stream_batches(agent) >= before + 3
        assert agent.stop() == 0
        assert gw.stop() == 0
    _check_journal(data)
