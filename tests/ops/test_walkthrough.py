"""docs/operations.md, run as written: its commands, the sample configurations and the systemd units'
ExecStart lines, on loopback and without systemd. Each box gets its own directory standing in for ``/``
(paths in commands and copied files are rewritten into it), ``systemctl enable --now UNIT`` starts the unit's
ExecStart, and commands that need a real Debian box with systemd (apt-get, pip, systemd-sysusers,
daemon-reload) are skipped. The units themselves are checked with ``systemd-analyze verify``."""

from __future__ import annotations

import configparser
import dataclasses
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from flowtunnel.agent.config import AgentConfig
from flowtunnel.config import load_settings
from flowtunnel.gateway.config import GatewayConfig
from tests.ops.util import Daemon, run_cli
from tests.peers import UdpCapture, free_tcp_port, free_udp_port, have_tool

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "operations.md"
UNITS = ROOT / "contrib" / "systemd"
CONFIGS = ROOT / "contrib" / "config"
SKIPPED = ("apt-get", "python3", "/opt/flowtunnel/bin/pip", "ln", "systemd-sysusers", "cd", "git")


def doc_commands() -> list[tuple[str, str]]:
    """(box, command) for every command line of the ```sh blocks, box from the section heading."""
    box, out, in_block = "both", [], False
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            box = "gateway" if "gateway box" in line else "field" if "field box" in line else "both"
        elif line.startswith("```"):
            in_block = line.strip() == "```sh" if not in_block else False
        elif in_block and line.strip() and not line.lstrip().startswith("#"):
            out += [(b, line.strip()) for b in (("gateway", "field") if box == "both" else (box,))]
    return out


def exec_start(unit: str) -> list[str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / unit)
    return shlex.split(parser["Service"]["ExecStart"])


@dataclasses.dataclass
class Site:
    """The two boxes' stand-in roots and the loopback addresses that replace the documented ones."""

    work: Path
    gateway_port: int = dataclasses.field(default_factory=free_tcp_port)
    agent_port: int = dataclasses.field(default_factory=free_udp_port)
    collector: UdpCapture | None = None
    daemons: list[Daemon] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        for box in ("gateway", "field"):  # what a fresh Debian box has
            (self.root(box) / "etc/systemd/system").mkdir(parents=True)

    def root(self, box: str) -> Path:
        return self.work / ("gwbox" if box == "gateway" else "fieldbox")

    def rewrite(self, text: str, box: str) -> str:
        """The documented paths and addresses replaced by this box's stand-ins, in one pass."""
        assert self.collector is not None
        root = self.root(box)
        table = {
            "/var/lib/flowtunnel-agent": f"{self.root('field')}/var/lib/flowtunnel-agent",
            "/var/lib/flowtunnel": f"{self.root('gateway')}/var/lib/flowtunnel",
            "/etc/flowtunnel": f"{root}/etc/flowtunnel",
            "/etc/systemd": f"{root}/etc/systemd",
            "0.0.0.0:8080": f"127.0.0.1:{self.gateway_port}",
            "gw.example.org:8080": f"127.0.0.1:{self.gateway_port}",
            "127.0.0.1:8080": f"127.0.0.1:{self.gateway_port}",
            "udp://127.0.0.1:9995": self.collector.url,
            "udp://127.0.0.1:2055": f"udp://127.0.0.1:{self.agent_port}",
        }
        pattern = "|".join(re.escape(k) for k in sorted(table, key=len, reverse=True))
        return re.sub(pattern, lambda m: table[m.group(0)], text)

    def source(self, path: str) -> Path:
        """A relative path of the doc: in the source tree if it is one, else in the working directory."""
        return ROOT / path if (ROOT / path).exists() else self.work / path

    def run(self, box: str, command: str) -> None:
        words = shlex.split(self.rewrite(command, box))
        if words[0] in SKIPPED or words[:2] == ["systemctl", "daemon-reload"]:
            return
        if words[0] == "install":
            self._install(words[1:])
        elif words[:3] == ["systemctl", "enable", "--now"]:
            self._start(box, words[3])
        elif words[0] == "flowtunnel":
            if box == "gateway" and words[1] in ("status", "sources", "query"):
                self.settle()
            args = [self.rewrite(str(self.source(w)), box) if w.startswith(("src/", "contrib/")) else w
                    for w in words[1:]]
            done = run_cli(args, cwd=self.work)
            assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
            assert "Traceback" not in done.stderr
        elif words[0] == "curl":
            with urllib.request.urlopen(words[-1], timeout=10) as resp:  # loopback, rewritten above
                assert resp.status == 200
        else:
            raise AssertionError(f"the walk-through test does not know how to run: {command}")

    def settle(self, timeout: float = 60.0) -> None:
        """Wait (as an operator would, for a few seconds) until the agent's spool is empty and the gateway's
        status file shows what it acknowledged."""
        agent_status = self.root("field") / "var/lib/flowtunnel-agent/status.json"
        gateway_status = self.root("gateway") / "var/lib/flowtunnel/status.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                agent = json.loads(agent_status.read_text())
                gateway = json.loads(gateway_status.read_text())
            except (OSError, ValueError):
                agent, gateway = {}, {}
            received = agent.get("received", {}).get("datagrams")
            acked = gateway.get("agents", {}).get("hotel-12", {}).get("acked")
            if received and agent.get("backlog", {}).get("datagrams") == 0 and acked == received:
                return
            time.sleep(0.1)
        raise AssertionError(f"not settled after {timeout} s")

    def _install(self, args: list[str]) -> None:
        mode, make_dir, parents, paths = 0o755, False, False, []
        it = iter(args)
        for a in it:
            if a == "-m":
                mode = int(next(it), 8)
            elif a == "-d":
                make_dir = True
            elif a == "-D":
                parents = True
            else:
                paths.append(a)
        if make_dir:
            for p in paths:
                Path(p).mkdir(parents=True, exist_ok=True)
                os.chmod(p, mode)
            return
        src, dst = self.source(paths[0]), Path(paths[1])
        if parents:
            dst.parent.mkdir(parents=True, exist_ok=True)
        box = "gateway" if str(dst).startswith(str(self.root("gateway"))) else "field"
        text = src.read_text(encoding="utf-8")
        dst.write_text(self.rewrite(text, box) if dst.suffix == ".toml" else text, encoding="utf-8")
        os.chmod(dst, mode)

    def _start(self, box: str, unit: str) -> None:
        """The unit's ExecStart as systemd runs it: StateDirectory created, credentials copied."""
        words = [self.rewrite(w, box) for w in exec_start(f"{unit}.service")]
        assert words[0] == "/opt/flowtunnel/bin/flowtunnel"
        creds = self.work / f"{unit}.credentials"
        creds.mkdir()
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read(UNITS / f"{unit}.service")
        service = parser["Service"]
        for spec in service.get("LoadCredential", "").split():
            name, _, path = spec.partition(":")
            shutil.copyfile(self.rewrite(path, box), creds / name)
        state = {"gateway": "var/lib", "field": "var/lib"}[box]
        (self.root(box) / state / service["StateDirectory"]).mkdir(parents=True, exist_ok=True)
        args = [w.replace("%d", str(creds)) for w in words[1:]]
        daemon = Daemon(args, workdir=self.work, name=unit)
        self.daemons.append(daemon)
        daemon.wait_for("listening on" if "gateway" in unit else "running")

    def stop(self) -> None:
        for d in reversed(self.daemons):
            assert d.stop() == 0, d.text()
            assert "Traceback" not in d.text(), d.text()


