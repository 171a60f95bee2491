"""Gateway settings: defaults < TOML < env < flags, and one clear error per bad value."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import pytest

from flowtunnel.config import load_settings
from flowtunnel.errors import ConfigError
from flowtunnel.gateway.config import DEFAULT_SOURCE_POOL, ForwardTarget, GatewayConfig


def load(tmp_path: Path, *, toml: str = "", env: dict[str, str] | None = None, **flags: Any) -> GatewayConfig:
    cfg_file = None
    if toml:
        cfg_file = tmp_path / "gw.toml"
        cfg_file.write_text(toml)
    return load_settings(GatewayConfig, section="gateway", config_file=cfg_file, env=env or {}, flags=flags)


def test_defaults_and_layering(tmp_path: Path) -> None:
    cfg = load(tmp_path, data=str(tmp_path))
    assert cfg.listen == "127.0.0.1:8080"
    assert cfg.source_pool == DEFAULT_SOURCE_POOL
    assert (cfg.store, cfg.metrics, cfg.spoof) == (True, True, False)
    cfg = load(
        tmp_path,
        toml='[gateway]\ndata = "/srv/gw"\nforward = ["udp://127.0.0.1:2055", "udp://[::1]:9995"]\n'
        'max-body = "1MiB"\nretain = "30d"\nstore = false\n',
        env={"FLOWTUNNEL_GATEWAY_LISTEN": "[::1]:0", "FLOWTUNNEL_GATEWAY_MAX_BODY": "2MiB"},
        max_body="3MiB",
    )
    assert cfg.data_dir == Path("/srv/gw")
    assert cfg.targets == (ForwardTarget(host="127.0.0.1", port=2055), ForwardTarget(host="::1", port=9995))
    assert cfg.targets[1].family == socket.AF_INET6
    assert str(cfg.targets[1]) == "udp://[::1]:9995"
    assert cfg.listen_host_port == ("::1", 0)
    assert cfg.max_body == 3 * 1024 * 1024
    assert cfg.retain == 30 * 86400
    assert not cfg.store


def test_lists_from_env_and_flags(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        data="d",
        env={"FLOWTUNNEL_GATEWAY_SOURCE_POOL": "127.1.0.0/24, 127.2.0.5", "FLOWTUNNEL_GATEWAY_SPOOF": "yes"},
        spoof_map="a=127.9.0.1,b=127.9.0.2",
        source_ports="40000-40100",
    )
    assert cfg.source_pool == ("127.1.0.0/24", "127.2.0.5")
    assert cfg.spoof
    assert cfg.spoof_addresses == {"a": "127.9.0.1", "b": "127.9.0.2"}
    assert cfg.source_port_range == (40000, 40100)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({}, "data directory is required"),
        ({"data": "d", "listen": "localhost"}, "listen address 'localhost' is not HOST:PORT"),
        ({"data": "d", "listen": "1.2.3.4:70000"}, "port 70000 is outside"),
        ({"data": "d", "forward": "http://x:1"}, "forward target 'http://x:1' is not udp://HOST:PORT"),
        ({"data": "d", "forward": "udp://x"}, "has no port"),
        ({"data": "d", "source_pool": "127.0.0.300"}, "source pool entry '127.0.0.300'"),
        ({"data": "d", "source_pool": "127.0.0.9-127.0.0.1"}, "source pool entry"),
        ({"data": "d", "source_ports": "9-1"}, "source ports '9-1'"),
        ({"data": "d", "spoof_map": "agent"}, "spoof map entry 'agent' is not AGENT=ADDRESS"),
        ({"data": "d", "spoof_map": "a=::1"}, "is not an IPv4 address"),
        ({"data": "d", "tls_cert": "c.pem"}, "tls_cert and tls_key go together"),
        ({"data": "d", "max_body": "10"}, "max-body 10 is outside the allowed range 1KiB .. 1GiB"),
        ({"data": "d", "max_body": "ten"}, "--max-body: 'ten' is not a size"),
        ({"data": "d", "journal_quota": "1k"}, "journal-quota 1k is outside the allowed range 1MiB .. 16TiB"),
        ({"data": "d", "body_timeout": "0s"}, "body-timeout 0s is outside the allowed range 100ms .. 1d"),
        ({"data": "d", "retain": "99999999d"}, "retain 99999999d is outside the allowed range 1m .. 36500d"),
        ({"data": "d", "forward_rate": "-1"},
         "--forward-rate: forward-rate -1 is outside the allowed range 0 .. 10000000 (0 = unlimited)"),
        ({"data": "d", "max_inflight": "x"}, "--max-inflight: 'x' is not an integer"),
    ],
)
def test_bad_values_raise_one_config_error(tmp_path: Path, flags: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load(tmp_path, **flags)
    assert "\n" not in str(info.value)


def test_unknown_toml_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key gateway\.forwards"):
        load(tmp_path, toml='[gateway]\ndata = "d"\nforwards = []\n')


def test_tls_files_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("tls_cert '/nonexistent/gw.pem' is not a readable file")):
        load(tmp_path, data="d", tls_cert="/nonexistent/gw.pem", tls_key="/nonexistent/gw.key")
