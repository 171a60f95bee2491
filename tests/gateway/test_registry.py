"""The agent registry: enrol, rotate, revoke; a private file; keys never shown; the gateway's cached view."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from flowtunnel.gateway.registry import REGISTRY_FILE, AgentExists, AgentKeys, AgentNotFound, Registry
from flowtunnel.wire import BadAgentId, format_key


def test_enrol_creates_a_private_file_and_a_fresh_key(tmp_path: Path) -> None:
    with Registry(tmp_path / "gw") as reg:
        a = reg.enroll("site-a", now=100.0)
        b = reg.enroll("site-b", now=101.0)
        assert len(a.key) == 32
        assert a.key != b.key
        assert reg.get("site-a") == a
        assert [e.agent_id for e in reg.list()] == ["site-a", "site-b"]
    mode = stat.S_IMODE((tmp_path / "gw" / REGISTRY_FILE).stat().st_mode)
    assert mode == 0o600


def test_key_is_not_in_reprs(tmp_path: Path) -> None:
    with Registry(tmp_path) as reg:
        entry = reg.enroll("site-a")
        assert format_key(entry.key) not in repr(entry)
        assert entry.key.hex() not in repr(entry)
        assert repr(entry.key) not in repr(entry)
        assert "site-a" in repr(entry)


def test_re_enrolling_needs_rotate_and_rotation_replaces_the_key(tmp_path: Path) -> None:
    with Registry(tmp_path) as reg:
        first = reg.enroll("site-a", now=1.0)
        with pytest.raises(AgentExists, match=r"'site-a' is already enrolled.*--rotate"):
            reg.enroll("site-a")
        assert reg.get("site-a") == first
        second = reg.enroll("site-a", rotate=True, now=2.0)
        assert second.key != first.key
        assert second.created_at == 1.0
        assert reg.get("site-a") == second


def test_revoke_marks_the_agent_and_rotate_lifts_it(tmp_path: Path) -> None:
    with Registry(tmp_path) as reg:
        reg.enroll("site-a")
        revoked = reg.revoke("site-a", now=5.0)
        assert revoked.revoked
        assert revoked.revoked_at == 5.0
        assert reg.revoke("site-a", now=9.0).revoked_at == 5.0  # idempotent, keeps the first time
        with pytest.raises(AgentExists):
            reg.enroll("site-a")
        assert not reg.enroll("site-a", rotate=True).revoked
        with pytest.raises(AgentNotFound, match="'ghost' is not enrolled"):
            reg.revoke("ghost")


@pytest.mark.parametrize("name", ["", "-lead", "a b", "../etc", "x" * 64, "é"])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    with Registry(tmp_path) as reg, pytest.raises(BadAgentId):
        reg.enroll(name)
    with Registry(tmp_path) as reg:
        assert reg.list() == []


def test_cached_view_sees_changes_within_the_check_interval_and_reloads_after_ttl(tmp_path: Path) -> None:
    now = [0.0]
    keys = AgentKeys(tmp_path, ttl=10.0, check_interval=0.1, clock=lambda: now[0])
    with Registry(tmp_path) as reg:
        assert keys.lookup("site-a") is None
        a = reg.enroll("site-a")
        assert keys.lookup("site-a") == a  # an agent the copy does not know: the file is checked at once
        reg.revoke("site-a")
        now[0] += 0.1
        entry = keys.lookup("site-a")  # the file changed: re-read at the next check
        assert entry is not None
        assert entry.revoked
    assert keys.known() == ["site-a"]
    # Nothing changed and the TTL has not passed: no re-read (the cached copy answers).
    keys._entries.clear()
    assert keys.lookup("site-a") is None
    now[0] = 11.0
    assert keys.lookup("site-a") is not None
    # After an authentication failure the copy is re-read, at most once per min_reload.
    assert not keys.refresh_if_stale()  # just re-read
    now[0] = 12.0
    assert keys.refresh_if_stale()
    assert not keys.refresh_if_stale()


def test_the_registry_file_is_checked_at_most_once_per_interval_not_per_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every request stat'ed and read the registry file: ~5 % of the gateway's CPU with 2,000 agents.
    now = [0.0]
    keys = AgentKeys(tmp_path, ttl=10.0, check_interval=0.1, clock=lambda: now[0])
    with Registry(tmp_path) as reg:
        reg.enroll("site-a")
    assert keys.lookup("site-a") is not None
    checks = 0
    signature = keys._signature

    def counted() -> tuple[int, int, int, bytes] | None:
        nonlocal checks
        checks += 1
        return signature()

    monkeypatch.setattr(keys, "_signature", counted)
    for _ in range(100):
        assert keys.lookup("site-a") is not None
        now[0] += 0.004  # 100 lookups in 0.4 s
    assert checks <= 4
    with Registry(tmp_path) as reg:
        reg.revoke("site-a")
    now[0] += 0.1
    entry = keys.lookup("site-a")
    assert entry is not None
    assert entry.revoked


def test_a_reload_reuses_unchanged_entries_and_reads_changed_ones(tmp_path: Path) -> None:
    # Every registry_ttl the copy is re-read: with 2,000 agents parsing every key again was ~10 % of the
    # gateway's CPU (bench/fleet.py).
    now = [0.0]
    keys = AgentKeys(tmp_path, ttl=1.0, check_interval=0.1, clock=lambda: now[0])
    with Registry(tmp_path) as reg:
        reg.enroll("site-a")
        reg.enroll("site-b")
    a, b = keys.lookup("site-a"), keys.lookup("site-b")
    with Registry(tmp_path) as reg:
        rotated = reg.enroll("site-b", rotate=True)
    now[0] += 2.0
    assert keys.lookup("site-a") is a  # unchanged: the same entry, not parsed again
    new_b = keys.lookup("site-b")
    assert new_b == rotated
    assert new_b is not b
    assert b is not None
    assert new_b.key != b.key
