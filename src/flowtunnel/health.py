"""Health checks over status documents, for ``flowtunnel status`` (Nagios exit codes) and the gateway's
``/v1/health`` endpoint.

Pure functions of a status document (``status.json`` of an agent or a gateway, or ``GET /v1/status``), a
clock reading and thresholds, so the same rules answer a monitoring system, a load balancer and a test.
Exit codes follow the Nagios plugin convention: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flowtunnel.config import format_duration

__all__ = [
    "CRITICAL",
    "OK",
    "STATE_NAMES",
    "UNKNOWN",
    "WARNING",
    "CheckResult",
    "Problem",
    "Thresholds",
    "check_agent",
    "check_gateway",
    "silent_agents",
]

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATE_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}

#: Both daemons rewrite their status every few seconds; older than this, the process is not running.
STATUS_STALE_AFTER = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Thresholds:
    """When a check warns or goes critical (seconds). Defaults suit a field link that may drop for minutes."""

    #: An enrolled agent the gateway has not heard from for this long (never heard from: since enrolment).
    stale_warning: float = 15 * 60.0
    stale_critical: float = 60 * 60.0
    #: The oldest datagram waiting in an agent's spool (the agent's status only: the gateway cannot see it).
    backlog_warning: float = 15 * 60.0
    backlog_critical: float = 2 * 3600.0
    #: Drop counters (spool full, receive buffer, malformed, agent sequence gaps) that grew this recently.
    drops_window: float = 60 * 60.0

    def __post_init__(self) -> None:
        for name in ("stale", "backlog"):
            warn, crit = getattr(self, f"{name}_warning"), getattr(self, f"{name}_critical")
            if not 0 < warn <= crit:
                raise ValueError(
                    f"{name} thresholds must satisfy 0 < warning ({format_duration(warn)}) <= critical "
                    f"({format_duration(crit)})"
                )
        if self.drops_window < 0:
            raise ValueError(f"drops window {self.drops_window} must be >= 0 (0 = do not check drops)")


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    state: int
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckResult:
    """The worst state of all problems (OK when there are none), and the problems, worst first."""

    state: int
    problems: tuple[Problem, ...]

    @classmethod
    def of(cls, problems: Iterable[Problem]) -> CheckResult:
        ordered = tuple(sorted(problems, key=lambda p: -p.state))
        return cls(state=ordered[0].state if ordered else OK, problems=ordered)

    def line(self, what: str) -> str:
        """One Nagios plugin line: ``FLOWTUNNEL WARNING - agent hotel-12 last seen 20m ago (...); ...``."""
        detail = "; ".join(p.text for p in self.problems) or f"{what} healthy"
        return f"FLOWTUNNEL {STATE_NAMES[self.state]} - {detail}"

    def as_json(self) -> dict[str, object]:
        return {"state": STATE_NAMES[self.state], "code": self.state,
                "problems": [dataclasses.asdict(p) | {"state": STATE_NAMES[p.state]} for p in self.problems]}


def _age(now: float, t: object) -> float | None:
    return max(0.0, now - float(t)) if isinstance(t, int | float) and not isinstance(t, bool) else None


def _ago(seconds: float) -> str:
    """``42s ago``, ``20m ago``, ``2.5h ago``, ``3d ago``: rounded to what an operator reads at a glance."""
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}".removesuffix(".0") + "h ago"
    return f"{seconds / 86400:.1f}".removesuffix(".0") + "d ago"


def _graded(age: float, warning: float, critical: float) -> int:
    return CRITICAL if age > critical else WARNING if age > warning else OK


def _status_age(doc: Mapping[str, Any], now: float, kind: str) -> list[Problem]:
    age = _age(now, doc.get("updated"))
    if age is None or age > STATUS_STALE_AFTER:
        when = "never" if age is None else _ago(age)
        return [Problem(state=CRITICAL, text=f"{kind} not running (status written {when})")]
    return []


def _drops(who: str, changed: object, drops: object, now: float, window: float) -> list[Problem]:
    age = _age(now, changed)
    if window <= 0 or age is None or age > window:
        return []
    items = sorted(drops.items()) if isinstance(drops, Mapping) else []
    counts = ", ".join(f"{k}={v}" for k, v in items if v)
    return [Problem(state=WARNING, text=f"{who} drops grew {_ago(age)} ({counts or 'counters changed'})")]


def silent_agents(
    agents: Mapping[str, Any], *, now: float, silence: float, ignore: Iterable[str] = ()
) -> dict[str, float]:
    """Enrolled, non-revoked agents not heard from for longer than ``silence`` seconds, with that time; an
    agent never heard from counts from its enrolment. Agents in ``ignore`` (or marked ``health_ignored``)
    and agents the document does not date at all are left out."""
    skip = set(ignore)
    out: dict[str, float] = {}
    for agent_id, a in agents.items():
        if not isinstance(a, Mapping) or agent_id in skip or a.get("health_ignored"):
            continue
        if not a.get("enrolled", True) or a.get("revoked"):
            continue
        age = _age(now, a.get("last_seen"))
        if age is None:
            age = _age(now, a.get("enrolled_at"))
        if age is not None and age > silence:
            out[str(agent_id)] = age
    return out


def check_gateway(doc: Mapping[str, Any], *, now: float | None = None,
                  thresholds: Thresholds = Thresholds()) -> CheckResult:
    """A gateway's status document: is it running, are its agents heard from, did their drops grow."""
    now = time.time() if now is None else now
    t = thresholds
    problems = _status_age(doc, now, "gateway")
    agents = doc.get("agents") or {}
    for agent_id, age in sorted(silent_agents(agents, now=now, silence=t.stale_warning).items()):
        state = _graded(age, t.stale_warning, t.stale_critical)
        limit = t.stale_critical if state == CRITICAL else t.stale_warning
        heard = isinstance(agents[agent_id].get("last_seen"), int | float)
        seen = "last seen" if heard else "never seen, enrolled"
        problems.append(Problem(state=state, text=f"agent {agent_id} {seen} {_ago(age)} "
                                                  f"(> {format_duration(limit)})"))
    for agent_id, a in sorted(agents.items()):
        if isinstance(a, Mapping) and not a.get("revoked") and not a.get("health_ignored"):
            drops = dict(a.get("dropped") or {})
            if a.get("gap"):
                drops["gap"] = a["gap"]
            problems += _drops(f"agent {agent_id}", a.get("drops_changed"), drops, now, t.drops_window)
    return CheckResult.of(problems)


def check_agent(doc: Mapping[str, Any], *, now: float | None = None,
                thresholds: Thresholds = Thresholds()) -> CheckResult:
    """An agent's status document: is it running, how old is the oldest spooled datagram, did drops grow."""
    now = time.time() if now is None else now
    t = thresholds
    problems = _status_age(doc, now, "agent")
    backlog = doc.get("backlog") or {}
    age = _age(now, backlog.get("oldest_received")) if backlog.get("datagrams") else None
    if age is not None:
        state = _graded(age, t.backlog_warning, t.backlog_critical)
        if state != OK:
            limit = t.backlog_critical if state == CRITICAL else t.backlog_warning
            problems.append(Problem(state=state, text=(
                f"backlog of {backlog.get('datagrams')} datagrams, oldest received {_ago(age)} "
                f"(> {format_duration(limit)})")))
    problems += _drops(f"agent {doc.get('agent_id', '?')}", doc.get("drops_changed"), doc.get("drops"), now,
                       t.drops_window)
    return CheckResult.of(problems)
