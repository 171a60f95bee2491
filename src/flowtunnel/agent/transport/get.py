"""The GET-only rung: a sealed batch cut into pieces carried in URLs (and a cookie), for proxies that refuse
POST or request bodies (docs/protocol.md 7.5).

The batch is written as base64url without padding and cut so each request-target stays within
``MAX_TARGET`` characters (what proxies reliably pass, the absolute URI included when a proxy forwards it),
plus up to ``cookie_chars`` more characters in ``Cookie: ft=`` (0: no cookie, for proxies that strip them).
Pieces go in order on the kept-alive connection; the gateway answers ``{"have": k, "of": n}`` until the last
piece completes the batch, then exactly what a POST would have got. Each batch takes a fresh random
``batch_id``, so a re-sent batch is never mixed with pieces of an earlier try.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os

from flowtunnel.agent.transport.answers import Answer, Hints, Retry
from flowtunnel.agent.transport.post import PostTransport

__all__ = ["MAX_TARGET", "GetTransport"]

MAX_TARGET = 2000
COOKIE_CHARS = 3000  # the gateway takes up to 3,000 characters of ``ft``
_PENDING_TRIES = 20  # "complete, being processed" answers before giving up on this try
_PENDING_WAIT = 0.1


class GetTransport(PostTransport):
    """``GET /v1/g/<agent>/<batch_id>/<i>/<n>/<data>`` per piece (see the module docstring); the probe and
    every failure mapping are the POST rung's."""

    name = "get"

    cookie_chars = COOKIE_CHARS

    @property
    def batch_route(self) -> str:
        return f"GET {self._prefix}/v1/g/... pieces"

    async def _carry(self, batch: bytes, hints: Hints) -> Answer:
        text = base64.urlsafe_b64encode(batch).rstrip(b"=").decode("ascii")
        batch_id = os.urandom(8).hex()
        base = f"{self._prefix}/v1/g/{self._agent_id}/{batch_id}/"
        forward = len(self._gateway) if self.client.forward else 0  # the absolute URI's scheme and host
        digits = len(str(len(text) + 1))
        room = max(16, MAX_TARGET - forward - len(base) - 2 * digits - 2)
        step = room + self.cookie_chars
        pieces = [text[k:k + step] for k in range(0, len(text), step)] or [""]
        n = len(pieces)
        what = hints.what
        resp = None
        for i, piece in enumerate(pieces):
            refused, verified = await self._verified(what)
            if refused is not None:
                return refused
            data, cookie = piece[:room], piece[room:]
            headers = [("X-Flowtunnel-Agent", hints.agent_id)]
            if cookie:
                headers.append(("Cookie", f"ft={cookie}"))
            target = f"{base}{i}/{n}/{data}"
            for _ in range(_PENDING_TRIES):
                resp = await self.client.request("GET", target, headers=headers, reuse_only=verified)
                verified = False
                have = _have(resp.body) if resp.status == 200 else None
                if have is None:
                    break
                if i < n - 1 or have < n:
                    break
                await asyncio.sleep(_PENDING_WAIT)  # complete, being processed: ask again for the answer
            else:
                return Retry(cause="get-pending", detail=f"{what}: the gateway still processes batch "
                             f"{batch_id} after {_PENDING_TRIES} asks")
            assert resp is not None
            if resp.status != 200 or _have(resp.body) is None:
                return self._answer(resp, what)
            if i == n - 1:
                return Retry(cause="get-incomplete", detail=f"{what}: after its last piece the gateway has "
                             f"{_have(resp.body)} of {n} pieces of batch {batch_id}")
        raise AssertionError("unreachable")  # pragma: no cover


def _have(payload: bytes) -> int | None:
    """``k`` of a ``{"have": k, "of": n}`` answer, else None."""
    try:
        doc = json.loads(payload)
    except ValueError:
        return None
    if isinstance(doc, dict) and "have" in doc and "acked" not in doc:
        have = doc.get("have")
        return have if isinstance(have, int) else None
    return None
