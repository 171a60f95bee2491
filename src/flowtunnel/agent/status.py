"""Reading and rendering the agent's ``status.json`` for ``flowtunnel status --spool DIR``.

The agent rewrites the file atomically every few seconds (``AgentService.status`` builds it); this module
only turns it into text an operator reads at a glance, so it takes plain dicts and tolerates missing keys
(a status file written by an older or newer agent still renders).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowtunnel.statusfile import read_status_file, stale_note
from flowtunnel.wire import CONTENT_TYPE

__all__ = ["read_status", "render"]

# Written every few seconds; older than this, the agent is probably not running.
STALE_AFTER = 30.0


def read_status(spool_dir: Path) -> dict[str, Any]:
    """The parsed ``<spool_dir>/status.json``; raises ``FlowtunnelError`` naming the file and the problem."""
    return read_status_file(spool_dir, kind="agent", missing=f"no agent has run with spool {spool_dir}")


def _size(n: object) -> str:
    if not isinstance(n, int | float):
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover - loop always returns


def _ago(t: object, now: float) -> str:
    if not isinstance(t, int | float):
        return "never"
    delta = max(0.0, now - float(t))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(t)))
    if delta < 120:
        return f"{stamp} ({delta:.0f} s ago)"
    if delta < 7200:
        return f"{stamp} ({delta / 60:.0f} min ago)"
    return f"{stamp} ({delta / 3600:.1f} h ago)"


def _counts(d: object) -> str:
    if not isinstance(d, Mapping) or not any(d.values()):
        return "none"
    return ", ".join(f"{k}={v}" for k, v in sorted(d.items()) if v)


_CODEC_NAMES = {0: "none", 1: "zstd", 2: "zstd+dict", 3: "columnar", 4: "columnar+lzma"}


def _link(status: Mapping[str, Any]) -> str:
    """The upload rate the agent measured (it picks codecs by it) and the codecs its batches went in."""
    rate = _get(status, "upload", "link_bytes_per_s")
    text = f"{_size(rate)}/s measured" if isinstance(rate, int | float) else "not measured yet"
    codecs = _get(status, "upload", "codecs")
    if isinstance(codecs, Mapping) and any(codecs.values()):
        used = ", ".join(
            f"{_CODEC_NAMES.get(int(k), k) if str(k).isdigit() else k} {v}"
            for k, v in sorted(codecs.items(), key=lambda kv: str(kv[0])) if v
        )
        text += f"; batches by codec: {used}"
    return text


def _upstream(loss: object) -> str:
    """Loss between exporters and the agent (export sequence gaps), which the tunnel cannot recover."""
    if not isinstance(loss, Mapping) or not loss:
        return "none seen (v5/v9 checked here; the gateway checks IPFIX)"
    lost = {k: v.get("lost", 0) for k, v in loss.items() if isinstance(v, Mapping)}
    total = sum(int(n) for n in lost.values() if isinstance(n, int))
    if not total:
        return f"none ({len(lost)} exporter streams checked)"
    worst = ", ".join(f"{k}: {n}" for k, n in sorted(lost.items(), key=lambda kv: -int(kv[1]))[:3] if n)
    return f"{total} units lost before the agent ({worst})"


def _spool_health(spool: object) -> str:
    """Full disk now, and torn write-ahead log tails found on open (a crash cut a write short)."""
    if not isinstance(spool, Mapping):
        return "-"
    parts = []
    if spool.get("disk_full"):
        parts.append("DISK FULL (appends held until space is freed)")
    torn = spool.get("torn_tails")
    if isinstance(torn, int) and torn:
        plural = "s" if torn != 1 else ""
        parts.append(f"{torn} torn write-ahead log tail{plural} found on open (see the log)")
    return ", ".join(parts) or "ok"


def _drops(status: Mapping[str, Any]) -> str:
    """Drops by cause, with what to do about kernel drops and a note where they cannot be counted."""
    text = _counts(status.get("drops"))
    kernel = _get(status, "drops", "kernel_rcvbuf")
    if isinstance(kernel, int) and kernel:
        text += " (kernel_rcvbuf: raise --rcvbuf and net.core.rmem_max)"
    per_socket = status.get("kernel_drops")
    if isinstance(per_socket, Mapping) and any(v is None for v in per_socket.values()):
        text += "; kernel drops not countable on this system"
    return text


def _acknowledged(status: Mapping[str, Any], now: float) -> str:
    """When data was last acknowledged; while uploads fail (even if resyncs succeed), for how long not."""
    since = _get(status, "upload", "unacked_since")
    last = _ago(_get(status, "upload", "last_ack"), now)
    if isinstance(since, int | float):
        waited = max(0.0, now - float(since))
        return f"NOT ACKNOWLEDGED for {waited:.0f} s (failing since {_ago(since, now)}; last ack {last})"
    return last


def _get(doc: Mapping[str, Any], *path: str) -> Any:
    cur: Any = doc
    for key in path:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(key)
    return cur


def _rung(status: Mapping[str, Any]) -> str:
    """The rung in use, its route, and why the others are not used."""
    rung = _get(status, "upload", "rung")
    route = _get(status, "upload", "route")
    text = f"{rung}" + (f" ({route})" if route else "")
    if _get(status, "upload", "rung_for_bytes") is True:
        text += f", {_get(status, 'upload', 'rung_why')}"  # "fewer bytes per batch than post"
    others = _get(status, "upload", "rungs")
    if isinstance(others, Mapping):
        notes = [f"{name} {state}" for name, state in others.items() if name != rung and state != "untried"]
        if notes:
            text += "; " + "; ".join(notes)
    return text


def _gateways(status: Mapping[str, Any], gateways: Mapping[str, Any]) -> str:
    """Which of several gateways is in use, how often the agent moved, and why it left the others."""
    names = list(gateways)
    current = status.get("gateway")
    place = f"{names.index(current) + 1} of {len(names)} in use" if current in names else f"{len(names)}"
    text = f"{place}, {_get(status, 'upload', 'gateway_moves') or 0} moves"
    notes = [f"{url} {state}" for url, state in gateways.items() if url != current and state != "untried"]
    return text + ("; " + "; ".join(notes) if notes else "")


def render(
    status: Mapping[str, Any], *, now: float | None = None, pid_running: bool | None = None
) -> str:
    """A few aligned lines: identity, backlog, last upload, rates, compression, drops, exporters.

    ``pid_running``: whether the agent named in the file still runs (None: not known); a file older than
    ``STALE_AFTER`` or written by a dead agent is marked stale.
    """
    now = time.time() if now is None else now
    rows: list[tuple[str, str]] = []
    updated = status.get("updated")
    state = ""
    if updated is not None or pid_running is not None:
        note = stale_note(dict(status), now=now, stale_after=STALE_AFTER, pid_running=pid_running)
        if note:
            state = f"  (STALE: {note})"
    rows.append(("agent", f"{status.get('agent_id', '?')} (pid {status.get('pid', '?')}){state}"))
    rows.append(("updated", _ago(updated, now)))
    rows.append(("listen", ", ".join(status.get("listen") or []) or "-"))
    rows.append(("gateway", f"{status.get('gateway', '-')}"
                 + (f" via {_get(status, 'upload', 'proxy')}" if _get(status, "upload", "proxy") else "")))
    gateways = _get(status, "upload", "gateways")
    if isinstance(gateways, Mapping) and len(gateways) > 1:
        rows.append(("gateways", _gateways(status, gateways)))
    rung = _get(status, "upload", "rung")
    if rung:
        rows.append(("rung", _rung(status)))
    label = _get(status, "upload", "content_type")
    if label and label != CONTENT_TYPE:  # the POST rung's batches go under another label: a proxy refused it
        rows.append(("content type", f"{label} (not {CONTENT_TYPE}: refused on this network)"))
    if _get(status, "upload", "batch_path") == "/v1/batches":  # the compact route was refused on this network
        rows.append(("batch path", "/v1/batches (POST /v1/b refused on this network)"))
    for label, key in (("captive portal", "captive_portal"), ("TLS intercepted", "intercepted_by"),
                       ("body limit", "body_limit_by")):
        value = _get(status, "upload", key)
        if value:
            if key == "body_limit_by":
                value = f"{_size(_get(status, 'upload', 'max_body'))}, imposed by {value}"
            elif key == "intercepted_by":
                value = f"by {value}"
            rows.append((label, str(value)))
    oversize = _get(status, "upload", "oversize")
    if oversize:
        rows.append(("oversize", f"{oversize} datagrams too large for the path's body limit even alone "
                     "(kept)"))
    rows.append(("gateway acked", f"seq {status.get('gateway_acked')}"
                 if status.get("gateway_acked") is not None else "unknown (not reached yet)"))
    backlog_n, backlog_b = _get(status, "backlog", "datagrams"), _get(status, "backlog", "bytes")
    quota = _get(status, "spool", "quota_bytes")
    disk = _get(status, "spool", "disk_bytes")
    policy = _get(status, "spool", "policy")
    if quota and isinstance(disk, int | float):
        of_quota = f" (spool {_size(disk)} on disk of {_size(quota)} quota, {policy})"
    else:
        of_quota = f" of {_size(quota)} quota ({policy})" if quota else ""
    rows.append(("backlog", f"{backlog_n if backlog_n is not None else '-'} datagrams, {_size(backlog_b)}"
                 + of_quota))
    rows.append(("spool", _spool_health(status.get("spool"))))
    result = _get(status, "upload", "last_result") or "none"
    failures = _get(status, "upload", "consecutive_failures") or 0
    last = f"{_ago(_get(status, 'upload', 'last_attempt'), now)}: {result}"
    if failures:
        last += f" ({failures} failures in a row"
        nxt = _get(status, "upload", "next_attempt")
        last += f", next try in {max(0.0, float(nxt) - now):.0f} s)" if isinstance(nxt, int | float) else ")"
    rows.append(("last upload", last))
    rows.append(("last success", _ago(_get(status, "upload", "last_success"), now) + " (gateway answered)"))
    rows.append(("last ack", _acknowledged(status, now)))
    rin = _get(status, "rates", "datagrams_in_per_s")
    rout = _get(status, "rates", "bytes_out_per_s")
    rows.append(("rates", f"{rin if rin is not None else '-'} datagrams/s in, "
                 f"{_size(rout) if rout is not None else '-'}/s out"))
    ratio = status.get("compression_ratio")
    rows.append(("compression", f"{ratio:.2f}x" if isinstance(ratio, int | float) else "-"))
    rows.append(("link", _link(status)))
    rows.append(("sent", f"{_get(status, 'upload', 'datagrams') or 0} datagrams in "
                 f"{_get(status, 'upload', 'batches') or 0} batches, "
                 f"{_size(_get(status, 'upload', 'body_bytes'))}"))
    rows.append(("received", f"{_get(status, 'received', 'datagrams') or 0} datagrams, "
                 f"{_size(_get(status, 'received', 'bytes'))}"))
    rows.append(("drops", _drops(status)))
    rows.append(("malformed", _counts(status.get("malformed")) + " (carried anyway)"
                 if _counts(status.get("malformed")) != "none" else "none"))
    rows.append(("upload errors", _counts(_get(status, "upload", "failures"))))
    rows.append(("upstream loss", _upstream(status.get("upstream_loss"))))
    lost = _get(status, "upload", "gateway_lost")
    if lost:
        rows.append(("lost at gateway", f"{lost} datagrams (acknowledged, then lost by the gateway)"))
    exporters = status.get("exporters")
    if isinstance(exporters, Mapping) and exporters:
        for i, (addr, info) in enumerate(sorted(exporters.items())):
            n = info.get("datagrams") if isinstance(info, Mapping) else None
            seen = info.get("last_seen") if isinstance(info, Mapping) else None
            rows.append(("exporters" if i == 0 else "", f"{addr}: {n} datagrams, last {_ago(seen, now)}"))
    else:
        rows.append(("exporters", "none seen yet"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
