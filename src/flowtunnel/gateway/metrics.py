"""Prometheus metrics of the gateway, in their own ``CollectorRegistry`` (several gateways per test process).

Label cardinality is bounded: the ``agent`` label only takes enrolled agent ids (anything else is
``"unknown"``), causes come from fixed code paths, and agent-reported drop causes are limited in number and
shape. The same numbers feed ``status.json``.

The per-agent and per-rung series are not ``prometheus_client`` metric objects: a request only adds to plain
fields of its ``AgentStats`` (and the rung's figures), and ``_Series`` turns those into samples when
``/metrics`` is scraped. With 2,000 agents, a ``labels()`` look-up and a locked update per series and request
were ~5 % of the gateway's CPU, and their ~20,000 child objects and locks were most of what the garbage
collector walked (issue 16, docs/benchmarks.md "Fleet").
"""

from __future__ import annotations

import re
import statistics
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from flowtunnel.buildinfo import register_build_info

__all__ = ["CONTENT_TYPE_LATEST", "AgentStats", "GatewayMetrics", "parse_count", "parse_dropped_header"]

UNKNOWN_AGENT = "unknown"
_CAUSE_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,31}$")
# ASCII digits only: str.isdigit() also accepts "²", which int() refuses
_COUNT_RE = re.compile(r"[0-9]{1,20}")
_MAX_DROP_CAUSES = 16
#: Advisory figures are clamped to this (they become gauges and JSON numbers).
MAX_FIGURE = 2**63 - 1
#: Longest X-Flowtunnel-Dropped value parsed (16 causes of 32 characters and 20 digits fit well below it).
MAX_DROPPED_HEADER = 1024


def parse_count(text: str | None) -> int | None:
    """A non-negative count from an advisory header: 1 to 20 ASCII digits (spaces around allowed), clamped
    to ``MAX_FIGURE``; anything else is None (the header is advisory: it must never fail a batch)."""
    if text is None or len(text) > 64:
        return None
    text = text.strip()
    if not _COUNT_RE.fullmatch(text):
        return None
    return min(int(text), MAX_FIGURE)


#: Batches whose clock samples make an agent's clock skew (their median).
SKEW_SAMPLES = 16


def parse_dropped_header(text: str) -> dict[str, int]:
    """``"spool_full=12,malformed=3"`` → ``{"spool_full": 12, "malformed": 3}``; malformed parts are skipped
    (the header is advisory, it must never fail a batch), at most 16 causes, values clamped to
    ``MAX_FIGURE``; a value longer than ``MAX_DROPPED_HEADER`` is ignored whole."""
    out: dict[str, int] = {}
    if len(text) > MAX_DROPPED_HEADER:
        return out
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        count = parse_count(value) if sep and _CAUSE_RE.match(name) else None
        if count is None:
            continue
        out[name] = count
        if len(out) >= _MAX_DROP_CAUSES:
            break
    return out


@dataclass(slots=True)
class AgentStats:
    """What the gateway knows about one agent's traffic since it started (plus acked, from the journal)."""

    datagrams: int = 0
    duplicates: int = 0
    gap: int = 0
    lost: int = 0
    http_bytes: int = 0
    datagram_bytes: int = 0
    batches: int = 0
    last_seen: float | None = None
    acked: int = 0
    backlog: int | None = None
    replayed: int = 0
    nonce_reused: int = 0
    journal_bytes: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    #: When a drop counter the agent reports (or its sequence gap) last grew, for ``flowtunnel status``.
    drops_changed: float | None = None
    #: The rung (post, ws, get, dns) of the agent's last acknowledged batch (the console's "rung in use").
    rung: str | None = None
    #: When (unix time, gateway clock) the oldest datagram the agent had not yet had acknowledged, at its last
    #: batch, was received: the agent seals that datagram's age (``backlog_age``) in its agent info.
    backlog_oldest: float | None = None
    # agent clock minus gateway clock, seconds, per recent batch (see GatewayMetrics.clock_sample)
    skew_samples: deque[float] = field(default_factory=lambda: deque(maxlen=SKEW_SAMPLES))
    #: An authenticated request of the agent was answered since start (``acked`` is then this gateway's).
    answered: bool = False

    @property
    def clock_skew(self) -> float | None:
        """The agent's clock minus the gateway's, in seconds (median of recent batches), or None. Computed
        when read (a scrape, the status), not per batch; safe from another thread (copies the samples)."""
        samples = tuple(self.skew_samples)
        return statistics.median(samples) if samples else None

    def as_dict(self) -> dict[str, object]:
        ratio = self.datagram_bytes / self.http_bytes if self.http_bytes else None
        return {
            "acked": self.acked,
            "datagrams": self.datagrams,
            "duplicates": self.duplicates,
            "gap": self.gap,
            "lost_at_gateway": self.lost,
            "batches": self.batches,
            "http_bytes": self.http_bytes,
            "datagram_bytes": self.datagram_bytes,
            "compression_ratio": ratio,
            "last_seen": self.last_seen,
            "backlog": self.backlog,
            "replayed": self.replayed,
            "nonce_reused": self.nonce_reused,
            "journal_bytes": self.journal_bytes,
            "dropped": dict(self.dropped),
            "rejected": dict(self.rejected),
            "drops_changed": self.drops_changed,
            "rung": self.rung,
            "clock_skew_s": None if self.clock_skew is None else round(self.clock_skew, 3),
            "backlog_oldest": self.backlog_oldest,
        }


