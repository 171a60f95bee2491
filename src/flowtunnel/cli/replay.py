"""``flowtunnel replay``: send the NetFlow/IPFIX datagrams of a capture to a UDP receiver, paced.

Used to feed a recorded exporter into an agent, a collector or the demo. The datagrams are sent in file
order from one UDP socket, so the receiver sees this host as the exporter (keeping the original source
addresses would need raw sockets). Pacing follows an absolute schedule (datagram ``i`` leaves at
``start + i / rate``, or at its capture time divided by ``--speed``), so sleep overshoot never accumulates
into a slower rate.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from flowtunnel.capture import CaptureError, CaptureReader, CaptureStats, find_netflow
from flowtunnel.cli._common import port_arg

__all__ = ["Loaded", "ReplaySummary", "Target", "load_datagrams", "parse_target", "register", "replay"]

EXIT_OK = 0
EXIT_BAD_INPUT = 2
DEFAULT_RATE = 1000.0

_DESCRIPTION = f"""\
Send the NetFlow v5, v9 and IPFIX export datagrams found in a pcap or pcapng capture to a UDP
receiver (an agent, a collector such as nfcapd), in capture order.

Export datagrams are recognised by content on any UDP port (--port narrows the search to
datagrams sent to that port; --exporter keeps those of one sender). They all leave from one
UDP socket of this host: the receiver sees this host as the exporter, since keeping the original
source addresses would need raw sockets. If the capture holds several exporters whose v9/IPFIX
template ids clash, replay them one at a time with --exporter.

