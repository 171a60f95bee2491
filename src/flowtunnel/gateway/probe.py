"""``GET /v1/probe``: the gateway proves it holds an agent's key, so an agent tells it from a captive portal.

Contract: docs/protocol.md section 7.3; the MAC is ``flowtunnel.wire.probe``. The gateway keeps no state per
probe; a token bucket per source address (``SourceRate``) bounds what a flood of probes costs (registry
lookups and HMACs), and every refusal is counted by cause and logged once per cause, like batch refusals.
"""

from __future__ import annotations

import math

from aiohttp import web
from aiohttp.typedefs import Handler

from flowtunnel.gateway.admission import SourceRate
from flowtunnel.gateway.edge import NO_STORE, http_response
from flowtunnel.gateway.ingest import Ingest, Rejected
from flowtunnel.wire import WireError, decode_probe_nonce, probe_mac_text, validate_agent_id

__all__ = ["probe_handler"]


def _refuse(ingest: Ingest, exc: Rejected) -> web.Response:
    return http_response(ingest.refuse(exc), headers=NO_STORE)


def probe_handler(ingest: Ingest, rate: SourceRate) -> Handler:
    """The aiohttp handler of ``GET /v1/probe`` for this gateway's ``ingest`` (its registry and counters)."""

    async def probe(request: web.Request) -> web.Response:
        wait = rate.take(request.remote or "?")
        if wait > 0:
            return _refuse(ingest, Rejected(
                "rate-limited",
                f"more than {rate.rate:g} probes/s (bursts of {rate.burst}) from {request.remote}",
                retry_after=max(1, math.ceil(wait)),
            ))
        agent_text = request.query.get("agent", "")
        nonce_text = request.query.get("nonce", "")
        label = ingest.enrolled(agent_text)
        try:
            agent_id = validate_agent_id(agent_text)
            nonce = decode_probe_nonce(nonce_text)
        except WireError as exc:
            return _refuse(ingest, Rejected("bad-probe", str(exc), agent=label))
        try:
            entry = ingest.entry(agent_id)
        except Rejected as exc:
            return _refuse(ingest, exc)
        doc = {"gateway": "flowtunnel", "agent": agent_id, "mac": probe_mac_text(entry.key, agent_id, nonce)}
        return web.json_response(doc, headers=NO_STORE)

    return probe
