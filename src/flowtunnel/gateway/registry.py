"""The agent registry: who may send batches to this gateway, with which key.

Stored in ``DATA/registry.sqlite`` (mode 0600): ``flowtunnel enroll``/``revoke`` write it while the
gateway may be running; the gateway reads it through ``AgentKeys``, a cache that re-reads the file after a
short TTL, on an unknown agent and after an authentication failure (so enrolments, rotations and
revocations take effect without a restart). Keys never appear in reprs or logs.

Error handling: ``RegistryError`` (and its subclasses ``AgentExists``, ``AgentNotFound``) name the agent and
the registry file.
"""

from __future__ import annotations

import base64
import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flowtunnel.errors import FlowtunnelError
from flowtunnel.wire.keys import KEY_PREFIX, format_key, generate_key, parse_key, validate_agent_id

__all__ = [
    "REGISTRY_FILE",
    "AgentEntry",
    "AgentExists",
    "AgentKeys",
    "AgentNotFound",
    "Registry",
    "RegistryError",
]

REGISTRY_FILE = "registry.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    agent_id   TEXT PRIMARY KEY,
    key        TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    revoked_at REAL
)
"""


class RegistryError(FlowtunnelError):
    """The registry cannot do what was asked; the message names the agent and the file."""


class AgentExists(RegistryError):
    """Enrolling a name that is already enrolled (use rotate to issue a new key)."""


class AgentNotFound(RegistryError):
    """Revoking or looking up a name that was never enrolled."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentEntry:
    """One enrolled agent. ``key`` is the raw 32-byte key; it is left out of the repr on purpose."""

    agent_id: str
    key: bytes = field(repr=False)
    created_at: float
    updated_at: float
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


