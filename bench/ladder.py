"""Transport-ladder benchmark: what each rung costs on the wire, and how fast the agent gets out of each zoo
network.

Part 1, bytes per rung: a real ``flowtunnel agent`` restricted to one rung (``--rungs NAME``), and with the
default ladder (``post,ws,get``: the first batch by POST, then WebSocket for fewer bytes), uploads a
softflowd NetFlow v9 stream to a real gateway through the link emulator (``tests/linkemu.py``, raw TCP mode),
which counts every byte both ways, HTTP heads, WebSocket frames and answers included. The stream is sent at
2, 10 and 500 datagrams/s; the baseline, measured from the same datagrams in the same run, is the exporter's
own UDP (payload + 28 bytes of IPv4/UDP headers per datagram). Agent settings are the defaults (``--latency
1s``). POST is also measured through squid with Basic and with NTLM logins (the link between agent and
proxy), for the goal "POST through an NTLM proxy within 5 % of POST through a Basic proxy". Every run checks
zero loss (the gateway acknowledged every datagram); a rung the agent cannot use is reported as such.

Part 2, time to the first acknowledged batch on each zoo network: runs ``tests/zoo/test_zoo_e2e.py`` (the
agent in an isolated namespace whose only way out is the network under test) and reads the records it writes
(``FLOWTUNNEL_ZOO_RECORD``). Needs root (network namespaces), squid and mitmproxy.

Run from the repository root: ``python bench/ladder.py [--quick] [--write] [--skip-zoo]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT_DIR = Path(__file__).resolve().parents[1]
for p in (ROOT_DIR, ROOT_DIR / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from tests.agent.chain import GatewayProc, wait_until  # noqa: E402
from tests.linkemu import ThreadedLink  # noqa: E402
from tests.zoo.agentrun import find_rung  # noqa: E402
from tests.zoo.squid import BASIC, NTLM_443, Squid, SquidNetwork, squid_binary  # noqa: E402

from _common import (  # noqa: E402
    ROOT,
    AgentProc,
    add_common_args,
    command_line,
    enroll_agent,
    free_udp_port,
    machine,
    md_table,
    raw_udp_bytes,
    replace_section,
    send_paced,
    softflowd_streams,
    utc_now,
    workdir,
)

SECTION = "Transport ladder"
RUNGS = ("post", "ws", "get")
DEFAULT_LADDER = "default ladder (post, then ws)"
RATES = (2.0, 10.0, 500.0)
GOALS = {("ws", 10.0): 0.20, ("get", 10.0): 0.50}
AGENT = "bench"


@dataclass(frozen=True, kw_only=True)
class RungRun:
    label: str
    rate: float
    datagrams: int
    raw: int
    up: int | None = None
    down: int | None = None
    seconds: float | None = None
    body: int | None = None  # the sealed batches' bytes (the agent's status), the rest being the rung's own
    rung: str | None = None
    error: str = ""

    @property
    def ratio(self) -> float | None:
        return None if self.up is None or self.down is None else (self.up + self.down) / self.raw


def _agent(spool: Path, gateway: str, key: str, port: int, extra: Sequence[str],
           env: dict[str, str] | None = None) -> AgentProc:
    agent = AgentProc(spool, gateway=gateway, agent_id=AGENT, key=key, port=port)
    # defaults only: the chain helper's test-speed flags are dropped
    agent.args = ["agent", "--gateway", gateway, "--listen", f"udp://127.0.0.1:{port}", "--spool", str(spool),
                  "--agent-id", AGENT, "--key-file", str(agent.key_file), "--status-interval", "0.5", *extra]
    return agent


def measure(work: Path, label: str, payloads: list[bytes], rate: float, *, agent_extra: Sequence[str],
            proxy: SquidNetwork | None = None, proxy_creds: str = "") -> RungRun:
    """One run: agent → link emulator → (squid →) gateway; bytes counted on the link."""
    n, raw = len(payloads), raw_udp_bytes(payloads)
    data = work / "gateway"
    key = enroll_agent(data, AGENT)
    gw = GatewayProc(data).start()
    squid = Squid(proxy).start() if proxy is not None else None
    try:
        upstream = squid.port if squid is not None else gw.port
        with ThreadedLink(upstream=("127.0.0.1", upstream), http=False) as link:
            extra = list(agent_extra)
            target = gw.url
            if squid is not None:
                extra += ["--proxy", f"http://{proxy_creds}127.0.0.1:{link.port}"]
            else:
                target = link.url
            port = free_udp_port()
            agent = _agent(work / "spool", target, key, port, extra)
            try:
                agent.start()
            except RuntimeError as exc:
                why = str(exc).splitlines()[-1][:120]
                return RungRun(label=label, rate=rate, datagrams=n, raw=raw, error=why)
            with agent:
                before = link.stats()
                started = time.monotonic()
                send_paced(payloads, ("127.0.0.1", port), rate)
                try:
                    wait_until(lambda: gw.acked(AGENT) >= n, f"{label}: {n} datagrams acknowledged",
                               timeout=60 + n / rate)
                except AssertionError:
                    return RungRun(label=label, rate=rate, datagrams=n, raw=raw,
                                   error=f"acknowledged {gw.acked(AGENT)} of {n}")
                seconds = time.monotonic() - started
                time.sleep(0.5)  # the last answer finishes crossing the link
                after = link.stats()
                status = agent.status() or {}
                agent.stop()
        up = after.bytes_from_client - before.bytes_from_client
        down = after.bytes_from_server - before.bytes_from_server
        rung = find_rung(status)
        body = (status.get("upload") or {}).get("body_bytes")
        return RungRun(label=label, rate=rate, datagrams=n, raw=raw, up=up, down=down, seconds=seconds,
                       body=body if isinstance(body, int) else None, rung=str(rung) if rung else None)
    finally:
        if squid is not None:
            squid.__exit__(None, None, None)
        gw.stop()


def zoo_first_acks(quick: bool) -> list[dict[str, object]]:
    """Run the zoo's end-to-end scenarios and return their time-to-first-ack records."""
    with tempfile.TemporaryDirectory(prefix="ft-bench-zoo-") as tmp:
        record = Path(tmp) / "zoo.jsonl"
        env = {**os.environ, "FLOWTUNNEL_ZOO_RECORD": str(record)}
        cmd = [sys.executable, "-m", "pytest", "tests/zoo/test_zoo_e2e.py", "-q", "-p", "no:randomly",
               "-p", "no:cacheprovider"]
        if quick:
            cmd += ["-k", "not satellite"]
        subprocess.run(cmd, cwd=ROOT, env=env, check=False, capture_output=True, timeout=1800)
        if not record.exists():
            return []
        return [json.loads(line) for line in record.read_text().splitlines() if line.strip()]


