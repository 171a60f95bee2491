"""The DNS rung on the transport seam: its settings, and the gateway's TXT verdicts as the seam's answers."""

from __future__ import annotations

import pytest

from flowtunnel.agent.config import AgentConfig
from flowtunnel.agent.transport.answers import Acked, Hints, Rejected, Resync, Retry, TooLarge
from flowtunnel.agent.transport.dns import DnsTransport, _answer
from flowtunnel.config import load_settings
from flowtunnel.errors import ConfigError
from flowtunnel.wire.dns import Answer

BASE = {"gateway": "http://gw.example:8080", "spool": "/tmp/spool", "agent_id": "site-a",
        "key": "ftk1_" + "A" * 43}


def make(**flags: object) -> AgentConfig:
    return load_settings(AgentConfig, section="agent", flags={**BASE, **flags})


def test_a_dns_zone_ends_the_default_ladder_with_the_dns_rung() -> None:
    assert make().rungs == ("post", "ws", "get")
    cfg = make(dns_zone="T.Example.Org.", dns_resolver="127.0.0.1:5300", dns_qps="50")
    assert cfg.rungs == ("post", "ws", "get", "dns")
    assert cfg.dns_zone == "t.example.org"
    assert cfg.dns_qps == 50
    assert make(dns_zone="t.example.org", rungs="get,dns").rungs == ("get", "dns")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"rungs": "post,dns"}, "the dns rung needs the gateway's zone: --dns-zone ZONE"),
        ({"dns_zone": "bad_zone!"}, "dns-zone: DNS zone 'bad_zone!' is not a valid domain name"),
        ({"dns_zone": "t.example.org", "dns_qps": "0"}, "dns-qps 0.0 is outside the allowed range"),
        ({"dns_zone": "t.example.org", "dns_resolver": "nowhere"}, "dns-resolver"),
    ],
)
def test_bad_dns_settings_say_what_is_wrong(flags: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make(**flags)


@pytest.mark.parametrize(
    ("txt", "expected"),
    [
        (Answer(kind="a", fields={"st": "200", "acked": "42", "tag": "t" * 22}),
         Acked(acked=42, tag="t" * 22)),
        (Answer(kind="e", fields={"st": "409", "code": "resync", "acked": "7"}), Resync),
        (Answer(kind="e", fields={"st": "409", "code": "out-of-order"}), Resync),
        (Answer(kind="e", fields={"st": "413", "code": "limit-exceeded"}), TooLarge),
        (Answer(kind="e", fields={"st": "503", "code": "journal-full", "ra": "5"}), Retry),
        (Answer(kind="e", fields={"st": "429", "code": "agent-rate", "ra": "2"}), Retry),
        (Answer(kind="e", fields={"st": "401", "code": "unknown-agent"}), Rejected),
        (Answer(kind="e", fields={"st": "400", "code": "dns-bad-name"}), Rejected),
        (Answer(kind="a", fields={"st": "200"}), Retry),  # an ack without acked is not an ack
    ],
)
def test_txt_verdicts_map_like_http_statuses(txt: Answer, expected: object) -> None:
    got = _answer(txt, "batch 1..2")
    if isinstance(expected, type):
        assert isinstance(got, expected)
    else:
        assert got == expected
    if isinstance(got, Retry) and "ra" in txt.fields:
        assert got.after == float(txt.fields["ra"])


async def test_under_a_long_zone_a_batch_needing_too_many_names_is_too_large_not_an_error() -> None:
    # 203 characters of zone leave 19 bytes a name: 16,383 names (the most a batch may take) carry 311,277
    zone = ".".join(["z" * 49] * 4) + ".org"
    transport = DnsTransport(zone=zone, resolver=("127.0.0.1", 9))
    got = await transport.exchange(b"x" * 400_000, Hints(agent_id="site-a", backlog=0, acked=0))
    await transport.close()
    assert isinstance(got, TooLarge)
    assert "311277 bytes" in got.detail


async def test_a_silent_resolver_is_a_retry_and_a_huge_batch_too_large() -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:  # a "resolver" that never answers
        sink.bind(("127.0.0.1", 0))
        transport = DnsTransport(zone="t.example.org", resolver=sink.getsockname(), qps=1000, max_body=1000,
                                 query_timeout=0.05, retries=1)
        hints = Hints(agent_id="site-a", backlog=0, acked=0)
        try:
            big = await transport.exchange(b"x" * 1001, hints)
            assert isinstance(big, TooLarge)
            assert big.by == "dns rung"
            silent = await transport.exchange(b"y" * 100, hints)
        finally:
            await transport.close()
    assert isinstance(silent, Retry)
    assert silent.cause == "dns-no-answer"
