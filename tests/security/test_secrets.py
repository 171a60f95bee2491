"""Secrets never show in reprs, error messages or config dumps: keys, proxy passwords, the registry file."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from flowtunnel.agent.config import AgentConfig, load_key
from flowtunnel.config import mask_credentials
from flowtunnel.errors import ConfigError
from flowtunnel.gateway.config import GatewayConfig
from flowtunnel.gateway.registry import AgentKeys, Registry
from flowtunnel.sinkrunner import SinkOptions
from flowtunnel.wire import BadKey, format_key, parse_key
from tests.reliability.harness import find_leaks

KEY = bytes(range(100, 132))
KEY_TEXT = format_key(KEY)


def test_agent_config_repr_masks_the_key_and_the_proxy_password(tmp_path: Path) -> None:
    cfg = AgentConfig(gateway="https://gw.example.net:8443", spool=tmp_path, agent_id="site-a", key=KEY_TEXT,
                      proxy="http://alice:s3cret-pw@proxy.example.net:3128")
    pac = AgentConfig(gateway="https://gw.example.net:8443", spool=tmp_path, agent_id="site-a", key=KEY_TEXT,
                      proxy="auto", pac="http://alice:s3cret-pw@wpad.example.net/proxy.pac")
    shown = [repr(cfg), str(cfg), repr(pac), str(pac)]
    assert find_leaks(shown, KEY_TEXT) == []
    assert not any("s3cret-pw" in s for s in shown), shown
    assert load_key(cfg) == KEY


def test_a_bad_key_is_refused_without_echoing_it(tmp_path: Path) -> None:
    almost = KEY_TEXT[:-1] + "!"
    with pytest.raises(BadKey) as info:
        parse_key(almost)
    assert almost[5:20] not in str(info.value)
    cfg = AgentConfig(gateway="http://gw:8080", spool=tmp_path, agent_id="site-a", key=almost)
    with pytest.raises(ConfigError) as cinfo:
        load_key(cfg)
    assert almost[5:20] not in str(cinfo.value)


def test_registry_entries_hide_keys_and_the_file_is_private(tmp_path: Path) -> None:
    with Registry(tmp_path) as reg:
        entry = reg.enroll("site-a")
        text = format_key(entry.key)
        shown = [repr(entry), str(entry), repr(reg), repr(reg.list())]
        revoked = reg.revoke("site-a")
        shown.append(repr(revoked))
    keys = AgentKeys(tmp_path)
    shown.append(repr(keys.lookup("site-a")))
    assert find_leaks(shown, text) == []
    mode = stat.S_IMODE((tmp_path / "registry.sqlite").stat().st_mode)
    assert mode & 0o077 == 0, oct(mode)


def test_gateway_and_sink_settings_mask_the_journal_password(tmp_path: Path) -> None:
    """``--journal nats://user:password@...`` (scale-out): the settings' reprs, which end up in logs and
    tracebacks, keep the user and hosts but not the password."""
    url = "nats://flow:n4ts-s3cret@10.0.0.1:4222,10.0.0.2:4222"
    shown = [repr(GatewayConfig(data=tmp_path, journal=url)),
             repr(SinkOptions(journal=url, data=tmp_path, name="store"))]
    assert not any("n4ts-s3cret" in s for s in shown), shown
    assert all("nats://flow:***@10.0.0.1:4222,10.0.0.2:4222" in s for s in shown), shown
    assert mask_credentials("see http://a:b@h:1/x and nats://c:d@e") == "see http://a:***@h:1/x and nats://c:***@e"
