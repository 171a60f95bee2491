"""Parquet export of the flow store that never destroys the previous good export.

DuckDB's ``COPY ... TO dir (PARTITION_BY ...)`` writes its files in place: killed mid-way, it leaves a
truncated ``data_0.parquet`` where the last export's file was. So the COPY writes into a staging directory,
and only complete files are moved into the target, each one fsynced and then renamed over its final name
(copied to a temporary name in the target first when staging is on another filesystem). At any moment
every ``day=...`` file under the target is a whole file, from the previous export or from this one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Final

from flowtunnel.store.filter import compile_filter

__all__ = [
    "STAGING_PREFIX", "export_sql", "fsync_dir", "install_partitions", "new_staging", "remove_staging",
    "since_clause",
]

STAGING_PREFIX: Final = ".flowtunnel-export-"
_TMP_PREFIX: Final = ".flowtunnel-tmp-"


def since_clause(since_seconds: float | None, params: list[object], now: dt.datetime, clock: str) -> str:
    """WHERE condition keeping flows of the last ``since_seconds`` by ``clock`` ("flow" or "received")."""
    if since_seconds is None:
        return ""
    params.append((now - dt.timedelta(seconds=since_seconds)).isoformat())
    if clock == "received":
        return "received >= CAST(? AS TIMESTAMPTZ)"
    if clock != "flow":
        raise ValueError(f"unknown clock {clock!r}: choose flow or received")
    # Flows without an exporter timestamp count by when they were received.
    return "coalesce(flow_end, flow_start, received) >= CAST(? AS TIMESTAMPTZ)"


def export_sql(
    target: Path,
    *,
    since_seconds: float | None,
    now: dt.datetime,
    clock: str = "flow",
    flow_filter: str | None = None,
) -> tuple[str, list[object]]:
    """COPY statement writing ``flows`` as Parquet under ``target``, one ``day=YYYY-MM-DD`` directory per day.

    A flow's day is that of its start (or, without exporter timestamps, its reception), in UTC. ``target``
    is a directory inside the staging one (DuckDB's allowed directories hold what is *under* them);
    ``install_partitions`` moves the files to where the user asked. ``flow_filter`` (nfdump-style text,
    compiled here so that the query server checks it too) keeps only the flows it selects; ``FilterError``
    when it does not parse.
    """
    params: list[object] = []
    where = [c for c in (since_clause(since_seconds, params, now, clock),) if c]
    if flow_filter:
        compiled = compile_filter(flow_filter)
        where.append(compiled.where)
        params.extend(compiled.params)
    where_sql = f"WHERE {' AND '.join(where)}" if where else ""
    literal = str(target).replace("'", "''")
    sql = (
        "COPY (SELECT *, CAST(coalesce(flow_start, received) AS DATE) AS day FROM flows "
        f"{where_sql}) TO '{literal}' (FORMAT parquet, PARTITION_BY (day), OVERWRITE_OR_IGNORE true)"
    )
    return sql, params


def new_staging(parent: Path) -> Path:
    """A new private staging directory under ``parent``; leftovers of killed exports there are removed."""
    parent.mkdir(parents=True, exist_ok=True)
    for old in parent.glob(f"{STAGING_PREFIX}*"):
        pid = old.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if pid.isdecimal() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = parent / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir(mode=0o700)
    return path


def remove_staging(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another export of this process, running now (ours remove their own when done)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def install_partitions(staging: Path, target: Path) -> None:
    """Move every ``day=*/file`` of ``staging`` to the same name under ``target``, each file atomically.

    Files of a day that this export does not rewrite (an earlier export's extra files of that day) are
    removed once the new ones are in place; days this export does not touch are left alone.
    """
    target.mkdir(parents=True, exist_ok=True)
    if not staging.is_dir():
        return  # nothing matched: DuckDB wrote no partition
    for part in sorted(p for p in staging.iterdir() if p.is_dir()):
        dest = target / part.name
        dest.mkdir(exist_ok=True)
        for stale in dest.glob(f"{_TMP_PREFIX}*"):
            stale.unlink(missing_ok=True)  # a copy cut short by a kill
        placed: set[str] = set()
        for item in sorted(part.iterdir()):
            _place(item, dest / item.name)
            placed.add(item.name)
        for old in dest.iterdir():
            if old.is_file() and old.suffix == ".parquet" and old.name not in placed:
                old.unlink()
        fsync_dir(dest)
    fsync_dir(target)


def _place(src: Path, dst: Path) -> None:
    _fsync_file(src)
    try:
        os.replace(src, dst)  # same filesystem: atomic
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    tmp = dst.with_name(f"{_TMP_PREFIX}{dst.name}")
    try:
        shutil.copyfile(src, tmp)
        _fsync_file(tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (the export's partitions, the Parquet sink's files)."""
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories; rename still holds
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
