"""The DNS rung: sealed batches as query names through the resolver the network offers (docs/protocol.md 9).

The last rung, for networks where only DNS gets out (a hotel before login, a locked APN). The agent's
``DnsClient`` (``agent/dnsclient.py``) cuts the sealed batch into names under the gateway's zone and paces the
queries; this module maps its outcome to the seam's ``Answer``, exactly as the HTTP rungs map a status: the
gateway's verdict arrives in a TXT record (``st`` is the HTTP status the same refusal would have had), and
everything that is not the gateway's verdict (no answer, a resolver rewriting answers, a portal's DNS hijack)
is a ``Retry`` with a cause naming it. There is no captive-portal probe here: the acknowledgement's tag is
verified by the delivery protocol like on every rung, and a portal cannot forge it.

Resource handling: one UDP socket to the resolver while the rung is in use (``close`` releases it); a batch
larger than the gateway reassembles (``MAX_DNS_BODY``) is answered ``TooLarge``, so the delivery protocol
sends smaller ones.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flowtunnel.agent.transport.answers import (
    GATEWAY,
    Acked,
    Answer,
    Hints,
    Rejected,
    Resync,
    Retry,
    TooLarge,
)
from flowtunnel.wire.dns import MAX_FRAGMENTS, DnsNameError, ReassemblyLimits, capacity
from flowtunnel.wire.dns import Answer as TxtAnswer

if TYPE_CHECKING:
    from flowtunnel.agent.dnsclient import DnsClient

__all__ = ["MAX_DNS_BODY", "DnsTransport"]

logger = logging.getLogger(__name__)

#: The gateway's default reassembly bound for one batch (``wire.dns.ReassemblyLimits.max_batch_bytes``).
MAX_DNS_BODY = ReassemblyLimits().max_batch_bytes
_RETRY_STATUSES = frozenset({407, 408, 425, 429})


class DnsTransport:
    """``exchange`` one sealed batch over DNS (see the module docstring)."""

    name = "dns"
    #: Caught up, batches gather at least this long on this rung (``--latency`` longer wins): a 10-datagram
    #: softflowd batch costs 2.4 queries per 1,400 bytes, a 50-datagram one about 1.9 (bench/dns.py).
    min_latency = 5.0
    #: Backlog batches (the uploader's ``SMALL`` choice) go with codec 5, columnar + field deltas + LZMA2:
    #: ~14 % fewer bytes, so queries, than codec 4 on softflowd v9 (bench/dns.py, "drain"), for ~2x its CPU;
    #: caught-up batches are sealed with it beside the default codec, the smaller kept.
    small_codec = 5

    def __init__(self, *, zone: str, resolver: tuple[str, int] | None = None, qps: float = 20.0,
                 max_body: int = MAX_DNS_BODY, query_timeout: float = 2.0, retries: int = 5) -> None:
        self._zone = zone
        self._resolver = resolver
        self._qps = qps
        self._query_timeout = query_timeout
        self._retries = retries
        # A long zone leaves few bytes a name: no more than the names a batch may take (``MAX_FRAGMENTS``).
        self._max_body = min(max_body, capacity(zone) * MAX_FRAGMENTS)
        self._client: DnsClient | None = None
        self.route = ""

    @property
    def stats(self) -> dict[str, int]:
        """The client's counters (queries, retries, polls, bytes both ways), for status and benches."""
        if self._client is None:
            return {}
        st = self._client.stats
        return {"queries": st.queries, "retries": st.retries, "polls": st.polls, "bytes_out": st.bytes_out,
                "bytes_in": st.bytes_in, "bad_answers": st.bad_answers, "tcp_fallbacks": st.tcp_fallbacks}

    def _open(self) -> DnsClient:
        # Imported here: dnslib loads only on an agent that uses the dns rung.
        from flowtunnel.agent.dnsclient import DnsClient, DnsClientConfig, system_resolver

        if self._client is None:
            resolver = self._resolver or system_resolver()
            self.route = f"dns via {resolver[0]}:{resolver[1]}, zone {self._zone}"
            config = DnsClientConfig(zone=self._zone, resolver=resolver, qps=self._qps,
                                     query_timeout=self._query_timeout, retries=self._retries)
            self._client = DnsClient(config)
        return self._client

    async def exchange(self, batch: bytes, hints: Hints) -> Answer:
        from flowtunnel.agent.dnsclient import DnsTransportError

        what = hints.what
        if len(batch) > self._max_body:
            return TooLarge(detail=f"{what}: {len(batch)} bytes exceed the {self._max_body} bytes one batch "
                            "may take over DNS", by="dns rung")
        try:
            client = self._open()
            answer = await client.exchange(batch)
        except DnsTransportError as exc:
            return Retry(cause="dns-no-answer", detail=f"{what}: {exc}")
        except DnsNameError as exc:
            return Retry(cause=exc.cause, detail=f"{what}: {exc}")
        except OSError as exc:
            return Retry(cause=f"connection:{type(exc).__name__}", detail=f"{what}: resolver: {exc}")
        return _answer(answer, what)

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _answer(answer: TxtAnswer, what: str) -> Answer:
    """The gateway's TXT verdict as the seam's answer (the same mapping as ``answers.from_http``)."""
    status = answer.int("st", 0)
    if answer.kind == "a" and status == 200:
        acked = answer.int("acked", -1)
        if acked < 0:
            return Retry(cause="bad-response", detail=f"{what}: a DNS acknowledgement without acked")
        return Acked(acked=acked, tag=answer.fields.get("tag"))
    code = answer.fields.get("code", "unknown")
    detail = f"{what}: gateway refused it over DNS ({status} {code})"
    if status == 409 and code in ("resync", "out-of-order"):
        return Resync(detail=detail)
    if status == 413:
        return TooLarge(detail=detail, by=GATEWAY)
    if status in _RETRY_STATUSES or status >= 500 or answer.kind != "e":
        after = float(answer.int("ra")) if "ra" in answer.fields else None
        return Retry(cause=f"dns-{status or answer.kind}", detail=detail, after=after)
    return Rejected(cause=f"dns-{status}", detail=detail, by=GATEWAY)