Pacing: --rate PPS sends PPS datagrams per second (default {DEFAULT_RATE:g}; 0 = as fast as possible,
which can overrun a receiver's socket buffer); --speed X follows the capture's own timing, X times
faster (1 = real time). A progress bar is drawn on stderr when it is a terminal; a summary line ends
the run. SIGINT/SIGTERM stop sending and print the summary.

Exit status: 0 when the capture was sent; 2 when the file is missing, unreadable or not a capture, or
the target or another argument is invalid; 130/143 when interrupted by SIGINT/SIGTERM.
"""

_EPILOG = """\
examples:
  flowtunnel replay capture.pcap --to udp://127.0.0.1:2055
  flowtunnel replay capture.pcapng --to udp://[::1]:4739 --speed 10 --port 9995
"""


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "replay",
        help="send the NetFlow/IPFIX datagrams of a pcap/pcapng capture to a UDP receiver, paced",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "file", type=Path, metavar="FILE", help="pcap or pcapng capture to read ('-': standard input)"
    )
    parser.add_argument(
        "--to", required=True, metavar="udp://HOST:PORT", dest="to",
        help="receiver address, e.g. udp://127.0.0.1:2055 or udp://[::1]:2055",
    )
    pacing = parser.add_mutually_exclusive_group()
    pacing.add_argument(
        "--rate", type=_non_negative, default=None, metavar="PPS",
        help=f"datagrams per second (default {DEFAULT_RATE:g}; 0: as fast as possible)",
    )
    pacing.add_argument(
        "--speed", type=_positive, default=None, metavar="X",
        help="follow the capture's timing, X times faster (1: real time)",
    )
    parser.add_argument(
        "--port", type=port_arg, action="append", default=None, metavar="N",
        help="only datagrams sent to UDP port N in the capture (repeatable; default: any port)",
    )
    parser.add_argument(
        "--exporter", action="append", default=None, metavar="IP",
        help="only datagrams sent by this IP address in the capture (repeatable)",
    )
    parser.set_defaults(func=run)


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def _positive(text: str) -> float:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("speed must be > 0")
    return value


# --- target -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """A resolved UDP destination."""

    family: int
    sockaddr: tuple[Any, ...]
    text: str  # as the user wrote it


def parse_target(text: str) -> Target:
    """``udp://HOST:PORT`` (``udp://[v6]:PORT``; HOST may be a name) → ``Target``; else ``ValueError``."""
    example = "(examples: udp://127.0.0.1:2055, udp://[::1]:2055)"
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() != "udp":
        raise ValueError(f"target {text!r} is not udp://HOST:PORT {example}")
    if rest.startswith("["):
        host, bracket, port_text = rest[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise ValueError(f"target {text!r}: IPv6 address needs udp://[ADDR]:PORT {example}")
        port_text = port_text[1:]
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon or ":" in host:
            raise ValueError(f"target {text!r} has no port, or an IPv6 address without brackets {example}")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"target {text!r}: port {port_text!r} is not in 1..65535")
    try:
        infos = socket.getaddrinfo(host, int(port_text), type=socket.SOCK_DGRAM, proto=socket.IPPROTO_UDP)
    except socket.gaierror as exc:
        raise ValueError(f"target {text!r}: cannot resolve {host!r}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    return Target(family=family, sockaddr=tuple(sockaddr), text=text)


# --- loading and sending --------------------------------------------------------------------------------


@dataclass(slots=True)
class Loaded:
    """The datagrams to send, their capture times, and what the capture held besides."""

    payloads: list[bytes]
    times: list[float]
    versions: Counter[int]
    capture: CaptureStats
    not_netflow: int  # UDP datagrams that are not NetFlow/IPFIX, or not to --port
    other_exporters: int = 0  # NetFlow datagrams left out by --exporter


def load_datagrams(
    path: Path | str, *, ports: Sequence[int] | None = None, exporters: Sequence[str] | None = None
) -> Loaded:
    """The NetFlow/IPFIX datagrams of the capture, in order. Raises ``CaptureError`` for a bad file."""
    wanted = frozenset(_normalise_ip(e) for e in exporters) if exporters else None
    payloads: list[bytes] = []
    times: list[float] = []
    versions: Counter[int] = Counter()
    other_exporters = 0
    with CaptureReader(path) as reader:
        for found in find_netflow(reader, ports=ports):
            dgram = found.datagram
            if wanted is not None and dgram.src not in wanted:
                other_exporters += 1
                continue
            payloads.append(dgram.payload)
            times.append(dgram.time)
            versions[found.version] += 1
    not_netflow = reader.stats.udp - len(payloads) - other_exporters
    return Loaded(payloads, times, versions, reader.stats, not_netflow, other_exporters)


def _normalise_ip(text: str) -> str:
    try:
        return ipaddress.ip_address(text.strip("[]")).compressed
    except ValueError:
        raise CaptureError(f"--exporter {text!r} is not an IP address") from None


@dataclass(slots=True)
class ReplaySummary:
    """What ``replay`` sent; ``line()`` is the closing stderr line."""

    target: str
    sent: int = 0
    bytes: int = 0
    send_errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    interrupted: bool = False

    def line(self, loaded: Loaded) -> str:
        versions = ", ".join(
            f"{'IPFIX' if v == 10 else f'v{v}'}: {n}" for v, n in sorted(loaded.versions.items())
        )
        total = len(loaded.payloads)
        rate = self.sent / self.seconds if self.seconds > 0 else 0.0
        text = (
            f"flowtunnel replay: sent {self.sent} of {total} export datagrams"
            + (f" ({versions})" if versions else "")
            + f", {self.bytes} bytes, to {self.target} in {self.seconds:.1f} s ({rate:.0f} datagrams/s)"
        )
        if self.send_errors:
            text += "; send errors: " + ", ".join(f"{k}: {n}" for k, n in sorted(self.send_errors.items()))
        skipped = [
            f"{loaded.not_netflow} other UDP datagrams" if loaded.not_netflow else "",
            f"{loaded.other_exporters} from other exporters" if loaded.other_exporters else "",
            f"{loaded.capture.fragments} IP fragments" if loaded.capture.fragments else "",
            f"{loaded.capture.truncated} truncated frames" if loaded.capture.truncated else "",
            "file cut short" if loaded.capture.truncated_file else "",
        ]
        skipped_text = ", ".join(s for s in skipped if s)
        if skipped_text:
            text += f"; skipped {skipped_text}"
        if self.interrupted:
            text += "; interrupted"
        return text


def replay(
    loaded: Loaded,
    target: Target,
    *,
    rate: float = DEFAULT_RATE,
    speed: float | None = None,
    stop: threading.Event | None = None,
    progress: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ReplaySummary:
    """Send ``loaded.payloads`` to ``target`` in order, paced by ``rate`` (0: no pacing) or ``speed``.

    ``stop`` ends the run early (the summary says ``interrupted``); ``progress(n)`` is called with the count
    sent, at most every few milliseconds. Error handling: a failed send is counted by errno name and the
    next datagram is tried; a full socket buffer (``ENOBUFS``/``EAGAIN``) is retried after a short pause.
    """
    summary = ReplaySummary(target=target.text)
    payloads, times = loaded.payloads, loaded.times
    sock = socket.socket(target.family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        started = clock()
        first_time = times[0] if times else 0.0
        last_report = 0.0
        for i, payload in enumerate(payloads):
            if stop is not None and stop.is_set():
                summary.interrupted = True
                break
            if speed is not None:
                due = started + (times[i] - first_time) / speed
            elif rate > 0:
                due = started + i / rate
            else:
                due = 0.0
            ahead = due - clock()
            if ahead > 0.0005:
                if stop is not None:
                    if stop.wait(ahead):
                        summary.interrupted = True
                        break
                else:
                    sleep(ahead)
            if _send(sock, payload, target.sockaddr, summary):
                summary.sent += 1
                summary.bytes += len(payload)
            if progress is not None:
                now = clock()
                if now - last_report >= 0.05:
                    last_report = now
                    progress(i + 1)
        summary.seconds = clock() - started
        if progress is not None:
            progress(summary.sent if summary.interrupted else len(payloads))
    finally:
        sock.close()
    return summary


def _send(sock: socket.socket, payload: bytes, addr: tuple[Any, ...], summary: ReplaySummary) -> bool:
    for attempt in range(100):
        try:
            sock.sendto(payload, addr)
            return True
        except OSError as exc:
            if exc.errno in (errno.ENOBUFS, errno.EAGAIN) and attempt < 99:
                time.sleep(0.001)  # the kernel's queue is full: let it drain, do not drop
                continue
            summary.send_errors[errno.errorcode.get(exc.errno or 0, str(exc.errno))] += 1
            return False
    return False


# --- command ----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    try:
        target = parse_target(args.to)
    except ValueError as exc:
        print(f"flowtunnel replay: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        loaded = load_datagrams(args.file, ports=args.port, exporters=args.exporter)
    except CaptureError as exc:
        print(f"flowtunnel replay: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        rate = DEFAULT_RATE if args.rate is None else args.rate
        if sys.stderr.isatty() and loaded.payloads:
            summary = _replay_with_bar(loaded, target, rate=rate, speed=args.speed, stop=stop)
        else:
            summary = replay(loaded, target, rate=rate, speed=args.speed, stop=stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(summary.line(loaded), file=sys.stderr)
    if received:
        return 128 + received[0]
    return EXIT_OK


def _replay_with_bar(
    loaded: Loaded, target: Target, *, rate: float, speed: float | None, stop: threading.Event
) -> ReplaySummary:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("replay"), BarColumn(), MofNCompleteColumn(), TextColumn("datagrams"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("replay", total=len(loaded.payloads))
        return replay(
            loaded, target, rate=rate, speed=speed, stop=stop,
            progress=lambda n: bar.update(task, completed=n),
        )
