"""The agent registry in a JetStream KV bucket, for gateways that share a JetStream journal.

``enroll|revoke|agents --journal nats://...`` write and read the bucket (one key per agent, a JSON value with
the key in the registry's text form); each gateway keeps a copy updated by a watch on the bucket
(``KvAgentKeys``, the same face as the file registry's ``AgentKeys``), so an enrolment, a rotation or a
revocation reaches every gateway within moments of being written. Keys never appear in reprs or logs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from flowtunnel.errors import ConfigError
from flowtunnel.gateway.registry import AgentEntry, AgentExists, AgentNotFound, RegistryError
from flowtunnel.journal.jetstream import (
    JetStreamConfig,
    _Connection,
    _reason,
    agent_of,
    create_retrying,
    retry_unheard,
    subject_token,
    wait_for_leader,
)
from flowtunnel.runtime import cancel_and_wait
from flowtunnel.wire.keys import format_key, generate_key, parse_key, validate_agent_id

__all__ = ["REGISTRY_BUCKET", "KvAgentKeys", "KvRegistry"]

log = logging.getLogger("flowtunnel.journal.registry")

REGISTRY_BUCKET = "flowtunnel-agents"


def _encode(entry: AgentEntry) -> bytes:
    return json.dumps({
        "key": format_key(entry.key), "created_at": entry.created_at, "updated_at": entry.updated_at,
        "revoked_at": entry.revoked_at,
    }).encode()


def _decode(agent_id: str, value: bytes) -> AgentEntry:
    doc = json.loads(value)
    return AgentEntry(
        agent_id=agent_id, key=parse_key(doc["key"]), created_at=float(doc["created_at"]),
        updated_at=float(doc["updated_at"]),
        revoked_at=None if doc.get("revoked_at") is None else float(doc["revoked_at"]),
    )


class KvRegistry:
    """Enrol, rotate, revoke and list agents in the bucket. ``open()`` then ``close()``."""

    def __init__(self, config: JetStreamConfig, *, bucket: str = REGISTRY_BUCKET) -> None:
        self.config = config
        self.bucket = bucket
        self._conn = _Connection(config)
        self.kv: Any = None

    async def open(self, *, create: bool = True) -> None:
        from nats.js.api import KeyValueConfig, StorageType

        await self._conn.open("flowtunnel-registry")
        try:
            try:
                self.kv = await self._conn.js.key_value(self.bucket)
            except Exception:
                if not create:
                    raise ConfigError(f"agent registry bucket {self.bucket} does not exist at "
                                      f"{self.config.describe()}") from None
                try:
                    kvc = KeyValueConfig(bucket=self.bucket, history=1,
                                         replicas=self.config.effective_replicas, storage=StorageType.FILE)
                    self.kv = await create_retrying(lambda: self._conn.js.create_key_value(kvc))
                    # An enrolment right after the bucket is made must not meet "no response from stream".
                    await wait_for_leader(self._conn.js, f"KV_{self.bucket}")
                except Exception as exc:
                    raise ConfigError(f"cannot create agent registry bucket {self.bucket} at "
                                      f"{self.config.describe()}: {_reason(exc)}") from None
        except BaseException:
            await self._conn.close()
            raise

    async def close(self) -> None:
        await self._conn.close()

    async def get(self, agent_id: str) -> tuple[AgentEntry, int] | None:
        from nats.js.errors import KeyNotFoundError

        try:
            e = await retry_unheard(lambda: self.kv.get(subject_token(agent_id)))
        except KeyNotFoundError:
            return None
        return _decode(agent_id, e.value), int(e.revision)

    async def enroll(self, name: str, *, rotate: bool = False) -> AgentEntry:
        agent_id = validate_agent_id(name)
        ts = time.time()
        old = await self.get(agent_id)
        if old is not None and not rotate:
            raise AgentExists(f"agent {agent_id!r} is already enrolled in bucket {self.bucket} "
                              "(use --rotate to issue a new key; the old one stops working)")
        created = old[0].created_at if old is not None else ts
        entry = AgentEntry(agent_id=agent_id, key=generate_key(), created_at=created, updated_at=ts)
        key, value = subject_token(agent_id), _encode(entry)
        try:
            if old is None:
                await retry_unheard(lambda: self.kv.create(key, value))
            else:
                await retry_unheard(lambda: self.kv.update(key, value, last=old[1]))
        except Exception as exc:
            raise RegistryError(f"cannot enrol {agent_id!r} in bucket {self.bucket}: {_reason(exc)} "
                                "(enrolled or changed at the same moment elsewhere?)") from None
        return entry

    async def revoke(self, name: str) -> AgentEntry:
        agent_id = validate_agent_id(name)
        old = await self.get(agent_id)
        if old is None:
            raise AgentNotFound(f"agent {agent_id!r} is not enrolled in bucket {self.bucket}")
        entry, rev = old
        if entry.revoked:
            return entry
        ts = time.time()
        new = AgentEntry(agent_id=agent_id, key=entry.key, created_at=entry.created_at, updated_at=ts,
                         revoked_at=ts)
        await retry_unheard(lambda: self.kv.update(subject_token(agent_id), _encode(new), last=rev))
        return new

    async def list(self) -> list[AgentEntry]:
        # Not kv.keys(): it reads through a consumer the cluster may place on a replica that is a moment
        # behind, and a listing right after an enrolment then came back without it (or empty) now and then.
        # The stream's leader answers both the subjects and the values, so a listing sees every write acked.
        prefix = f"$KV.{self.bucket}."
        info = await retry_unheard(
            lambda: self._conn.js.stream_info(f"KV_{self.bucket}", subjects_filter=prefix + ">"))
        subjects = info.state.subjects or {}
        if info.state.messages > len(subjects):  # history=1: one message per key, unless the list was cut
            raise RegistryError(f"bucket {self.bucket} holds {info.state.messages} entries but the server "
                                f"listed {len(subjects)} keys in one answer: too many agents to list here")
        out = []
        for subject in sorted(subjects):
            got = await self.get(agent_of(subject[len(prefix):]))
            if got is not None:
                out.append(got[0])
        return out


class KvAgentKeys:
    """``AgentKeys`` over the bucket: a copy kept current by a watch task (``start()`` / ``close()``)."""

    def __init__(self, registry: KvRegistry) -> None:
        self._registry = registry
        self._entries: dict[str, AgentEntry] = {}
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="registry:watch")
        async with asyncio.timeout(10):
            await self._ready.wait()

    async def close(self) -> None:
        if self._task is not None:
            # The watch awaits nats-py's iterator, which may swallow a cancellation: cancel until it ends.
            await cancel_and_wait([self._task])
            self._task = None

    async def _watch(self) -> None:
        while True:
            try:
                watcher = await self._registry.kv.watchall()
                async for e in watcher:
                    if e is None:  # the initial values are in
                        self._ready.set()
                        continue
                    agent_id = agent_of(e.key)
                    if e.operation in ("DEL", "PURGE") or not e.value:
                        self._entries.pop(agent_id, None)
                        continue
                    try:
                        self._entries[agent_id] = _decode(agent_id, e.value)
                    except (ValueError, KeyError) as exc:
                        log.warning("agent registry: entry %s unreadable: %s", agent_id, exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("agent registry watch on %s failed, restarting: %s", self._registry.bucket,
                            _reason(exc))
                self._ready.set()
                await asyncio.sleep(1.0)

    def lookup(self, agent_id: str) -> AgentEntry | None:
        return self._entries.get(agent_id)

    def refresh_if_stale(self) -> bool:
        return False  # the watch keeps the copy current

    def entries(self) -> dict[str, AgentEntry]:
        return dict(self._entries)

    def known(self) -> list[str]:
        return sorted(self._entries)
