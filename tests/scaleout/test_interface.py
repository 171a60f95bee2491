"""The journal interface without a server: the store does not import the gateway, message encoding round
trips, the journal URL parses (and never shows the password)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flowtunnel.journal.jetstream import decode_message, encode_datagrams, parse_journal_url
from tests.gateway.util import datagrams


def test_the_store_sink_imports_no_gateway_module() -> None:
    code = ("import sys, flowtunnel.store.sink, flowtunnel.journal; "
            "print([m for m in sys.modules if m.startswith('flowtunnel.gateway')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_a_message_round_trips_its_datagrams() -> None:
    dgs = datagrams(50, start=7, exporter="2001:db8::1")
    entries = decode_message(encode_datagrams(dgs), seq=42, agent="a.b", first=7, count=50, appended_ns=5)
    assert [e.datagram for e in entries] == dgs
    assert {(e.seq, e.stream, e.appended_ns) for e in entries} == {(42, "a.b", 5)}
    assert [e.stream_seq for e in entries] == list(range(7, 57))


def test_journal_urls() -> None:
    cfg = parse_journal_url("nats://user:s3cret@n1:4222,n2:4223, n3:4224")
    assert cfg.servers == ("nats://n1:4222", "nats://n2:4223", "nats://n3:4224")
    assert cfg.effective_replicas == 3
    assert "s3cret" not in repr(cfg)
    assert "s3cret" not in cfg.describe()
    assert parse_journal_url("nats://127.0.0.1:4222").effective_replicas == 1
    assert cfg.subject("site.7") == "flowtunnel.journal.site=7"
    for bad in ("http://n1:4222", "nats://n1", "nats://n1:0", "nats://n1:99999"):
        with pytest.raises(ValueError, match="journal URL"):
            parse_journal_url(bad)
