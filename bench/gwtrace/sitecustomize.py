"""Bench-only trace of a gateway process (bench/fleet.py --trace FILE): where each POST's time goes, loop
stalls, garbage collections, journal commits. Loaded through PYTHONPATH by every Python process of the run;
active only in ``flowtunnel gateway`` with FLOWTUNNEL_GWTRACE set (the file written at exit). It wraps
project functions at import (monkeypatching): a measuring tool, never part of the gateway.

Per request (keyed by its handler's task): ``head`` (reading the batch header), ``slot`` (waiting for an
in-flight slot), ``body``, ``open`` (authenticate, decompress), ``mark`` (reading the agent's mark),
``commit`` (waiting for the journal's group commit), ``total`` (the
``flowtunnel_gateway_batch_request_seconds`` observation). Loop callbacks over 20 ms: wall and CPU time of
the loop's thread (CPU time separates work from preemption on a loaded box). Per commit round: when the loop
took its pieces, when its thread entered and left ``append_group``, when the loop settled it. Checkpoints
outside commits (``DurableLog``'s checkpointer, if the code has one): start, wall, frames.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("FLOWTUNNEL_GWTRACE") and "gateway" in sys.orig_argv:  # pragma: no cover - bench only
    import asyncio
    import atexit
    import gc
    import json
    import time
    from collections import Counter
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager
    from typing import Any

    import flowtunnel.gateway.admission as _adm
    import flowtunnel.gateway.app as _app
    import flowtunnel.gateway.ingest as _ing
    import flowtunnel.gateway.metrics as _met
    import flowtunnel.gateway.service as _svc
    import flowtunnel.journal.group as _grp
    import flowtunnel.log.durable as _dur

    _OUT = os.environ["FLOWTUNNEL_GWTRACE"]
    _pc = time.perf_counter
    _reqs: list[dict[str, Any]] = []
    _stalls: list[tuple[float, float, str, float]] = []
    _gcs: list[tuple[float, int, float, float]] = []  # start, generation, wall, cpu
    #: start, wall, parts, file growth (a checkpoint in the commit), CPU of the committing thread
    _commits: list[tuple[float, float, int, int, float]] = []
    _takes: list[float] = []  # a commit round's pieces taken (on the loop)
    _settles: list[float] = []  # a commit round's outcome settled (on the loop)
    _ckpts: list[tuple[float, float, str, Any]] = []  # start, wall, kind, result
    _rec: dict[object, dict[str, Any]] = {}
    _census: dict[str, Any] = {}

    def _cur() -> dict[str, Any]:
        task = asyncio.current_task()
        r = _rec.get(task)
        if r is None:
            r = _rec[task] = {"t0": _pc()}
        return r

    def _timed(name: str, fn: Any) -> Any:
        async def wrapper(*args: Any, **kw: Any) -> Any:
            r = _cur()
            start = _pc()
            try:
                return await fn(*args, **kw)
            finally:
                r[name] = _pc() - start
        return wrapper

    _app._read_head = _timed("head", _app._read_head)
    _app._read_paced = _timed("body", _app._read_paced)
    _ing.Ingest._open = _timed("open", _ing.Ingest._open)  # type: ignore[method-assign]
    _ing.Ingest.hwm = _timed("mark", _ing.Ingest.hwm)  # type: ignore[method-assign]
    _orig_take = _grp.GroupCommit._take

    def _take(self: Any) -> Any:
        pieces = _orig_take(self)
        if pieces:
            _takes.append(_pc())
        return pieces

    _grp.GroupCommit._take = _take  # type: ignore[method-assign]
    _orig_settle = _grp.GroupCommit._settle

    def _settle(self: Any, *args: Any) -> Any:
        _settles.append(_pc())
        return _orig_settle(self, *args)

    _grp.GroupCommit._settle = _settle  # type: ignore[method-assign,assignment]

    def _ckpt_timed(kind: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kw: Any) -> Any:
            start = _pc()
            result = None
            try:
                result = fn(*args, **kw)
                return result
            finally:
                _ckpts.append((start, _pc() - start, kind, result))
        return wrapper

    _dur.DurableLog._checkpoint = _ckpt_timed("forced", _dur.DurableLog._checkpoint)  # type: ignore[method-assign]
    if hasattr(_dur.DurableLog, "_restart_wal"):
        _dur.DurableLog._restart_wal = _ckpt_timed(  # type: ignore[method-assign]
            "restart", _dur.DurableLog._restart_wal)
    try:
        import flowtunnel.log.checkpointer as _ckp
    except ImportError:  # the code before the checkpoint thread
        pass
    else:
        _ckp.Checkpointer._checkpoint_pass = _ckpt_timed(  # type: ignore[method-assign]
            "background", _ckp.Checkpointer._checkpoint_pass)
    _orig_append = _grp.GroupCommit.append

    async def _append(self: Any, agent: str, first_seq: int, datagrams: Any, **kw: Any) -> Any:
        r = _cur()
        r["n"] = len(datagrams)
        start = _pc()
        try:
            return await _orig_append(self, agent, first_seq, datagrams, **kw)
        finally:
            r["commit"] = _pc() - start

    _grp.GroupCommit.append = _append  # type: ignore[method-assign]
    _orig_queued = _adm.Admission.queued

    @asynccontextmanager
    async def _queued(self: Any, agent_id: str, **kw: Any) -> AsyncIterator[Any]:
        r = _cur()
        r["agent"] = agent_id
        r["small"] = bool(kw.get("small"))
        start = _pc()
        async with _orig_queued(self, agent_id, **kw) as busy:
            r["slot"] = _pc() - start
            yield busy

    _adm.Admission.queued = _queued  # type: ignore[method-assign]
    _orig_take_now = getattr(_adm.Admission, "take_now", None)  # None: code before it (A/B runs)

    def _take_now(self: Any, agent_id: str, **kw: Any) -> Any:
        # queued's fast path (a free slot, nobody waiting), which app.py also calls directly: no wait
        assert _orig_take_now is not None
        lane = _orig_take_now(self, agent_id, **kw)
        if lane is not None:
            r = _cur()
            r["agent"] = agent_id
            r["small"] = bool(kw.get("small"))
            r["slot"] = 0.0
        return lane

    if _orig_take_now is not None:
        _adm.Admission.take_now = _take_now  # type: ignore[method-assign]
    _orig_group = _dur.DurableLog.append_group

    def _append_group(self: Any, parts: Any) -> Any:
        size = os.stat(self.path).st_size
        start, cpu = _pc(), time.thread_time()
        try:
            return _orig_group(self, parts)
        finally:
            _commits.append((start, _pc() - start, len(parts), os.stat(self.path).st_size - size,
                             time.thread_time() - cpu))

    _dur.DurableLog.append_group = _append_group  # type: ignore[method-assign]
    _orig_init = _met.GatewayMetrics.__init__

    def _init(self: Any, *args: Any, **kw: Any) -> None:
        _orig_init(self, *args, **kw)
        observe = self.batch_seconds.observe

        def observed(value: float, *a: Any, **k: Any) -> Any:
            r = _rec.pop(asyncio.current_task(), {})
            r["total"] = value
            _reqs.append(r)
            return observe(value, *a, **k)

        self.batch_seconds.observe = observed

    _met.GatewayMetrics.__init__ = _init  # type: ignore[method-assign]
    _orig_run = asyncio.events.Handle._run

    def _run(self: Any) -> None:
        start, cpu = _pc(), time.thread_time()
        _orig_run(self)
        wall = _pc() - start
        if wall > 0.02:
            owner = getattr(self._callback, "__self__", None)
            if isinstance(owner, asyncio.Task):
                name = f"task {getattr(owner.get_coro(), '__qualname__', '?')}"
            else:
                name = repr(self._callback)[:120]
            _stalls.append((start, wall, name, time.thread_time() - cpu))

    asyncio.events.Handle._run = _run  # type: ignore[method-assign]
    _gc_start: list[float] = [0.0, 0.0]

    def _gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            _gc_start[:] = [_pc(), time.thread_time()]
        else:
            _gcs.append((_gc_start[0], info["generation"], _pc() - _gc_start[0],
                         time.thread_time() - _gc_start[1]))

    gc.callbacks.append(_gc)

    def _take_census() -> None:
        objs = gc.get_objects()
        _census.update(objects=len(objs), frozen=gc.get_freeze_count(), types=Counter(
            f"{getattr(type(o), '__module__', '?')}.{getattr(type(o), '__qualname__', '?')}" for o in objs
        ).most_common(25))

    _orig_start = _svc.Gateway._start

    async def _start(self: Any) -> None:
        await _orig_start(self)
        asyncio.get_running_loop().call_later(40, _take_census)  # once the fleet runs

    _svc.Gateway._start = _start  # type: ignore[method-assign]

    def _dump() -> None:
        with open(_OUT, "w") as fh:
            json.dump({"reqs": _reqs, "stalls": _stalls, "gcs": _gcs, "commits": _commits,
                       "takes": _takes, "settles": _settles, "checkpoints": _ckpts, "census": _census}, fh)

    atexit.register(_dump)
