"""Export sequence tracking per (exporter, domain): how much the exporter sent that never reached us.

Units differ by version: v5 counts flows, v9 export packets, IPFIX data records. Sequence numbers are
uint32 and wrap; differences are taken modulo 2^32. A forward jump is loss; a small backward jump is a late
(reordered) datagram that fills an earlier gap; a large jump either way, or an exporter clock (sysUptime)
going backwards, is a restart: counted as a reset, not as loss.

Exporters disagree on what the number means. RFC 7011 says it counts the data records sent *before* this
message; softflowd's IPFIX puts the count *after* it and leaves options records out. The tracker therefore
learns, per stream, two things: whether the number is taken before or after the datagram (``timing``), and
whether options records count (``unit``: "all" or "flows"). Each is locked once a jump is explained by only
one choice. Until then the RFC rule applies to loss, but a jump that another choice explains is not loss.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SequenceStats", "SequenceTracker"]

_MOD = 1 << 32
_HALF = 1 << 31
_NO_LOSS = (0, False)
_CHOICES = (("before", "all"), ("after", "all"), ("before", "flows"), ("after", "flows"))


@dataclass(frozen=True, slots=True, kw_only=True)
class SequenceStats:
    """``expected`` = ``received + lost``: units the exporter's numbering says it sent while we watched."""

    expected: int
    received: int
    lost: int
    resets: int


class SequenceTracker:
    """State of one (exporter, domain) stream."""

    __slots__ = (
        "_last_all",
        "_last_flows",
        "_last_seq",
        "_last_uptime",
        "_same_next",
        "lost",
        "max_gap",
        "received",
        "reorder_window",
        "resets",
        "synced",
        "timing",
        "unit",
    )

    def __init__(self, *, reorder_window: int, max_gap: int) -> None:
        self._last_seq = 0
        self._last_all = 0
        self._last_flows = 0
        self._last_uptime: int | None = None
        # The sequence number update_same() accounts by itself: the next one by the RFC rule while that rule
        # is in force and the last datagram's flow units equal its units; -1 otherwise.
        self._same_next = -1
        self.timing: str | None = None  # "before" (RFC) or "after" (softflowd) the datagram, once learnt
        self.unit: str | None = None  # "all" data records (RFC) or "flows" only, once learnt
        self.synced = False
        self.received = 0
        self.lost = 0
        self.resets = 0
        self.reorder_window = reorder_window
        self.max_gap = max_gap

    @property
    def next_expected(self) -> int:
        """The sequence number the next datagram should carry (RFC convention unless another was learnt)."""
        if self.timing == "after":
            return self._last_seq
        return (self._last_seq + (self._last_flows if self.unit == "flows" else self._last_all)) % _MOD

    def update_same(self, sequence: int, units: int, uptime_ms: int) -> tuple[int, bool]:
        """``update(sequence, units, uptime_ms)`` with its common case decided first: the datagram is next by
        the RFC rule and as big as the last one (nearly every v9 export packet, most v5 datagrams), where
        the general rule costs a good part of decoding a small datagram."""
        last = self._last_uptime
        if sequence == self._same_next and units == self._last_all and (last is None or uptime_ms >= last):
            # What update() does here: the RFC rule explains the number, no reset (the clock did not go back),
            # nothing to learn (as big as the last datagram); only the counts and the last values move.
            self._last_uptime = uptime_ms
            self.received += units
            self._last_seq = sequence
            self._same_next = (sequence + units) % _MOD
            return _NO_LOSS
        return self.update(sequence, units, uptime_ms)

    def update(
        self, sequence: int, units: int | None, uptime_ms: int | None = None, flow_units: int | None = None
    ) -> tuple[int, bool]:
        """Account one datagram; returns (units lost just before it, whether it was a reset).

        ``units`` counts the datagram in the version's unit (None: unknown, e.g. IPFIX sets held for a
        missing template; the next datagram then resynchronises without counting loss); ``flow_units`` the
        same without options records (defaults to ``units``).
        """
        if flow_units is None:
            flow_units = units
        restarted = (
            uptime_ms is not None
            and self._last_uptime is not None
            and uptime_ms < self._last_uptime
            and self._last_uptime - uptime_ms < _HALF  # not the 49.7-day uptime wrap
        )
        if uptime_ms is not None:
            self._last_uptime = uptime_ms
        lost = 0
        reset = False
        if self.synced and restarted:
            reset = True
        elif (
            self.synced
            and self.timing != "after"
            and self.unit != "flows"
            and (self._last_seq + self._last_all) % _MOD == sequence
        ):
            # The RFC rule explains it: the common case, decided cheaply. "after" could explain it only if
            # this datagram is as big as the last one; otherwise numbering before the datagram is learnt.
            if self.timing is None and units is not None and units != self._last_all != flow_units:
                self.timing = "before"
        elif self.synced:
            size = {
                ("before", "all"): self._last_all,
                ("after", "all"): units or 0,
                ("before", "flows"): self._last_flows,
                ("after", "flows"): flow_units or 0,
            }
            allowed = [(t, u) for t, u in _CHOICES if self.timing in (None, t) and self.unit in (None, u)]
            matches = [c for c in allowed if (self._last_seq + size[c]) % _MOD == sequence]
            if matches:
                gap = 0
                if len({t for t, _ in matches}) == 1:
                    self.timing = matches[0][0]
                if len({u for _, u in matches}) == 1:
                    self.unit = matches[0][1]
            else:
                gap = (sequence - self._last_seq - size[allowed[0]]) % _MOD
            if gap == 0:
                pass
            elif gap < _HALF and gap <= self.max_gap:
                lost = gap
            elif gap >= _HALF and _MOD - gap <= self.reorder_window:
                # A late datagram: it was counted as lost when the gap opened; it arrived after all.
                self.lost -= min(self.lost, units or 0)
                self.received += units or 0
                return 0, False
            else:
                reset = True
        if reset:
            self.resets += 1
        self.lost += lost
        if units is None:
            self.synced = False
            self._same_next = -1
            return lost, reset
        self.received += units
        self._last_seq = sequence
        self._last_all = units
        self._last_flows = flow_units or 0
        self.synced = True
        rfc = units == flow_units and self.timing != "after" and self.unit != "flows"
        self._same_next = (sequence + units) % _MOD if rfc else -1
        return lost, reset

    def stats(self) -> SequenceStats:
        return SequenceStats(
            expected=self.received + self.lost, received=self.received, lost=self.lost, resets=self.resets
        )
