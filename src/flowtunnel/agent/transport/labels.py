"""Which Content-Type the POST rung labels a sealed batch with: a pure choice fed what the path answered.

Some proxies refuse request bodies by their declared type (squid's ``req_mime_type``, a filter's "no binary
uploads"). The gateway takes the same sealed body under any type of the short list ``wire.CONTENT_TYPES``
(it never parses the label's format), so when something on the path (not the gateway: its refusals are JSON)
answers a POST with 403 or 415 while a GET through the same path reaches the gateway (the probe), the type is
the likely cause and the next type is tried, for the same batch. The type a batch is acknowledged with is kept
(and remembered per network by the uploader, ``network.RungMemory``); when every type is refused, it is not
the type: the path refuses POST itself, the refusal goes to the ladder, which steps down, and the next try
(a re-probe of the POST rung) starts over from the type that worked last.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flowtunnel.wire import CONTENT_TYPES

__all__ = ["REFUSAL_STATUSES", "ContentTypes"]

#: what a proxy answers a request it refuses by the body's type: squid's ``http_access deny`` gives 403;
#: 415 (Unsupported Media Type) is the status made for it.
REFUSAL_STATUSES = (403, 415)


@dataclass(kw_only=True)
class ContentTypes:
    """The POST rung's choice of label (see the module docstring). A type ``""`` in ``types`` means no
    ``Content-Type`` header at all, for a gateway route that reads none.

    ``current`` is the type to send next; ``confirmed`` the last type a batch was acknowledged with (None
    before the first); ``refused`` the types refused in this round, each with why, in the order refused.
    """

    types: tuple[str, ...] = CONTENT_TYPES
    current: str = CONTENT_TYPES[0]
    confirmed: str | None = None
    refused: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.types or self.current not in self.types:
            listed = ", ".join(self.types) or "(none)"
            raise ValueError(f"content type {self.current!r} is not one of {listed}")

    def use(self, ctype: str | None) -> None:
        """Start over with ``ctype`` (the one remembered for this network), or the first type for None or a
        type not in the list (a memory written by another version)."""
        self.current = ctype if ctype in self.types else self.types[0]
        self.confirmed = None
        self.refused = {}

    def refused_by_path(self, status: int, *, why: str) -> str | None:
        """The path (not the gateway), which passes a GET to the gateway, answered ``status`` to a POST
        labelled ``current``: the type to try next for the same batch, or None when ``status`` is not a
        refusal by type or every type was refused in this round (then the round is over: ``current`` goes
        back to the type that worked last, or the first)."""
        if status not in REFUSAL_STATUSES:
            return None
        self.refused[self.current] = why
        for ctype in self.types:
            if ctype not in self.refused:
                self.current = ctype
                return ctype
        self.current = self.confirmed or self.types[0]
        self.refused = {}
        return None

    def acked(self) -> str | None:
        """A batch labelled ``current`` was acknowledged. Returns what to log, once, when the label carrying
        batches changed (a type was refused, or this network's remembered type is not the first), else
        None."""
        refused, self.refused = self.refused, {}
        if self.confirmed == self.current:
            return None
        first = self.confirmed is None and self.current == self.types[0]
        self.confirmed = self.current
        if first and not refused:
            return None
        why = "; ".join(f"{ctype}: {text}" for ctype, text in refused.items())
        return (f"batches go as Content-Type {self.current}"
                + (f" (refused: {why})" if why else " (what worked on this network before)"))

    def status(self) -> str:
        """The type in use, for ``status``."""
        return self.confirmed or self.current
