"""``nexusd check``: the integrity verdict on a database file, with no daemon involved.

Exit 0 sound, 1 damaged (or unreadable), 2 when the path is not a nexusd
database at all (missing, a directory, empty, not SQLite, another program's),
or when the database is PostgreSQL (a URL in ``--db`` or, without ``--db``,
in ``$NEXUSD_STORAGE``): PostgreSQL has its own checks (``pg_amcheck``).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
from pathlib import Path
from typing import Any

from ..wire.paths import NoHomeDirectory
from .output import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    fail,
    is_url,
    not_a_regular_file,
    not_for_postgres,
    out,
    reason,
    safe,
)

#: Problems ``check`` prints before "… and N more" (``--json`` lists them all).
CHECK_SHOWN = 20


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0 sound, 1 damaged, 2 when the path is not a nexusd database at all."""
    from ..storage.schema import StorageError, describe, integrity_check
    from ..wire.paths import default_db_path

    instead = "check it with PostgreSQL's own tools (pg_amcheck)"
    if args.db and is_url(args.db):
        return not_for_postgres("check", "--db", args.db, instead)
    storage = os.environ.get("NEXUSD_STORAGE")
    if storage and not args.db:  # the daemon would not be using the file check would find
        return not_for_postgres("check", "NEXUSD_STORAGE", storage, instead)
    try:  # the default only when needed: it may need a home directory
        db = Path(args.db or os.environ.get("NEXUSD_DB") or default_db_path())
    except NoHomeDirectory as exc:
        return fail(exc.message, EXIT_USAGE)
    if db.is_dir():
        return fail(f"{db} is a directory, not a database file", EXIT_USAGE)
    if not db.exists():
        return fail(f"{db} does not exist", EXIT_USAGE)
    problem = not_a_regular_file(db)
    if problem is not None:  # SQLite would block on a fifo, read a device
        return fail(problem, EXIT_USAGE)
    try:
        if db.stat().st_size == 0:  # SQLite would read it as an empty database
            return fail(f"{db} is an empty file, not a nexusd database", EXIT_USAGE)
        problems = integrity_check(db)
        info = _describe(db, describe) if problems == ["ok"] else {}
    except StorageError as exc:  # not SQLite, or another program's: one line, no verdict
        return fail(exc.message, EXIT_USAGE)
    except OSError as exc:
        return fail(f"cannot read {db}: {reason(exc)}", EXIT_ERROR)
    except sqlite3.Error as exc:
        problems, info = [str(exc)], {}
    ok = problems == ["ok"]
    # SQLite puts several problems in one row, separated by newlines.
    lines = [] if ok else [ln for row in problems for ln in row.splitlines() if ln.strip()]
    verdict = {"db": str(db), "ok": ok, "problems": lines, **info}
    if ok:
        human = (
            f"{safe(str(db))}: ok (schema {info['schema_version']}, {info['messages']} messages "
            f"in {info['sessions']} sessions)"
        )
    else:
        shown = [f"  {safe(line)}" for line in lines[:CHECK_SHOWN]]
        if len(lines) > CHECK_SHOWN:
            shown.append(f"  … and {len(lines) - CHECK_SHOWN} more")
        human = f"{safe(str(db))}: DAMAGED\n" + "\n".join(shown)
    out(args, verdict, human)
    return EXIT_OK if ok else EXIT_ERROR


def _describe(db: Path, describe: Any) -> dict[str, int]:
    """What ``check`` reports of a sound file; one without nexusd's table is not ours."""
    from ..storage.schema import TABLE, StorageError

    try:
        return dict(describe(db))
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        raise StorageError(
            f"{db} is an SQLite database without nexusd's table ({TABLE}), not a nexusd database"
        ) from None
