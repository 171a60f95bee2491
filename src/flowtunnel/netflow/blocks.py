"""``RecordBlock``: the records of one fixed-length data set, undecoded, for the columnar path.

Kept apart from ``columns`` (which needs numpy) so that the decoder can hand out blocks, and plain decoding
(the ``decode`` command, the agent) never imports numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from flowtunnel.netflow.record import Record
from flowtunnel.netflow.templates import Layout

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["MODE_INIT", "MODE_PLAIN", "MODE_TIMED", "RecordBlock"]

MODE_PLAIN: Final = 0  # no sysUpTime fields, or no clock to resolve them: keys are ``layout.keys``
MODE_TIMED: Final = 1  # resolved with the v5/v9 header clock: keys are ``layout.out_keys``
MODE_INIT: Final = 2  # resolved with the exporter's boot time (IPFIX systemInitTimeMilliseconds)


@dataclass(slots=True)
class RecordBlock:
    """The records of one fixed-length flow data set, undecoded: ``count`` records of ``layout.min_size``
    bytes in ``data``, with what the ``Record`` path would have used to resolve times.

    ``mode`` says which keys the equivalent records have (``block_mode``); ``records()`` decodes the block the
    ``Record`` way, ``array()`` views it as a structured array of ``record_dtype(layout)``.
    """

    layout: Layout
    domain: int
    data: bytes
    count: int
    mode: int  # MODE_*: which clock resolves sysUpTime fields, if any
    export_ms: int | None
    uptime_ms: int | None
    init_ms: int | None

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys of the equivalent records (absolute times appended when they resolve)."""
        return self.layout.keys if self.mode == MODE_PLAIN else self.layout.out_keys

    def array(self) -> npt.NDArray[np.void]:
        import numpy as np

        from flowtunnel.netflow.columns import record_dtype

        return np.frombuffer(self.data, dtype=record_dtype(self.layout), count=self.count)

    def records(self) -> list[Record]:
        """The block decoded as ``Decoder.decode`` would have returned it."""
        records, _ = self.layout.decode_records(
            self.data, 0, len(self.data), self.domain, self.export_ms, self.uptime_ms, self.init_ms
        )
        return records
