"""Helpers shared by the benchmarks in ``bench/``: the machine description, markdown tables, section
replacement in
``docs/benchmarks.md``, paced UDP senders, the test streams (softflowd exports of a generated trace, the
vendor
captures), per-process CPU/RSS readings, and a real agent → link emulator → gateway chain.

The benches import the real-peer helpers of the test suite (``tests/peers.py``, ``tests/linkemu.py``,
``tests/agent/chain.py``) instead of re-writing them, so the repository root goes on ``sys.path`` here.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.agent.chain import AgentProc, GatewayProc, enroll_agent, wait_until  # noqa: E402
from tests.linkemu import LinkStats, Mode, Shape, ThreadedLink  # noqa: E402
from tests.peers import Nfcapd, UdpCapture, capture_softflowd, free_udp_port, make_trace  # noqa: E402

from flowtunnel.capture import find_netflow, read_udp  # noqa: E402

__all__ = [
    "DOC",
    "ROOT",
    "UNBUDGETED",
    "VENDOR",
    "AgentProc",
    "Chain",
    "Nfcapd",
    "Shape",
    "StoreGatewayProc",
    "Stream",
    "UdpCapture",
    "add_common_args",
    "capture_softflowd",
    "cpu_seconds",
    "enroll_agent",
    "free_udp_port",
    "machine",
    "make_trace",
    "md_table",
    "peak_rss_kib",
    "raw_udp_bytes",
    "replace_section",
    "send_paced",
    "softflowd_streams",
    "udp_drops",
    "utc_now",
    "vendor_streams",
    "wait_udp_bound",
    "wait_udp_drained",
]

DOC = ROOT / "docs" / "benchmarks.md"
VENDOR = ROOT / "tests" / "data" / "vendor"
UDP_IP_OVERHEAD = 28  # IPv4 (20) + UDP (8) header bytes per datagram
#: order of the sections in docs/benchmarks.md; a missing section is inserted before the next one listed here
SECTION_ORDER = ("Wire efficiency", "Throughput", "Agent footprint", "Latency", "Decoding", "Store",
                 "Transport ladder", "Console", "Scale-out")
_DOC_INTRO = """\
# Benchmarks

