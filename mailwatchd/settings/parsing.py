"""Typed values from setting strings: booleans, durations, sizes, whole numbers and ports.

Every problem raises ConfigError naming the key and the fix.
"""

from __future__ import annotations

import math
import re

from mailwatchd.errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgG]i?[bB]?)?\s*$")
_SIZE_UNITS = {"k": 1024, "m": 1024**2, "g": 1024**3}


def parse_bool(key: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(key, f"{raw!r} is not a boolean", "use true or false")


def parse_duration(key: str, raw: str, *, minimum: float = 0.0) -> float:
    """Seconds from '30', '30s', '500ms', '5m', '2h' or '5d'."""
    match = _DURATION.match(raw)
    if not match:
        raise ConfigError(key, f"{raw!r} is not a duration", "use seconds, or a number with ms, s, m, h or d")
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not math.isfinite(seconds) or seconds < minimum:
        raise ConfigError(key, f"{raw!r} is too small", f"use at least {minimum:g} seconds")
    return seconds


def parse_size(key: str, raw: str) -> int:
    """Bytes from '1048576', '512K', '25M' or '1G' (binary units)."""
    match = _SIZE.match(raw)
    if not match:
        raise ConfigError(key, f"{raw!r} is not a size", "use bytes, or a number with K, M or G")
    unit = (match.group(2) or "")[:1].lower()
    size = int(match.group(1)) * _SIZE_UNITS.get(unit, 1)
    if size < 1024:
        raise ConfigError(key, f"{raw!r} is too small", "use at least 1K")
    return size


def parse_int(key: str, raw: str, *, minimum: int, maximum: int) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(key, f"{raw!r} is not a whole number", f"use a number from {minimum} to {maximum}") from None
    if not minimum <= value <= maximum:
        raise ConfigError(key, f"{value} is out of range", f"use a number from {minimum} to {maximum}")
    return value


def parse_port(key: str, raw: str) -> int:
    return parse_int(key, raw, minimum=1, maximum=65535)
