"""Durations as people write them (``30d``, ``12h``, ``90m``, ``45s``, ``1.5``) and back.

Retention by age takes a duration in the configuration, the CLI and the
Python clients; the wire carries plain seconds.  One parser for all of them,
so ``30d`` means the same everywhere.
"""

from __future__ import annotations

import math
import re
from typing import Final

__all__ = ["MAX_DURATION", "format_duration", "parse_duration"]

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_FORM: Final = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhdw]?)\s*", re.IGNORECASE)
#: The longest duration accepted: 100 years (past that, say 0: no limit).
MAX_DURATION: Final = 100 * 365 * 86400


def parse_duration(value: str | float) -> float:
    """Seconds in ``value``: a number of seconds, or digits with one unit of s, m, h, d, w.

    0 means no limit.  Raises ValueError, with a message fit for a user, for
    anything else, a negative value, or more than :data:`MAX_DURATION`.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _FORM.fullmatch(value)
        if match is None:
            raise ValueError(
                f"{value!r} is not a duration: write seconds, or a number with s, m, h, d or w"
                " (e.g. 30d, 12h, 90m)"
            )
        seconds = float(match.group(1)) * _UNITS[(match.group(2) or "s").lower()]
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} is not a duration (0 or more seconds)")
    if seconds > MAX_DURATION:
        raise ValueError(f"{value!r} is longer than 100 years (use 0 for no limit)")
    return seconds


def format_duration(seconds: float) -> str:
    """``seconds`` in the largest unit that divides it (``2592000`` → ``30d``); 0 → ``0``."""
    if seconds == 0:
        return "0"
    for unit in ("w", "d", "h", "m"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
