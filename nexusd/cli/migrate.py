"""``nexusd migrate --to postgresql://… [--db PATH]``: an SQLite database copied into PostgreSQL.

It works on files and a server, with no daemon; the copy is
:func:`nexusd.storage.postgres.copy.copy` (read-only on the SQLite file, ids
kept, rerunnable).  The SQLite file is found as ``nexusd serve`` finds it
(``--db``, else ``$NEXUSD_DB``, else ``--config``'s ``db``, else the default).
The URL is shown only redacted (never its password); credentials come from
libpq as for the daemon (``~/.pgpass``, ``PGPASSFILE``, ``PGPASSWORD``).

Progress goes to stderr: a bar redrawn in place on a terminal, else a line
at every tenth of the copy.

Exit 0 copied (or already copied: a rerun changes nothing); 1 not copied, or
copied in part (a rerun goes on): a nexusd daemon serves the SQLite file, the
target holds messages that are not this file's, psycopg is not installed,
the server cannot be reached or refused a statement; 2 usage: the URL is not
a PostgreSQL URL, the SQLite file is missing, not SQLite, not nexusd's, or of
a newer schema; 130 interrupted (Ctrl-C: whole chunks stay; rerun to go on).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from ..storage.schema import StorageError
from .output import EXIT_ERROR, EXIT_OK, EXIT_USAGE, fail, out

#: Redrawn at most this often on a terminal (seconds).
_REDRAW = 0.1


def add_command(sub: Any) -> None:
    """Declare ``migrate`` on ``sub``; it runs on a file and a server (``local=``)."""
    from .restore import DB_HELP

    m = sub.add_parser(
        "migrate",
        help="copy an SQLite database into PostgreSQL (ids kept; rerunnable)",
        description="Copy the SQLite database (any nexusd schema, v1 files included; opened"
        " read-only, never changed) into the PostgreSQL database at URL, creating nexusd's"
        " schema there: every message with its id, the sessions' retention and floors. Stop"
        " the daemon first. Rerun after an interruption: it goes on where it stopped.",
    )
    m.add_argument(
        "--to",
        required=True,
        metavar="URL",
        help="postgresql://[user@]host[:port]/dbname[?param=value...]; the password from"
        " ~/.pgpass, PGPASSFILE or PGPASSWORD, not the command line",
    )
    m.add_argument("--db", metavar="PATH", help=DB_HELP.replace("to replace", "to copy"))
    m.add_argument("--config", metavar="FILE", help="the daemon's TOML file, to find its db")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(local=cmd_migrate)


class _Progress:
    """On a terminal, ``[#####.....]  45%  90,000/200,000 messages``; else a line per tenth."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        try:
            self.tty = bool(stream.isatty())
        except (AttributeError, ValueError):
            self.tty = False
        self.shown = 0.0
        self.tenth = -1
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        frac = done / total if total else 1.0
        if self.tty:
            now = time.monotonic()
            if now - self.shown < _REDRAW and done < total:
                return
            self.shown = now
            filled = int(frac * 30)
            bar = "#" * filled + "." * (30 - filled)
            self.stream.write(f"\r[{bar}] {frac:4.0%}  {done:,}/{total:,} messages")
            self.drawn = True
        else:
            tenth = int(frac * 10)
            if tenth == self.tenth:
                return
            self.tenth = tenth
            self.stream.write(f"nexusd: migrate: {frac:4.0%}  {done:,}/{total:,} messages\n")
        self.stream.flush()

    def end(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def cmd_migrate(args: argparse.Namespace) -> int:
    from .restore import _database

    for name in ("socket", "timeout"):  # given before the command, they would be ignored
        if hasattr(args, f"global_{name}"):
            return fail(f"--{name} applies to client commands, not migrate", EXIT_USAGE)
    from ..storage.postgres.dsn import check, redact, require_driver

    try:
        url = check(args.to)
    except ValueError as exc:
        return fail(f"--to {exc}", EXIT_USAGE)
    try:
        require_driver()
    except StorageError as exc:
        return fail(exc.message, EXIT_ERROR)
    db = _database(args)
    if isinstance(db, int):
        return db
    from ..storage.postgres.copy import CopyRefused, Source, SourceBusy, SourceRefused

    try:
        source = Source(Path(db))
    except SourceRefused as exc:
        return fail(exc.message, EXIT_USAGE)
    except SourceBusy as exc:
        return fail(exc.message, EXIT_ERROR)
    progress = _Progress(sys.stderr)
    shown = redact(url)
    try:
        done = asyncio.run(_copy(url, source, progress))
    except CopyRefused as exc:
        progress.end()
        return fail(exc.message, EXIT_ERROR)
    except StorageError as exc:
        progress.end()
        return fail(f"{shown}: {exc.message}", EXIT_ERROR)
    except _Failed as exc:
        progress.end()
        return fail(
            f"{shown}: {exc} (once that is fixed, run it again: it goes on where it stopped)",
            EXIT_ERROR,
        )
    finally:
        source.close()
    progress.end()
    rate = done.inserted / done.seconds if done.seconds > 0 else 0.0
    value = {
        "db": str(db),
        "to": shown,
        "schema_version": done.schema_version,
        "messages": done.messages,
        "inserted": done.inserted,
        "already_there": done.messages - done.inserted,
        "sessions": done.sessions,
        "floors": done.floors,
        "retention": done.retention,
        "marks": done.marks,
        "seconds": round(done.seconds, 3),
        "rows_per_second": round(rate),
    }
    human = (
        f"copied {db} (schema {done.schema_version}) to {shown}: {done.messages:,} messages"
        f" in {done.sessions:,} sessions, {done.inserted:,} inserted now"
        f" ({done.messages - done.inserted:,} already there) in {done.seconds:.1f} s"
    )
    out(args, value, human)
    return EXIT_OK


class _Failed(Exception):
    """A psycopg error, worded as one line (libpq's first line; never the URL)."""


async def _copy(url: str, source: Any, progress: _Progress) -> Any:
    import psycopg
    import psycopg.conninfo

    from ..storage.postgres.copy import copy

    try:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            return await copy(conn, source, progress=progress)
    except psycopg.Error as exc:
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        password = psycopg.conninfo.conninfo_to_dict(url).get("password")
        if password:  # libpq does not quote it; made sure of anyway
            first = first.replace(str(password), "***")
        raise _Failed(first.removeprefix("connection failed: ")) from None