def test_the_walkthrough_runs_as_written(tmp_path: Path) -> None:
    commands = doc_commands()
    assert any(c.startswith("flowtunnel enroll") and "--key-file" in c for _, c in commands)
    site = Site(work=tmp_path)
    with UdpCapture() as collector:
        site.collector = collector
        try:
            for box, command in commands:
                site.run(box, command)
            key = tmp_path / "hotel-12.key"
            assert stat.S_IMODE(key.stat().st_mode) == 0o600
            assert stat.S_IMODE((site.root("field") / "etc/flowtunnel/agent.key").stat().st_mode) == 0o600
            # Everything the demo capture holds reaches the collector, from hotel-12's own source address.
            site.settle()
            status = json.loads((site.root("field") / "var/lib/flowtunnel-agent/status.json").read_text())
            received = status["received"]["datagrams"]
            assert received > 0
            collector.wait_for(received, timeout=30)
            sources = run_cli(["sources", "--data", str(site.root("gateway") / "var/lib/flowtunnel"),
                               "--format", "json"])
            rows = [json.loads(line) for line in sources.stdout.splitlines()]
            assert [r["agent"] for r in rows] == ["hotel-12"]
            assert {(r["source_address"], r["source_port"]) for r in rows} == {
                addr for _, addr in collector.datagrams}
        finally:
            site.stop()


@pytest.mark.parametrize(("name", "cls", "section"), [("gateway.toml", GatewayConfig, "gateway"),
                                                      ("agent.toml", AgentConfig, "agent")])
