"""The ``storage`` URL: checked at start-up, redacted wherever it is shown.

``storage = "postgresql://user@host/dbname?sslmode=verify-full"`` (or
``postgres://``) names the database; the query string takes any libpq
parameter (``host=/run/postgresql`` for a socket directory, ``passfile=``,
``sslrootcert=``, ``target_session_attrs=``...), and several ``host:port``
pairs separated by commas give libpq's failover.  libpq does the connecting,
so its own credentials apply: ``~/.pgpass`` or ``PGPASSFILE``, ``PGPASSWORD``,
``PGSERVICE``.

A password may still arrive in the URL (from an ``EnvironmentFile``, say), so
nothing ever shows the URL as given: every log line, error and ``stats`` field
shows :func:`redact` of it.  :func:`check` words its errors without the
password too (libpq's own messages quote the part they reject, which may be
the password).

Imports no driver: the daemon's configuration checks the URL whether or not
psycopg is installed; :func:`require_driver` says, in one line, what to install.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import parse_qsl

from ..schema import StorageError

__all__ = ["SCHEMES", "MissingDriver", "check", "has_password", "redact", "require_driver"]

#: What a ``storage`` URL may begin with (libpq accepts both).
SCHEMES: Final = ("postgresql://", "postgres://")
#: Where the password was, in a redacted URL.
HIDDEN: Final = "***"
_PORT: Final = re.compile(r"\d{1,5}")
_OTHER_USER: Final = re.compile(r"^(\w[\w+.-]*://[^:/?#@]*):.*@")
_KEYWORD: Final = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")
#: Values libpq checks only when it connects; checked here so a typo stops start-up.
_CHOICES: Final = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "target_session_attrs": (
        "any",
        "read-write",
        "read-only",
        "primary",
        "standby",
        "prefer-standby",
    ),
}
_EXAMPLE: Final = "e.g. postgresql://nexusd@db.example.com/nexus?sslmode=verify-full"


class MissingDriver(StorageError):
    """``storage`` names PostgreSQL but the ``postgres`` extra is not installed."""


def _split(url: str) -> tuple[str, str, str, str]:
    """``scheme://``, the user part (before ``@``, or ""), the hosts, and ``/path?query``.

    The user part ends at the last ``@`` before the first ``/`` (libpq's rule,
    but taking the last ``@`` hides more); a ``/`` left unencoded in a password
    puts its ``@`` in the path, so that ``@`` counts too: when in doubt, more is
    hidden, never less.
    """
    scheme = next(s for s in SCHEMES if url.startswith(s))
    rest = url[len(scheme) :]
    slash = rest.find("/")
    at = (rest if slash < 0 else rest[:slash]).rfind("@")
    if at < 0 and slash >= 0:
        query = rest.find("?", slash)
        at = rest[: query if query >= 0 else len(rest)].rfind("@")
    user, after = (rest[:at], rest[at + 1 :]) if at >= 0 else ("", rest)
    cut = min((i for i in (after.find("/"), after.find("?")) if i >= 0), default=len(after))
    return scheme, user + ("@" if at >= 0 else ""), after[:cut], after[cut:]


def _is_url(text: str) -> bool:
    return text.startswith(SCHEMES)


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (in the user part and in ``password=``).

    Safe on anything: text that is not a URL keeps nothing after a
    ``password=`` (a libpq ``key=value`` string); a URL with no password is
    returned unchanged.
    """
    if not _is_url(url):  # another scheme's user:password@, a key=value string
        url = _OTHER_USER.sub(rf"\g<1>:{HIDDEN}@", url)
        return _KEYWORD.sub(rf"\g<1>{HIDDEN}", url)
    scheme, user, hosts, tail = _split(url)
    if ":" in user:
        user = f"{user.partition(':')[0]}:{HIDDEN}@"
    path, mark, query = tail.partition("?")
    if mark:
        parts = query.split("&")
        query = "&".join(
            f"password={HIDDEN}" if p.partition("=")[0] == "password" else p for p in parts
        )
    return scheme + user + hosts + path + mark + query


def has_password(url: str) -> bool:
    """Whether ``url`` carries a password (which then shows in ``ps`` when given as a flag)."""
    return redact(url) != url


def check(url: str) -> str:
    """``url`` when it is a PostgreSQL URL libpq can read, else ValueError with one line.

    The line never holds the password, so it can go to the log as it is.
    """
    if not _is_url(url):
        start = redact(url)
        shown = start if len(start) <= 40 else start[:37] + "..."
        raise ValueError(f"must be a postgresql:// (or postgres://) URL, {_EXAMPLE}; got {shown!r}")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise ValueError(
            f"{redact(url)!r} has spaces or control characters: percent-encode them (%20)"
        )
    _, user, hosts, tail = _split(url)
    if "@" in user[:-1] or "/" in user:  # libpq would read the user part differently
        raise ValueError(
            f"{redact(url)!r}: percent-encode '@' and '/' in the user name and password (%40, %2F)"
        )
    for pair in hosts.split(","):
        host, colon, port = pair.rpartition(":") if not pair.endswith("]") else (pair, "", "")
        if colon and port and not (_PORT.fullmatch(port) and 0 < int(port) < 65536):
            raise ValueError(f"{redact(url)!r}: port {port!r} of {host!r} is not a port number")
    for key, value in parse_qsl(tail.partition("?")[2], keep_blank_values=True):
        allowed = _CHOICES.get(key)
        if allowed and value not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}, not {value!r}")
        if key == "port" and not all(_PORT.fullmatch(p) for p in value.split(",")):
            raise ValueError(f"port must be a port number, not {value!r}")
    _libpq_check(url)
    return url


def _libpq_check(url: str) -> None:
    """What libpq's own parser rejects (an unknown parameter, bad percent-encoding).

    Skipped without psycopg (:func:`require_driver` then stops the daemon).
    libpq quotes the token it rejects, so the redacted URL is parsed first for
    the message; what only the full URL fails on is the password itself.
    """
    try:
        from psycopg import ProgrammingError
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        return
    for text, whose in ((redact(url), ""), (url, "the password: ")):
        try:
            conninfo_to_dict(text)
        except ProgrammingError as exc:
            if whose:  # libpq's words would quote the password
                raise ValueError(
                    "the password in the URL is not valid URL text: percent-encode"
                    " reserved characters (% as %25, @ as %40, / as %2F)"
                ) from None
            raise ValueError(str(exc).strip().splitlines()[0]) from None


def require_driver() -> None:
    """Raise :class:`MissingDriver` (one line: what to install) unless psycopg and its pool load."""
    for package in ("psycopg", "psycopg_pool"):
        try:
            __import__(package)
        except ImportError as exc:
            missing = isinstance(exc, ModuleNotFoundError) and exc.name == package
            why = "" if missing else f" (importing it failed: {exc})"
            raise MissingDriver(
                f"storage = postgresql://… needs {package}{why}: pip install 'nexusd[postgres]'"
                " (from nexusd's checkout: pip install '.[postgres]')"
            ) from None
