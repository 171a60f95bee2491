"""Pure NetFlow v5 / v9 (RFC 3954) / IPFIX (RFC 7011) codec: bytes in, typed records out, and back.

No sockets, files, clocks or asyncio: callers pass datagrams and the exporter's address. Main entry points:
``Decoder.decode(payload, exporter) -> Message`` (records are dicts keyed by IANA names),
``Decoder.decode_columns`` (fixed-length data sets as numpy-ready ``RecordBlock``s), the encoders
``encode_v5`` / ``encode_v9`` / ``encode_ipfix``, and ``sniff`` to recognise export datagrams.
Template scope and value representation are explained in ``decoder`` and ``fields``.
"""

import importlib
from typing import TYPE_CHECKING, Any

# Eager: importing the submodule ``sniff`` (the agent does) binds the package attribute to the module.
from flowtunnel.netflow.sniff import sniff

if TYPE_CHECKING:
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
    from flowtunnel.netflow.templates import FieldSpec, Template

# Submodules load on first use (PEP 562): the agent needs only ``sequence`` and ``sniff``, not the decoder,
# the field tables or the encoder, and importing them all cost it ~35 ms of start-up CPU (issue 14).
_LAZY = {
    "COUNTER_NAMES": "flowtunnel.netflow.decoder",
    "DataSet": "flowtunnel.netflow.encoder",
    "Decoder": "flowtunnel.netflow.decoder",
    "DecoderConfig": "flowtunnel.netflow.decoder",
    "FieldSpec": "flowtunnel.netflow.templates",
    "LimitExceeded": "flowtunnel.netflow.errors",
    "MalformedHeader": "flowtunnel.netflow.errors",
    "MalformedSet": "flowtunnel.netflow.errors",
    "MalformedTemplate": "flowtunnel.netflow.errors",
    "Message": "flowtunnel.netflow.decoder",
    "ProtocolError": "flowtunnel.netflow.errors",
    "Record": "flowtunnel.netflow.record",
    "RecordBlock": "flowtunnel.netflow.blocks",
    "SequenceStats": "flowtunnel.netflow.sequence",
    "Template": "flowtunnel.netflow.templates",
    "Truncated": "flowtunnel.netflow.errors",
    "UnknownTemplate": "flowtunnel.netflow.errors",
    "data_type": "flowtunnel.netflow.fields",
    "encode_ipfix": "flowtunnel.netflow.encoder",
    "encode_v5": "flowtunnel.netflow.encoder",
    "encode_v9": "flowtunnel.netflow.encoder",
    "exporter_host": "flowtunnel.netflow.decoder",
    "field_key": "flowtunnel.netflow.fields",
    "format_timestamp": "flowtunnel.netflow.fields",
    "is_timestamp": "flowtunnel.netflow.fields",
    "parse_field_key": "flowtunnel.netflow.fields",
    "units": "flowtunnel.netflow.fields",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


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
