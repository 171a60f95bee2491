"""Attacks on the path between a real agent and a real gateway: replayed requests, forged answers, stolen
logs. The link emulator sits in the middle and, like a curious proxy, records every request it carries.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from flowtunnel.wire import COMPACT_ACK_BYTES, parse_compact_ack
from tests.conftest import require
from tests.linkemu import Action, Fault, Mode
from tests.reliability.harness import AgentProc, exported, find_leaks, stack

#: these tests replay and forge POST requests: on the default ladder batches go by ws after the first one
POST_ONLY = ("--rungs", "post")


async def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, object]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await reader.readexactly(length)
    finally:
        writer.close()
    status = int(head.split(b" ", 2)[1])
    if status == 200 and request.startswith(b"POST /v1/b ") and len(body) == COMPACT_ACK_BYTES:
        acked, tag = parse_compact_ack(body)  # the agent's default route answers 24 bytes, not JSON
        return status, {"acked": acked, "tag": tag}
    doc = json.loads(body) if body else {}
    return status, doc


async def test_replaying_every_recorded_agent_request_adds_nothing(tmp_path: Path) -> None:
    require("softflowd")
    payloads, _ = await asyncio.to_thread(exported, 9, 2000)
    async with stack(tmp_path, record=True, agent_args=POST_ONLY) as st:
        await st.send(payloads[:80])
        await st.drained(80)
        recorded = list(st.link.recorded)
        posts = [r for r in recorded if r.startswith(b"POST /v1/b ")]
        assert len(posts) >= 2  # at least the resynchronisation and one batch
        for round_ in ("live", "after a gateway restart"):
            for request in recorded:
                status, doc = await raw_exchange(st.gateway.port, request)
                assert status == 200, (round_, status, doc)
                if request.startswith(b"POST") and "accepted" in doc:
                    assert doc["accepted"] == 0, (round_, doc)  # compact answers: the journal says below
            if round_ == "live":
                await st.gateway.kill9()
                await st.gateway.start()
        await st.stop()
        journal = await asyncio.to_thread(st.journal)
    mine = [(seq, payload) for stream, seq, payload in journal if stream == st.agent_id]
    assert [seq for seq, _ in mine] == list(range(1, 81))
    assert [p for _, p in mine] == list(payloads[:80])


async def test_a_forged_acknowledgement_on_the_path_loses_nothing(tmp_path: Path) -> None:
    """Regression (found by this suite): unauthenticated acks let anyone on the path make the agent trim
    data the gateway never got."""
    require("softflowd")
    payloads, _ = await asyncio.to_thread(exported, 9, 2000)
    async with stack(tmp_path, agent_args=POST_ONLY) as st:
        await st.send(payloads[:10])
        await st.drained(10)
        st.link.set_mode(Mode.REFUSE)  # the uplink goes down while the next datagrams arrive
        await st.send(payloads[10:40])
        await st.spooled(40)
        forged = json.dumps({"agent": st.agent_id, "acked": 100_000, "accepted": 30, "duplicates": 0})
        st.link.add_fault(Fault(action=Action.ANSWER, status=200, body=forged.encode(), count=None,
                                content_type="application/json", match="POST /v1/b"))
        st.link.set_mode(Mode.FORWARD)
        await asyncio.sleep(3.0)  # the agent uploads into the forgery
        assert st.link.stats().faults, "no batch met the forgery"
        st.link.clear_faults()
        await st.send(payloads[40:70])
        await st.drained(70)
        await st.stop()
        journal = await asyncio.to_thread(st.journal)
    delivered = [p for stream, _, p in journal if stream == st.agent_id]
    assert delivered == list(payloads[:70])


async def test_no_key_in_any_log_status_file_or_command_line(tmp_path: Path) -> None:
    """Debug logs of gateway and agent, with an impostor using a wrong key: no key text anywhere."""
    require("softflowd")
    payloads, _ = await asyncio.to_thread(exported, 9, 2000)
    wrong_key = "ftk1_" + "A" * 42 + "E"  # a well-formed key that is not the agent's
    async with stack(tmp_path, log_level="debug", agent_args=("--status-interval", "200ms")) as st:
        impostor = AgentProc(tmp_path, gateway_url=st.link.url, agent_id=st.agent_id, key=wrong_key,
                             name="impostor", env={"FLOWTUNNEL_LOG_LEVEL": "debug"})
        await impostor.start()
        await st.send(payloads[:40])
        await st.drained(40)
        assert impostor.proc is not None
        cmdline = (await asyncio.to_thread(Path(f"/proc/{impostor.proc.pid}/cmdline").read_bytes)).decode(
            errors="replace"
        )
        await asyncio.sleep(1.0)  # the impostor has been refused by now, and said so
        await impostor.terminate()
        status = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "flowtunnel", "status", "--spool", str(st.agent.spool)],
            capture_output=True, timeout=60, check=False,
        )
        await st.stop()
    texts = [st.gateway.log_text(), st.agent.log_text(), impostor.log_text(), cmdline,
             status.stdout.decode(errors="replace"), status.stderr.decode(errors="replace")]
    for directory in (st.agent.spool, st.gateway.data, impostor.spool):
        for path in directory.glob("*.json"):
            texts.append(path.read_text(errors="replace"))
    assert "authentication" in st.gateway.log_text() + impostor.log_text()  # the impostor was noticed
    assert find_leaks(texts, st.key) == []
    assert find_leaks(texts, wrong_key) == []
