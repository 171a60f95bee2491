"""Gateway sinks: consumers of the journal, each on its own cursor (udp-forward, jsonl; store lives in
``flowtunnel.store.sink``)."""

from flowtunnel.gateway.notify import JournalNotify
from flowtunnel.gateway.sinks.base import CursorSink, Sink
from flowtunnel.gateway.sinks.jsonl import JsonlSink
from flowtunnel.gateway.sinks.udp_forward import UdpForwardConfig, UdpForwardSink

__all__ = ["CursorSink", "JournalNotify", "JsonlSink", "Sink", "UdpForwardConfig", "UdpForwardSink"]
