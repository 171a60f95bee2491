"""Source address pool and the persisted (agent, exporter) -> source map."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flowtunnel.gateway.pool import AddressPool, ForwardMap, Mapping, PoolExhausted


def test_pool_entries_in_order_skipping_network_and_broadcast() -> None:
    pool = AddressPool(["127.0.5.0/30", "127.0.9.1-127.0.9.2", "198.51.100.7", "fd00::/127"])
    assert list(pool.addresses(4)) == ["127.0.5.1", "127.0.5.2", "127.0.9.1", "127.0.9.2", "198.51.100.7"]
    assert list(pool.addresses(6)) == ["fd00::", "fd00::1"]
    assert pool.has(6)
    assert not AddressPool(["127.0.0.2"]).has(6)


def test_allocation_takes_the_first_free_address_and_reports_exhaustion() -> None:
    pool = AddressPool(["127.0.0.2-127.0.0.4"])
    assert pool.allocate(4, set()) == "127.0.0.2"
    assert pool.allocate(4, {"127.0.0.2", "127.0.0.3"}) == "127.0.0.4"
    message = "no free IPv4 address left in the source pool (3 in use)"
    with pytest.raises(PoolExhausted, match=re.escape(message)):
        pool.allocate(4, {"127.0.0.2", "127.0.0.3", "127.0.0.4"})
    with pytest.raises(PoolExhausted, match="IPv6"):
        pool.allocate(6, set())


def test_default_loopback_pool_is_lazy() -> None:
    pool = AddressPool(["127.0.0.2-127.255.255.254"])
    used = {f"127.0.0.{i}" for i in range(2, 200)}
    assert pool.allocate(4, used) == "127.0.0.200"


def test_forward_map_persists_atomically(tmp_path: Path) -> None:
    fmap = ForwardMap(tmp_path)
    m = Mapping(agent="a", exporter="127.0.0.1", family=4, address="127.0.0.2", port=40001)
    fmap.put(m)
    assert fmap.dirty
    fmap.save()
    assert not fmap.dirty
    assert [p.name for p in tmp_path.iterdir()] == ["forward-map.json"]
    again = ForwardMap(tmp_path)
    assert again.get("a", "127.0.0.1", 4) == m
    assert again.used(4) == {"127.0.0.2"}
    again.put(m)
    assert not again.dirty


def test_unreadable_forward_map_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "forward-map.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"forward map .*forward-map\.json is unreadable"):
        ForwardMap(tmp_path)
