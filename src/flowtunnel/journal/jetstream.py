"""The journal on NATS JetStream: a replicated stream shared by any number of stateless gateways.

Layout (docs/scale-out.md): one stream (file storage, R3 on a cluster, ``discard new`` with a byte limit) with
subject ``<prefix>.<agent>``; one message per accepted batch (split to fit the server's max payload), its
headers carrying the agent seqs it holds. Exactly once across gateways: each publish carries
``Nats-Expected-Last-Subject-Sequence`` (the stream seq of the agent's last message, whose headers hold the
agent's high-water mark) so only one of two racing gateways can append after a given mark, and
``Nats-Msg-Id = <agent>:<epoch>:<first_seq>`` (the epoch is the mark the publish was decided on) so the retry
of a publish whose answer was lost is recognised as a duplicate. A lost race (10071) raises
``JournalConflict``: ingest re-reads the mark and decides again. A timeout is retried with the same id.

The agent's mark also lives in a KV bucket (written after the append, monotonic by compare-and-set), so it
survives the agent's messages ageing out of the stream (``max_age``). Trimming keeps each agent's last message
(the mark the compare-and-set reads), so a consumed message is never the only record of a mark that a crashed
gateway had not yet copied to the bucket.

Sinks read with ``JetStreamReader`` on a durable pull consumer (ack policy "all": acking a message acks
everything before it), one per sink name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flowtunnel.datagram import Datagram, make_datagram
from flowtunnel.errors import ConfigError
from flowtunnel.journal.base import Appended, JournalConflict, JournalFull, JournalUnavailable
from flowtunnel.log import Entry, LogError
from flowtunnel.runtime import cancel_and_wait

__all__ = [
    "AgentQuotaFull",
    "JetStreamConfig",
    "JetStreamJournal",
    "JetStreamReader",
    "decode_message",
    "encode_datagrams",
    "parse_journal_url",
    "wait_for_leader",
]

log = logging.getLogger("flowtunnel.journal.jetstream")

T = TypeVar("T")

H_EXPECTED = "Nats-Expected-Last-Subject-Sequence"
H_MSG_ID = "Nats-Msg-Id"
H_FIRST = "Flowtunnel-First"
H_LAST = "Flowtunnel-Last"
H_COUNT = "Flowtunnel-Count"
H_RECEIVED = "Flowtunnel-Received-Ns"

#: JetStream API error codes this module acts on.
ERR_WRONG_LAST_SEQ = 10071
ERR_STREAM_NOT_FOUND = 10059
ERR_NO_MESSAGE = 10037
ERR_STORE_FAILED = 10077  # a store failure; its text says which limit ("discard new" refusals come as this)
ERR_INSUFFICIENT = 10023  # insufficient resources
ERR_MSG_ID_IN_PROCESS = 10158  # duplicate message id is in process

#: Per datagram in a message: received_ns, exporter_port, local_port, exporter length, payload length.
_DG = struct.Struct("<qHHHI")
#: How long a sink's fetch may wait for messages (it returns at once when some are there).
FETCH_WAIT = 1.0
#: Room left in a message for headers and the protocol line.
_HEADER_ROOM = 1024


def encode_datagrams(datagrams: Sequence[Datagram]) -> bytes:
    parts: list[bytes] = []
    pack = _DG.pack
    for d in datagrams:
        exp = d.exporter.encode()
        parts.append(pack(d.received_ns, d.exporter_port, d.local_port, len(exp), len(d.payload)))
        parts.append(exp)
        parts.append(d.payload)
    return b"".join(parts)


def _encoded_size(d: Datagram) -> int:
    return _DG.size + len(d.exporter) + len(d.payload)


def decode_message(
    data: bytes, *, seq: int, agent: str, first: int, count: int, appended_ns: int | None = None
) -> list[Entry]:
    """The entries of one stream message (all with the message's stream ``seq``)."""
    out: list[Entry] = []
    view = memoryview(data)
    pos = 0
    unpack = _DG.unpack_from
    for i in range(count):
        received, eport, lport, elen, plen = unpack(view, pos)
        pos += _DG.size
        exporter = bytes(view[pos : pos + elen]).decode()
        pos += elen
        payload = bytes(view[pos : pos + plen])
        pos += plen
        dg = make_datagram(received, exporter, eport, lport, payload)
        out.append(Entry(seq=seq, stream=agent, stream_seq=first + i, datagram=dg, appended_ns=appended_ns))
    if pos != len(data):
        raise LogError(f"stream message {seq} of agent {agent}: {len(data) - pos} bytes after {count} "
                       "datagrams", path="jetstream")
    return out


def subject_token(agent: str) -> str:
    """An agent id as one subject token / KV key ('.' would split a subject: '=' is never in an id)."""
    return agent.replace(".", "=")


def agent_of(token: str) -> str:
    return token.replace("=", ".")


@dataclass(frozen=True, slots=True, kw_only=True)
class JetStreamConfig:
    """Where the journal lives and how the stream is shaped. ``servers`` are ``nats://host:port`` (no
    credentials: those are ``user``/``password``, never shown)."""

    servers: tuple[str, ...]
    user: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    stream: str = "FLOWTUNNEL"
    prefix: str = "flowtunnel.journal"
    marks_bucket: str = "flowtunnel-marks"
    #: Stream replicas; 0 = 3 when three or more servers are listed, else 1.
    replicas: int = 0
    #: Stream byte limit ("discard new": beyond, appends are refused with 503 and agents keep spooling).
    max_bytes: int = 8 << 30
    #: Age limit of messages in seconds (0 = kept until consumed and trimmed).
    max_age: float = 0.0
    #: Duplicate window of ``Nats-Msg-Id`` in seconds.
    duplicate_window: float = 120.0
    #: Messages one agent may hold in the stream (0 = no per-agent quota).
    agent_max_msgs: int = 0
    #: Seconds to wait for one publish acknowledgement; a timeout is retried with the same id.
    publish_timeout: float = 5.0
    publish_attempts: int = 3
    connect_timeout: float = 5.0
    #: Create the stream and bucket when missing (gateways); sinks require them to exist.
    create: bool = True

    @property
    def effective_replicas(self) -> int:
        if self.replicas:
            return self.replicas
        return 3 if len(self.servers) >= 3 else 1

    def subject(self, agent: str) -> str:
        return f"{self.prefix}.{subject_token(agent)}"

    def describe(self) -> str:
        """For messages: the servers and the stream, never the credentials."""
        return f"{','.join(self.servers)} (stream {self.stream})"


def parse_journal_url(text: str, **overrides: Any) -> JetStreamConfig:
    """``nats://[user:password@]HOST:PORT[,HOST:PORT...]`` → ``JetStreamConfig``; ``ValueError`` naming the
    bad part (never the password)."""
    if not text.startswith("nats://"):
        raise ValueError(f"journal URL must start with nats:// (got {text.split('://', 1)[0]}://...)")
    rest = text[len("nats://") :]
    user = password = None
    if "@" in rest:
        cred, rest = rest.rsplit("@", 1)
        user, _, pw = cred.partition(":")
        user = urllib.parse.unquote(user)
        password = urllib.parse.unquote(pw) if pw else None
    servers: list[str] = []
    for part in rest.rstrip("/").split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"journal URL server {part!r} is not HOST:PORT")
        servers.append(f"nats://{host}:{int(port)}")
    return JetStreamConfig(servers=tuple(servers), user=user, password=password, **overrides)


