"""The agent: receives export datagrams over UDP, spools them durably, uploads them to the gateway (HTTP).

``AgentService`` wires the parts; ``run_agent`` runs it until a stop event; ``render`` formats the status file
for ``flowtunnel status --spool DIR``.
"""

from flowtunnel.agent.config import AgentConfig, ListenAddress, load_key, parse_listen
from flowtunnel.agent.receiver import Receiver, ReceiverStats, check_datagram, kernel_drops
from flowtunnel.agent.service import STATUS_FILE, AgentService, run_agent
from flowtunnel.agent.status import read_status, render
from flowtunnel.agent.uploader import Uploader, UploaderStats

__all__ = [
    "STATUS_FILE",
    "AgentConfig",
    "AgentService",
    "ListenAddress",
    "Receiver",
    "ReceiverStats",
    "Uploader",
    "UploaderStats",
    "check_datagram",
    "kernel_drops",
    "load_key",
    "parse_listen",
    "read_status",
    "render",
    "run_agent",
]