class GatewayMetrics:
    """Counters and gauges of one gateway; ``render()`` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        p = "flowtunnel_gateway_"
        self.rejected = Counter(
            p + "rejected_requests", "Requests rejected, by agent and cause", ["agent", "cause"], registry=r
        )
        self.sink_lag = Gauge(
            p + "sink_lag_entries", "Journal entries a sink has not consumed yet", ["sink"], registry=r
        )
        self.sink_errors = Counter(
            p + "sink_errors", "Errors in a sink, by cause", ["sink", "cause"], registry=r
        )
        self.inflight = Gauge(p + "inflight_requests", "Batch requests being processed now", registry=r)
        self.journal_bytes = Gauge(p + "journal_bytes", "Size of the journal on disk", registry=r)
        self.journal_entries = Gauge(p + "journal_entries", "Entries retained in the journal", registry=r)
        self.batch_seconds = Histogram(
            p + "batch_request_seconds", "POST /v1/batches or /v1/b from its headers to its answer (slot "
            "wait, body, ingest, journal commit): the gateway's side of an agent's request latency",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        self.journal_commits = Counter(
            p + "journal_commits", "Journal commits (one transaction and fsync each; the SQLite journal "
            "commits the batches of several agents together)", registry=r,
        )
        self.journal_commit_batches = Counter(
            p + "journal_commit_batches", "Batch pieces journaled by those commits (divided by the commits: "
            "the mean group size)", registry=r,
        )
        self.forwarded = Counter(
            p + "forwarded_datagrams", "Datagrams re-emitted by udp-forward", ["target"], registry=r
        )
        self.ws_connections = Gauge(p + "ws_connections", "Open WebSocket connections", registry=r)
        self.compression_streams = Gauge(
            p + "compression_streams", "Agents' compression streams held in memory (docs/protocol.md section "
            "3.4; ~130 KB each)", registry=r,
        )
        self.compression_streams_evicted = Counter(
            p + "compression_streams_evicted", "Compression streams dropped to stay within the memory bound "
            "(least recently used agent first): each costs that agent one refusal and a resend", registry=r,
        )
        self.get_pending_batches = Gauge(
            p + "get_pending_batches", "GET-only batches waiting for pieces", registry=r
        )
        self.get_pending_bytes = Gauge(
            p + "get_pending_bytes", "Bytes held by GET-only batches waiting for pieces", registry=r
        )
        self.get_expired = Counter(
            p + "get_expired_batches", "GET-only batches dropped incomplete after get_max_age", registry=r
        )
        register_build_info(r, component="gateway")
        self.agents: dict[str, AgentStats] = {}
        # Per rung (endpoint family: post, ws, get, probe, state), so bench/ can compare what each costs.
        self.rungs: dict[str, dict[str, int]] = {}
        self.rejects_by_cause: dict[str, int] = {}
        r.register(_Series(self))

    def journal_commit(self, pieces: int) -> None:
        """One journal commit holding ``pieces`` batch pieces."""
        self.journal_commits.inc()
        self.journal_commit_batches.inc(pieces)

    def _stats(self, agent: str) -> AgentStats:
        st = self.agents.get(agent)
        if st is None:
            st = self.agents[agent] = AgentStats()
        return st

    def _rung(self, rung: str) -> dict[str, int]:
        doc = self.rungs.get(rung)
        if doc is None:
            doc = self.rungs[rung] = {"requests": 0, "acked": 0, "refused": 0, "bytes_in": 0, "bytes_out": 0}
        return doc

    def rung_request(self, rung: str, *, bytes_in: int, bytes_out: int = 0) -> None:
        """One request (or WebSocket message) on ``rung``, with the bytes it took each way."""
        doc = self._rung(rung)
        doc["requests"] += 1
        doc["bytes_in"] += bytes_in
        doc["bytes_out"] += bytes_out

    def rung_traffic(self, rung: str, *, bytes_in: int = 0, bytes_out: int = 0) -> None:
        doc = self._rung(rung)
        doc["bytes_in"] += bytes_in
        doc["bytes_out"] += bytes_out

    def rung_batch(self, rung: str, outcome: str) -> None:
        """A sealed batch that reached ingest over ``rung``: ``outcome`` "acked" or "refused"."""
        self._rung(rung)[outcome] += 1

    def agent_rung(self, agent: str, rung: str) -> None:
        """``agent``'s batch was acknowledged over ``rung`` (an enrolled id: ingest accepted it)."""
        self._stats(agent).rung = rung

    def reject(self, agent: str | None, cause: str) -> None:
        """Count a rejected request. ``agent`` must already be reduced to an enrolled id or None."""
        label = agent or UNKNOWN_AGENT
        self.rejected.labels(label, cause).inc()
        self.rejects_by_cause[cause] = self.rejects_by_cause.get(cause, 0) + 1
        if agent is not None:
            st = self._stats(agent)
            st.rejected[cause] = st.rejected.get(cause, 0) + 1

    def accepted(
        self,
        agent: str,
        *,
        now: float,
        acked: int,
        accepted: int,
        duplicates: int,
        gap: int,
        http_bytes: int,
        lost: int = 0,
        datagram_bytes: int,
        backlog: int | None,
        dropped: dict[str, int],
        backlog_age: int | None = None,
    ) -> None:
        st = self._stats(agent)
        if backlog_age is not None:
            # Kept as the time (gateway clock) the oldest unacknowledged datagram was received: its age keeps
            # growing while the agent stays silent, and the two clocks need not agree.
            st.backlog_oldest = now - backlog_age
        st.batches += 1
        st.datagrams += accepted
        st.duplicates += duplicates
        st.gap += gap
        st.lost += lost
        st.http_bytes += http_bytes
        st.datagram_bytes += datagram_bytes
        st.last_seen = now
        st.acked = acked
        st.answered = True
        if backlog is not None:
            st.backlog = backlog
        # The first report after a (gateway) start is the baseline: counters the agent carried over are old.
        if gap or (st.dropped and any(n > st.dropped.get(c, 0) for c, n in dropped.items())):
            st.drops_changed = now
        for cause, n in dropped.items():
            if cause in st.dropped or len(st.dropped) < _MAX_DROP_CAUSES:
                st.dropped[cause] = n

    def replay(self, agent: str) -> None:
        """An exact copy of an earlier request: counted, nothing else changes."""
        self._stats(agent).replayed += 1

    def nonce_reuse(self, agent: str) -> None:
        self._stats(agent).nonce_reused += 1

    def held(self, agent: str, n: int) -> None:
        """Journal bytes held for ``agent`` now."""
        st = self.agents.get(agent)
        if st is None and not n:
            return
        self._stats(agent).journal_bytes = n

    def clock_sample(self, agent: str, skew: float) -> None:
        """One batch's estimate of the agent's clock minus the gateway's, in seconds (the median of the
        recent ones is taken when read: ``AgentStats.clock_skew``)."""
        self._stats(agent).skew_samples.append(skew)

    def seen(self, agent: str, *, now: float, acked: int) -> None:
        """An authenticated request that carried no data (resync, state query)."""
        st = self._stats(agent)
        st.last_seen = now
        st.acked = acked
        st.answered = True

    def restore_last_seen(self, agent: str, when: float) -> None:
        """Carry an agent's last-seen time over a gateway restart (from the previous status.json)."""
        st = self._stats(agent)
        if st.last_seen is None or st.last_seen < when:
            st.last_seen = when

    def render(self) -> bytes:
        return generate_latest(self.registry)