@dataclass(slots=True)
class _Mark:
    hwm: int
    subject_seq: int


class _Connection:
    """One NATS connection with its JetStream context; ``ConfigError`` (one line) when it cannot start."""

    def __init__(self, config: JetStreamConfig) -> None:
        self.config = config
        self.nc: Any = None
        self.js: Any = None
        self.closing = False

    async def open(self, name: str) -> None:
        try:
            import nats
        except ImportError:
            raise ConfigError("--journal nats://... needs the nats extra (pip install 'flowtunnel[nats]')") \
                from None
        cfg = self.config
        once = {"logged": False}

        async def on_error(exc: Exception) -> None:
            if not once["logged"]:
                once["logged"] = True
                log.warning("nats %s: %s", cfg.describe(), exc)

        async def on_disconnect() -> None:
            if self.closing:
                return
            log.warning("nats: disconnected from %s; reconnecting", cfg.describe())

        async def on_reconnect() -> None:
            once["logged"] = False
            log.info("nats: reconnected to %s", cfg.describe())

        try:
            # A first connection without reconnects says at once whether a server answers and takes the
            # credentials (the lasting one reconnects forever and would hide both).
            # (nats-py's max_reconnect_attempts 0 means "forever", hence 1 and a deadline.)
            async with asyncio.timeout(cfg.connect_timeout * (len(cfg.servers) + 1)):
                probe = await nats.connect(
                    servers=list(cfg.servers), user=cfg.user, password=cfg.password, name=name,
                    connect_timeout=cfg.connect_timeout, allow_reconnect=False, max_reconnect_attempts=1,
                    reconnect_time_wait=0.1, error_cb=_quiet, disconnected_cb=_quiet_cb,
                    closed_cb=_quiet_cb,
                )
            await probe.close()
            self.nc = await nats.connect(
                servers=list(cfg.servers), user=cfg.user, password=cfg.password, name=name,
                connect_timeout=cfg.connect_timeout, allow_reconnect=True, max_reconnect_attempts=-1,
                reconnect_time_wait=0.5, error_cb=on_error, disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
            )
        except TimeoutError:
            raise ConfigError(f"cannot connect to the journal at {cfg.describe()}: no server answered "
                              f"within {cfg.connect_timeout * (len(cfg.servers) + 1):g} s") from None
        except Exception as exc:
            raise ConfigError(f"cannot connect to the journal at {cfg.describe()}: {_reason(exc)}") from None
        self.js = self.nc.jetstream(timeout=cfg.publish_timeout)

    async def close(self) -> None:
        self.closing = True
        if self.nc is not None:
            # Not drain(): it waits for a pull subscription's expired fetch; what matters was acknowledged.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self.nc.flush()
            with contextlib.suppress(Exception):
                await self.nc.close()
            self.nc = None

    async def stream_info(self) -> Any:
        from nats.js.errors import NotFoundError

        cfg = self.config
        for attempt in range(3):  # a cluster just started may still be electing: a few tries
            try:
                return await self.js.stream_info(cfg.stream)
            except NotFoundError:
                return None
            except Exception as exc:
                if attempt == 2 or "timeout" not in str(exc).lower():
                    raise ConfigError(f"journal at {cfg.describe()}: {_reason(exc)}") from None
                await asyncio.sleep(1.0)
        return None