class Registry:
    """Read/write access to ``DATA/registry.sqlite``. Cheap to open; close it (or use ``with``) when done."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / REGISTRY_FILE
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.path.exists():
            # Create it 0600 before SQLite does: the file holds every agent's key.
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        try:
            self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            self._db.execute(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise RegistryError(f"agent registry {self.path} cannot be opened: {exc}") from None

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({str(self.path)!r})"

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise RegistryError(f"agent registry {self.path}: {exc}") from None

    def enroll(self, name: str, *, rotate: bool = False, now: float | None = None) -> AgentEntry:
        """Create agent ``name`` with a new key (or, with ``rotate``, give an existing one a new key and
        lift a revocation). ``BadAgentId`` (a ValueError) from the id check propagates with its message."""
        agent_id = validate_agent_id(name)
        ts = time.time() if now is None else now
        key = generate_key()
        with self._write() as db:
            row = db.execute("SELECT created_at FROM agents WHERE agent_id = ?", (agent_id,)).fetchone()
            if row is not None and not rotate:
                raise AgentExists(
                    f"agent {agent_id!r} is already enrolled in {self.path} "
                    "(use --rotate to issue a new key; the old one stops working)"
                )
            if row is None:
                created = ts
                db.execute(
                    "INSERT INTO agents (agent_id, key, created_at, updated_at) VALUES (?, ?, ?, ?)",
                    (agent_id, format_key(key), ts, ts),
                )
            else:
                created = float(row[0])
                db.execute(
                    "UPDATE agents SET key = ?, updated_at = ?, revoked_at = NULL WHERE agent_id = ?",
                    (format_key(key), ts, agent_id),
                )
        return AgentEntry(agent_id=agent_id, key=key, created_at=created, updated_at=ts)

    def revoke(self, name: str, *, now: float | None = None) -> AgentEntry:
        """Mark ``name`` revoked: its batches get 403 from then on. Revoking twice is not an error."""
        ts = time.time() if now is None else now
        with self._write() as db:
            cur = db.execute(
                "UPDATE agents SET revoked_at = COALESCE(revoked_at, ?), updated_at = ? WHERE agent_id = ?",
                (ts, ts, name),
            )
            if cur.rowcount == 0:
                raise AgentNotFound(f"agent {name!r} is not enrolled in {self.path}")
        entry = self.get(name)
        assert entry is not None
        return entry

    def get(self, agent_id: str) -> AgentEntry | None:
        try:
            row = self._db.execute(
                "SELECT agent_id, key, created_at, updated_at, revoked_at FROM agents WHERE agent_id = ?",
                (agent_id,),
            ).fetchone()
        except sqlite3.DatabaseError as exc:
            raise RegistryError(f"agent registry {self.path}: {exc}") from None
        return None if row is None else self._entry(row)

    def list(self, known: Mapping[str, AgentEntry] | None = None) -> list[AgentEntry]:
        """Every agent, by id. ``known``: entries read before, reused where the row is unchanged (parsing
        2,000 keys took most of a re-read)."""
        try:
            rows = self._db.execute(
                "SELECT agent_id, key, created_at, updated_at, revoked_at FROM agents ORDER BY agent_id"
            ).fetchall()
        except sqlite3.DatabaseError as exc:
            raise RegistryError(f"agent registry {self.path}: {exc}") from None
        if not known:
            return [self._entry(r) for r in rows]
        out = []
        for r in rows:
            old = known.get(r[0])
            if old is not None and (old.created_at, old.updated_at, old.revoked_at) == (r[2], r[3], r[4]) \
                    and r[1] == _key_text(old.key):
                out.append(old)
            else:
                out.append(self._entry(r))
        return out

    def _entry(self, row: tuple[str, str, float, float, float | None]) -> AgentEntry:
        try:
            key = parse_key(row[1])
        except ValueError:
            raise RegistryError(
                f"agent registry {self.path}: agent {row[0]!r} has an unreadable key"
            ) from None
        return AgentEntry(
            agent_id=row[0], key=key, created_at=row[2], updated_at=row[3], revoked_at=row[4]
        )


def _key_text(key: bytes) -> str:
    """``format_key`` of 32 key bytes, without its checks (the bytes came from ``parse_key``)."""
    return KEY_PREFIX + base64.urlsafe_b64encode(key).rstrip(b"=").decode("ascii")


class AgentKeys:
    """The gateway's view of the registry: a copy re-read when the file changes or after ``ttl`` seconds.

    ``lookup`` is called on every request, so it must be cheap: the file's signature (a ``stat`` and a
    28-byte read) is checked at most once per ``check_interval`` seconds, and the file re-read (SQL) only
    when it changed: with 2,000 agents the per-request check was ~5 % of the gateway's CPU (bench/fleet.py).
    So a revocation is seen within ``check_interval``; a lookup of an unknown or revoked agent checks at
    once (a new enrolment or a rotation is not refused for that long), as does ``refresh_if_stale`` after an
    authentication failure, at most once per ``min_reload`` seconds (a key rotated within the file's
    timestamp granularity). ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        ttl: float = 2.0,
        min_reload: float = 0.25,
        check_interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._data_dir = data_dir
        self._ttl = ttl
        self._min_reload = min_reload
        self._check_interval = check_interval
        self._clock = clock
        self._entries: dict[str, AgentEntry] = {}
        self._loaded_at: float | None = None
        self._checked_at: float | None = None
        self._signature_seen: tuple[int, int, int, bytes] | None = None

    def _signature(self) -> tuple[int, int, int, bytes] | None:
        # SQLite's file change counter (header bytes 24-27, bumped by every commit in rollback-journal mode)
        # catches changes that a coarse file system timestamp would hide.
        try:
            with open(self._data_dir / REGISTRY_FILE, "rb") as fh:
                st = os.fstat(fh.fileno())
                counter = fh.read(28)[24:]
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino, counter)

    def reload(self) -> None:
        sig = self._signature()
        with Registry(self._data_dir) as reg:
            self._entries = {e.agent_id: e for e in reg.list(self._entries)}
        self._signature_seen = sig
        self._loaded_at = self._checked_at = self._clock()

    def _age(self) -> float:
        return float("inf") if self._loaded_at is None else self._clock() - self._loaded_at

    def _changed(self, *, now: bool = False) -> bool:
        """Whether the file changed since the copy was read; checked at most once per ``check_interval``
        unless ``now``."""
        at = self._clock()
        if not now and self._checked_at is not None and at - self._checked_at < self._check_interval:
            return False
        self._checked_at = at
        return self._signature() != self._signature_seen

    def lookup(self, agent_id: str) -> AgentEntry | None:
        """The agent's current entry (revoked ones included), or None if not enrolled.

        A changed registry file (enroll, rotate, revoke) is seen within ``check_interval``, and at once
        for an agent the copy does not know or has as revoked (re-enrolled with ``--rotate``).
        """
        if self._age() > self._ttl or self._changed():
            self.reload()
        entry = self._entries.get(agent_id)
        if (entry is None or entry.revoked) and self._changed(now=True):
            self.reload()
            entry = self._entries.get(agent_id)
        return entry

    def refresh_if_stale(self) -> bool:
        """After an authentication failure: re-read if the file changed, or (a change its signature may hide)
        if not done within ``min_reload``; True if the copy was re-read."""
        if self._changed(now=True) or self._age() > self._min_reload:
            self.reload()
            return True
        return False

    def entries(self) -> dict[str, AgentEntry]:
        """Every enrolled agent (revoked ones included), re-read first if the file changed."""
        if self._age() > self._ttl or self._changed():
            self.reload()
        return dict(self._entries)

    def known(self) -> list[str]:
        return sorted(self._entries)