def test_sample_configs_load_and_document_every_key(
    tmp_path: Path, name: str, cls: type, section: str
) -> None:
    path = CONFIGS / name
    text = path.read_text(encoding="utf-8")
    keys = set(re.findall(r"^#? ?([a-z][a-z0-9-]*) = ", text, flags=re.MULTILINE))
    fields = {f.name.replace("_", "-") for f in dataclasses.fields(cls)}
    assert keys == fields, f"undocumented: {sorted(fields - keys)}, unknown: {sorted(keys - fields)}"
    flags = {"key_file": str(tmp_path / "k")} if section == "agent" else {}
    load_settings(cls, section=section, config_file=path, flags=flags)
    # Each commented example is valid too, added to the active lines on its own.
    for line in re.findall(r"^# ([a-z][a-z0-9-]* = .*)$", text, flags=re.MULTILINE):
        key = line.split(" = ")[0]
        if key in ("tls-cert", "tls-key"):
            for p in ("cert", "key"):
                (tmp_path / f"tls-{p}").touch()
            line = f'tls-cert = "{tmp_path}/tls-cert"\ntls-key = "{tmp_path}/tls-key"'
        if key in ("key", "key-file"):
            continue
        if key == "proxy-password-file":  # refused without the login it belongs to
            line += '\nproxy-user = "alice"'
        one = tmp_path / "one.toml"
        one.write_text(text + "\n" + line + "\n", encoding="utf-8")
        tomllib.loads(one.read_text())
        load_settings(cls, section=section, config_file=one, flags=flags)


def test_the_systemd_units_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` over a stand-in root holding the system's units, ours (the spoof drop-in
    included) and an executable at the ExecStart path; any warning fails."""
    if not have_tool("systemd-analyze"):
        pytest.fail("not installed: systemd-analyze (Debian package systemd, see tools/setup-dev.sh)")
    root = tmp_path / "root"
    system = next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir())
    shutil.copytree(system, root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    (etc / "flowtunnel-gateway.service.d").mkdir(parents=True)
    for unit in ("flowtunnel-gateway.service", "flowtunnel-agent.service"):
        shutil.copyfile(UNITS / unit, etc / unit)
    shutil.copyfile(UNITS / "flowtunnel-gateway-spoof.conf", etc / "flowtunnel-gateway.service.d/spoof.conf")
    exe = root / "opt/flowtunnel/bin/flowtunnel"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", "flowtunnel-gateway.service",
         "flowtunnel-agent.service"], capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr
    for unit in ("flowtunnel-gateway.service", "flowtunnel-agent.service"):
        sec = subprocess.run(
            # --threshold is exposure x 10: fail above 3.0 of 10 ("OK" ends near there)
            ["systemd-analyze", "security", "--offline=yes", f"--root={root}", "--threshold=30", unit],
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert sec.returncode == 0, sec.stdout[-2000:] + sec.stderr
        unit_text = (UNITS / unit).read_text()
        for needed in ("User=flowtunnel", "ProtectSystem=strict", "NoNewPrivileges=yes", "StateDirectory=",
                       "CapabilityBoundingSet=\n", "AmbientCapabilities=\n"):
            assert needed in unit_text, (unit, needed)
    spoof = (UNITS / "flowtunnel-gateway-spoof.conf").read_text()
    assert "AmbientCapabilities=CAP_NET_RAW\n" in spoof
    assert "CapabilityBoundingSet=CAP_NET_RAW\n" in spoof


def test_enroll_key_file_is_0600_and_the_snippet_uses_the_agent_box_paths(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    done = run_cli(["enroll", "hotel-12", "--data", str(data), "--key-file", str(tmp_path / "k")])
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    key = (tmp_path / "k").read_text().strip()
    assert key.startswith("ftk1_")
    assert key not in done.stdout + done.stderr  # the key is in the file only
    snippet = tomllib.loads(done.stdout[done.stdout.index("[agent]"):done.stdout.index("# or on")])["agent"]
    assert snippet["spool"] == "/var/lib/flowtunnel-agent"  # not the gateway's /var/lib/flowtunnel
    assert snippet["key_file"] == "/etc/flowtunnel/agent.key"
    sample = tomllib.loads((CONFIGS / "agent.toml").read_text())["agent"]
    assert snippet["spool"] == sample["spool"]
    readme = (ROOT / "README.md").read_text()
    assert "--data /var/lib/flowtunnel " in readme
    assert not snippet["spool"].startswith("/var/lib/flowtunnel/")
    # The file is never overwritten by accident; --rotate replaces key and file.
    again = run_cli(["enroll", "hotel-13", "--data", str(data), "--key-file", str(tmp_path / "k")])
    assert again.returncode == 2
    assert again.stderr.strip() == (
        f"flowtunnel enroll: error: key file {tmp_path}/k exists "
        "(use --rotate to replace the key and the file)"
    )
    os.chmod(tmp_path / "k", 0o644)
    rotated = run_cli(["enroll", "hotel-12", "--data", str(data), "--rotate", "--key-file",
                       str(tmp_path / "k")])
    assert rotated.returncode == 0, rotated.stderr
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert (tmp_path / "k").read_text().strip() != key
    assert run_cli(["agents", "--data", str(data), "--format", "json"]).stdout.count("hotel-13") == 0
