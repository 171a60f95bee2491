"""Which network the agent is on, and the rung that worked there last (remembered across restarts).

The fingerprint is the default route's gateway address (``/proc/net/route``) plus the resolvers
(``/etc/resolv.conf``): a hotel Wi-Fi, the office LAN and a GPRS modem differ in both, and a box that stays on
one network keeps them. The parsers are pure (text in); ``RungMemory`` keeps, per fingerprint, the rung, the
POST rung's Content-Type that worked and its batch path (``/v1/batches`` where ``/v1/b`` was refused, and
since when: the POST rung tries ``/v1/b`` again after a while), in a small JSON file in the spool directory
(written atomically, and only when what it holds changed; a damaged file is forgotten, never fatal).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
import struct
from pathlib import Path

from flowtunnel.wire.digest import sha256

__all__ = ["RungMemory", "default_gateway", "fingerprint", "local_fingerprint", "resolvers"]

logger = logging.getLogger(__name__)

MAX_NETWORKS = 64  # networks remembered; the oldest entries go first
_FIELDS = ("rung", "content_type", "path")  # text fields of an entry
_SINCE = "path_since"  # unix seconds (a number): when /v1/b was refused and the path became /v1/batches


def default_gateway(route_text: str) -> str | None:
    """The IPv4 default route's gateway from the text of ``/proc/net/route`` (lowest metric), or None."""
    best: tuple[int, str] | None = None
    for line in route_text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8 or fields[1] != "00000000" or fields[7] != "00000000":
            continue
        try:
            gateway = socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))
            metric = int(fields[6])
        except (ValueError, struct.error, OSError):
            continue
        if best is None or metric < best[0]:
            best = (metric, gateway)
    return None if best is None else best[1]


def resolvers(resolv_text: str) -> list[str]:
    """The ``nameserver`` addresses of a ``resolv.conf`` text, in order."""
    found = []
    for line in resolv_text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            with contextlib.suppress(ValueError):
                found.append(str(ipaddress.ip_address(fields[1].split("%", 1)[0])))
    return found


def fingerprint(gateway: str | None, servers: list[str]) -> str:
    """A short stable name for the network: 16 hex characters of SHA-256 over gateway and resolvers."""
    text = f"gw={gateway or '-'};dns={','.join(servers) or '-'}"
    return sha256(text.encode()).hex()[:16]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[:1 << 20]
    except OSError:
        return ""


def local_fingerprint(route: Path = Path("/proc/net/route"), resolv: Path = Path("/etc/resolv.conf")) -> str:
    return fingerprint(default_gateway(_read(route)), resolvers(_read(resolv)))


class RungMemory:
    """``{network fingerprint: {"rung": name, "content_type": label, "path": path, "path_since": unix
    seconds}}`` in ``path`` (JSON): the rung that carried a batch on each network, and the label and batch
    path (``/v1/b``, or ``/v1/batches`` where something refused ``/v1/b``, and since when) the POST rung's
    batches passed with there (``labels``, ``post``). ``get`` / ``content_type`` / ``batch_path`` /
    ``path_since`` read; ``update`` changes the map and says whether the file
    must be written, ``write`` writes it (a worker thread's job), ``put`` does both. Never raises for the
    file.
    A file of an older version (plain ``{fingerprint: rung}``, or entries without a path) is read as it
    stands: what it does not name is not remembered."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._map: dict[str, dict[str, str | float]] = {}
        text = _read(path)
        if text:
            try:
                doc = json.loads(text)
                if isinstance(doc, dict):
                    for k, v in doc.items():
                        if isinstance(v, str):
                            v = {"rung": v}
                        if isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("rung"), str):
                            entry: dict[str, str | float] = {
                                f: x for f, x in v.items() if f in _FIELDS and isinstance(x, str)}
                            since = v.get(_SINCE)
                            if isinstance(since, int | float) and not isinstance(since, bool):
                                entry[_SINCE] = since
                            self._map[k] = entry
            except ValueError:
                logger.warning("forgetting the damaged rung memory %s", path)

    def _text(self, network: str, name: str) -> str | None:
        value = self._map.get(network, {}).get(name)
        return value if isinstance(value, str) else None

    def get(self, network: str) -> str | None:
        """The rung that worked on ``network`` last, or None."""
        return self._text(network, "rung")

    def content_type(self, network: str) -> str | None:
        """The Content-Type the POST rung's batches passed with on ``network`` last, or None."""
        return self._text(network, "content_type")

    def batch_path(self, network: str) -> str | None:
        """The path (``/v1/b`` or ``/v1/batches``, after the gateway URL's own) the POST rung's batches
        passed on ``network`` last, or None."""
        return self._text(network, "path")

    def path_since(self, network: str) -> float | None:
        """Since when (unix seconds) the POST rung's batches go to ``/v1/batches`` on ``network`` (``/v1/b``
        was refused then), or None (not known: a file of an older version, or not on ``/v1/batches``)."""
        value = self._map.get(network, {}).get(_SINCE)
        return None if isinstance(value, str) else value

    def update(self, network: str, rung: str, *, content_type: str | None = None,
               path: str | None = None, since: float | None = None) -> str | None:
        """``rung`` carried a batch on ``network`` (labelled ``content_type`` on ``path`` when given: a
        POST; ``since``: when ``/v1/b`` was refused, for ``/v1/batches``). Returns the file's new text when
        what is remembered changed (give it to ``write``), else None: a batch like the one before costs no
        disk write and no thread."""
        entry = dict(self._map.get(network, {}), rung=rung)
        if content_type is not None:
            entry["content_type"] = content_type
        if path is not None:
            entry["path"] = path
            entry.pop(_SINCE, None)
            if since is not None:
                entry[_SINCE] = round(since)
        if self._map.get(network) == entry:
            return None
        self._map.pop(network, None)
        self._map[network] = entry
        while len(self._map) > MAX_NETWORKS:
            self._map.pop(next(iter(self._map)))
        return json.dumps(self._map, indent=1, sort_keys=False)

    def write(self, text: str) -> None:
        """Replace the file with ``text`` (from ``update``) atomically; a failure is logged, not raised."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(text)
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("cannot remember the rung for this network in %s: %s", self.path, exc.strerror)

    def put(self, network: str, rung: str, *, content_type: str | None = None,
            path: str | None = None, since: float | None = None) -> None:
        """``update``, then ``write`` when something changed (synchronously)."""
        text = self.update(network, rung, content_type=content_type, path=path, since=since)
        if text is not None:
            self.write(text)