async def create_retrying(make: Callable[[], Awaitable[Any]], *, attempts: int = 4) -> Any:
    """Create a stream or bucket, retrying a few times: a cluster just started, or busy electing leaders,
    answers "timeout" or "error creating store" for a moment. The last error propagates."""
    for attempt in range(attempts):
        try:
            return await make()
        except Exception:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(1.0)
    raise AssertionError("unreachable")


async def retry_unheard(make: Callable[[], Awaitable[T]], *, within: float = 10.0) -> T:
    """``make()``, again while the cluster answers "no response from stream": no server had the stream's
    interest yet (a stream or bucket just created or just given a new leader, its interest still crossing the
    cluster's routes), so nothing was stored and a retry cannot double anything. Other errors propagate."""
    from nats.js.errors import NoStreamResponseError

    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            return await make()
        except NoStreamResponseError:
            if loop.time() >= deadline:
                raise
            await asyncio.sleep(0.1)


async def wait_for_leader(js: Any, stream: str, *, within: float = 15.0) -> None:
    """Return once ``stream`` has a leader (a replicated stream or bucket just created has none for a moment,
    and reads and writes meanwhile fail with "no response from stream"); after ``within`` s, return anyway
    and let the caller's own error say what is wrong. A server without clustering reports no cluster: done."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                info = await js.stream_info(stream)
            if info.cluster is None or info.cluster.leader:
                return
        await asyncio.sleep(0.1)


async def _quiet(exc: Exception) -> None:
    return None


async def _quiet_cb() -> None:
    return None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    desc = getattr(exc, "description", None)
    if desc:
        text = f"{desc} (JetStream error {getattr(exc, 'err_code', '?')})"
    return text.splitlines()[0][:300]


class JetStreamJournal:
    """``AgentJournal`` on a JetStream stream (see the module docstring). ``open()`` then ``close()``.

    Error handling: ``open`` raises ``ConfigError`` with one line (no server, refused credentials, no
    JetStream, a missing stream when ``create`` is off). ``append`` raises ``JournalConflict`` on a lost
    race, ``JournalFull`` when the stream is full (``AgentQuotaFull`` for the agent's quota) and
    ``JournalUnavailable`` when the stream did not confirm the append (nothing acknowledged).
    """

    shared = True

    def __init__(self, config: JetStreamConfig) -> None:
        self.config = config
        self._conn = _Connection(config)
        self._kv: Any = None
        self._marks: dict[str, _Mark] = {}
        self._kv_rev: dict[str, int] = {}
        self._dirty: dict[str, int] = {}  # marks to copy to the bucket
        self._flush_wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self.max_payload = 1 << 20
        self.published = 0
        self.conflicts = 0
        self.duplicates = 0
        self.retries = 0
        self.refused_full = 0
        self.refused_quota = 0
        self.last_seq = 0

    def __repr__(self) -> str:
        return f"JetStreamJournal({self.config.describe()})"

    async def open(self, *, name: str = "flowtunnel-gateway") -> None:
        await self._conn.open(name)
        try:
            await self._ensure()
        except BaseException:
            await self._conn.close()
            raise
        self.max_payload = int(self._conn.nc.max_payload)
        need = 65535 + _DG.size + 255 + _HEADER_ROOM  # the largest UDP datagram with its exporter and headers
        if self.max_payload < need:
            await self._conn.close()
            raise ConfigError(f"journal at {self.config.describe()}: the server's max_payload "
                              f"{self.max_payload} is below {need} bytes, the largest datagram with its "
                              "headers: raise max_payload in the server's configuration")
        self._flusher = asyncio.get_running_loop().create_task(self._flush_marks(), name="journal:marks")

    async def _ensure(self) -> None:
        from nats.js.api import DiscardPolicy, KeyValueConfig, StorageType, StreamConfig

        cfg = self.config
        info = await self._conn.stream_info()
        if info is None:
            if not cfg.create:
                raise ConfigError(f"journal stream {cfg.stream} does not exist at {cfg.describe()} "
                                  "(a gateway with --journal creates it)")
            sc = StreamConfig(
                name=cfg.stream, subjects=[f"{cfg.prefix}.>"], storage=StorageType.FILE,
                num_replicas=cfg.effective_replicas, discard=DiscardPolicy.NEW, max_bytes=cfg.max_bytes,
                max_age=cfg.max_age,
                duplicate_window=min(cfg.duplicate_window, cfg.max_age or cfg.duplicate_window),
                max_msgs_per_subject=cfg.agent_max_msgs or -1,
                discard_new_per_subject=bool(cfg.agent_max_msgs),
            )
            try:
                await create_retrying(lambda: self._conn.js.add_stream(sc))
            except Exception as exc:
                raise ConfigError(f"cannot create journal stream {cfg.stream} at {cfg.describe()}: "
                                  f"{_reason(exc)}") from None
            await wait_for_leader(self._conn.js, cfg.stream)
            log.info("journal stream %s created (replicas %d, max %d bytes)", cfg.stream,
                     cfg.effective_replicas, cfg.max_bytes)
        try:
            self._kv = await self._conn.js.key_value(cfg.marks_bucket)
        except Exception:
            if not cfg.create:
                raise ConfigError(f"journal mark bucket {cfg.marks_bucket} does not exist at "
                                  f"{cfg.describe()}") from None
            try:
                kvc = KeyValueConfig(bucket=cfg.marks_bucket, history=1, replicas=cfg.effective_replicas,
                                     storage=StorageType.FILE)
                self._kv = await create_retrying(lambda: self._conn.js.create_key_value(kvc))
                await wait_for_leader(self._conn.js, f"KV_{cfg.marks_bucket}")
            except Exception as exc:
                raise ConfigError(f"cannot create bucket {cfg.marks_bucket} at {cfg.describe()}: "
                                  f"{_reason(exc)}") from None

    async def close(self) -> None:
        if self._flusher is not None:
            await cancel_and_wait([self._flusher])
            self._flusher = None
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._write_marks()
        await self._conn.close()

    @property
    def js(self) -> Any:
        return self._conn.js

    # -- marks ---------------------------------------------------------------------------------------------

    async def _load(self, agent: str) -> _Mark:
        from nats.js.errors import KeyNotFoundError, NotFoundError

        cfg = self.config
        try:
            async with asyncio.timeout(cfg.publish_timeout):
                try:
                    msg = await self.js.get_last_msg(cfg.stream, cfg.subject(agent))
                    headers = msg.headers or {}
                    stream_hwm, subject_seq = int(headers.get(H_LAST, 0)), int(msg.seq)
                except NotFoundError:
                    stream_hwm = subject_seq = 0
                try:
                    entry = await self._kv.get(subject_token(agent))
                    kv_hwm = int(entry.value or b"0")
                    self._kv_rev[agent] = int(entry.revision)
                except KeyNotFoundError:
                    kv_hwm = 0
                    self._kv_rev.pop(agent, None)
        except (TimeoutError, OSError) as exc:
            raise JournalUnavailable(f"cannot read the mark of agent {agent} from {cfg.describe()}: "
                                     f"{_reason(exc)}", path=cfg.stream) from None
        except Exception as exc:
            if isinstance(exc, LogError):
                raise
            raise JournalUnavailable(f"cannot read the mark of agent {agent} from {cfg.describe()}: "
                                     f"{_reason(exc)}", path=cfg.stream) from None
        mark = _Mark(hwm=max(stream_hwm, kv_hwm), subject_seq=subject_seq)
        if stream_hwm > kv_hwm:
            self._mark_dirty(agent, stream_hwm)  # a gateway died before copying it: repair
        self._marks[agent] = mark
        return mark

    async def hwm(self, agent: str) -> int:
        mark = self._marks.get(agent)
        if mark is None:
            mark = await self._load(agent)
        return mark.hwm

    def forget(self, agent: str) -> None:
        """Drop the cached mark (after a conflict, or to re-read another gateway's appends)."""
        self._marks.pop(agent, None)

    def _mark_dirty(self, agent: str, hwm: int) -> None:
        if hwm > self._dirty.get(agent, 0):
            self._dirty[agent] = hwm
            self._flush_wake.set()

    async def _flush_marks(self) -> None:
        """Copy new marks to the bucket (monotonic), at most a few times a second."""
        failing = False
        while True:
            await self._flush_wake.wait()
            self._flush_wake.clear()
            try:
                await self._write_marks()
                if failing:
                    log.info("journal: marks copied to bucket %s again", self.config.marks_bucket)
                failing = False
            except Exception as exc:  # the stream holds the marks meanwhile; retried on the next wake
                if not failing:  # once per episode
                    log.warning("journal: copying marks to bucket %s failed (retrying): %s",
                                self.config.marks_bucket, _reason(exc))
                failing = True
                self._flush_wake.set()
                await asyncio.sleep(1.0)
            await asyncio.sleep(0.2)

    async def _write_marks(self) -> None:
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        while self._dirty:
            agent, hwm = next(iter(self._dirty.items()))
            key = subject_token(agent)
            value = str(hwm).encode()
            for _ in range(5):
                rev = self._kv_rev.get(agent)
                try:
                    if rev is None:
                        self._kv_rev[agent] = await self._kv.create(key, value)
                    else:
                        self._kv_rev[agent] = await self._kv.update(key, value, last=rev)
                    break
                except KeyWrongLastSequenceError:
                    pass
                except Exception as exc:
                    if "wrong last sequence" not in str(exc).lower() and "key exists" not in str(exc).lower():
                        raise
                try:
                    entry = await self._kv.get(key)
                except KeyNotFoundError:
                    self._kv_rev.pop(agent, None)
                    continue
                self._kv_rev[agent] = int(entry.revision)
                if int(entry.value or b"0") >= hwm:
                    break
            if self._dirty.get(agent) == hwm:
                del self._dirty[agent]

    # -- append --------------------------------------------------------------------------------------------

    def _chunks(self, datagrams: Sequence[Datagram]) -> list[tuple[int, int]]:
        """Index ranges of ``datagrams`` whose encoding fits one message."""
        room = self.max_payload - _HEADER_ROOM
        out: list[tuple[int, int]] = []
        start, size = 0, 0
        for i, d in enumerate(datagrams):
            n = _encoded_size(d)
            if n > room:
                raise JournalFull(f"datagram of {len(d.payload)} bytes exceeds the journal's max payload "
                                  f"{self.max_payload}", path=self.config.stream)
            if size + n > room and i > start:
                out.append((start, i))
                start, size = i, 0
            size += n
        if start < len(datagrams):
            out.append((start, len(datagrams)))
        return out

    async def append(
        self, agent: str, first_seq: int, datagrams: Sequence[Datagram], *, hwm: int,
        appended_ns: int | None = None,
    ) -> Appended:
        mark = self._marks.get(agent)
        if mark is None:
            mark = await self._load(agent)
        if mark.hwm != hwm:
            self.conflicts += 1
            raise JournalConflict(f"agent {agent}: mark is {mark.hwm}, not {hwm}", path=self.config.stream)
        received = appended_ns if appended_ns is not None else time.time_ns()
        first_stream_seq = 0
        for lo, hi in self._chunks(datagrams):
            chunk_first = first_seq + lo
            chunk_last = first_seq + hi - 1
            headers = {
                H_EXPECTED: str(mark.subject_seq),
                H_MSG_ID: f"{agent}:{mark.hwm}:{chunk_first}",
                H_FIRST: str(chunk_first),
                H_LAST: str(chunk_last),
                H_COUNT: str(hi - lo),
                H_RECEIVED: str(received),
            }
            seq = await self._publish(agent, encode_datagrams(datagrams[lo:hi]), headers)
            mark = _Mark(hwm=chunk_last, subject_seq=seq)
            self._marks[agent] = mark
            first_stream_seq = first_stream_seq or seq
            self.last_seq = max(self.last_seq, seq)
        self._mark_dirty(agent, mark.hwm)
        return Appended(first_seq=first_stream_seq, last_seq=mark.subject_seq)

    async def _publish(self, agent: str, payload: bytes, headers: dict[str, str]) -> int:
        from nats.js.errors import APIError

        cfg = self.config
        subject = cfg.subject(agent)
        last_exc: BaseException | None = None
        # Whether one of our own earlier attempts may have been stored (it timed out, or the answer was lost):
        # only then is a "duplicate" answer our own retry; otherwise another gateway made this very publish.
        maybe_ours = False
        attempt = 0
        while attempt < cfg.publish_attempts:
            if attempt:
                self.retries += 1
                await asyncio.sleep(min(1.0, 0.2 * attempt))
            attempt += 1
            try:
                # Our own bound besides the library's: while it reconnects, nats-py can queue the publish
                # behind a flush that never completes, and the request would wait with no timer at all.
                # "No response from stream" (nothing stored: no server had the stream's interest yet) is
                # retried at once within one publish timeout, without counting as an attempt.
                async with asyncio.timeout(2 * cfg.publish_timeout + 1.0):
                    ack = await retry_unheard(
                        lambda: self.js.publish(subject, payload, timeout=cfg.publish_timeout,
                                                headers=headers),
                        within=cfg.publish_timeout)
            except APIError as exc:
                code = getattr(exc, "err_code", None)
                if code == ERR_WRONG_LAST_SEQ:
                    self.forget(agent)
                    self.conflicts += 1
                    raise JournalConflict(f"agent {agent}: another gateway appended first ({_reason(exc)})",
                                          path=cfg.stream) from None
                if code == ERR_MSG_ID_IN_PROCESS:
                    # The same publish (same mark, same first seq) is being stored right now: ask again.
                    attempt -= 1
                    await asyncio.sleep(0.02)
                    continue
                text = str(getattr(exc, "description", "") or exc).lower()
                if code == ERR_STORE_FAILED and "per subject" in text:
                    self.refused_quota += 1
                    raise AgentQuotaFull(
                        f"agent {agent} holds its quota of {cfg.agent_max_msgs} messages in stream "
                        f"{cfg.stream}", path=cfg.stream) from None
                if code == ERR_INSUFFICIENT or (code == ERR_STORE_FAILED and "maximum" in text):
                    self.refused_full += 1
                    raise JournalFull(f"stream {cfg.stream} is full (max {cfg.max_bytes} bytes): "
                                      f"{_reason(exc)}", path=cfg.stream) from None
                last_exc = exc  # e.g. no leader during an election: retry with the same id
                maybe_ours = True
            except Exception as exc:  # a timeout, no responders, the connection closed or reconnecting
                last_exc = exc
                maybe_ours = True
            else:
                if ack.duplicate and not maybe_ours:
                    self.forget(agent)
                    self.conflicts += 1
                    raise JournalConflict(f"agent {agent}: another gateway appended this batch first",
                                          path=cfg.stream)
                if ack.duplicate:
                    self.duplicates += 1
                else:
                    self.published += 1
                return int(ack.seq)
        self.forget(agent)  # whether the last try landed is unknown: re-read the mark next time
        raise JournalUnavailable(
            f"stream {cfg.stream} did not confirm the append of agent {agent} after {cfg.publish_attempts} "
            f"attempts: {_reason(last_exc) if last_exc else 'no answer'}", path=cfg.stream)

    # -- housekeeping ------------------------------------------------------------------------------------

    async def consumer_floor(self) -> int | None:
        """The stream seq every durable consumer has acknowledged (None with no consumer)."""
        infos = await self.js.consumers_info(self.config.stream)
        floors = [int(i.ack_floor.stream_seq or 0) for i in infos if i.config.durable_name]
        return min(floors) if floors else None

    async def trim(self) -> int:
        """Purge what every durable consumer acknowledged, keeping each agent's last message (its mark);
        the number of subjects purged."""
        floor = await self.consumer_floor()
        if not floor:
            return 0
        cfg = self.config
        info = await self.js.stream_info(cfg.stream, subjects_filter=f"{cfg.prefix}.>")
        subjects = info.state.subjects or {}
        purged = 0
        first = int(info.state.first_seq or 0)
        if first > floor:
            return 0
        for subject, count in subjects.items():
            if count < 2:
                continue
            agent = agent_of(subject[len(cfg.prefix) + 1 :])
            mark = self._marks.get(agent)
            if mark is None:
                mark = await self._load(agent)
            upto = min(floor + 1, mark.subject_seq)
            if upto > first:
                await self.js.purge_stream(cfg.stream, seq=upto, subject=subject)
                purged += 1
        return purged

    async def stats(self) -> dict[str, object]:
        info = await self.js.stream_info(self.config.stream)
        st = info.state
        self.last_seq = max(self.last_seq, int(st.last_seq or 0))
        return {
            "kind": "jetstream",
            "stream": self.config.stream,
            "servers": list(self.config.servers),
            "replicas": info.config.num_replicas,
            "first_seq": st.first_seq,
            "last_seq": st.last_seq,
            "messages": st.messages,
            "bytes": st.bytes,
            "max_bytes": info.config.max_bytes,
            "published": self.published,
            "duplicates": self.duplicates,
            "conflicts": self.conflicts,
            "retries": self.retries,
            "refused_full": self.refused_full,
            "refused_agent_quota": self.refused_quota,
        }


class AgentQuotaFull(JournalFull):
    """The agent holds its quota of messages in the stream (``agent_max_msgs``): the others still fit."""


class JetStreamReader:
    """A sink's ``JournalReader`` + ``JournalWaiter`` on a durable pull consumer named after the sink.

    ``read`` blocks (call it from a worker thread: it hops to the event loop that owns the connection);
    ``commit_cursor`` records the position and the acker task acknowledges it (ack policy "all"), so it can
    be called from the event loop. A sink that keeps its own position (the store, in DuckDB) skips what it
    already has: a sink killed between its commit and its ack sees those messages again and drops them.
    """

    def __init__(self, config: JetStreamConfig, name: str, *, ack_wait: float = 30.0) -> None:
        self.config = config
        self.name = name
        self.ack_wait = ack_wait
        self._conn = _Connection(config)
        self._sub: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: fetched and not yet acknowledged, by stream seq: a sink re-reading from its own committed position
        #: (after a failed commit) gets them again.
        self._held: dict[int, Any] = {}
        self._want_ack = 0
        self._acked = 0
        self._ack_wake = asyncio.Event()
        self._acker: asyncio.Task[None] | None = None
        self._position = 0  # the last stream seq handed out by ``read``
        self._start_floor = 0
        self._last_seq = 0

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._conn.open(f"flowtunnel-sink-{self.name}")
        cfg = self.config
        try:
            info = await self._conn.stream_info()
            if info is None:
                raise ConfigError(f"journal stream {cfg.stream} does not exist at {cfg.describe()} "
                                  "(a gateway with --journal creates it)")
            self._last_seq = int(info.state.last_seq or 0)
            for attempt in range(5):  # a cluster just (re)started may still be electing leaders
                try:
                    ci = await self._restart_consumer()
                    break
                except ConfigError:
                    raise
                except Exception as exc:
                    if attempt == 4 or "timeout" not in str(exc).lower():
                        raise ConfigError(f"cannot open consumer {self.name} on {cfg.describe()}: "
                                          f"{_reason(exc)}") from None
                    await asyncio.sleep(1.0)
            self._start_floor = self._acked = self._position = int(ci.ack_floor.stream_seq or 0)
        except BaseException:
            await self._conn.close()
            raise
        self._acker = self._loop.create_task(self._ack_loop(), name=f"sink:{self.name}:acks")

    async def _restart_consumer(self) -> Any:
        """Bind the durable consumer; one left with messages delivered to a dead process and not acknowledged
        (they would come again only after ``ack_wait``) is recreated at its acknowledged position."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import NotFoundError

        cfg = self.config
        js = self._conn.js
        try:
            ci = await js.consumer_info(cfg.stream, self.name)
        except NotFoundError:
            ci = None
        start = 1
        if ci is not None:
            floor = int(ci.ack_floor.stream_seq or 0)
            delivered = int(ci.delivered.stream_seq or 0)
            if delivered <= floor:
                self._sub = await js.pull_subscribe_bind(self.name, stream=cfg.stream)
                return ci
            log.info("sink %s: messages %d..%d were delivered to a stopped process and not acknowledged: "
                     "resuming after %d", self.name, floor + 1, delivered, floor)
            await js.delete_consumer(cfg.stream, self.name)
            start = floor + 1
        config = ConsumerConfig(
            durable_name=self.name, ack_policy=AckPolicy.ALL, ack_wait=self.ack_wait, max_ack_pending=-1,
            max_deliver=-1, filter_subject=f"{cfg.prefix}.>",
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start > 1 else DeliverPolicy.ALL,
            opt_start_seq=start if start > 1 else None,
        )
        await js.add_consumer(cfg.stream, config)
        self._sub = await js.pull_subscribe_bind(self.name, stream=cfg.stream)
        return await js.consumer_info(cfg.stream, self.name)

    async def close(self) -> None:
        if self._acker is not None:
            await cancel_and_wait([self._acker])
            self._acker = None
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._ack_now()
        await self._conn.close()

    # JournalWaiter
    @property
    def last_seq(self) -> int:
        return max(self._last_seq, self._position)

    async def wait(self, after_seq: int) -> None:
        """Return once a message past ``after_seq`` is fetched (a long fetch; bound it with a timeout)."""
        while not any(seq > after_seq for seq in self._held):
            await self._fetch(64, 5.0)

    async def _fetch(self, batch: int, wait: float) -> None:
        from nats.errors import TimeoutError as NatsTimeout

        try:
            msgs = await self._sub.fetch(batch=batch, timeout=wait)
        except (NatsTimeout, TimeoutError):
            return
        for m in msgs:
            seq = int(m.metadata.sequence.stream)
            self._last_seq = max(self._last_seq, seq + int(m.metadata.num_pending or 0))
            if seq > self._acked:  # a redelivery of an acknowledged message is dropped
                self._held.setdefault(seq, m)

    # JournalReader
    def cursor(self, name: str) -> int:
        return self._start_floor

    def commit_cursor(self, name: str, seq: int) -> None:
        """Acknowledge everything up to ``seq`` (asynchronously: the acker task sends it)."""
        if seq > self._want_ack:
            self._want_ack = seq
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._ack_wake.set)

    def read(self, after: int = 0, limit: int = 1000, max_bytes: int = 4 << 20) -> list[Entry]:
        """Entries of whole messages past ``after`` (at least one message when there is one)."""
        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(self._read(after, limit, max_bytes), self._loop)
        return fut.result()

    async def _read(self, after: int, limit: int, max_bytes: int) -> list[Entry]:
        # ``after`` is not acknowledged here: a sink reads ahead of what it committed (the store decodes the
        # next batch while the last one commits; parquet gathers several reads into one file), and only
        # ``commit_cursor`` says what is done. A sink whose own position is ahead of the consumer's at start
        # commits that position (``commit_cursor``) before it reads.
        if not any(seq > after for seq in self._held):
            # The fetch returns at once with what is there; its expiry must leave time for large messages to
            # arrive (delivered to an expired pull, they would come again only after ack_wait).
            await self._fetch(64, FETCH_WAIT)
        out: list[Entry] = []
        size = 0
        prefix = len(self.config.prefix) + 1
        for seq in sorted(s for s in self._held if s > after):
            if out and (len(out) >= limit or size >= max_bytes):
                break
            m = self._held[seq]
            h = m.headers or {}
            out.extend(decode_message(
                m.data, seq=seq, agent=agent_of(m.subject[prefix:]), first=int(h.get(H_FIRST, 0)),
                count=int(h.get(H_COUNT, 0)), appended_ns=int(h[H_RECEIVED]) if H_RECEIVED in h else None,
            ))
            size += len(m.data)
            self._position = max(self._position, seq)
        return out

    async def _ack_loop(self) -> None:
        while True:
            await self._ack_wake.wait()
            self._ack_wake.clear()
            try:
                await self._ack_now()
            except Exception as exc:  # redelivered later and skipped by position: nothing lost
                log.warning("sink %s: acknowledging up to %d failed: %s", self.name, self._want_ack,
                            _reason(exc))
                await asyncio.sleep(1.0)
                self._ack_wake.set()

    async def _ack_now(self) -> None:
        target = self._want_ack
        if target <= self._acked:
            return
        # A position the sink already held at start (its own, e.g. DuckDB's) is acknowledged by fetching up
        # to it: messages past it stay held for ``read``.
        for _ in range(64):
            if any(s >= target for s in self._held):
                break
            before = len(self._held)
            await self._fetch(64, FETCH_WAIT)
            if len(self._held) == before:
                break
        seqs = [s for s in self._held if s <= target]
        if not seqs:
            return
        top = max(seqs)
        await self._held[top].ack_sync()
        for s in seqs:
            del self._held[s]
        self._acked = top

    def status(self) -> dict[str, object]:
        return {"consumer": self.name, "acked": self._acked, "position": self._position,
                "last_seq": self.last_seq}
