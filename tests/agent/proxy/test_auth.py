"""ProxyAuthenticator: Basic, NTLM and Negotiate handshakes (NTLM checked by pyspnego's own acceptor), and a
hostile proxy's 407s (garbage challenges, endless loops) that must end in a ProxyAuthError, never a loop."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import pytest
import spnego
from hypothesis import given, settings
from hypothesis import strategies as st

from flowtunnel.agent.proxy.auth import (
    MAX_HANDSHAKES,
    MAX_ROUNDS,
    AuthFailed,
    AuthUnsupported,
    ProxyAuthenticator,
    ProxyAuthError,
    ProxyCredentials,
    parse_challenges,
)

SECRET = "s3cr3t-Pa55"
CREDS = ProxyCredentials(username="alice", password=SECRET, domain="CORP")


@pytest.fixture
def ntlm_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    """pyspnego's NTLM acceptor knowing CORP\\alice (what a Windows proxy would check against)."""
    users = tmp_path / "ntlm-users"
    users.write_text(f"CORP:alice:{SECRET}\n")
    monkeypatch.setenv("NTLM_USER_FILE", str(users))
    return spnego.server(protocol="ntlm", options=spnego.NegotiateOptions.use_ntlm)


def _answer_until_error(answer: Callable[[], str], limit: int = 100) -> tuple[int, Exception | None]:
    """Call ``answer`` until it raises (at most ``limit`` times): (answers given, the exception)."""
    for n in range(limit):
        try:
            answer()
        except Exception as exc:
            return n, exc
    return limit, None


def _token(header: str, scheme: str) -> bytes:
    name, _, value = header.partition(" ")
    assert name == scheme
    return base64.b64decode(value)


# ---------------------------------------------------------------------------------------------- credentials


def test_credentials_repr_masks_the_password() -> None:
    text = repr(CREDS)
    assert SECRET not in text
    assert "***" in text
    assert "alice" in text


def test_authenticator_repr_and_errors_never_show_the_password() -> None:
    a = ProxyAuthenticator(CREDS, proxy_host="proxy.corp")
    assert SECRET not in repr(a)
    a.respond(["Basic realm=\"corp\""])
    with pytest.raises(AuthFailed) as err:
        a.respond(["Basic realm=\"corp\""])
    assert SECRET not in str(err.value)
    assert "CORP\\alice" in str(err.value)


@pytest.mark.parametrize("bad", ["al:ice", "al\nice", ""])
def test_credentials_refuse_unusable_usernames(bad: str) -> None:
    with pytest.raises(ValueError, match="username"):
        ProxyCredentials(username=bad, password="x")


def test_credentials_refuse_header_injection_in_the_password() -> None:
    with pytest.raises(ValueError, match="password"):
        ProxyCredentials(username="u", password="p\r\nX-Evil: 1")


# ---------------------------------------------------------------------------------------------- parsing


def test_parse_challenges_splits_lists_and_keeps_tokens_and_params() -> None:
    got = parse_challenges([
        'Basic realm="a, b", charset="UTF-8", NTLM',
        "Negotiate TlRMTVNTUAACAAAA==",
        "Digest realm=\"x\", nonce=\"abc\", qop=\"auth\"",
    ])
    assert [c.scheme for c in got] == ["basic", "ntlm", "negotiate", "digest"]
    assert got[0].params == (("realm", "a, b"), ("charset", "UTF-8"))
    assert got[2].token == "TlRMTVNTUAACAAAA=="
    assert dict(got[3].params)["nonce"] == "abc"


def test_parse_challenges_bounds_its_work() -> None:
    huge = ", ".join(f"X{i} a=b" for i in range(100_000))
    got = parse_challenges([huge, "NTLM"])
    assert len(got) <= 32


# ---------------------------------------------------------------------------------------------- Basic


def test_basic_on_407_and_refused_on_a_second_407() -> None:
    a = ProxyAuthenticator(CREDS, proxy_host="p")
    assert a.initial() is None
    value = a.respond(['Basic realm="corp"'])
    assert a.scheme == "basic"
    assert _token(value, "Basic") == f"CORP\\alice:{SECRET}".encode()
    with pytest.raises(AuthFailed, match="refused Basic"):
        a.respond(['Basic realm="corp"'])


