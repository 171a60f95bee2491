"""NetFlow v5: fixed 24-byte header and 48-byte records, decoded in one ``iter_unpack`` over the record block.

Records use the IANA names of the v5 fields. ``first``/``last`` (ms of the exporter's uptime) are kept as
``flowStartSysUpTime``/``flowEndSysUpTime`` and resolved to absolute ``flowStartMilliseconds`` /
``flowEndMilliseconds`` with the header's clock (unix_secs + unix_nsecs at sysUptime). The v5 domain is
``engine_type << 8 | engine_id`` (as nfdump does), since v5 has no source id.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from flowtunnel.netflow.errors import MalformedHeader, Truncated
from flowtunnel.netflow.fields import V4_INT_MEMO
from flowtunnel.netflow.record import Record, RecordShape
from flowtunnel.netflow.templates import clock_args, make_row_converter

__all__ = [
    "CONVERT",
    "HEADER",
    "KEYS",
    "MAX_COUNT",
    "RECORD",
    "ROW",
    "V5Header",
    "decode_v5_records",
    "parse_v5_header",
]

HEADER = struct.Struct("!HHIIIIBBH")
RECORD = struct.Struct("!4s4s4sHHIIIIHHxBBBHHBBxx")
MAX_COUNT = 30  # Cisco's limit; a bigger count means the bytes are not v5

KEYS: tuple[str, ...] = (
    "sourceIPv4Address",
    "destinationIPv4Address",
    "ipNextHopIPv4Address",
    "ingressInterface",
    "egressInterface",
    "packetDeltaCount",
    "octetDeltaCount",
    "flowStartSysUpTime",
    "flowEndSysUpTime",
    "sourceTransportPort",
    "destinationTransportPort",
    "tcpControlBits",
    "protocolIdentifier",
    "ipClassOfService",
    "bgpSourceAsNumber",
    "bgpDestinationAsNumber",
    "sourceIPv4PrefixLength",
    "destinationIPv4PrefixLength",
    "flowStartMilliseconds",
    "flowEndMilliseconds",
    "samplingInterval",
    "samplingAlgorithm",
)


class V5Header(NamedTuple):
    n_records: int
    sys_uptime_ms: int
    unix_secs: int
    unix_nsecs: int
    sequence: int
    engine_type: int
    engine_id: int
    sampling: int

    @property
    def domain(self) -> int:
        return (self.engine_type << 8) | self.engine_id

    @property
    def export_ms(self) -> int:
        return self.unix_secs * 1000 + self.unix_nsecs // 1_000_000


def parse_v5_header(data: bytes) -> V5Header:
    """Parse and check the header: count 1..30 and exactly ``24 + 48 * count`` bytes."""
    if len(data) < HEADER.size:
        raise Truncated(f"v5 header needs {HEADER.size} bytes, datagram has {len(data)}", offset=0)
    _, count, uptime, secs, nsecs, seq, etype, eid, sampling = HEADER.unpack_from(data)
    if not 1 <= count <= MAX_COUNT:
        raise MalformedHeader(f"v5 count {count} outside 1..{MAX_COUNT}", offset=2)
    need = HEADER.size + RECORD.size * count
    if len(data) < need:
        raise Truncated(f"v5 count {count} needs {need} bytes, datagram has {len(data)}", offset=len(data))
    return V5Header(count, uptime, secs, nsecs, seq, etype, eid, sampling)


# IPv4 addresses unpacked as uint32 for the int-keyed address cache (``RECORD`` keeps them as bytes).
ROW = struct.Struct("!IIIHHIIIIHHxBBBHHBBxx")
CONVERT = make_row_converter(
    18,
    [(0, V4_INT_MEMO), (1, V4_INT_MEMO), (2, V4_INT_MEMO)],
    (7, 8),
    n_extra=2,
    unpack=ROW.iter_unpack,
    u32_times=True,  # first/last are uint32
)
"""``CONVERT(record_bytes, *clock_args(export_ms, uptime_ms), record_type, out, sampling_interval,
sampling_algorithm)``."""


def decode_v5_records(data: bytes, header: V5Header, shape: RecordShape) -> list[Record]:
    """All records of the datagram (keys ``KEYS``): one ``iter_unpack`` over the block and one compiled pass
    (addresses to text, uptime to absolute ms, sampling from the header)."""
    block = data[HEADER.size : HEADER.size + RECORD.size * header.n_records]
    return CONVERT(
        block,
        *clock_args(header.export_ms, header.sys_uptime_ms),
        shape.record_type(),
        [],
        header.sampling & 0x3FFF,
        header.sampling >> 14,
    )
