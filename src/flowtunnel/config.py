"""Settings loading shared by every command: defaults < TOML file < environment < command-line flags.

Each long-running command describes its settings as a frozen keyword-only dataclass. ``load_settings`` fills
it from one TOML section, ``FLOWTUNNEL_<SECTION>_<KEY>`` environment variables and the flags the user gave,
converting text by the field's type, so that every flag has a config key and an env var without each command
repeating the plumbing.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from flowtunnel.errors import ConfigError

__all__ = [
    "check_bounds",
    "count_setting",
    "duration_setting",
    "env_name",
    "format_duration",
    "format_size",
    "load_settings",
    "mask_credentials",
    "masked_repr",
    "parse_duration",
    "parse_size",
    "size_setting",
]

T = TypeVar("T")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4, "ti": 1024**4,
}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_size(text: str | int) -> int:
    """``"4MiB"`` → 4194304, ``"500k"`` → 500000, ``123`` → 123. Raises ``ValueError`` with the text."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 4096, 500k, 4MiB, 2GB)")
    unit = (m.group(2) or "").lower()
    value = float(m.group(1)) * _SIZE_UNITS[unit]
    if not math.isfinite(value) or value >= 2**63:
        raise ValueError(f"{text!r} is too large a size")
    return int(value)


def parse_duration(text: str | float | int) -> float:
    """``"1h30m"`` → 5400.0, ``"250ms"`` → 0.25, ``"30d"`` → 2592000.0, ``5`` → 5.0 (seconds)."""
    if isinstance(text, int | float):
        return float(text)
    s = text.strip()
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION_RE.match(s, pos)
        if not m or m.end() == pos:
            raise ValueError(f"{text!r} is not a duration (examples: 500ms, 30s, 5m, 1h30m, 30d)")
        total += float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "").lower()]
        pos = m.end()
    if not s:
        raise ValueError("empty duration")
    if not math.isfinite(total):
        raise ValueError(f"{text!r} is too long a duration")
    return total


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e18 else f"{x:g}"


def format_duration(seconds: float) -> str:
    """``0.25`` → ``"250ms"``, ``90`` → ``"90s"``, ``3600`` → ``"1h"``: for messages."""
    if seconds == 0:
        return "0s"
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if (seconds >= size and (seconds / size).is_integer()) or (unit == "s" and seconds >= 1):
            return f"{_num(seconds / size)}{unit}"
    return f"{_num(seconds * 1000)}ms"


def format_size(n: float) -> str:
    """``4194304`` → ``"4MiB"``, ``500000`` → ``"500k"``, ``123`` → ``"123"`` (bytes): for messages."""
    shown = [_num(n)]
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024),
                       ("T", 1000**4), ("G", 1000**3), ("M", 1000**2), ("k", 1000)):
        if n >= size and float(n / size).is_integer():
            shown.append(f"{_num(n / size)}{unit}")
    return min(reversed(shown), key=len)  # ties: the one with a unit


def duration_setting(default: float | None, lo: float, hi: float, *, zero: str | None = None) -> Any:
    """A dataclass field for a duration in seconds, parsed from text (``parse_duration``), allowed in
    ``lo .. hi`` (``load_settings`` and ``check_bounds`` enforce it); ``zero`` says what 0 means."""
    return dataclasses.field(default=default, metadata={
        "parse": parse_duration, "bounds": (lo, hi), "format": format_duration, "zero": zero})


def size_setting(default: int, lo: int, hi: int, *, zero: str | None = None) -> Any:
    """A dataclass field for a byte count parsed from text (``parse_size``), allowed in ``lo .. hi``."""
    return dataclasses.field(default=default, metadata={
        "parse": parse_size, "bounds": (lo, hi), "format": format_size, "zero": zero})


def count_setting(default: int, lo: int, hi: int, *, zero: str | None = None) -> Any:
    """A dataclass field for a plain count, allowed in ``lo .. hi``."""
    return dataclasses.field(default=default, metadata={"bounds": (lo, hi), "zero": zero})


def check_bounds(obj: object, *, error: type[Exception] = ConfigError) -> None:
    """Raise ``error`` for the first field of dataclass ``obj`` whose value is outside the ``"bounds"`` of its
    metadata, naming the setting, the value and the allowed range ("latency 99999999d is outside 10ms .. 1h").
    ``None`` (unset) values pass."""
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        problem = _out_of_bounds(f, getattr(obj, f.name))
        if problem:
            raise error(problem)