def test_basic_after_done_is_sent_with_every_request() -> None:
    a = ProxyAuthenticator(ProxyCredentials(username="bob", password="pw"), proxy_host="p")
    value = a.respond(["Basic"])
    a.done()
    assert a.initial() == value


def test_prefer_basic_sends_credentials_before_any_407() -> None:
    a = ProxyAuthenticator(ProxyCredentials(username="bob", password="pw"), proxy_host="p", prefer="basic")
    value = a.initial()
    assert value is not None
    assert _token(value, "Basic") == b"bob:pw"
    with pytest.raises(AuthFailed):  # a 407 to preemptive credentials: refused, not a second try
        a.respond(["Basic"])


def test_no_credentials_is_unsupported_and_names_the_offer() -> None:
    a = ProxyAuthenticator(None, proxy_host="proxy.corp")
    assert a.initial() is None
    with pytest.raises(AuthUnsupported, match=r"offers ntlm, basic.*--proxy-user"):
        a.respond(["NTLM", 'Basic realm="x"'])


def test_only_unknown_schemes_is_unsupported() -> None:
    with pytest.raises(AuthUnsupported, match="offers only digest"):
        ProxyAuthenticator(CREDS, proxy_host="p").respond(['Digest realm="x", nonce="1"'])


def test_ntlm_preferred_over_basic() -> None:
    a = ProxyAuthenticator(CREDS, proxy_host="p")
    value = a.respond(['Basic realm="x"', "NTLM"])
    assert a.scheme == "ntlm"
    assert _token(value, "NTLM").startswith(b"NTLMSSP\0\x01")


# ------------------------------------------------------------------------------------------ NTLM / Negotiate


def test_ntlm_handshake_is_accepted_by_a_real_acceptor(ntlm_server: object) -> None:
    server = ntlm_server
    a = ProxyAuthenticator(CREDS, proxy_host="proxy.corp")
    negotiate = _token(a.respond(["NTLM"]), "NTLM")
    challenge = server.step(negotiate)  # type: ignore[attr-defined]
    authenticate = _token(a.respond(["NTLM " + base64.b64encode(challenge).decode()]), "NTLM")
    server.step(authenticate)  # type: ignore[attr-defined]
    assert server.complete  # type: ignore[attr-defined]
    assert server.client_principal == "CORP\\alice"  # type: ignore[attr-defined]
    a.done()
    assert a.initial() is None  # the connection is authenticated: nothing more to send


def test_ntlm_wrong_password_is_refused_by_the_acceptor_then_authfailed(ntlm_server: object) -> None:
    server = ntlm_server
    wrong = ProxyCredentials(username="alice", password="wrong", domain="CORP")
    a = ProxyAuthenticator(wrong, proxy_host="p")
    challenge = server.step(_token(a.respond(["NTLM"]), "NTLM"))  # type: ignore[attr-defined]
    authenticate = _token(a.respond(["NTLM " + base64.b64encode(challenge).decode()]), "NTLM")
    with pytest.raises(spnego.exceptions.SpnegoError):
        server.step(authenticate)  # type: ignore[attr-defined]
    with pytest.raises(AuthFailed, match=r"refused NTLM credentials for user 'CORP\\alice'"):
        a.respond(["NTLM"])  # what squid answers: a bare NTLM challenge again


def test_negotiate_is_answered_with_raw_ntlm_in_the_negotiate_scheme(ntlm_server: object) -> None:
    # squid's negotiate_wrapper_auth routes tokens starting with NTLMSSP to its NTLM helper; an SPNEGO-wrapped
    # NTLM token would go to the Kerberos helper and be refused (tests/zoo/test_networks.py shows both).
    server = ntlm_server
    a = ProxyAuthenticator(CREDS, proxy_host="p")
    first = a.respond(["Negotiate"])
    assert a.scheme == "negotiate"
    token = _token(first, "Negotiate")
    assert token.startswith(b"NTLMSSP\0")
    challenge = server.step(token)  # type: ignore[attr-defined]
    last = a.respond(["Negotiate " + base64.b64encode(challenge).decode()])
    server.step(_token(last, "Negotiate"))  # type: ignore[attr-defined]
    assert server.complete  # type: ignore[attr-defined]
    with pytest.raises(AuthFailed, match="refused Negotiate"):
        a.respond(["Negotiate"])


