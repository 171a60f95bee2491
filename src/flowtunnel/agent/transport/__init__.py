"""The agent's transports (how a sealed batch reaches the gateway) and the delivery protocol they share.

``answers``: what a transport answers; ``base``: the ``Transport`` protocol; ``delivery``: the pure state
machine (trim, renumber, resync, backoff, body-size adaptation); ``post``: the HTTP POST rung.
"""

from flowtunnel.agent.transport.answers import (
    Acked,
    Answer,
    Hints,
    NoContext,
    Rejected,
    Resync,
    Retry,
    TooLarge,
    from_http,
)
from flowtunnel.agent.transport.base import Transport
from flowtunnel.agent.transport.delivery import Commit, Delivery, Note, ResyncPlan, Sent, Wait, plan_resync

__all__ = [
    "Acked",
    "Answer",
    "Commit",
    "Delivery",
    "Hints",
    "NoContext",
    "Note",
    "Rejected",
    "Resync",
    "ResyncPlan",
    "Retry",
    "Sent",
    "TooLarge",
    "Transport",
    "Wait",
    "from_http",
    "plan_resync",
]
