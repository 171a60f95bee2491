"""``flowtunnel enroll``, ``revoke``, ``agents`` and ``status`` for a gateway, as a user runs them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import aiohttp
import pytest

from flowtunnel.agent.config import AgentConfig
from flowtunnel.cli import main
from flowtunnel.config import load_settings
from flowtunnel.gateway import Registry
from flowtunnel.gateway.status import render
from flowtunnel.wire import parse_key
from tests.gateway.util import datagrams, post_batch, seal, start_gateway


def test_enroll_json_is_one_line_and_the_key_works(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["enroll", "site-a", "--data", str(tmp_path), "--format", "json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    doc = json.loads(out)
    assert set(doc) == {"agent_id", "key"}
    assert doc["agent_id"] == "site-a"
    with Registry(tmp_path) as reg:
        entry = reg.get("site-a")
    assert entry is not None
    assert parse_key(doc["key"]) == entry.key


def test_enroll_text_prints_a_usable_agent_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["enroll", "site-a", "--data", str(tmp_path), "--gateway-url", "https://gw.example:8443"]) == 0
    )
    out = capsys.readouterr().out
    toml_text = out[out.index("[agent]") : out.index("# or on the command line")]
    cfg = tomllib.loads(toml_text)["agent"]
    assert cfg["gateway"] == "https://gw.example:8443"
    assert cfg["agent_id"] == "site-a"
    with Registry(tmp_path) as reg:
        entry = reg.get("site-a")
    assert entry is not None
    assert parse_key(cfg["key"]) == entry.key
    assert "flowtunnel agent --gateway https://gw.example:8443" in out


def test_enroll_with_several_gateway_urls_prints_them_all_as_the_agent_config_takes_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cluster's gateways (``--gateway-url`` repeated, or comma-separated): the printed config lists them
    all as a TOML array, which the agent's config loader reads as its gateways, best first; the command line
    repeats ``--gateway``."""
    urls = ["https://gw1.example:8443", "https://gw2.example:8443", "https://gw3.example:8443"]
    argv = ["enroll", "site-a", "--data", str(tmp_path), "--key-file", str(tmp_path / "site-a.key"),
            "--gateway-url", urls[0], "--gateway-url", f"{urls[1]},{urls[2]}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    toml_text = out[out.index("[agent]") : out.index("# or on the command line")]
    assert tomllib.loads(toml_text)["agent"]["gateway"] == urls
    conf = tmp_path / "agent.toml"
    conf.write_text(toml_text.replace("/etc/flowtunnel/agent.key", str(tmp_path / "site-a.key")))
    cfg = load_settings(AgentConfig, section="agent", config_file=conf)
    assert cfg.gateways == tuple(urls)
    assert "flowtunnel agent " + " ".join(f"--gateway {u}" for u in urls) in out


def test_enroll_twice_revoke_and_rotate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = str(tmp_path)
    assert main(["enroll", "site-a", "--data", data, "--format", "json"]) == 0
    first = json.loads(capsys.readouterr().out)["key"]
    assert main(["enroll", "site-a", "--data", data]) == 1
    assert "already enrolled" in capsys.readouterr().err
    assert main(["revoke", "site-a", "--data", data]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["agents", "--data", data, "--format", "json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["agent_id"] == "site-a"
    assert row["revoked"] is not None
    assert main(["enroll", "site-a", "--data", data, "--rotate", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["key"] != first
    assert main(["agents", "--data", data]) == 0
    listing = capsys.readouterr().out
    assert "site-a" in listing
    assert "active" in listing
    assert first not in listing
    assert main(["revoke", "nobody", "--data", data]) == 1
    assert "'nobody' is not enrolled" in capsys.readouterr().err


def test_bad_name_or_missing_data_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["enroll", "bad/name", "--data", str(tmp_path)]) == 2
    assert "agent id 'bad/name'" in capsys.readouterr().err
    monkeypatch.delenv("FLOWTUNNEL_GATEWAY_DATA", raising=False)
    assert main(["enroll", "site-a"]) == 2
    assert "data directory is required" in capsys.readouterr().err
    monkeypatch.setenv("FLOWTUNNEL_GATEWAY_DATA", str(tmp_path / "env"))
    assert main(["enroll", "site-a", "--format", "json"]) == 0
    assert (tmp_path / "env" / "registry.sqlite").exists()


async def test_status_of_a_running_gateway_from_file_and_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "gw"
    with Registry(data) as reg:
        key = reg.enroll("site-a").key
        reg.enroll("idle")
    gw = await start_gateway(data, jsonl=str(tmp_path / "out.jsonl"))
    try:
        async with aiohttp.ClientSession() as session:
            await post_batch(
                session,
                gw.url,
                seal("site-a", key, 1, datagrams(3)),
                agent="site-a",
                headers={"X-Flowtunnel-Backlog": "42", "X-Flowtunnel-Dropped": "spool_full=2"},
            )
            await post_batch(session, gw.url, b"junk", agent="site-a")
        gw.write_status()
        assert main(["status", "--data", str(data)]) == 0
        text = capsys.readouterr().out
        # In a thread: the command blocks, and this event loop runs the gateway it asks.
        assert await asyncio.to_thread(main, ["status", "--gateway", gw.url, "--format", "json"]) == 0
        doc = json.loads(capsys.readouterr().out)
    finally:
        await gw.stop()
    assert doc["agents"]["site-a"]["acked"] == 3
    assert doc["agents"]["site-a"]["backlog"] == 42
    assert doc["agents"]["idle"]["acked"] == 0
    assert doc["rejected"] == {"bad-magic": 1}
    assert "jsonl" in doc["sinks"]
    for needle in ("site-a", "idle", "42", "spool_full=2", "bad-magic=1", "journal  3 entries", "jsonl"):
        assert needle in text, needle


def test_render_tolerates_a_sparse_document() -> None:
    text = render({"kind": "gateway", "updated": 0}, now=1000.0)
    assert "STALE" in text
    assert "none enrolled" in text


def test_status_of_a_missing_directory_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--data", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "status.json does not exist" in err
    assert err.count("\n") == 1


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("kind", ["gateway", "agent"])
def test_status_of_a_file_left_by_a_dead_process_says_it_is_stale(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """Issue 17.11: a gateway that cannot write status.json (disk full) left ``status --data`` showing the
    dead process's figures as if they were current (the file was recent, so the age test did not fire)."""
    pid = _dead_pid()
    (tmp_path / "status.json").write_text(json.dumps({"kind": kind, "pid": pid, "updated": time.time()}))
    flag = "--data" if kind == "gateway" else "--spool"
    assert main(["status", flag, str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert re.search(rf"status file stale \(updated \d+ s ago; pid {pid} not running\)", text), text
    # The same file from a live process is not stale.
    live = {"kind": kind, "pid": os.getpid(), "updated": time.time()}
    (tmp_path / "status.json").write_text(json.dumps(live))
    assert main(["status", flag, str(tmp_path)]) == 0
    assert "stale" not in capsys.readouterr().out.lower()