# ------------------------------------------------------------------------------------------ hostile proxies


def test_endless_bare_407_loop_raises_within_the_round_limit() -> None:
    a = ProxyAuthenticator(CREDS, proxy_host="p")
    answers, error = _answer_until_error(lambda: a.respond(["NTLM"]))
    assert isinstance(error, AuthFailed)
    assert answers <= MAX_ROUNDS


def test_endless_challenge_token_loop_raises(ntlm_server: object) -> None:
    server = ntlm_server
    a = ProxyAuthenticator(CREDS, proxy_host="p")
    challenge = "NTLM " + base64.b64encode(server.step(_token(a.respond(["NTLM"]), "NTLM"))).decode()  # type: ignore[attr-defined]
    answers, error = _answer_until_error(lambda: a.respond([challenge]))  # the proxy replays its challenge
    assert isinstance(error, AuthFailed)
    assert "after the handshake completed" in str(error)
    assert answers + 1 <= MAX_ROUNDS


def test_407_after_every_done_is_a_loop_after_a_few_handshakes() -> None:
    a = ProxyAuthenticator(CREDS, proxy_host="p")

    def one_request() -> str:
        value = a.respond(["NTLM"])
        a.done()  # the proxy let one request through, then asks again
        return value

    rounds, error = _answer_until_error(one_request)
    assert isinstance(error, AuthFailed)
    assert "407 loop" in str(error)
    assert rounds <= MAX_HANDSHAKES


@pytest.mark.parametrize(
    "challenge",
    [
        "NTLM !!!not-base64!!!",
        "NTLM " + base64.b64encode(b"NTLMSSP\0\x02\0\0\0" + b"\xff" * 7).decode(),  # truncated type 2
        "NTLM " + base64.b64encode(bytes(range(256)) * 4).decode(),  # random bytes
        "NTLM " + base64.b64encode(b"NTLMSSP\0\x03\0\0\0" + bytes(64)).decode(),  # wrong message type
        "NTLM TlRMTVNTUAACAAAA" + "A" * 50_000,  # huge
    ],
)
def test_garbage_ntlm_challenges_raise_authfailed(challenge: str) -> None:
    a = ProxyAuthenticator(CREDS, proxy_host="p")
    a.respond(["NTLM"])
    with pytest.raises(AuthFailed) as err:
        a.respond([challenge])
    assert len(str(err.value)) < 400
    assert SECRET not in str(err.value)


def test_token_before_handshake_started_is_refused() -> None:
    a = ProxyAuthenticator(CREDS, proxy_host="p")
    with pytest.raises(AuthFailed, match="before we started"):
        a.respond(["NTLM TlRMTVNTUAACAAAA"])


def test_scheme_switch_mid_handshake_is_refused() -> None:
    a = ProxyAuthenticator(CREDS, proxy_host="p")
    a.respond(["NTLM"])
    with pytest.raises(AuthFailed, match="stopped offering ntlm"):
        a.respond(['Basic realm="x"'])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=300), max_size=4), st.lists(st.text(max_size=300), max_size=4))
def test_any_challenges_end_in_a_value_or_a_proxy_auth_error(
    first: list[str], second: list[str]
) -> None:
    a = ProxyAuthenticator(CREDS, proxy_host="p")
    for values in (first, second, second, second, second):
        try:
            value = a.respond(values)
        except ProxyAuthError:
            return
        assert value.split(" ", 1)[0] in ("Basic", "NTLM", "Negotiate")
    raise AssertionError("five 407s in a row were answered: a loop")
