"""AgentConfig: defaults < TOML < env < flags, validation messages, and secrets kept out of reprs."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowtunnel.agent.config import AgentConfig, ListenAddress, check_files, load_key, mask_url, parse_listen
from flowtunnel.config import load_settings
from flowtunnel.errors import ConfigError
from flowtunnel.log import FullPolicy
from flowtunnel.wire.keys import format_key, generate_key

KEY = format_key(bytes(range(32)))
BASE = {"gateway": "http://127.0.0.1:8080", "spool": "/tmp/spool", "agent_id": "site-a", "key": KEY}


def make(**flags: object) -> AgentConfig:
    return load_settings(AgentConfig, section="agent", flags={**BASE, **flags})


def test_defaults() -> None:
    cfg = make()
    assert cfg.listen == ("udp://127.0.0.1:2055",)
    assert cfg.listen_addresses == (ListenAddress("127.0.0.1", 2055),)
    assert cfg.latency == 1.0
    assert cfg.max_body == 1024 * 1024
    assert cfg.full_policy is FullPolicy.DROP_OLDEST
    assert cfg.spool_dir == Path("/tmp/spool")


def test_file_env_and_flags_in_order(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text(
        '[agent]\ngateway = "http://gw.example:80"\nspool = "/var/spool/ft"\nagent-id = "from-file"\n'
        f'key = "{KEY}"\nlisten = ["udp://127.0.0.1:9995", "udp://[::1]:9995"]\nmax-body = "512KiB"\n'
        'latency = "250ms"\nfull-policy = "refuse-new"\n'
    )
    env = {"FLOWTUNNEL_AGENT_AGENT_ID": "from-env", "FLOWTUNNEL_AGENT_BANDWIDTH": "20k"}
    cfg = load_settings(
        AgentConfig, section="agent", config_file=conf, env=env, flags={"gateway": "https://gw2.example"},
    )
    assert cfg.gateway == "https://gw2.example"
    assert cfg.agent_id == "from-env"
    assert cfg.spool == Path("/var/spool/ft")
    assert cfg.listen_addresses == (ListenAddress("127.0.0.1", 9995), ListenAddress("::1", 9995))
    assert cfg.max_body == 512 * 1024
    assert cfg.latency == 0.25
    assert cfg.bandwidth == 20_000
    assert cfg.full_policy is FullPolicy.REFUSE_NEW


def test_env_listen_is_comma_separated() -> None:
    env = {"FLOWTUNNEL_AGENT_LISTEN": "udp://0.0.0.0:2055, udp://[::]:2055"}
    cfg = load_settings(AgentConfig, section="agent", env=env, flags=BASE)
    assert [str(a) for a in cfg.listen_addresses] == ["udp://0.0.0.0:2055", "udp://[::]:2055"]


def test_several_gateways_from_flags_env_and_a_toml_array(tmp_path: Path) -> None:
    """Issue 12: ``--gateway`` repeated, a comma list (env) or a TOML array; each transport sees one URL."""
    cfg = make(gateway=("https://gw1.example:8443", "https://gw2.example:8443/ft/"))
    assert cfg.gateways == ("https://gw1.example:8443", "https://gw2.example:8443/ft/")
    one = cfg.for_gateway("https://gw2.example:8443/ft/")
    assert (one.gateway, one.gateways, one.agent_id) == ("https://gw2.example:8443/ft/",
                                                         ("https://gw2.example:8443/ft/",), "site-a")
    with pytest.raises(ValueError, match="is not one of"):
        cfg.for_gateway("https://gw3.example")
    env = {"FLOWTUNNEL_AGENT_GATEWAY": "http://127.0.0.1:1, http://127.0.0.1:2"}
    cfg = load_settings(AgentConfig, section="agent", env=env,
                        flags={k: v for k, v in BASE.items() if k != "gateway"})
    assert cfg.gateways == ("http://127.0.0.1:1", "http://127.0.0.1:2")
    conf = tmp_path / "agent.toml"
    conf.write_text('[agent]\ngateway = ["http://gw1.example", "http://gw2.example"]\n')
    cfg = load_settings(AgentConfig, section="agent", config_file=conf,
                        flags={k: v for k, v in BASE.items() if k != "gateway"})
    assert cfg.gateways == ("http://gw1.example", "http://gw2.example")
    assert make().gateways == ("http://127.0.0.1:8080",)  # the single-URL form, unchanged


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"gateway": None}, "gateway URL is required"),
        ({"gateway": " , "}, "gateway URL is required"),
        ({"gateway": ("http://gw1", "ftp://gw2")}, "'ftp://gw2' is not an http:// or https:// URL"),
        ({"gateway": ("http://gw1", "http://gw1/")}, "names the same URL twice"),
        ({"gateway": "http://gw1:99999"}, "is not an http:// or https:// URL"),
        ({"gateway": ",".join(f"http://gw{i}" for i in range(33))}, "33 gateway URLs given, at most 32"),
        ({"gateway": "ftp://x"}, "is not an http:// or https:// URL"),
        ({"gateway": "http://u:p@gw"}, "must not carry credentials"),
        ({"spool": None}, "spool directory is required"),
        ({"agent_id": None}, "agent id is required"),
        ({"agent_id": "bad id!"}, "may only contain"),
        ({"key": None}, "a key is required"),
        ({"key_file": "/k"}, "either key or key-file"),
        ({"listen": ("udp://127.0.0.1",)}, "is not udp://HOST:PORT"),
        ({"listen": ("tcp://127.0.0.1:1",)}, "is not udp://HOST:PORT"),
        ({"listen": ("udp://localhost:2055",)}, "is not an IP address"),
        ({"listen": ("udp://127.0.0.1:1", "udp://127.0.0.1:1")}, "given twice"),
        ({"proxy": "socks5://p:1"}, "is not an http://"),
        ({"pin_sha256": "abcd"}, "is not 64 hex digits"),
        ({"proxy_password_file": "/pw"}, "proxy-password-file needs proxy-user"),
        ({"proxy": "http://p:1", "pac": "/p.pac"}, "pac is read only with proxy = auto"),
        ({"proxy": "none", "pac": "http://wpad/p.pac"}, "pac is read only with proxy = auto"),
        ({"max_body": "1k"}, r"max-body 1k is outside the allowed range 4k \.\. 1GiB"),
        ({"latency": "0s"}, r"latency 0s is outside the allowed range 10ms \.\. 1h"),
        ({"latency": "99999999d"}, r"latency 99999999d is outside the allowed range 10ms \.\. 1h"),
        ({"bandwidth": -1}, r"bandwidth -1 is outside the allowed range 0 \.\. 10G \(0 = unlimited\)"),
        ({"rcvbuf": "2TiB"}, r"rcvbuf 2TiB is outside the allowed range 4KiB \.\. 1GiB"),
        ({"spool_quota": "1k"}, r"spool-quota 1k is outside the allowed range 512KiB \.\. 16TiB"),
        ({"max_batch_datagrams": 0}, r"max-batch-datagrams 0 is outside the allowed range 1 \.\. 1000000"),
        ({"shutdown_timeout": "1d"}, r"shutdown-timeout 1d is outside the allowed range 0s \.\. 10m"),
        ({"spool_quota": "9" * 400}, "too large a size"),
        ({"latency": "9" * 400 + "d"}, "too long a duration"),
        ({"full_policy": "drop-newest"}, "is not one of drop-oldest, refuse-new"),
        ({"spool_quota": "lots"}, "is not a size"),
    ],
)
def test_bad_values_name_the_setting(flags: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make(**flags)


def test_a_body_limit_below_one_datagram_is_accepted() -> None:
    """Issue 15: a proxy capping bodies at 64 KB needs ``--max-body 60k``, which used to be refused."""
    assert make(max_body="60k").max_body == 60_000
    assert make(max_body="4k").max_body == 4000


def test_unknown_file_key_is_refused(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text('[agent]\nlatencyy = "1s"\n')
    with pytest.raises(ConfigError, match=r"unknown key agent\.latencyy"):
        load_settings(AgentConfig, section="agent", config_file=conf, flags=BASE)


def test_repr_masks_key_and_proxy_password() -> None:
    cfg = make(proxy="http://alice:s3cret@proxy.example:3128")
    text = repr(cfg)
    assert KEY not in text
    assert "s3cret" not in text
    assert "key='***'" in text
    assert "http://alice:***@proxy.example:3128" in text


def test_mask_url() -> None:
    assert mask_url("http://u:p@h:1/x") == "http://u:***@h:1/x"
    assert mask_url("http://h:1") == "http://h:1"
    assert mask_url(None) is None


def test_parse_listen_ipv6() -> None:
    addr = parse_listen("udp://[::1]:2055")
    assert addr == ListenAddress("::1", 2055)
    assert addr.family_v6
    assert str(addr) == "udp://[::1]:2055"


def test_load_key_from_flag_and_file(tmp_path: Path) -> None:
    raw = generate_key()
    key_file = tmp_path / "key"
    key_file.write_text(format_key(raw) + "\n")
    assert load_key(make(key=None, key_file=str(key_file))) == raw
    assert load_key(make()) == bytes(range(32))


def test_bad_key_is_reported_without_echoing_it(tmp_path: Path) -> None:
    secret = "ftk1_" + "A" * 40
    with pytest.raises(ConfigError, match="key is not a valid flowtunnel key") as info:
        load_key(make(key=secret))
    assert secret not in str(info.value)
    with pytest.raises(ConfigError, match="cannot read key file"):
        load_key(make(key=None, key_file=str(tmp_path / "missing")))


def test_a_pac_file_that_cannot_be_read_is_refused_before_start(tmp_path: Path) -> None:
    pac = tmp_path / "proxy.pac"
    for value in (str(pac), f"file://{pac}"):
        with pytest.raises(ConfigError, match=f"cannot read PAC file {pac}: No such file"):
            check_files(make(proxy="auto", pac=value))
    pac.mkdir()
    with pytest.raises(ConfigError, match="Is a directory"):
        check_files(make(pac=str(pac)))
    pac.rmdir()
    pac.write_text("function FindProxyForURL(url, host) { return 'DIRECT'; }\n")
    check_files(make(proxy="auto", pac=str(pac)))
    # A PAC URL that cannot be fetched is the network's state, warned about when routes are found.
    check_files(make(proxy="auto", pac="http://127.0.0.1:1/unreachable.pac"))
    check_files(make(proxy_user="u", proxy_password_file=str(tmp_path / "pw")))  # read when a proxy needs it
