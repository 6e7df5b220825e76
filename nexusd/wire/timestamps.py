"""The one timestamp syntax the daemon accepts from a caller, and the form it stores.

A caller's ``timestamp`` is an RFC 3339 instant with an offset; the daemon
stores every instant in UTC, in its own fixed-width form, so stored
timestamps sort and read alike.  See ``docs/protocol.md``.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Final

from .errors import BadRequest
from .protocol import MAX_TIMESTAMP_CHARS

__all__ = ["parse_timestamp"]

#: RFC 3339 ``date-time``: date, ``T`` (or ``t`` or a space), time, an optional
#: fraction of 1-9 digits, then ``Z`` (``z``) or a ``±HH:MM`` offset.  ASCII digits only.
_TIMESTAMP: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?"
    r"(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)
_fromisoformat: Final = datetime.fromisoformat


def parse_timestamp(value: str, field: str = "timestamp") -> str:
    """A caller's timestamp as the server stores it, or :class:`BadRequest` naming ``field``.

    Accepted: an RFC 3339 instant (see ``docs/protocol.md``) of at most
    :data:`MAX_TIMESTAMP_CHARS` characters.  Returned: the same instant in UTC
    in the server's own format, ``2026-11-26T07:41:50.406180Z`` (a fraction
    beyond microseconds is truncated), so stored timestamps all sort and read
    alike.  A time without an offset is refused: it names no instant.
    """
    if len(value) > MAX_TIMESTAMP_CHARS:
        raise BadRequest(
            f"{field} is {len(value)} characters; the limit is {MAX_TIMESTAMP_CHARS}",
            field=field,
        )
    if _TIMESTAMP.fullmatch(value) is None:
        raise BadRequest(
            f"{field} must be an RFC 3339 date and time with Z or a ±HH:MM offset,"
            f" like 2026-11-26T07:41:50.406180Z or 2026-11-26T08:41:50+01:00; got {value!r}",
            field=field,
        )
    # The pattern fixed the shape; fromisoformat (C, and it truncates a long
    # fraction) checks the ranges: month 13, February 30, hour 24, second 60.
    try:
        if len(value) == 27 and value[10] == "T" and value[26] == "Z":
            _fromisoformat(value[:26])  # already the stored form
            return value
        when = _fromisoformat(value[:-1] + "Z" if value[-1] == "z" else value)
        offset = when.utcoffset()
        when = when.replace(tzinfo=None)
        if offset:
            when -= offset
    except (ValueError, OverflowError):
        raise BadRequest(
            f"{field} {value!r} is not a valid date and time in years 0001-9999 UTC",
            field=field,
        ) from None
    return when.isoformat(timespec="microseconds") + "Z"