def _out_of_bounds(f: dataclasses.Field[Any], value: Any) -> str | None:
    bounds = f.metadata.get("bounds")
    if bounds is None or value is None or not isinstance(value, int | float) or isinstance(value, bool):
        return None
    lo, hi = bounds
    if lo <= value <= hi:
        return None
    fmt: Any = f.metadata.get("format") or _num
    zero = f.metadata.get("zero")
    what = f" (0 = {zero})" if zero else ""
    name = f.name.replace("_", "-")
    return f"{name} {fmt(value)} is outside the allowed range {fmt(lo)} .. {fmt(hi)}{what}"


_CREDENTIALS_RE = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:@/\s]*):[^@/\s]*@", re.IGNORECASE)


def mask_credentials(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` in it replaced by ``***``."""
    return _CREDENTIALS_RE.sub(r"\g<head>:***@", text)


def masked_repr(obj: Any) -> str:
    """The dataclass repr of a settings object with URL passwords masked (``nats://u:pw@...``): a repr ends
    up in logs and tracebacks."""
    shown = []
    for f in dataclasses.fields(obj):
        if f.repr:
            value = getattr(obj, f.name)
            text = repr(mask_credentials(value)) if isinstance(value, str) else repr(value)
            shown.append(f"{f.name}={text}")
    return f"{type(obj).__name__}({', '.join(shown)})"


def env_name(section: str, key: str) -> str:
    """The environment variable for a setting: ``FLOWTUNNEL_AGENT_SPOOL`` for section agent, key spool."""
    return f"FLOWTUNNEL_{section}_{key}".upper().replace("-", "_")


def _convert(value: Any, tp: Any, *, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value == "" and type(None) in args):
            return None
        return _convert(value, non_none[0], where=where)
    if origin in (tuple, list):
        item = args[0] if args else str
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
        return tuple(_convert(v, item, where=where) for v in items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        low = str(value).strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: {value!r} is not a boolean (use true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: {value!r} is not an integer")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {value!r} is not an integer") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {value!r} is not a number") from None
    if tp is Path:
        return Path(value).expanduser()
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(str(m.value) for m in tp)
            raise ConfigError(f"{where}: {value!r} is not one of {allowed}") from None
    if tp is str:
        return str(value)
    return value


def load_settings(
    cls: type[T],
    *,
    section: str,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> T:
    """Build ``cls`` (a dataclass) from defaults, ``[section]`` of ``config_file``, env vars and ``flags``.

    Flags whose value is ``None`` were not given and do not override. Field metadata may carry a
    ``"parse"`` callable (e.g. ``parse_size``) applied to text values from any source.

    Error handling: unknown keys in the file, unreadable files, TOML syntax errors and values that do not
    convert raise ``ConfigError`` naming the file/variable/flag, the key and the value.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    raw: dict[str, tuple[Any, str]] = {}
    if config_file is not None:
        try:
            doc = tomllib.loads(Path(config_file).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {config_file} is not UTF-8 text (byte {exc.start})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from None
        table = doc.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"config file {config_file}: [{section}] must be a table")
        for key, value in table.items():
            name = key.replace("-", "_")
            if name not in fields:
                known = ", ".join(sorted(k.replace("_", "-") for k in fields))
                raise ConfigError(f"config file {config_file}: unknown key {section}.{key} (known: {known})")
            raw[name] = (value, f"{config_file} [{section}] {key}")
    environ = env or {}
    for name in fields:
        var = env_name(section, name)
        if var in environ:
            raw[name] = (environ[var], f"environment variable {var}")
    for name, value in (flags or {}).items():
        if value is None:
            continue
        if name not in fields:
            raise TypeError(f"flag {name!r} is not a field of {cls.__name__}")
        raw[name] = (value, f"--{name.replace('_', '-')}")
    kwargs: dict[str, Any] = {}
    for name, (value, where) in raw.items():
        joiner = fields[name].metadata.get("join")
        if joiner is not None and isinstance(value, list | tuple):
            # A text setting that holds a list (``gateway``): a TOML array or a repeated flag, joined.
            value = joiner.join(str(v) for v in value)
        parse = fields[name].metadata.get("parse")
        if parse is not None and isinstance(value, str | int | float) and not isinstance(value, bool):
            try:
                value = parse(value)
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        kwargs[name] = _convert(value, hints[name], where=where)
        problem = _out_of_bounds(fields[name], kwargs[name])
        if problem:
            raise ConfigError(f"{where}: {problem}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{section}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{section}: {exc}") from None
