"""Pure NetFlow v5 / v9 (RFC 3954) / IPFIX (RFC 7011) codec: bytes in, typed records out, and back.

No sockets, files, clocks or asyncio: callers pass datagrams and the exporter's address. Main entry points:
``Decoder.decode(payload, exporter) -> Message`` (records are dicts keyed by IANA names),
``Decoder.decode_columns`` (fixed-length data sets as numpy-ready ``RecordBlock``s), the encoders
``encode_v5`` / ``encode_v9`` / ``encode_ipfix``, and ``sniff`` to recognise export datagrams.
Template scope and value representation are explained in ``decoder`` and ``fields``.
"""

from flowtunnel.netflow.blocks import RecordBlock
from flowtunnel.netflow.decoder import COUNTER_NAMES, Decoder, DecoderConfig, Message, exporter_host
from flowtunnel.netflow.encoder import DataSet, encode_ipfix, encode_v5, encode_v9
from flowtunnel.netflow.errors import (
    LimitExceeded,
    MalformedHeader,
    MalformedSet,
    MalformedTemplate,
    ProtocolError,
    Truncated,
    UnknownTemplate,
)
from flowtunnel.netflow.fields import (
    data_type,
    field_key,
    format_timestamp,
    is_timestamp,
    parse_field_key,
    units,
)
from flowtunnel.netflow.record import Record
from flowtunnel.netflow.sequence import SequenceStats
from flowtunnel.netflow.sniff import sniff
from flowtunnel.netflow.templates import FieldSpec, Template

__all__ = [
    "COUNTER_NAMES",
    "DataSet",
    "Decoder",
    "DecoderConfig",
    "FieldSpec",
    "LimitExceeded",
    "MalformedHeader",
    "MalformedSet",
    "MalformedTemplate",
    "Message",
    "ProtocolError",
    "Record",
    "RecordBlock",
    "SequenceStats",
    "Template",
    "Truncated",
    "UnknownTemplate",
    "data_type",
    "encode_ipfix",
    "encode_v5",
    "encode_v9",
    "exporter_host",
    "field_key",
    "format_timestamp",
    "is_timestamp",
    "parse_field_key",
    "sniff",
    "units",
]
