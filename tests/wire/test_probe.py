"""The probe MAC (wire/probe.py) is what docs/protocol.md section 7.3 says, byte for byte, and only the key
holder's answer for this exact agent and nonce verifies."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flowtunnel.wire import AuthenticationFailed, MalformedHeader, decode_probe_nonce, probe_mac, verify_probe
from flowtunnel.wire.probe import encode_b64url, probe_mac_text

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
KEY = bytes(range(32))


def doc_vector() -> dict[str, str]:
    text = DOC.read_text(encoding="utf-8")
    block = text[text.index("Probe vector") :]
    block = block[block.index("```text\n") + 8 : block.index("```\n", block.index("```text\n") + 8)]
    out: dict[str, str] = {}
    for line in block.splitlines():
        m = re.match(r"^(\w+(?: text)?)\s+(.*)$", line)
        assert m, line
        out[m.group(1)] = m.group(2).strip()
    return out


def test_the_documented_vector_is_what_the_code_computes() -> None:
    vec = doc_vector()
    nonce = bytes.fromhex(vec["nonce"].split()[0])
    assert vec["nonce"].endswith(f"(parameter: {encode_b64url(nonce)})")
    assert decode_probe_nonce(encode_b64url(nonce)) == nonce
    assert probe_mac(KEY, "site-a", nonce).hex() == vec["mac"]
    assert probe_mac_text(KEY, "site-a", nonce) == vec["mac text"]
    assert vec["request"] == f"GET /v1/probe?agent=site-a&nonce={encode_b64url(nonce)}"
    assert vec["mac text"] in vec["answer"]
    verify_probe(KEY, "site-a", nonce, vec["mac text"])


@pytest.mark.parametrize(
    "mac",
    [None, 5, "", "x" * 43, probe_mac_text(bytes(32), "site-a", bytes(16)),
     probe_mac_text(KEY, "site-b", bytes(16)), probe_mac_text(KEY, "site-a", bytes(17)),
     probe_mac_text(KEY, "site-a", bytes(16))[:-1] + "=", "<html>login</html>"],
)
def test_anything_but_the_keyed_answer_for_this_nonce_is_refused(mac: object) -> None:
    with pytest.raises(AuthenticationFailed):
        verify_probe(KEY, "site-a", bytes(16), mac)


@pytest.mark.parametrize("text", ["", "AAAA", "A" * 20, "A" * 44, "A" * 100, "AAAAAAAAAAAAAAAAAAAAA=",
                                  "AAAAAAAAAAAAAAAAAAAAA+", "AAAAAAAAAAAAAAAAAAAA\u00e9A"])
def test_nonces_outside_16_to_32_bytes_of_unpadded_base64url_are_refused(text: str) -> None:
    with pytest.raises(MalformedHeader):
        decode_probe_nonce(text)


def test_the_mac_refuses_bad_arguments_instead_of_computing_something() -> None:
    with pytest.raises(ValueError, match=r"probe nonce of 15 bytes is outside 16\.\.32"):
        probe_mac(KEY, "site-a", bytes(15))
    with pytest.raises(ValueError, match="may only contain"):
        probe_mac(KEY, "bad id", bytes(16))
