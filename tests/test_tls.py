"""An agent that nothing can make use TLS runs without ``ssl`` (``flowtunnel.tls``, issue 14: ~1.1 MB of its
RSS): the scan of its command line, environment and config file errs towards loading it, and a process
without it that needs TLS all the same says so in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flowtunnel.tls import leave_out_ssl, tls_reason

HTTP = ["agent", "--gateway", "http://gw.example.net:8080", "--spool", "/var/spool/ft", "--proxy", "none"]


def test_an_http_gateway_without_tls_settings_needs_no_tls() -> None:
    assert tls_reason(HTTP, {}) is None
    assert tls_reason(HTTP, {"FLOWTUNNEL_AGENT_LATENCY": "5s", "HTTP_PROXY": "http://p:3128"}) is None
    unset = [w for w in HTTP if w not in ("--proxy", "none")]
    assert tls_reason(unset, {"PATH": "/bin"}) is None


def test_a_proxy_keeps_ssl_for_its_ntlm_or_negotiate() -> None:
    """pyspnego, loaded when a proxy asks for NTLM or Negotiate, imports ``ssl``."""
    unset = [w for w in HTTP if w not in ("--proxy", "none")]
    assert tls_reason([*unset, "--proxy=http://proxy:3128"], {}) is not None
    assert tls_reason(unset, {"http_proxy": "http://proxy:3128"}) is not None
    assert tls_reason(unset, {"FLOWTUNNEL_AGENT_PROXY": "http://proxy:3128"}) is not None


@pytest.mark.parametrize("extra", [
    ["--gateway", "HTTPS://gw:8443"],  # any https:// word, whatever flag it belongs to
    ["--gateway=http://a:1,https://b:2"],
    ["--ca-file", "ca.pem"],
    ["--ca=ca.pem"],  # argparse takes a unique prefix for the flag
    ["--pin-sha256", "ab" * 32],
    ["--pac", "proxy.pac"],
    ["--proxy", "auto"],  # a PAC file or WPAD may be fetched over https
    ["--prox=AUTO"],
    ["--config", "/nonexistent/agent.toml"],  # not read here: the scan does not guess
    ["--metrics-listen", "127.0.0.1:9100"],  # prometheus_client imports ssl
])
def test_anything_on_the_command_line_that_may_use_tls_keeps_ssl(extra: list[str]) -> None:
    assert tls_reason([*HTTP, *extra], {}) is not None


@pytest.mark.parametrize("env", [
    {"FLOWTUNNEL_AGENT_GATEWAY": "https://gw:8443"},
    {"FLOWTUNNEL_AGENT_CA_FILE": "ca.pem"},
    {"FLOWTUNNEL_AGENT_PIN_SHA256": "ab"},
    {"FLOWTUNNEL_AGENT_PROXY": "auto"},
    {"FLOWTUNNEL_SSL": "load"},
])
def test_the_environment_may_keep_ssl(env: dict[str, str]) -> None:
    assert tls_reason(HTTP, env) is not None


@pytest.mark.parametrize(("text", "needs"), [
    ('[agent]\ngateway = "http://gw:8080"\nlatency = "2s"\n', False),
    ('[agent]\ngateway = ["http://a:1", "https://b:2"]\n', True),
    ('[agent]\nca-file = "ca.pem"\n', True),
    ('[agent]\nproxy = "auto"\n', True),
    ('[agent]\nproxy = "none"\n', False),
    ('[agent]\nproxy = "http://p:3128"\n', True),
    ("[agent\n", True),  # not TOML: not guessed at
])
def test_the_config_file_may_keep_ssl(tmp_path: Path, text: str, needs: bool) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    assert (tls_reason([*HTTP, "--config", str(path)], {}) is not None) is needs


def test_ssl_cannot_be_left_out_once_asyncio_is_loaded() -> None:
    import asyncio  # noqa: F401 (pytest's asyncio plugin has loaded it already)

    assert leave_out_ssl() is False
    assert sys.modules["ssl"] is not None


def _agent_process(gateway: str, then: str) -> str:
    """What a fresh process prints after ``flowtunnel agent --gateway GATEWAY``'s start-up decision and the
    agent's imports, then ``then``."""
    code = (
        "import sys; from flowtunnel.cli import _agent_tls; "
        f"_agent_tls(['agent', '--gateway', {gateway!r}, '--proxy', 'none']); "
        "import flowtunnel.cli.agent; from flowtunnel.agent.service import run_agent; "
        "from flowtunnel.agent.uploader import Uploader; "
        "print(sys.modules.get('ssl') is not None); " + then
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_an_agent_for_an_http_gateway_runs_without_ssl_and_one_for_https_with_it() -> None:
    assert _agent_process("http://127.0.0.1:9", "").split() == ["False"]
    assert _agent_process("https://127.0.0.1:9", "").split() == ["True"]


def test_tls_needed_in_a_process_without_ssl_is_one_clear_error() -> None:
    then = (
        "from flowtunnel.agent.config import AgentConfig; from flowtunnel.agent.transport.post import "
        "make_client; from flowtunnel.tls import TlsUnavailable; "
        "cfg = AgentConfig(gateway='https://127.0.0.1:9', spool='/tmp', agent_id='a', key='A' * 43 + '=', "
        "proxy='none')\n"
        "try:\n    make_client(cfg)\nexcept TlsUnavailable as exc:\n    print(exc)"
    )
    lines = _agent_process("http://127.0.0.1:9", then).splitlines()
    assert lines[0] == "False"
    assert len(lines) == 2
    assert lines[1].startswith("an https:// gateway needs TLS, but this agent started without it")
    assert "FLOWTUNNEL_SSL=load" in lines[1]