ZOO_NETWORKS = [
    ("ntlm-connect-443", "NTLM login, CONNECT only to 443"),
    ("negotiate", "Negotiate login, proxy from the environment"),
    ("basic", "Basic login, credentials in the proxy URL"),
    ("body-64k", "bodies capped at 64 KB"),
    ("no-octet-stream", "application/octet-stream refused"),
    ("batch-type-refused", "batch type and octet-stream refused (POST relabelled)"),
    ("post-denied", "POST denied"),
    ("upgrade-stripped", "Upgrade stripped"),
    ("upgrade-allowed", "Upgrade allowed, POST denied"),
    ("captive-portal", "captive portal opening after 6 s"),
    ("pac", "PAC file on loopback"),
    ("pac-first-down", "PAC file whose first proxy is down"),
    ("wpad", "WPAD on loopback"),
    ("tls-intercept", "TLS-intercepting proxy (mitmproxy)"),
    ("satellite-ntlm", "satellite link to the NTLM proxy"),
]


def bench(args: argparse.Namespace) -> str:
    flows = 1500 if args.quick else 6000  # ~14 flows per v9 datagram: a few hundred datagrams
    stream = next(s for s in softflowd_streams(flows, versions=(9,)))
    rates = [r for r in RATES if not args.rates or str(int(r)) in args.rates.split(",")]
    runs: list[RungRun] = []
    for rate in rates:
        # At 2 and 10/s a whole stream would take minutes: send as many datagrams as ~40 s allow.
        count = len(stream.payloads) if rate >= 100 else max(30, int(rate * (20 if args.quick else 40)))
        payloads = stream.payloads[:count]
        for rung in RUNGS:
            with workdir("ft-bench-ladder-") as work:
                runs.append(measure(work, rung, payloads, rate, agent_extra=["--rungs", rung]))
                print(runs[-1], file=sys.stderr)
        # The default ladder: the first batch by post, then ws for fewer bytes (issue 14), switch included.
        with workdir("ft-bench-ladder-") as work:
            runs.append(measure(work, DEFAULT_LADDER, payloads, rate, agent_extra=[]))
            print(runs[-1], file=sys.stderr)
    if squid_binary() is not None:
        payloads = stream.payloads[: max(30, 10 * (20 if args.quick else 40))]
        for label, network, creds in (("post via Basic proxy", BASIC, "alice:pw@"),
                                      ("post via NTLM proxy", NTLM_443, "CORP%5Calice:pw@")):
            with workdir("ft-bench-ladder-") as work:
                runs.append(measure(work, label, payloads, 10.0, agent_extra=["--rungs", "post"],
                                    proxy=network, proxy_creds=creds))
                print(runs[-1], file=sys.stderr)
    rows = []
    for r in runs:
        goal = GOALS.get((r.label, r.rate))
        if r.ratio is None:
            rows.append([r.label, f"{r.rate:g}", r.datagrams, f"{r.raw:,}", "-", "-", "-", "-",
                         f"not measured: {r.error}"])
            continue
        verdict = "" if goal is None else (f"goal ≤ {goal:.2f}: " + ("met" if r.ratio <= goal else "NOT met"))
        bodies = "-" if r.body is None else f"{r.body / r.raw:.3f}"
        rows.append([r.label, f"{r.rate:g}", r.datagrams, f"{r.raw:,}", f"{r.up:,}", f"{r.down:,}", bodies,
                     f"**{r.ratio:.3f}**", verdict])
    table = md_table(["rung", "datagrams/s", "datagrams", "raw UDP bytes", "HTTP up", "HTTP down",
                      "sealed batches/raw", "(up+down)/raw", "goal"], rows, align="lrrrrrrrl")
    basic = next((r for r in runs if r.label == "post via Basic proxy" and r.ratio is not None), None)
    ntlm = next((r for r in runs if r.label == "post via NTLM proxy" and r.ratio is not None), None)
    ntlm_line = ""
    if basic is not None and ntlm is not None and basic.ratio and ntlm.ratio:
        diff = (ntlm.ratio / basic.ratio - 1) * 100
        ntlm_line = (f"POST through the NTLM proxy costs {diff:+.1f} % bytes against the Basic proxy "
                     f"(goal within 5 %: {'met' if abs(diff) <= 5 else 'NOT met'}).\n\n")
    zoo = [] if args.skip_zoo else zoo_first_acks(args.quick)
    by_net = {str(r["network"]): r for r in zoo}
    zrows = []
    for key, text in ZOO_NETWORKS:
        rec = by_net.get(key)
        goal = 30.0 if "satellite" in key else 15.0
        if rec is None:
            zrows.append([text, "-", "-", "-", "did not get out (or not run)"])
            continue
        first, done = float(str(rec["first_ack_s"])), float(str(rec["all_acked_s"]))
        zrows.append([text, f"{first:.2f}", f"{done:.2f}", str(rec.get("rung") or "-"),
                      f"≤ {goal:g} s: {'met' if first <= goal else 'NOT met'}"])
    ztable = md_table(["zoo network", "first ack (s)", "all acked (s)", "rung", "goal"], zrows, align="lrrll")
    return (
        f"Measured {utc_now()} by {command_line('ladder.py', args)}; {machine()}.\n\n"
        f"Bytes on the wire per rung for softflowd's NetFlow v9 export ({flows}-flow trace), agent defaults "
        "(`--latency 1s`), counted by the link emulator both ways with every HTTP head, WebSocket frame and "
        "answer; baseline: the same datagrams as raw UDP (payload + 28 bytes). Zero loss in every measured "
        "run. \"sealed batches/raw\": the bodies the agent sealed (its status's `body_bytes`), the same on "
        "every rung for the same batches; the rest of (up+down) is what the rung itself adds (heads, frames, "
        "answers, probes, pieces' base64).\n\n"
        f"{table}\n\n{ntlm_line}"
        "Time from the agent's start to its first acknowledged batch on each zoo network (`tests/zoo/`: the "
        "agent in a network namespace whose only way out is the network under test, started with the "
        "gateway URL and `--proxy auto` or the proxy URL, nothing about rungs; the stream is sent as soon as "
        "it is up).\n\n"
        f"{ztable}\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    parser.add_argument("--rates", default="", help="comma-separated subset of 2,10,500 (default: all)")
    parser.add_argument("--skip-zoo", action="store_true", help="skip the time-to-first-ack part")
    args = parser.parse_args(argv)
    body = bench(args)
    print(body)
    if args.write:
        replace_section(args.doc, SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
