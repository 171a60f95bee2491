"""The catalogue of reliability scenarios: one fault plan each, in a quick and a soak variant.

A plan is a coroutine run beside the exporter; it injects faults through the ``Run`` it is given (the link
emulator, the gateway and agent processes) and counts them in ``run.faults``. All randomness comes from
``run.rng`` (seeded by the scenario), so a failing run replays with the same seed.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable

from tests.linkemu import Action, Fault, LinkEmulator, Mode, Shape
from tests.reliability.harness import FaultPlan, Run, Scenario

__all__ = ["SEED_ENV", "SOAK_SECONDS_ENV", "quick_scenarios", "seed", "soak_scenarios"]

#: Environment variable bounding each soak scenario's fault loop, in seconds (default 120).
SOAK_SECONDS_ENV = "FLOWTUNNEL_SOAK_SECONDS"


#: Environment variable with the seed of every scenario's randomness (default 1): replays a failing run.
SEED_ENV = "FLOWTUNNEL_SEED"


def seed() -> int:
    return int(os.environ.get(SEED_ENV, "1"))


def _soak_seconds() -> float:
    return float(os.environ.get(SOAK_SECONDS_ENV, "120"))


# -- link faults --------------------------------------------------------------------------------------------


def _gprs(link: LinkEmulator) -> None:
    link.up = Shape(latency=0.3, jitter=0.1, rate_bps=80_000)
    link.down = Shape(latency=0.3, jitter=0.1, rate_bps=80_000)


def _per_request(
    action: Action, count: int, *, after: tuple[int, int] = (0, 0), status: int = 503,
    retry_after: float | None = None, lenient: bool = False,
) -> FaultPlan:
    async def plan(run: Run) -> None:
        for _ in range(count):
            await run.sleep_random(0.3, 0.8)
            offset = run.rng.randint(*after)
            run.link.add_fault(Fault(action=action, after=offset, match="POST /v1/b", status=status,
                                     retry_after=retry_after))
            # wait until the fault was used before arming the next, while the agent still has batches to
            # send; one never used is not counted (a batch that went another way than POST /v1/b would
            # otherwise pass as a fault survived), and is a failure of the scenario unless ``lenient``
            while run.link.pending_faults() and (not run.done_sending.is_set() or run.uploading()):
                await run.sleep_random(0.05, 0.1)
            if run.link.pending_faults():
                run.link.clear_faults()
                (run.notes if lenient else run.problems).append(
                    f"{action.value} fault armed, but no request met it")
                return
            run.faults += 1

    return plan


async def _outage(run: Run, mode: Mode, count: int, low: float, high: float) -> None:
    for _ in range(count):
        await run.sleep_random(0.5, 1.0)
        run.link.outage(run.rng.uniform(low, high), mode)
        run.faults += 1
        while run.link.mode is not Mode.FORWARD:
            await run.sleep_random(0.05, 0.1)


async def _resets(run: Run, count: int) -> None:
    for _ in range(count):
        await run.sleep_random(0.3, 0.9)
        run.faults += run.link.reset_connections() > 0


# -- process faults -----------------------------------------------------------------------------------------


async def _kill_gateway(run: Run, count: int) -> None:
    for _ in range(count):
        await run.wait_sent(run.rng.randint(10, 30) + len(run.sent))
        await run.sleep_random(0.0, 0.5)
        await run.gateway.kill9()
        run.faults += 1
        await run.sleep_random(0.2, 1.5)
        await run.gateway.start()


async def _kill_agent(run: Run, count: int) -> None:
    """kill -9 of the agent at a random instant while it uploads; the exporter pauses while it is down."""
    for _ in range(count):
        await run.wait_sent(run.rng.randint(10, 30) + len(run.sent))
        run.sending.clear()
        await run.wait_spooled()
        await run.sleep_random(0.0, 0.4)  # somewhere in the upload cycle
        await run.agent.kill9()
        run.faults += 1
        await run.sleep_random(0.1, 0.8)
        await run.agent.start()
        run.sending.set()


async def _term_gateway(run: Run, count: int) -> None:
    for _ in range(count):
        await run.wait_sent(run.rng.randint(20, 40) + len(run.sent))
        code = await run.gateway.terminate()
        if code != 0:
            run.problems.append(f"gateway exited with {code} on SIGTERM")
        run.faults += 1
        await run.sleep_random(0.2, 0.8)
        await run.gateway.start()


async def _term_agent(run: Run, count: int) -> None:
    for _ in range(count):
        await run.wait_sent(run.rng.randint(20, 40) + len(run.sent))
        run.sending.clear()
        await run.wait_spooled()
        code = await run.agent.terminate()
        if code != 0:
            run.problems.append(f"agent exited with {code} on SIGTERM")
        spooled, acked = run.agent.spool_progress()
        if acked < spooled:  # the link is up: a graceful stop sends what is spooled first
            run.problems.append(f"agent stopped with {spooled - acked} datagrams not uploaded")
        run.faults += 1
        await run.agent.start()
        run.sending.set()


async def _mixed(run: Run, seconds: float) -> None:
    """Soak: random faults of every kind until ``seconds`` have passed or the exporter is done."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    kinds = ("kill-gateway", "kill-agent", "outage", "abort-request", "abort-response", "answer-503", "reset")
    while loop.time() < end and not run.done_sending.is_set():
        kind = run.rng.choice(kinds)
        if kind == "kill-gateway":
            await _kill_gateway(run, 1)
        elif kind == "kill-agent":
            await _kill_agent(run, 1)
        elif kind == "outage":
            await _outage(run, run.rng.choice([Mode.REFUSE, Mode.BLACKHOLE, Mode.RESET]), 1, 0.5, 3.0)
        elif kind == "reset":
            await _resets(run, 1)
        else:
            action = {"abort-request": Action.ABORT_REQUEST, "abort-response": Action.ABORT_RESPONSE,
                      "answer-503": Action.ANSWER}[kind]
            await _per_request(action, 1, after=(0, 2000), status=503, retry_after=1.0, lenient=True)(run)


