"""The delivery protocol as a pure state machine: fed what was sent and what came back, it says what to do.

The uploader (I/O: spool, sealing, clocks, transports) asks ``Delivery.wants_resync`` what to send next (an
empty sealed batch that learns the gateway's mark, or the next batch), sends it through a transport, and
feeds the ``Answer`` to ``Delivery.answer``, which returns one action: ``Commit`` (the gateway's mark, to
record and trim to; after a resync, ``plan_resync`` says how to align the spool), or ``Wait`` (back off, then
go on). Every rule lives here, tested without sockets (tests/agent/transport/test_delivery.py reads like a
transcript): the ack's tag must verify; 409 resynchronises at once, with backoff if it keeps happening; 413
lowers the body limit (down to ``min_body``) and retries at once; 409 ``unknown-context`` to a batch sealed
against a compression context sets ``fresh_context`` (the next batch is sealed without) and retries at once;
a connection cut twice in a row while the body was being sent counts as a body limit on the path; a single
datagram that is too large even alone is counted as ``oversize`` and kept (POST cannot carry it); transient
failures back off exponentially with full jitter or per ``Retry-After``; refusals back off
``reject_backoff`` and are logged every time.

Nothing here reads a clock, a socket or a random source: the caller passes ``draw`` (uniform in [0, 1)).
Log lines come back as ``Note`` values on the action (``once``: a cause logged once, then counted).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from flowtunnel.agent.policy import backoff_delay
from flowtunnel.agent.transport.answers import (
    GATEWAY,
    Acked,
    Answer,
    NoContext,
    Rejected,
    Resync,
    Retry,
    TooLarge,
)
from flowtunnel.wire import AuthenticationFailed, verify_ack

__all__ = ["Commit", "Delivery", "Note", "ResyncPlan", "Sent", "Wait", "plan_resync"]

# A connection closed this many times in a row while a body was being sent counts as a body limit on the path
# (some proxies cut the connection instead of answering 413).
CUTS_FOR_LIMIT = 2


@dataclass(frozen=True, kw_only=True)
class Note:
    """A log line for the caller to emit: ``level`` (logging.INFO...), ``text`` (what happened), ``then``
    (what the next attempt waits: "retrying with backoff", "retrying in 300 s"; empty when nothing is said
    about it) and ``once``: a cause name when only its first occurrence is worth a warning. The line is
    ``line``; a caller that does something else next (another rung or gateway at once) logs ``text`` and
    says what it does instead, so no line says "retrying with backoff" before an immediate retry."""

    level: int
    text: str
    then: str = ""
    once: str | None = None

    @property
    def line(self) -> str:
        return f"{self.text}; {self.then}" if self.then else self.text


@dataclass(frozen=True, kw_only=True)
class Sent:
    """What went out: a batch of seqs ``first..last`` (``datagrams`` of them), or a resync (``first`` None);
    ``nonce`` of the sealed body (the ack's tag is bound to it) and ``size`` of the body in bytes."""

    nonce: bytes
    size: int
    first: int | None = None
    last: int | None = None
    datagrams: int = 0
    context: bool = False  # sealed against a compression context (docs/protocol.md section 3.3)
    stream: bool = False  # a frame of a compression stream (docs/protocol.md section 3.4)
    continued: bool = False  # ... that continues one (not its start frame)

    @property
    def resync(self) -> bool:
        return self.first is None

    @property
    def what(self) -> str:
        return "resync" if self.first is None else f"batch {self.first}..{self.last}"


@dataclass(frozen=True, kw_only=True)
class Commit:
    """The gateway holds every seq up to ``acked``: record it and trim. ``resync``: the answer to a resync
    (align the spool with ``plan_resync`` first)."""

    acked: int
    resync: bool
    notes: tuple[Note, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Wait:
    """Wait ``delay`` seconds, then go on (``Delivery.wants_resync`` says with what). ``cause`` is the
    counter the failure went to."""

    delay: float
    cause: str
    notes: tuple[Note, ...] = ()


Action = Commit | Wait


@dataclass(frozen=True, kw_only=True)
class ResyncPlan:
    """How to align the spool after a resync learned the gateway's mark: ``lost`` datagrams the gateway once
    acknowledged and no longer has, which the spool cannot re-send; ``renumber``: move the spool's datagrams
    above the mark (a new spool for an existing agent id); ``advance``: number new datagrams above the mark
    (a spool restored from a backup: what it holds up to the mark was delivered)."""

    lost: int = 0
    renumber: bool = False
    advance: bool = False
    notes: tuple[Note, ...] = ()


def plan_resync(*, acked: int, known: int, last: int, first_stored: int, agent_id: str) -> ResyncPlan:
    """The gateway says it holds up to ``acked``; the spool last recorded ``known``, holds seqs from
    ``first_stored`` and handed out seqs up to ``last``."""
    notes: list[Note] = []
    lost = 0
    if acked < known:
        # The gateway forgot what it had acknowledged (its journal was restored from a backup, or lost).
        lost = max(0, min(first_stored - 1, known) - acked)
        if lost:
            notes.append(Note(level=logging.ERROR, text=(
                f"gateway acknowledged only up to seq {acked}, but earlier acknowledged {known}: {lost} "
                f"datagrams (seq {acked + 1}..{acked + lost}) were lost at the gateway and are no longer in "
                "the spool; re-sending the rest")))
        else:
            notes.append(Note(level=logging.WARNING, text=(
                f"gateway acknowledged only up to seq {acked}, but earlier acknowledged {known}: re-sending "
                "from the spool")))
    if acked <= last:
        return ResyncPlan(lost=lost, notes=tuple(notes))
    if known:
        notes.append(Note(level=logging.WARNING, text=(
            f"gateway acknowledged up to seq {acked}, beyond this spool's last seq {last} (restored from a "
            f"backup?): its datagrams up to {acked} count as delivered; numbering continues at {acked + 1}")))
        return ResyncPlan(lost=lost, advance=True, notes=tuple(notes))
    notes.append(Note(level=logging.WARNING, text=(
        f"gateway already holds seqs up to {acked} for agent {agent_id} but this spool is new: numbering "
        f"continues at {acked + 1}")))
    return ResyncPlan(lost=lost, renumber=True, notes=tuple(notes))


@dataclass(kw_only=True)
class Delivery:
    """The delivery protocol's state for one agent (see the module docstring).

    ``max_body`` is the body limit batches are sealed under: the configured one, lowered by 413s and cuts
    mid-body, never below ``min_body``. ``oversize`` counts single datagrams refused as too large even alone
    (each seq once); ``failures`` counts every failed attempt by cause.
    """

    agent_id: str
    key: bytes = field(repr=False)
    max_body: int
    min_body: int
    backoff_base: float
    backoff_cap: float
    reject_backoff: float
    wants_resync: bool = True
    consecutive_failures: int = 0
    resync_streak: int = 0  # 409 answers since the last acknowledged batch
    cuts: int = 0  # connections cut mid-body in a row
    limit_by: str | None = None  # who imposed the lowered body limit, for status
    oversize: int = 0
    oversize_seqs: set[int] = field(default_factory=set, repr=False)
    failures: Counter[str] = field(default_factory=Counter)
    last_result: str = "none"
    # The gateway lacks the compression context batches were sealed against: seal the next one without
    # (the uploader clears it once it dropped its context).
    fresh_context: bool = False
    # The gateway refused a stream frame's header (older than stream compression): the uploader seals
    # without streams for that gateway from now on (and clears this).
    no_streams: bool = False
    # A failure episode lasts from the first failure until data is acknowledged again (or nothing is left to
    # send): a successful resync does not end it, so a gateway that answers every resync but refuses every
    # batch neither looks healthy nor resets the backoff.
    unacked_since: float | None = None
    last_ack: float | None = None

    def caught_up(self, *, now: float) -> tuple[Note, ...]:
        """Nothing is left to send after a successful resync: whatever failed before, nothing waits."""
        if not self.consecutive_failures or self.wants_resync:
            return ()
        note = Note(level=logging.INFO, text=(
            f"gateway reachable again after {self.consecutive_failures} failed attempts; nothing waiting"))
        self.consecutive_failures = 0
        self.unacked_since = None
        return (note,)

    def local_failure(self, cause: str) -> None:
        """Something on this side failed (the spool, sealing): resynchronise before the next batch."""
        self.failures[cause] += 1
        self.last_result = cause
        self.wants_resync = True

    def answer(self, sent: Sent, answer: Answer, *, draw: float, now: float = 0.0) -> Action:
        """What to do after ``answer`` to ``sent`` (``now``: seconds, for the failure episode's start)."""
        action = self._answer(sent, answer, draw=draw, now=now)
        if isinstance(action, Wait) and self.unacked_since is None:
            self.unacked_since = now
        return action

    def _answer(self, sent: Sent, answer: Answer, *, draw: float, now: float) -> Action:
        if isinstance(answer, Acked):
            try:
                verify_ack(self.key, agent_id=self.agent_id, request_nonce=sent.nonce, acked=answer.acked,
                           tag=answer.tag)
            except (AuthenticationFailed, ValueError) as exc:  # ValueError: acked beyond 2**64 - 1
                # Not from the gateway holding this agent's key (a forgery on the path, a replayed answer, or
                # a gateway too old to tag): trust nothing in it, keep every datagram, back off.
                return self._failed("bad-ack", f"{sent.what}: 200 whose acknowledgement is not authentic "
                                    f"({exc})", draw=draw)
            return self._acked(sent, answer.acked, now=now)
        if isinstance(answer, Resync):
            return self._resync(answer, draw=draw)
        if isinstance(answer, NoContext):
            if not sent.context and not sent.continued:
                # A batch sealed without a context cannot lack one: the answer is not the gateway's truth.
                return self._failed("unknown-context", answer.detail, draw=draw)
            self.failures["unknown-context"] += 1
            if sent.continued:  # not acknowledged: the uploader seals the next batch in a new stream anyway
                text = (f"{answer.detail}; sealing it again in a new compression stream (the gateway "
                        "restarted or dropped the stream: nothing is lost)")
            else:
                self.fresh_context = True
                text = (f"{answer.detail}; sealing it again without a compression context (the gateway "
                        "restarted or dropped it: nothing is lost)")
            note = Note(level=logging.WARNING, once="unknown-context", text=text)
            return Wait(delay=0.0, cause="unknown-context", notes=(note,))
        if isinstance(answer, TooLarge):
            self.cuts = 0
            return self._too_large(sent, answer.detail, answer.by, draw=draw)
        if isinstance(answer, Retry):
            if answer.cut and not sent.resync:
                self.cuts += 1
                if self.cuts >= CUTS_FOR_LIMIT and sent.size > self.min_body:
                    self.cuts = 0
                    return self._too_large(
                        sent, f"{sent.what}: the connection was cut {CUTS_FOR_LIMIT} times in a row while "
                        f"sending a body of {sent.size} bytes", "the path (connection cut mid-body)",
                        draw=draw)
            return self._failed(answer.cause, answer.detail, draw=draw, after=answer.after)
        assert isinstance(answer, Rejected)
        if sent.stream and answer.by == GATEWAY and answer.code == "malformed-header":
            # A gateway older than stream compression refuses its header flags (docs/protocol.md 3.4):
            # nothing was taken; the same datagrams go again at once, sealed the older ways.
            self.no_streams = True
            self.failures["no-stream"] += 1
            self.last_result = "no-stream"
            note = Note(level=logging.WARNING, once="no-stream", text=(
                f"{answer.detail}; this gateway does not take stream compression (an older version): sealing "
                "without it for this gateway until the agent restarts"))
            return Wait(delay=0.0, cause="no-stream", notes=(note,))
        return self._failed(answer.cause, answer.detail, draw=draw, rejected=answer.by)

    # -- rules -----------------------------------------------------------------------------------------------

    def _acked(self, sent: Sent, acked: int, *, now: float) -> Commit:
        notes: list[Note] = []
        self.last_result = "ok"
        self.cuts = 0
        if sent.resync:
            self.wants_resync = False
            return Commit(acked=acked, resync=True)
        if self.consecutive_failures:
            since = ""
            if self.unacked_since is not None:
                since = f" ({now - self.unacked_since:.0f} s without an ack)"
            n = self.consecutive_failures
            text = f"gateway acknowledging data again after {n} failed attempts{since}"
            notes.append(Note(level=logging.INFO, text=text))
        self.consecutive_failures = 0
        self.unacked_since = None
        self.last_ack = now
        self.resync_streak = 0
        if sent.last is not None and acked < sent.last:
            # The contract says the gateway takes every datagram above its mark; if it did not, ask again.
            notes.append(Note(level=logging.WARNING, once="ack-behind", text=(
                f"gateway acknowledged {acked} after a batch ending at {sent.last}; resynchronising")))
            self.wants_resync = True
        return Commit(acked=acked, resync=False, notes=tuple(notes))

    def _resync(self, answer: Resync, *, draw: float) -> Wait:
        # The gateway holds less than it once acknowledged (journal restored or torn): resynchronise now (the
        # answer's own "acked" is not authenticated; the resync's is), unless this keeps happening: the
        # resync in between succeeds, so 409s are counted until a batch is acknowledged, and a gateway (or
        # someone on the path) answering 409 to every batch gets backoff, not a request loop.
        self.failures["resync"] += 1
        self.last_result = "resync"
        self.wants_resync = True
        delay = 0.0
        if self.resync_streak:
            delay = backoff_delay(self.resync_streak - 1, base=self.backoff_base, cap=self.backoff_cap,
                                  draw=draw)
        self.resync_streak += 1
        self.consecutive_failures += 1
        note = Note(level=logging.WARNING, once="resync-409", text=answer.detail,
                    then="resynchronising now" if delay == 0 else f"resynchronising in {delay:.1f} s")
        return Wait(delay=delay, cause="resync", notes=(note,))

    def _too_large(self, sent: Sent, detail: str, by: str, *, draw: float) -> Wait:
        who = "the gateway" if by == GATEWAY else by
        if sent.datagrams > 1:
            limit = max(self.min_body, min(self.max_body, sent.size) // 2)
            if limit < sent.size:
                self.max_body = limit
                self.limit_by = who
                self.failures["http-413"] += 1
                self.last_result = "http-413"
                note = Note(level=logging.WARNING, text=(
                    f"{detail}; {who} accepts less than {sent.size} bytes per body: lowering the body "
                    f"limit to {limit} bytes"))
                return Wait(delay=0.0, cause="http-413", notes=(note,))
        # One datagram alone (or a batch at the floor) is too large for this path: POST cannot carry it. It
        # stays in the spool (other rungs may carry it), counted once, and is retried after reject_backoff.
        seq = sent.first if sent.first is not None else 0
        if sent.datagrams <= 1 and seq not in self.oversize_seqs:
            self.oversize_seqs.add(seq)
            self.oversize += 1
        self.failures["oversize"] += 1
        self.last_result = "oversize"
        self.wants_resync = True
        self.consecutive_failures += 1
        delay = self.reject_backoff
        if sent.datagrams <= 1:
            text = (f"datagram seq {seq} seals to a body of {sent.size} bytes, more than {who} accepts "
                    f"({detail}): it cannot go by POST on this path; it stays in the spool (counted as "
                    "oversize)")
            then = f"everything after it waits, retrying in {delay:.0f} s"
        else:
            text = (f"{detail}: {who} refuses a body of {sent.size} bytes, at the floor of {self.min_body} "
                    "bytes; datagrams stay in the spool")
            then = f"retrying in {delay:.0f} s"
        return Wait(delay=delay, cause="oversize", notes=(Note(level=logging.ERROR, text=text, then=then),))

    def _failed(self, cause: str, detail: str, *, draw: float, after: float | None = None,
                rejected: str | None = None) -> Wait:
        self.failures[cause] += 1
        self.last_result = cause
        self.wants_resync = True
        if rejected is not None:
            # Not transient: an operator must act (enroll the agent, fix the key). Say so every time.
            delay = self.reject_backoff
            text = (f"gateway rejected {detail}" if rejected == GATEWAY
                    else f"{detail}; refused by {rejected}, not by the gateway")
            note = Note(level=logging.ERROR, text=text,
                        then=f"retrying in {delay:.0f} s, datagrams stay in the spool")
        else:
            delay = backoff_delay(self.consecutive_failures, base=self.backoff_base, cap=self.backoff_cap,
                                  draw=draw)
            if after is not None:
                delay = after
            note = Note(level=logging.WARNING, once=cause, text=f"upload failed ({detail})",
                        then="retrying with backoff")
        self.consecutive_failures += 1
        return Wait(delay=delay, cause=cause, notes=(note,))
