"""Process plumbing in ``flowtunnel.runtime`` that the other test modules do not cover."""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys

import pytest

from flowtunnel.runtime import TaskSet, cancel_and_wait

CALL = "from flowtunnel.runtime import limit_malloc_arenas; print(limit_malloc_arenas())"


def _run(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", CALL], env=env, capture_output=True, text=True, check=True,
                         timeout=60)
    return out.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_malloc_arenas_are_limited_on_glibc() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    assert _run(env) == "True"


def test_an_explicit_malloc_arena_max_wins() -> None:
    assert _run({**os.environ, "MALLOC_ARENA_MAX": "4"}) == "False"



async def _swallows(cancels: list[int], ended: list[str]) -> None:
    """Loops like a task whose library caught its cancellation ``cancels[0]`` times (nats-py's flush does)."""
    swallowed = 0
    while True:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            swallowed += 1
            if swallowed > cancels[0]:
                ended.append("ended")
                raise


async def test_a_task_that_swallows_its_cancellation_is_cancelled_again_until_it_ends() -> None:
    ended: list[str] = []
    task = asyncio.get_running_loop().create_task(_swallows([3], ended), name="swallower")
    await asyncio.sleep(0.02)
    assert await cancel_and_wait([task], grace=10.0) == []
    assert task.cancelled()
    assert ended == ["ended"]


async def test_a_task_that_never_ends_does_not_hold_shutdown(caplog: pytest.LogCaptureFixture) -> None:
    """A TaskSet closes within its grace whatever a task does, and names the task it left behind (before,
    close() gathered the tasks and waited for good)."""
    tasks = TaskSet()
    ended: list[str] = []
    limit = [10**9]
    stubborn = tasks.spawn(_swallows(limit, ended), name="stubborn")
    quick = tasks.spawn(asyncio.sleep(3600), name="quick")
    await asyncio.sleep(0.02)
    async with asyncio.timeout(5):
        await tasks.close(grace=0.5)
    assert quick.cancelled()
    assert not stubborn.done()
    assert "task stubborn did not stop within 0.5 s" in caplog.text
    limit[0] = 0  # the test's own clean-up: now it ends at the next cancellation
    assert await cancel_and_wait([stubborn], grace=5.0) == []


SETTLE = (
    "import gc\n"
    "from flowtunnel.runtime import SERVER_GC_YOUNG, settle_gc\n"
    "kept = [[i] for i in range(1000)]\n"
    "before = (gc.get_freeze_count(), gc.get_threshold()[0])\n"
    "settle_gc()\n"
    "print(*before, gc.get_freeze_count(), gc.get_threshold()[0], SERVER_GC_YOUNG)\n"
)


def test_settle_gc_freezes_what_start_up_built_and_collects_the_young_generation_less_often() -> None:
    # In a child process: it changes the collector of the whole process.
    out = subprocess.run([sys.executable, "-c", SETTLE], capture_output=True, text=True, check=True,
                         timeout=60)
    frozen_before, young_before, frozen, young, server_young = map(int, out.stdout.split())
    assert frozen_before == 0
    assert frozen > 1000  # at least what the script kept alive
    assert young == server_young > young_before


TRIM = """
import sys
from flowtunnel.runtime import trim_malloc
def anon():
    return int([l for l in open('/proc/self/status') if l.startswith('RssAnon:')][0].split()[1])
keep = [bytearray(b'x' * 60_000) for _ in range(400)]  # under the mmap threshold: on the heap
del keep[:-1]  # all freed but the last, which pins the heap's top: the free pages stay resident
before = anon()
ran = trim_malloc(every=0.0)
print(ran, before - anon())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_malloc_gives_freed_heap_pages_back() -> None:
    """issue 14: glibc keeps freed heap pages resident; the agent trims after each batch."""
    out = subprocess.run([sys.executable, "-c", TRIM], capture_output=True, text=True, check=True, timeout=60)
    ran, freed_kib = out.stdout.split()
    assert ran == "True"
    assert int(freed_kib) > 10_000  # ~23 MB freed in the middle of the heap


def test_trim_malloc_runs_at_most_once_per_interval() -> None:
    from flowtunnel.runtime import trim_malloc

    trim_malloc(every=0.0)
    assert trim_malloc(every=3600.0) is False