def _streams_used(run: Run) -> list[str]:
    """The quiet scenario must have gone through stream frames (docs/protocol.md 3.4), else it proves nothing
    about them: the agent started last has sealed some by the end (its status is rewritten every second)."""
    deadline = time.monotonic() + 5.0
    while True:
        upload = run.agent.status().get("upload") or {}
        frames = int(upload.get("stream_batches", 0))
        if frames > 0:
            run.notes.append(f"last agent process: {frames} stream frames of {upload.get('batches')} batches")
            return []
        if time.monotonic() > deadline:
            return [f"no batch went as a stream frame (agent upload status: {upload})"]
        time.sleep(0.2)


#: The agent's rungs for scenarios whose faults hit POST requests (the link emulator's per-request faults).
_POST_ONLY = ("--rungs", "post,get")


def quick_scenarios(seed: int = 1) -> list[Scenario]:
    """Every fault a few times, grouped so the whole set runs in about a minute and a half (CI)."""
    s = seed
    return [
        Scenario(name="baseline", description="no fault (control); nfcapd as a second forward target",
                 seed=s, nfcapd=True),
        Scenario(name="gprs-link", description="80 kbit/s each way, 300 ms latency + 0-100 ms jitter",
                 seed=s, setup=_gprs, flows=1000),
        # 20 datagrams/s (here and below): the export lasts ~7 s, long enough for every fault to meet a
        # request (at 80/s the agent could be done before the last was armed). These faults hit POST
        # requests, so the agent keeps to POST (``--rungs post,get``: no move to WebSocket for bytes).
        Scenario(name="cut-connections",
                 description="2 requests and 2 responses cut by RST mid-way, 1 response swallowed, "
                             "open connections reset twice",
                 seed=s, rate=20.0, agent_args=_POST_ONLY,
                 plan=_chain(_per_request(Action.ABORT_REQUEST, 2, after=(0, 3000)),
                                     _per_request(Action.ABORT_RESPONSE, 2, after=(0, 120)),
                                     _per_request(Action.DROP_RESPONSE, 1),
                                     lambda run: _resets(run, 2))),
        Scenario(name="proxy-answers", description="a proxy answers 503 (Retry-After: 1) x2, 502 x2, 407 x1",
                 seed=s, rate=20.0, agent_args=_POST_ONLY,
                 plan=_chain(_per_request(Action.ANSWER, 2, status=503, retry_after=1.0),
                                     _per_request(Action.ANSWER, 2, status=502),
                                     _per_request(Action.ANSWER, 1, status=407))),
        Scenario(name="outages", description="a 1-3 s black-hole outage, then a 1-3 s refused one", seed=s,
                 plan=_chain(lambda run: _outage(run, Mode.BLACKHOLE, 1, 1.0, 3.0),
                             lambda run: _outage(run, Mode.REFUSE, 1, 1.0, 3.0))),
        Scenario(name="kill-gateway", description="kill -9 of the gateway at 2 random instants", seed=s,
                 plan=lambda run: _kill_gateway(run, 2), nfcapd=True),
        Scenario(name="kill-agent", description="kill -9 of the agent at 2 random instants (exporter paused "
                                                "while it is down)", seed=s,
                 plan=lambda run: _kill_agent(run, 2)),
        # A quiet site: batches of a few datagrams go as frames of one compression stream that each side
        # holds in memory (docs/protocol.md 3.4); a kill -9 of either side, or a reset connection, mid-stream
        # must make the agent start a new stream, never lose or double a datagram.
        Scenario(name="quiet-kill", description="a quiet site (4 datagrams/s, --latency 1s: stream "
                                                "compression): kill -9 of the gateway twice and of the agent "
                                                "once, open connections reset once", seed=s, rate=4.0,
                 agent_args=("--latency", "1s"), check=_streams_used,
                 plan=_chain(lambda run: _kill_gateway(run, 1), lambda run: _kill_agent(run, 1),
                             lambda run: _resets(run, 1), lambda run: _kill_gateway(run, 1))),
        Scenario(name="sigterm", description="SIGTERM of the gateway, then of the agent, mid-stream; both "
                                             "restarted", seed=s,
                 plan=_chain(lambda run: _term_gateway(run, 1), lambda run: _term_agent(run, 1))),
    ]


