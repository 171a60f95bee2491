"""The batch wire format (pure: no I/O, no clock, no randomness): framing, compression, sealing, keys.

Byte layout and test vectors: docs/protocol.md.
"""

from flowtunnel.wire.ack import ack_tag, verify_ack
from flowtunnel.wire.batch import (
    AGENT_LEN_OFFSET,
    AUTO_COLUMNAR_BYTES,
    CONTENT_TYPE,
    HEADER,
    MAGIC,
    NONCE_BYTES,
    TAG_BYTES,
    VERSION,
    Batch,
    BatchHeader,
    RecordLength,
    WireLimits,
    header_length,
    open_batch,
    peek_header,
    seal_batch,
)
from flowtunnel.wire.codec import Codec, bundled_dictionaries, default_dictionary_id
from flowtunnel.wire.columnar import TemplateLengths
from flowtunnel.wire.errors import (
    AuthenticationFailed,
    BadAgentId,
    BadKey,
    BadMagic,
    LimitExceeded,
    MalformedHeader,
    MalformedRecords,
    Truncated,
    UnknownDictionary,
    UnsupportedVersion,
    WireError,
)
from flowtunnel.wire.keys import Key, format_key, generate_key, parse_key, validate_agent_id
from flowtunnel.wire.probe import decode_probe_nonce, probe_mac, probe_mac_text, verify_probe

__all__ = [
    "AGENT_LEN_OFFSET",
    "AUTO_COLUMNAR_BYTES",
    "CONTENT_TYPE",
    "HEADER",
    "MAGIC",
    "NONCE_BYTES",
    "TAG_BYTES",
    "VERSION",
    "AuthenticationFailed",
    "BadAgentId",
    "BadKey",
    "BadMagic",
    "Batch",
    "BatchHeader",
    "Codec",
    "Key",
    "LimitExceeded",
    "MalformedHeader",
    "MalformedRecords",
    "RecordLength",
    "TemplateLengths",
    "Truncated",
    "UnknownDictionary",
    "UnsupportedVersion",
    "WireError",
    "WireLimits",
    "ack_tag",
    "bundled_dictionaries",
    "decode_probe_nonce",
    "default_dictionary_id",
    "format_key",
    "generate_key",
    "header_length",
    "open_batch",
    "parse_key",
    "peek_header",
    "probe_mac",
    "probe_mac_text",
    "seal_batch",
    "validate_agent_id",
    "verify_ack",
    "verify_probe",
]