_P = "flowtunnel_gateway_"


class _Series(Collector):
    """The per-agent and per-rung series, made from ``GatewayMetrics.agents`` and ``.rungs`` at each scrape.

    Same names, labels and values as the metric objects they replace (no ``_created`` series). An agent's
    traffic series appear with its first acknowledged batch, its ``acked`` and last-seen ones with its first
    answered request, replays and nonce reuses once there is one. Runs in the scrape's worker thread while
    the event loop changes the figures: each dictionary is copied first (one C call, atomic under the GIL),
    so a scrape sees every figure as it was at some moment, never a broken dictionary."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return self._families()[0]

    def collect(self) -> Iterator[Metric]:
        families, fill = self._families()
        fill()
        return families

    def _families(self) -> tuple[Iterator[Metric], Callable[[], None]]:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ("agent",)) -> CounterMetricFamily:
            return CounterMetricFamily(_P + name, doc, labels=labels)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ("agent",)) -> GaugeMetricFamily:
            return GaugeMetricFamily(_P + name, doc, labels=labels)

        datagrams = counter("datagrams", "Datagrams journaled, per agent")
        duplicates = counter("duplicate_datagrams",
                             "Datagrams received again at or below the high-water mark")
        gap = counter("agent_gap_datagrams", "Sequence numbers an agent skipped (its own drops)")
        lost = counter("journal_lost_datagrams", "Acknowledged datagrams later missing from the journal "
                       "(restored backup, torn tail) that the agent no longer had")
        http_bytes = counter("http_body_bytes", "Sealed batch bytes received")
        datagram_bytes = counter("datagram_bytes", "Raw datagram bytes carried in accepted batches")
        ratio = gauge("compression_ratio", "Raw datagram bytes / HTTP body bytes since start")
        backlog = gauge("agent_backlog_datagrams", "Backlog the agent reported (X-Flowtunnel-Backlog)")
        dropped = gauge("agent_dropped_datagrams",
                        "Drops the agent reported, by cause (X-Flowtunnel-Dropped)", ("agent", "cause"))
        last_seen = gauge("agent_last_seen_timestamp_seconds", "Unix time of the agent's last request")
        acked = gauge("agent_acked_seq", "High-water mark acknowledged to the agent")
        skew = gauge("agent_clock_skew_seconds", "The agent's clock minus the gateway's (median of recent "
                     "batches; the gateway acts on its own receive time)")
        replayed = counter("replayed_requests", "Exact copies of an earlier request (same nonce and tag) "
                           "seen again: answered, but changing no figure")
        nonce_reused = counter("nonce_reuse", "Authenticated requests reusing a recent nonce with other "
                               "content under the same key (a broken or hostile client)")
        journal_bytes = gauge("agent_journal_bytes", "Journal bytes held for the agent (not yet consumed by "
                              "every sink)")
        rung_requests = counter("rung_requests",
                                "Requests per rung (HTTP requests; for ws also each message)", ("rung",))
        rung_batches = counter("rung_batches", "Sealed batches handed to ingest, per rung and outcome "
                               "(acked, refused)", ("rung", "outcome"))
        rung_bytes = counter("rung_bytes", "Bytes per rung and direction (in, out): request line, headers "
                             "and body as parsed, WebSocket frames with their headers", ("rung", "direction"))
        families: list[Metric] = [
            datagrams, duplicates, gap, lost, http_bytes, datagram_bytes, ratio, backlog, dropped, last_seen,
            acked, skew, replayed, nonce_reused, journal_bytes, rung_requests, rung_batches, rung_bytes,
        ]

        def fill() -> None:
            for agent, st in sorted(self._metrics.agents.copy().items()):
                a = [agent]
                if st.batches:
                    datagrams.add_metric(a, st.datagrams)
                    duplicates.add_metric(a, st.duplicates)
                    gap.add_metric(a, st.gap)
                    lost.add_metric(a, st.lost)
                    http_bytes.add_metric(a, st.http_bytes)
                    datagram_bytes.add_metric(a, st.datagram_bytes)
                    if st.http_bytes:
                        ratio.add_metric(a, st.datagram_bytes / st.http_bytes)
                if st.backlog is not None:
                    backlog.add_metric(a, st.backlog)
                for cause, n in sorted(st.dropped.copy().items()):
                    dropped.add_metric([agent, cause], n)
                if st.last_seen is not None:
                    last_seen.add_metric(a, st.last_seen)
                if st.answered:
                    acked.add_metric(a, st.acked)
                median = st.clock_skew
                if median is not None:
                    skew.add_metric(a, median)
                if st.replayed:
                    replayed.add_metric(a, st.replayed)
                if st.nonce_reused:
                    nonce_reused.add_metric(a, st.nonce_reused)
                journal_bytes.add_metric(a, st.journal_bytes)
            for rung, doc in sorted(self._metrics.rungs.copy().items()):
                figures = doc.copy()
                rung_requests.add_metric([rung], figures["requests"])
                for outcome in ("acked", "refused"):
                    if figures[outcome]:
                        rung_batches.add_metric([rung, outcome], figures[outcome])
                for direction in ("in", "out"):
                    if figures["bytes_" + direction]:
                        rung_bytes.add_metric([rung, direction], figures["bytes_" + direction])

        return iter(families), fill
