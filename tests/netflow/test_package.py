"""The public API of flowtunnel.netflow is pinned: other parts code against exactly these names."""

from __future__ import annotations

import flowtunnel.netflow as netflow


def test_public_names() -> None:
    assert sorted(netflow.__all__) == sorted(
        [
            "COUNTER_NAMES", "DataSet", "Decoder", "DecoderConfig", "FieldSpec", "LimitExceeded",
            "MalformedHeader", "MalformedSet", "MalformedTemplate", "Message", "ProtocolError", "Record",
            "RecordBlock",
            "SequenceStats", "Template", "Truncated", "UnknownTemplate", "data_type", "encode_ipfix",
            "encode_v5", "encode_v9", "exporter_host", "field_key", "format_timestamp", "is_timestamp",
            "parse_field_key", "sniff", "units",
        ]
    )  # fmt: skip
    for name in netflow.__all__:
        assert getattr(netflow, name) is not None


def test_every_error_is_the_peers_fault_and_a_flowtunnel_error() -> None:
    from flowtunnel.errors import FlowtunnelError

    for cls in (
        netflow.Truncated, netflow.MalformedHeader, netflow.MalformedSet, netflow.MalformedTemplate,
        netflow.UnknownTemplate, netflow.LimitExceeded,
    ):  # fmt: skip
        assert issubclass(cls, netflow.ProtocolError)
        assert issubclass(cls, FlowtunnelError)
        assert cls.peer_fault is True
        assert cls.cause in netflow.COUNTER_NAMES
        err = cls("what went wrong", offset=12)
        assert str(err) == "what went wrong (at byte 12)"
        assert err.offset == 12