How flowtunnel compares with what people would use instead, measured by the scripts in `bench/`.
`python bench/run.py` runs them all and rewrites this page (`--quick` for a short run); each script also runs
alone and rewrites its own section with `--write`. Figures depend on the machine: each section names its own,
and every figure stands beside a baseline measured in the same run, so the ratios are what carries over.
"""


# ---------------------------------------------------------------------------------------------- reporting


def machine() -> str:
    """``nproc``, CPU model, kernel, Python version: the line every section starts with."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}; shared with other work, so absolute figures are noisy: compare "
        "within the run"
    )


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` has one letter per column: ``l``, ``r`` or ``c`` (default all
    ``l``)."""
    width = len(header)
    marks = {"l": "---", "r": "---:", "c": ":-:"}
    spec = align or "l" * width
    if len(spec) != width:
        raise ValueError(f"align {spec!r} has {len(spec)} letters for {width} columns")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[c] for c in spec) + "|"]
    for row in rows:
        if len(row) != width:
            raise ValueError(f"row {row!r} has {len(row)} cells for {width} columns")
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def replace_section(doc: Path, title: str, body: str) -> None:
    """Put ``## title`` + ``body`` into ``doc``, replacing that section if present, else in
    ``SECTION_ORDER``."""
    text = with_section(doc.read_text() if doc.exists() else _DOC_INTRO, title, body)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def with_section(text: str, title: str, body: str, order: Sequence[str] = SECTION_ORDER) -> str:
    """``text`` with ``## title`` + ``body``: the section replaced where it is, else put before the first
    section that comes after it in ``order``, else at the end. A bench writes the text under the ``##``
    heading; the ``###`` subsections after it are written by hand (what a session changed and measured) and
    are kept."""
    heading = f"## {title}"
    section = f"{heading}\n\n{body.strip()}\n"
    found = re.search(rf"^{re.escape(heading)}[ \t]*$", text, flags=re.M)
    if found is not None:
        ends = [i for i in (text.find("\n## ", found.end()), text.find("\n### ", found.end())) if i >= 0]
        nxt = min(ends, default=-1)
        return text[: found.start()] + section + (text[nxt:] if nxt >= 0 else "")
    later = order[order.index(title) + 1 :] if title in order else ()
    spots = [m.start() for t in later if (m := re.search(rf"^## {re.escape(t)}[ \t]*$", text, re.M))]
    if spots:
        at = min(spots)
        return text[:at] + section + "\n" + text[at:]
    return text.rstrip() + "\n\n" + section


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a short run (small streams, short intervals)")
    parser.add_argument("--write", action="store_true", help="rewrite this bench's section of --doc")
    parser.add_argument("--doc", type=Path, default=DOC, help=f"markdown file to write (default {DOC})")


def command_line(script: str, args: argparse.Namespace) -> str:
    """The command that reproduces a run, as shown in the doc (``--write``/``--doc`` left out)."""
    return f"`python bench/{script}{' --quick' if args.quick else ''}`"


# ---------------------------------------------------------------------------------------------- streams


@dataclass(frozen=True, slots=True, kw_only=True)
class Stream:
    """Export datagrams to replay: ``payloads`` in order; ``records`` flow records (when known)."""

    name: str
    version: str
    payloads: list[bytes]
    records: int

    @property
    def raw_bytes(self) -> int:
        return raw_udp_bytes(self.payloads)


def raw_udp_bytes(payloads: Sequence[bytes]) -> int:
    """What the exporter's own UDP costs on the wire: payload + IPv4 and UDP headers, per datagram."""
    return sum(len(p) for p in payloads) + UDP_IP_OVERHEAD * len(payloads)


def softflowd_streams(flows: int, *, seed: int = 6, versions: Sequence[int] = (5, 9, 10)) -> list[Stream]:
    """softflowd's v5/v9/IPFIX exports of one generated trace of ``flows`` conversations, as captured."""
    names = {5: "v5", 9: "v9", 10: "IPFIX"}
    with tempfile.TemporaryDirectory(prefix="ft-bench-trace-") as tmp:
        trace = make_trace(Path(tmp) / "trace.pcap", flows=flows, seed=seed)
        out = []
        for version in versions:
            export = capture_softflowd(trace.path, version)
            out.append(
                Stream(
                    name=f"softflowd {names[version]}",
                    version=names[version],
                    payloads=export.payloads,
                    records=export.stats.records,
                )
            )
    return out


def vendor_streams() -> list[Stream]:
    """The Cisco captures of ``tests/data/vendor``, concatenated per version in file-name order."""
    groups: dict[str, list[bytes]] = {"IPFIX": [], "v9": []}
    for path in sorted(VENDOR.glob("cisco-*.pcap")):
        for nf in find_netflow(read_udp(path)):
            groups["IPFIX" if nf.version == 10 else "v9"].append(nf.datagram.payload)
    files = {
        "IPFIX": len(list(VENDOR.glob("cisco-ipfix-*.pcap"))),
        "v9": len(list(VENDOR.glob("cisco-nfv9-*"))),
    }
    return [
        Stream(name=f"Cisco {v} captures ({files[v]} files)", version=v, payloads=p, records=0)
        for v, p in groups.items()
        if p
    ]


def send_paced(
    payloads: Sequence[bytes],
    dest: tuple[str, int],
    rate: float,
    *,
    stamps: list[float] | None = None,
    tick: float = 0.0,
) -> float:
    """Send every payload to ``dest`` at ``rate`` datagrams/s (0: as fast as the socket takes them) from one
    socket; ``stamps`` receives each send's ``time.monotonic()``. Returns the seconds spent sending.

    ``tick`` > 0 sends in bursts, each ``tick`` seconds what is due by then: at thousands of datagrams/s a
    sleep per datagram would make the sender itself a large share of a 2-core machine (exporters send in
    bursts too: softflowd flushes its expired flows together).
    """
    sock = socket.socket(socket.AF_INET6 if ":" in dest[0] else socket.AF_INET, socket.SOCK_DGRAM)
    start = time.monotonic()
    try:
        if tick > 0 and rate:
            sent, total = 0, len(payloads)
            while sent < total:
                now = time.monotonic()
                due = min(total, int((now - start) * rate) + 1)
                for payload in payloads[sent:due]:
                    if stamps is not None:
                        stamps.append(now)
                    sock.sendto(payload, dest)
                sent = max(sent, due)
                if sent < total:
                    time.sleep(tick)
        else:
            for i, payload in enumerate(payloads):
                if stamps is not None:
                    stamps.append(time.monotonic())
                sock.sendto(payload, dest)
                if rate:
                    ahead = start + (i + 1) / rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
    finally:
        sock.close()
    return time.monotonic() - start


# ---------------------------------------------------------------------------------------------- processes


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on; the name may hold spaces


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (not its children), in seconds."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_kib(pid: int) -> int:
    """``VmHWM`` of ``pid``: its peak resident set size, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _udp_rows(port: int) -> list[list[str]]:
    rows = []
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if int(cols[1].partition(":")[2], 16) == port:
                rows.append(cols)
    return rows


def udp_drops(port: int) -> int:
    """Datagrams the kernel dropped on the socket(s) bound to UDP ``port`` (the receiver could not keep
    up)."""
    return sum(int(cols[-1]) for cols in _udp_rows(port))


def wait_udp_bound(port: int, proc: subprocess.Popen[bytes], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _udp_rows(port):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before binding UDP port {port}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.args!r} did not bind UDP port {port} within {timeout} s")
        time.sleep(0.05)


def wait_udp_drained(port: int, *, timeout: float) -> bool:
    """Wait until the receive queue of UDP ``port`` is empty; False if it still was not after ``timeout``."""
    deadline = time.monotonic() + timeout
    while any(int(cols[4].partition(":")[2], 16) for cols in _udp_rows(port)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


#: Gateway flags lifting the per-agent rate budget (see ``Stack``).
UNBUDGETED = ("--agent-rate", "0")


class StoreGatewayProc(GatewayProc):
    """``GatewayProc`` with the DuckDB store sink on (``chain.GatewayProc`` always passes ``--no-store``)."""

    def start(self) -> StoreGatewayProc:
        cmd = [
            "gateway",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--data",
            str(self.data),
            "--status-interval",
            "0.2",
            *self.extra,
        ]
        for target in self.forward:
            cmd += ["--forward", target]
        self._spawn([sys.executable, "-m", "flowtunnel", *cmd])
        wait_until(self._healthy, "gateway /healthz", timeout=60)
        return self


class Chain:
    """A real ``flowtunnel gateway`` and ``flowtunnel agent`` (subprocesses) on loopback, with the link
    emulator
    between them counting the HTTP bytes each way (headers included).

    ``with Chain(workdir, agent_args=["--latency", "1s"]) as chain: send_paced(..., chain.agent_addr, 500)``.
    ``store`` turns the gateway's DuckDB store on, ``forward`` adds udp-forward sinks.
    """

    AGENT = "bench"

    def __init__(
        self,
        workdir: Path,
        *,
        agent_args: Sequence[str] = (),
        gateway_args: Sequence[str] = (),
        store: bool = False,
        forward: Sequence[str] = (),
        link_down: bool = False,
        link_up: Shape | None = None,
        link_down_shape: Shape | None = None,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.data = workdir / "gateway"
        self.key = enroll_agent(self.data, self.AGENT)
        gw_cls = StoreGatewayProc if store else GatewayProc
        # The benchmarks measure capacity with one agent: the per-agent budget (4 MiB/s of journal by
        # default, a bound against rogue agents) would be the figure measured instead.
        self.gateway: GatewayProc = gw_cls(self.data, forward=forward, extra=[*UNBUDGETED, *gateway_args])
        self.agent_port = free_udp_port()
        self._agent_args = list(agent_args)
        self._link_down = link_down
        self._shapes = {"up": link_up, "down": link_down_shape}
        self.link: ThreadedLink | None = None
        self.agent: AgentProc | None = None

    @property
    def agent_addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.agent_port)

    def __enter__(self) -> Chain:
        try:
            self.gateway.start()
            self.link = ThreadedLink(upstream=("127.0.0.1", self.gateway.port), **self._shapes).__enter__()
            if self._link_down:
                self.set_link(up=False)
            self.agent = AgentProc(
                self.workdir / "spool",
                gateway=self.link.url,
                agent_id=self.AGENT,
                key=self.key,
                port=self.agent_port,
                # the chain helper's test defaults (latency 0.1 s, fast backoff) are overridden by what
                # the bench passes; argparse keeps the last value of a flag
                extra=[
                    "--latency",
                    "1s",
                    "--backoff-base",
                    "0.2",
                    "--backoff-cap",
                    "1s",
                    "--status-interval",
                    "0.2",
                    "--rcvbuf",
                    "64MiB",
                    *self._agent_args,
                ],
            ).start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self.agent is not None:
            try:
                self.agent.stop()
            finally:
                self.agent.__exit__()
        if self.link is not None:
            self.link.close()
        try:
            self.gateway.stop()
        finally:
            self.gateway.__exit__()

    def set_link(self, *, up: bool) -> None:
        assert self.link is not None
        mode = Mode.FORWARD if up else Mode.REFUSE
        self.link.call(lambda e: e.set_mode(mode))

    def link_stats(self) -> LinkStats:
        assert self.link is not None
        return self.link.stats()

    def acked(self) -> int:
        return self.gateway.acked(self.AGENT)

    def agent_status(self) -> dict[str, Any]:
        assert self.agent is not None
        return self.agent.status() or {}

    def agent_pid(self) -> int:
        assert self.agent is not None
        assert self.agent.proc is not None
        return self.agent.proc.pid

    def wait(self, cond: Callable[[], bool], what: str, timeout: float) -> None:
        wait_until(cond, what, timeout=timeout)


@contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def tool_version(cmd: Sequence[str]) -> str:
    """First line a tool prints about its version (``''`` when it is missing)."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else ""