def _chain(*plans: FaultPlan) -> FaultPlan:
    async def plan(run: Run) -> None:
        for p in plans:
            await p(run)

    return plan


def soak_scenarios(seed: int = 1) -> list[Scenario]:
    """Long randomised runs, each bounded by ``FLOWTUNNEL_SOAK_SECONDS``."""
    seconds = _soak_seconds()
    repeat = max(1, int(seconds * 80 / 142) + 1)  # enough datagrams at 80/s to outlast the fault loop
    return [
        Scenario(name="soak-kill-gateway", description=f"kill -9 of the gateway in a loop for {seconds:g} s",
                 seed=seed, repeat=repeat, plan=lambda run: _loop(run, _kill_gateway, seconds), nfcapd=False),
        Scenario(name="soak-kill-agent", description=f"kill -9 of the agent in a loop for {seconds:g} s",
                 seed=seed, repeat=repeat, plan=lambda run: _loop(run, _kill_agent, seconds)),
        Scenario(name="soak-mixed", description=f"random link and process faults for {seconds:g} s",
                 seed=seed, repeat=repeat, plan=lambda run: _mixed(run, seconds), setup=_gprs_light,
                 agent_args=_POST_ONLY),  # its mix has per-request faults: on ws none would meet a request
    ]


def _gprs_light(link: LinkEmulator) -> None:
    link.up = Shape(latency=0.2, jitter=0.1)
    link.down = Shape(latency=0.2, jitter=0.1)


async def _loop(run: Run, fault: Callable[[Run, int], Awaitable[None]], seconds: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end and not run.done_sending.is_set():
        await fault(run, 1)
