"""The one place psycopg's exceptions become nexusd's, and the URL's password is kept out.

No PostgreSQL error reaches a user unmapped: the backend (:mod:`.backend`) and
its readers (:mod:`.readers`) answer with what :func:`write_error` and
:func:`read_error` make of one: a fault of the server or the connection
(``OperationalError``) is ``unavailable``, anything else ``internal``.  Every
text naming the database goes through :meth:`Redactor.scrub`: libpq quotes
what it rejects, and a password in the URL must never reach a log line or
an error.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ...wire.errors import BadRequest, Internal, NexusError, Unavailable
from . import dsn

__all__ = [
    "NO_NUL",
    "Redactor",
    "lost",
    "one_line",
    "params",
    "read_error",
    "unreachable",
    "write_error",
]


def one_line(exc: BaseException) -> str:
    """An exception's text on one line (libpq's run over several)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(exc).__name__


def params(url: str) -> dict[str, Any]:
    """libpq's parameters of ``url`` (none when it does not parse)."""
    try:
        return conninfo_to_dict(url)
    except psycopg.Error:
        return {}


class Redactor:
    """Shows the URL without its password, and takes the password out of any text."""

    def __init__(self, url: str) -> None:
        self._url = url
        #: The URL as every log line and error shows it.
        self.shown = dsn.redact(url)
        self._password = str(params(url).get("password") or "")

    def scrub(self, text: str) -> str:
        if self._password and self._password in text:
            text = text.replace(self._password, dsn.HIDDEN)
        return text.replace(self._url, self.shown)

    def line(self, exc: BaseException) -> str:
        """``exc`` on one line, scrubbed."""
        return self.scrub(one_line(exc))


def write_error(exc: psycopg.Error, redactor: Redactor) -> NexusError:
    """A failed write's answer, the connection intact (a lost one: the backend's own)."""
    text = redactor.line(exc)
    if isinstance(exc, psycopg.OperationalError):
        return Unavailable(f"storage failure, nothing was written: {text}")
    return Internal(f"write failed, nothing was written: {text}")


#: PostgreSQL's text cannot hold U+0000 (SQLite's can): said of a write that
#: would store it and of a read that would look it up.
NO_NUL = "PostgreSQL storage cannot keep the NUL character (U+0000) in text"


def read_error(what: str, exc: psycopg.Error, redactor: Redactor) -> NexusError:
    """A failed read's error."""
    text = redactor.line(exc)
    if isinstance(exc, psycopg.DataError) and "NUL" in str(exc):  # psycopg's own refusal
        return BadRequest(f"{NO_NUL}, nor look it up")
    if isinstance(exc, psycopg.OperationalError):
        return Unavailable(f"{what} failed: {text}")
    return Internal(f"{what} failed: {text}")


def unreachable(down: str | None, wait: float) -> Unavailable:
    """A batch refused while the writer's connection is down (``down``: why)."""
    return Unavailable(
        f"the database connection is down ({down}); nothing was written;"
        f" reconnecting (next attempt in {wait:.1f} s)"
    )


def lost(committing: bool) -> Unavailable:
    """A batch whose connection was lost, during its COMMIT or before it."""
    if committing:
        return Unavailable(
            "the database connection was lost during COMMIT; this write may not have been stored"
        )
    return Unavailable("the database connection was lost; nothing was written")
