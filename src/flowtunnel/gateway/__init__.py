"""The gateway: HTTP ingest of sealed batches, agent registry, journal, and the sinks that consume it.

Main entry points: ``Gateway`` (start/stop one in-process), ``run_gateway`` (the ``flowtunnel gateway``
command), ``Registry`` (enroll/revoke), ``GatewayConfig``; sinks in ``flowtunnel.gateway.sinks``.
"""

from flowtunnel.gateway.config import GatewayConfig
from flowtunnel.gateway.ingest import Ack, Ingest, Rejected, StateAnswer, hwm_key
from flowtunnel.gateway.metrics import GatewayMetrics
from flowtunnel.gateway.notify import JournalNotify
from flowtunnel.gateway.registry import (
    AgentEntry,
    AgentExists,
    AgentKeys,
    AgentNotFound,
    Registry,
    RegistryError,
)
from flowtunnel.gateway.service import JOURNAL_FILE, STATUS_FILE, Gateway, run_gateway
from flowtunnel.gateway.sinks import Sink

__all__ = [
    "JOURNAL_FILE",
    "STATUS_FILE",
    "Ack",
    "AgentEntry",
    "AgentExists",
    "AgentKeys",
    "AgentNotFound",
    "Gateway",
    "GatewayConfig",
    "GatewayMetrics",
    "Ingest",
    "JournalNotify",
    "Registry",
    "RegistryError",
    "Rejected",
    "Sink",
    "StateAnswer",
    "hwm_key",
    "run_gateway",
]
