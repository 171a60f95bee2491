"""Reading and rendering the gateway's ``status.json`` for ``flowtunnel status --data DIR``.

The gateway rewrites the file atomically every few seconds (``Gateway.status`` builds it; ``GET /v1/status``
serves the same document). This module turns it into text an operator reads at a glance: agents (last seen,
acked sequence, datagrams, compression, backlog and drops they report, journal bytes held, rejects by cause,
replayed requests and nonce reuse), journal, sinks and their lag, and the udp-forward source of each (agent,
exporter). It tolerates missing keys.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowtunnel.statusfile import read_status_file, stale_note

__all__ = ["STALE_AFTER", "read_status", "render"]

#: Written every few seconds; older than this, the gateway is probably not running.
STALE_AFTER = 30.0


def read_status(data_dir: Path) -> dict[str, Any]:
    """The parsed ``<data_dir>/status.json``; raises ``FlowtunnelError`` naming the file and the problem."""
    return read_status_file(data_dir, kind="gateway", missing=f"no gateway has run with data {data_dir}")


def _size(n: object) -> str:
    if not isinstance(n, int | float):
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _ago(t: object, now: float) -> str:
    if not isinstance(t, int | float):
        return "never"
    delta = max(0.0, now - float(t))
    if delta < 120:
        return f"{delta:.0f} s ago"
    if delta < 7200:
        return f"{delta / 60:.0f} min ago"
    if delta < 172800:
        return f"{delta / 3600:.1f} h ago"
    return time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(float(t)))


def _counts(d: object) -> str:
    if not isinstance(d, Mapping) or not any(d.values()):
        return "-"
    return ", ".join(f"{k}={v}" for k, v in sorted(d.items()) if v)


def _skew(value: object) -> str:
    """An agent's clock minus the gateway's: "-" under a second (or unknown), else signed with a unit."""
    if not isinstance(value, int | float) or abs(value) < 1:
        return "-"
    sign = "+" if value > 0 else "-"
    value = abs(float(value))
    if value < 120:
        return f"{sign}{value:.0f} s"
    if value < 5400:
        return f"{sign}{value / 60:.0f} min"
    return f"{sign}{value / 3600:.1f} h"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    out = ["  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for r in rows:
        out.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return out


def render(
    status: Mapping[str, Any], *, now: float | None = None, pid_running: bool | None = None
) -> str:
    """The status document as a few aligned sections of plain text.

    ``pid_running`` says whether the process named in the document still runs (None: not known, e.g. the
    document came from a running gateway over HTTP); a file older than ``STALE_AFTER`` or written by a dead
    process is marked stale first thing.
    """
    now = time.time() if now is None else now
    lines: list[str] = []
    updated = status.get("updated")
    stale = None
    if updated is not None or pid_running is not None:
        stale = stale_note(dict(status), now=now, stale_after=STALE_AFTER, pid_running=pid_running)
    if stale:
        lines.append(f"STALE: {stale}: the figures below are the last ones it wrote")
    listen = ", ".join(str(u) for u in status.get("listen") or []) or "-"
    lines.append(f"gateway  {listen}  (pid {status.get('pid', '?')}, data {status.get('data', '?')})")
    lines.append(f"updated  {_ago(updated, now)}")

    agents = status.get("agents") or {}
    lines.append("")
    lines.append(f"agents ({len(agents)})")
    rows: list[list[str]] = []
    for agent_id, a in sorted(agents.items()):
        if not isinstance(a, Mapping):
            continue
        ratio = a.get("compression_ratio")
        state = "revoked" if a.get("revoked") else ("active" if a.get("enrolled", True) else "not enrolled")
        rows.append([
            str(agent_id), state, _ago(a.get("last_seen"), now), str(a.get("acked", 0)),
            str(a.get("datagrams", 0)), _size(a.get("http_bytes")),
            f"{ratio:.1f}x" if isinstance(ratio, int | float) else "-",
            "-" if a.get("backlog") is None else str(a.get("backlog")),
            _size(a.get("journal_bytes")) if a.get("journal_bytes") else "-",
            _counts({**(a.get("dropped") or {}), **({"gap": a["gap"]} if a.get("gap") else {}),
                     **({"LOST_HERE": a["lost_at_gateway"]} if a.get("lost_at_gateway") else {})}),
            _counts({**(a.get("rejected") or {}),
                     **({"replayed": a["replayed"]} if a.get("replayed") else {}),
                     **({"NONCE_REUSE": a["nonce_reused"]} if a.get("nonce_reused") else {})}),
            _skew(a.get("clock_skew_s")),
        ])
    if rows:
        lines += _table(["agent", "state", "last seen", "acked", "datagrams", "http in", "ratio", "backlog",
                         "journal", "drops", "rejected / replayed", "clock skew"], rows)
    else:
        lines.append("  none enrolled (flowtunnel enroll NAME --data DIR)")

    j = status.get("journal") or {}
    lines.append("")
    held = (
        f"seq {j.get('first_seq', '-')}..{j.get('last_seq', '-')}" if j.get("entries")
        else f"all consumed, last seq {j.get('last_seq', '-')}"
    )
    on_disk = j.get("disk_bytes") or j.get("file_bytes")
    lines.append(
        f"journal  {j.get('entries', '-')} entries, {_size(on_disk)} on disk "
        f"(quota {_size(j.get('disk_quota_bytes') or j.get('quota_bytes'))}), {held}"
        + (f", refused {j['refused']}" if j.get("refused") else "")
    )

    sinks = status.get("sinks") or {}
    lines.append("")
    lines.append(f"sinks ({len(sinks)})")
    srows: list[list[str]] = []
    for name, s in sorted(sinks.items()):
        if not isinstance(s, Mapping):
            continue
        extra = []
        for key in ("sent", "records", "rows", "path", "database", "out", "files"):
            if key in s:
                extra.append(f"{key}={s[key]}")
        if s.get("errors"):
            extra.append(f"errors: {_counts(s['errors'])}")
        state = "running" if s.get("running", True) else "STOPPED"
        if isinstance(s.get("failing_since"), int | float):
            state = "FAILING"
        srows.append([str(name), state, str(s.get("cursor", "-")), str(s.get("lag", "-")), " ".join(extra)])
    if srows:
        lines += _table(["sink", "state", "cursor", "lag", "details"], srows)
    else:
        lines.append("  none")
    for name, s in sorted(sinks.items()):
        since = s.get("failing_since") if isinstance(s, Mapping) else None
        if isinstance(since, int | float):
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(since)))
            lines.append(f"  {name} commits failing since {stamp} ({_ago(since, now)}): "
                         f"{s.get('commit_failures', '?')} failures, last: {s.get('last_error') or '?'}")

    fwd = sinks.get("udp-forward") if isinstance(sinks, Mapping) else None
    mappings = fwd.get("mappings") if isinstance(fwd, Mapping) else None
    if isinstance(fwd, Mapping) and mappings:
        lines.append("")
        lines.append(f"forward sources -> {', '.join(fwd.get('targets') or [])}")
        mrows = [[str(m.get("agent")), str(m.get("exporter")), str(m.get("source")),
                  "spoofed" if m.get("spoofed") else ("FALLBACK" if m.get("fallback") else "bound"),
                  str(m.get("sent", 0))] for m in mappings if isinstance(m, Mapping)]
        lines += _table(["agent", "exporter", "source", "mode", "sent"], mrows)

    dns = status.get("dns")
    if isinstance(dns, Mapping):
        lines.append("")
        lines.append(
            f"dns rung  zone {dns.get('zone', '-')} on udp+tcp port {dns.get('port', '-')}, "
            f"{dns.get('pending_batches', 0)} incomplete batches ({_size(dns.get('pending_bytes'))}); "
            f"{_counts(dns.get('counters'))}"
        )

    rungs = status.get("rungs")
    if isinstance(rungs, Mapping) and rungs:
        lines.append("")
        lines.append("rungs (since start)")
        rrows = [[str(name), str(r.get("requests", 0)), str(r.get("acked", 0)), str(r.get("refused", 0)),
                  _size(r.get("bytes_in")), _size(r.get("bytes_out"))]
                 for name, r in sorted(rungs.items()) if isinstance(r, Mapping)]
        lines += _table(["rung", "requests", "acked", "refused", "in", "out"], rrows)

    lines.append("")
    lines.append(f"rejected requests  {_counts(status.get('rejected'))}")
    return "\n".join(lines)
