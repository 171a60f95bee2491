"""The agent's upload path does not import aiohttp (the gateway's server library): its HTTP is its own client
over h11/wsproto; aiohttp comes in only with ``--metrics-listen`` or a PAC file fetched over HTTP."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
from pathlib import Path

from tests.agent.chain import AgentProc, GatewayProc, enroll_agent, wait_until
from tests.peers import free_udp_port


def test_the_agent_path_imports_no_aiohttp() -> None:
    code = ("import sys; import flowtunnel.cli.agent; from flowtunnel.agent.service import run_agent; "
            "from flowtunnel.agent.uploader import Uploader; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('aiohttp', 'dnslib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"  # dnslib too: it loads only when the dns rung is used


def test_the_agent_path_and_sealing_import_no_numpy_nor_the_netflow_decoder() -> None:
    """issue 14: numpy (~13 MB, ~0.1 s) is only for decoding at the gateway; the columnar encoder transposes
    with strided slices. The netflow package loads its decoder, fields and encoder on first use only."""
    code = (
        "import os, sys; import flowtunnel.cli.agent; from flowtunnel.agent.service import run_agent; "
        "from flowtunnel.datagram import Datagram; from flowtunnel.wire import Codec, seal_batch; "
        "p = bytes.fromhex('0009000100000001000000000000000100000000') + bytes.fromhex('010000080000000a'); "
        "d = [Datagram(received_ns=1, exporter='192.0.2.1', exporter_port=1, local_port=2, payload=p)] * 9; "
        "[seal_batch(agent_id='a', key=bytes(32), first_seq=1, datagrams=d, nonce=bytes(12), codec=c) "
        " for c in (None, Codec.COLUMNAR_LZMA, Codec.DELTA_LZMA, Codec.ZSTD_DICT)]; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'numpy' "
        "or m in ('flowtunnel.netflow.decoder', 'flowtunnel.netflow.fields', 'flowtunnel.netflow.encoder')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_the_agent_path_imports_neither_wsproto_nor_urllib_request_nor_email() -> None:
    """issue 14: wsproto builds a 64 KiB table at import (~18 ms, ~1.4 MB) and loads with the first WebSocket
    connection only; the environment's proxy is read by ``proxy.discover`` (``urllib.request`` would bring
    ``http.client`` and ``email``, ~1.3 MB); ``email.utils`` loads only for a ``Retry-After`` date. Building
    an uploader's rungs (the ws rung among them) imports none of them either."""
    code = (
        "import asyncio, sys, tempfile; from pathlib import Path; import flowtunnel.cli.agent; "
        "from flowtunnel.agent.service import run_agent; from flowtunnel.agent.uploader import Uploader; "
        "from flowtunnel.agent.config import AgentConfig; from flowtunnel.log import DurableLog, LogConfig; "
        "d = Path(tempfile.mkdtemp()); "
        "cfg = AgentConfig(gateway='http://127.0.0.1:9', spool=d, agent_id='a', key='A' * 43 + '=', "
        "rungs=('post', 'ws', 'get'), proxy='none'); "
        "spool = DurableLog(LogConfig(path=d / 's.sqlite', quota_bytes=0)); "
        "up = Uploader(cfg, bytes(32), spool); asyncio.run(up._build(cfg.gateway)); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('wsproto', 'email', 'http') "
        "or m == 'urllib.request'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_the_agent_path_and_sealing_do_not_load_cryptography() -> None:
    """issue 14: cryptography's Rust extension (OpenSSL linked in) costs ~8 MB of RSS at import; batches are
    sealed with libsodium's ChaCha20-Poly1305 (PyNaCl, ~1 MB). cryptography loads only for x509 after a pin
    mismatch, or for pyspnego's NTLM."""
    code = (
        "import sys; import flowtunnel.cli.agent; from flowtunnel.agent.service import run_agent; "
        "from flowtunnel.agent.uploader import Uploader; from flowtunnel.datagram import Datagram; "
        "from flowtunnel.wire import open_batch, seal_batch; "
        "d = [Datagram(received_ns=1, exporter='192.0.2.1', exporter_port=1, local_port=2, "
        "payload=b'x' * 40)]; "
        "body = seal_batch(agent_id='a', key=bytes(32), first_seq=1, datagrams=d, nonce=bytes(12)); "
        "assert open_batch(body, key=bytes(32)).datagrams == tuple(d); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_the_agent_path_loads_no_openssl() -> None:
    """issue 14: ``hashlib`` and ``hmac`` (and ``secrets``, which imports ``hmac``) load OpenSSL's libcrypto,
    ~3.6 MB of RSS; the agent's digests (acknowledgement and probe MACs, key fingerprints, the context id)
    use libsodium, already loaded to seal (``wire/digest.py``). Checked on ``flowtunnel agent``'s own path
    (``ssl`` hidden as the CLI does for a plain-HTTP gateway), through sealing, an acknowledgement checked
    and a key made."""
    code = (
        "import sys; from flowtunnel.cli import _agent_tls; "
        "_agent_tls(['agent', '--gateway', 'http://127.0.0.1:9']); "
        "import flowtunnel.cli.agent; from flowtunnel.agent.service import run_agent; "
        "from flowtunnel.agent.uploader import Uploader; from flowtunnel.agent.receiver import Receiver; "
        "import flowtunnel.agent.transport.http11, flowtunnel.agent.transport.network; "
        "from flowtunnel.datagram import Datagram; "
        "from flowtunnel.wire import seal_batch, verify_ack, ack_tag, generate_key; "
        "from flowtunnel.wire.keys import key_fingerprint; "
        "d = [Datagram(received_ns=1, exporter='192.0.2.1', exporter_port=1, local_port=2, "
        "payload=b'x' * 40)]; "
        "seal_batch(agent_id='a', key=bytes(32), first_seq=1, datagrams=d, nonce=bytes(12)); "
        "t = ack_tag(bytes(32), agent_id='a', request_nonce=bytes(12), acked=1); "
        "verify_ack(bytes(32), agent_id='a', request_nonce=bytes(12), acked=1, tag=t); "
        "key_fingerprint(generate_key()); "
        "print(sorted(m for m in sys.modules "
        "if m in ('hashlib', '_hashlib', 'hmac', 'secrets', 'ssl', '_ssl') and sys.modules[m] is not None), "
        "[line.split()[-1] for line in open('/proc/self/maps') if 'libcrypto' in line][:1])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[] []"


def test_an_agent_on_the_websocket_rung_loads_no_openssl(tmp_path: Path) -> None:
    """issue 14: the ladder moves batches to ws once POST carried one, and wsproto's handshake imports
    ``hashlib`` for one SHA-1, which mapped libcrypto into the agent (~3 MB of RSS: 33.5 MB peak at 1,000
    flows/s against 29.1 on POST). ``transport/ws.py`` imports wsproto with CPython's built-in SHA-1. A real
    ``flowtunnel agent`` (plain-HTTP gateway: no ``ssl`` either) on ws after its first batches."""
    data = tmp_path / "gw"
    key = enroll_agent(data, "site-ws")
    port = free_udp_port()
    spool = tmp_path / "spool"
    with GatewayProc(data).start() as gw, AgentProc(spool, gateway=gw.url, agent_id="site-ws", key=key,
                                                     port=port).start() as agent:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for i in range(1, 7):
                # a NetFlow v9 header (export sequence i) and one data set of 4 bytes
                sock.sendto(struct.pack(">HHIIII", 9, 1, 1, 0, i, 0) + bytes.fromhex("010000080000000a"),
                            ("127.0.0.1", port))
                wait_until(lambda i=i: gw.acked("site-ws") >= i, "acknowledged")  # type: ignore[misc]
        wait_until(lambda: (agent.status() or {}).get("upload", {}).get("rung") == "ws", "the agent on ws")
        assert agent.proc is not None
        maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
        assert [line.split()[-1] for line in maps.splitlines() if "libcrypto" in line][:1] == []
        assert agent.stop() == 0
