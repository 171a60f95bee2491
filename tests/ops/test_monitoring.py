"""Monitoring: ``flowtunnel status`` exits with Nagios codes (stale agent, old backlog, drops that grew), the
agent's optional ``/metrics`` listener, ``flowtunnel_build_info`` on both, and the gateway's ``/v1/health``
that fails while an enrolled, watched agent is silent."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import aiohttp
import pytest

from flowtunnel.cli import main
from flowtunnel.gateway import Registry
from flowtunnel.health import CRITICAL, OK, WARNING, Thresholds, check_agent, check_gateway
from tests.agent.test_service import config, running, v9
from tests.gateway.util import datagrams, post_batch, seal, start_gateway
from tests.peers import free_tcp_port

NOW = 1_800_000_000.0
T = Thresholds()


def gateway_doc(**agents: dict[str, object]) -> dict[str, object]:
    return {"kind": "gateway", "updated": NOW - 1, "agents": agents, "sinks": {}}


# -- the rules -----------------------------------------------------------------------------------------------


def test_silent_agents_warn_then_go_critical() -> None:
    doc = gateway_doc(
        fresh={"enrolled": True, "last_seen": NOW - 60},
        quiet={"enrolled": True, "last_seen": NOW - 20 * 60},
        gone={"enrolled": True, "last_seen": NOW - 2 * 3600},
        never={"enrolled": True, "last_seen": None, "enrolled_at": NOW - 3 * 3600},
        new={"enrolled": True, "last_seen": None, "enrolled_at": NOW - 60},
        spare={"enrolled": True, "last_seen": None, "enrolled_at": NOW - 9 * 3600, "health_ignored": True},
        old={"enrolled": True, "revoked": True, "last_seen": NOW - 9 * 3600},
    )
    result = check_gateway(doc, now=NOW)
    assert result.state == CRITICAL
    texts = [p.text for p in result.problems]
    assert texts == [
        "agent gone last seen 2h ago (> 1h)",
        "agent never never seen, enrolled 3h ago (> 1h)",
        "agent quiet last seen 20m ago (> 15m)",
    ]
    assert [p.state for p in result.problems] == [CRITICAL, CRITICAL, WARNING]
    assert result.line("gateway").startswith("FLOWTUNNEL CRITICAL - agent gone last seen 2h ago")


def test_drops_that_grew_recently_warn() -> None:
    doc = gateway_doc(a={"enrolled": True, "last_seen": NOW - 5, "dropped": {"spool_full": 12},
                         "drops_changed": NOW - 300})
    assert check_gateway(doc, now=NOW).line("gateway") == (
        "FLOWTUNNEL WARNING - agent a drops grew 5m ago (spool_full=12)")
    doc["agents"]["a"]["drops_changed"] = NOW - 3700  # type: ignore[index]
    assert check_gateway(doc, now=NOW).state == OK  # outside the window
    doc["agents"]["a"]["drops_changed"] = NOW - 300  # type: ignore[index]
    assert check_gateway(doc, now=NOW, thresholds=Thresholds(drops_window=0)).state == OK


def test_a_gateway_that_is_not_running_is_critical() -> None:
    doc = {"kind": "gateway", "updated": NOW - 600, "agents": {}, "sinks": {"store": {"running": False}}}
    result = check_gateway(doc, now=NOW)
    assert result.line("gateway") == "FLOWTUNNEL CRITICAL - gateway not running (status written 10m ago)"


def test_agent_backlog_age_and_drops() -> None:
    doc = {"kind": "agent", "agent_id": "a", "updated": NOW - 1, "drops": {"kernel_rcvbuf": 3},
           "drops_changed": NOW - 10, "backlog": {"datagrams": 500, "oldest_received": NOW - 3 * 3600}}
    result = check_agent(doc, now=NOW)
    assert result.state == CRITICAL
    assert [p.text for p in result.problems] == [
        "backlog of 500 datagrams, oldest received 3h ago (> 2h)",
        "agent a drops grew 10s ago (kernel_rcvbuf=3)",
    ]
    doc["backlog"] = {"datagrams": 0, "oldest_received": None}
    assert check_agent(doc, now=NOW).state == WARNING


def test_thresholds_must_be_ordered() -> None:
    with pytest.raises(ValueError, match=r"warning \(2h\) <= critical \(1h\)"):
        Thresholds(stale_warning=7200, stale_critical=3600)


# -- flowtunnel status on a real gateway ---------------------------------------------------------------------


async def test_status_exit_codes_follow_nagios(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "gw"
    with Registry(data) as reg:
        key = reg.enroll("site-a").key
        reg.enroll("spare", now=time.time() - 7200)
    gw = await start_gateway(data, health_ignore=("spare",))
    try:
        async with aiohttp.ClientSession() as session:
            headers = {"X-Flowtunnel-Dropped": "spool_full=2"}
            await post_batch(session, gw.url, seal("site-a", key, 1, datagrams(3)), agent="site-a",
                             headers=headers)
            gw.write_status()
            assert main(["status", "--data", str(data), "--check"]) == OK
            assert capsys.readouterr().out == "FLOWTUNNEL OK - gateway healthy\n"

            headers = {"X-Flowtunnel-Dropped": "spool_full=5"}  # the agent dropped 3 more
            await post_batch(session, gw.url, seal("site-a", key, 4, datagrams(3, start=3)), agent="site-a",
                             headers=headers)
            gw.write_status()
    finally:
        await gw.stop()
    assert main(["status", "--data", str(data)]) == WARNING
    out = capsys.readouterr().out
    assert "site-a" in out  # the usual table, then the verdict
    assert out.rstrip().endswith("FLOWTUNNEL WARNING - agent site-a drops grew 0s ago (spool_full=5)")

    # The same agent, silent for 2 hours: critical (the file is edited as a clock would move on).
    doc = json.loads((data / "status.json").read_text())
    doc["agents"]["site-a"]["last_seen"] = time.time() - 7200
    doc["agents"]["site-a"]["drops_changed"] = None
    doc["updated"] = time.time()
    (data / "status.json").write_text(json.dumps(doc))
    assert main(["status", "--data", str(data), "--format", "json"]) == CRITICAL
    verdict = json.loads(capsys.readouterr().out)["check"]
    assert verdict["state"] == "CRITICAL"
    assert verdict["problems"] == [{"state": "CRITICAL", "text": "agent site-a last seen 2h ago (> 1h)"}]
    relaxed = ["--stale-warning", "3h", "--stale-critical", "4h"]
    assert main(["status", "--data", str(data), "--check", *relaxed]) == OK
    capsys.readouterr()


def test_status_unreadable_is_unknown_with_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--data", str(tmp_path), "--check"]) == 3
    assert capsys.readouterr().out.startswith("FLOWTUNNEL UNKNOWN - ")


# -- the agent's /metrics and status -------------------------------------------------------------------------


async def _scrape(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


def _value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in\n{text}")


async def test_agent_metrics_and_backlog_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = bytes(32)
    port = free_tcp_port()
    cfg = config(tmp_path, f"http://127.0.0.1:{free_tcp_port()}", key, metrics_listen=f"127.0.0.1:{port}")
    async with running(cfg) as agent:  # its gateway is down: everything stays in the spool
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            for i in range(20):
                tx.sendto(v9(i), agent.receiver.bound[0])
        for _ in range(200):
            await asyncio.sleep(0.05)
            text = await _scrape(f"http://127.0.0.1:{port}")
            if "flowtunnel_agent_backlog_datagrams" in text and _value(
                    text, "flowtunnel_agent_backlog_datagrams") == 20:
                break
        assert _value(text, "flowtunnel_agent_backlog_datagrams") == 20
        assert _value(text, "flowtunnel_agent_backlog_bytes") > 0
        assert _value(text, "flowtunnel_agent_backlog_oldest_age_seconds") >= 0
        assert _value(text, "flowtunnel_agent_received_datagrams_total") == 20
        assert 'flowtunnel_agent_dropped_datagrams_total{agent="site-b",cause="spool_full"} 0.0' in text
        assert _value(text, "flowtunnel_agent_upload_wire_bytes_total") >= 0
        assert 'flowtunnel_build_info{component="agent"' in text
        await agent.write_status()
        assert main(["status", "--spool", str(tmp_path / "spool"), "--check", "--backlog-warning", "1ms",
                     "--backlog-critical", "1h"]) == WARNING
        out = capsys.readouterr().out
        assert out.startswith("FLOWTUNNEL WARNING - backlog of 20 datagrams, oldest received")
        assert main(["status", "--spool", str(tmp_path / "spool")]) == OK
        capsys.readouterr()


async def test_agent_metrics_port_busy_is_one_config_error(tmp_path: Path) -> None:
    from flowtunnel.errors import ConfigError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = config(tmp_path, "http://127.0.0.1:1", bytes(32), metrics_listen=f"127.0.0.1:{port}")
        with pytest.raises(ConfigError, match=f"cannot listen on metrics address 127.0.0.1:{port}"):
            async with running(cfg):
                pass


# -- the gateway's /v1/health and build info -----------------------------------------------------------------


async def test_gateway_health_fails_while_a_watched_agent_is_silent(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    with Registry(data) as reg:
        reg.enroll("fresh")
        late = reg.enroll("late", now=time.time() - 7200).key  # enrolled 2 h ago, never heard from
        reg.enroll("spare", now=time.time() - 7200)
        reg.enroll("retired", now=time.time() - 7200)
        reg.revoke("retired")
    gw = await start_gateway(data, health_ignore=("spare",), health_silence=3600)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(gw.url + "/v1/health") as resp:
                assert resp.status == 503
                doc = await resp.json()
            assert doc["status"] == "failing"
            assert list(doc["silent"]) == ["late"]
            assert doc["watched"] == 2
            async with session.get(gw.url + "/v1/health?silence=3h") as resp:
                assert resp.status == 200
            await post_batch(session, gw.url, seal("late", late, 1, datagrams(1)), agent="late")
            async with session.get(gw.url + "/v1/health") as resp:
                assert resp.status == 200
                assert (await resp.json())["silent"] == {}
            async with session.get(gw.url + "/metrics") as resp:
                text = await resp.text()
            assert 'flowtunnel_build_info{component="gateway"' in text
    finally:
        await gw.stop()


async def test_gateway_health_names_silent_agents_to_operators_only(tmp_path: Path) -> None:
    """``/v1/health`` is open (load balancers, uptime monitors), so its answer to anyone else carries the
    verdict and counts but no agent id: enrolled ids are the operator's (docs/security.md)."""
    data = tmp_path / "gw"
    token = "op-token-0123456789abcdefghijklmnop"
    (tmp_path / "admin.token").write_text(token + "\n")
    (tmp_path / "admin.token").chmod(0o600)
    with Registry(data) as reg:
        reg.enroll("hotel-secret-12", now=time.time() - 7200)  # silent for 2 h
        reg.enroll("fresh-site-7")
    gw = await start_gateway(data, health_silence=3600, admin_token_file=tmp_path / "admin.token")
    try:
        async with aiohttp.ClientSession() as session:
            for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789abcdefghij"}):
                async with session.get(gw.url + "/v1/health", headers=headers) as resp:
                    assert resp.status == 503
                    body = await resp.text()
                assert "hotel-secret-12" not in body
                assert "fresh-site-7" not in body
                doc = json.loads(body)
                assert doc["status"] == "failing"
                assert doc["silent_count"] == 1
                assert "silent" not in doc
            async with session.get(gw.url + "/v1/health?silence=3h") as resp:
                assert resp.status == 200
                assert (await resp.json())["silent_count"] == 0
            async with session.get(gw.url + "/v1/health",
                                   headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 503
                doc = await resp.json()
            assert list(doc["silent"]) == ["hotel-secret-12"]
            assert doc["silent_count"] == 1
    finally:
        await gw.stop()


async def test_gateway_health_keeps_the_registry_error_for_operators(tmp_path: Path) -> None:
    """A registry that cannot be read fails the health check; its message names the data directory, which
    only a reader of /v1/status is shown (docs/security.md)."""
    data = tmp_path / "gw"
    token = "op-token-0123456789abcdefghijklmnop"
    (tmp_path / "admin.token").write_text(token + "\n")
    (tmp_path / "admin.token").chmod(0o600)
    with Registry(data) as reg:
        reg.enroll("site-1")
    gw = await start_gateway(data, admin_token_file=tmp_path / "admin.token")
    try:
        (data / "registry.sqlite").write_bytes(b"not a database, " * 512)
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(30):
                while True:
                    async with session.get(gw.url + "/v1/health") as resp:
                        body = await resp.text()
                        if resp.status == 503:
                            break
                    await asyncio.sleep(0.2)
            assert json.loads(body) == {"status": "failing"}
            assert str(tmp_path) not in body
            async with session.get(gw.url + "/v1/health",
                                   headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 503
                doc = await resp.json()
            assert "registry" in doc["detail"]
            assert str(data) in doc["detail"]
    finally:
        await gw.stop()
