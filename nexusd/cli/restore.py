"""``nexusd restore BACKUP.db [--db PATH] [--no-keep]``: a checked backup in place of the database.

It works on files, with no daemon, and refuses while one holds the database;
the checks and the atomic replace are :func:`nexusd.storage.restore.restore`.
The database is found exactly as ``nexusd serve`` finds it (``--db``, else
``$NEXUSD_DB``, else ``--config``'s ``db``, else the default path).

Exit 0 restored; 1 not restored, the database as it was: the backup is
damaged, a daemon (or another restore) holds the database, another program
has it open, or a file operation failed; 2 the backup is not one this nexusd
can restore (missing, a directory or other non-file, empty, not SQLite,
another program's, a newer schema, a schema other than the one nexusd makes
at its version (a trigger, view, index or table of another's, or one of
nexusd's missing or changed), changes left in its own ``-wal``, the database
itself), or the database path or configuration is unusable, including a
configuration whose ``storage`` is PostgreSQL (from ``--config`` or
``$NEXUSD_STORAGE``) when no ``--db`` names a file: a PostgreSQL database is
restored with ``pg_restore``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

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

DB_HELP = (
    "the database to replace (default: where `nexusd serve` finds it: $NEXUSD_DB, else the"
    " --config file's db, else $STATE_DIRECTORY/nexus.db, else"
    " $XDG_STATE_HOME/nexusd/nexus.db, else ~/.local/state/nexusd/nexus.db)"
)


def add_command(sub: Any) -> None:
    """Declare ``restore`` on ``sub``; it runs on files, with ``set_defaults(local=...)``."""
    r = sub.add_parser(
        "restore",
        help="replace the database with a backup (stop the daemon first)",
        description="Check BACKUP.db (its schema exactly nexusd's, nothing else; integrity),"
        " then replace the"
        " database with a copy of it, atomically, keeping the previous one as DB.bak."
        " Refused while a daemon holds the database; a daemon started during the restore"
        " is refused, not made to wait.",
    )
    r.add_argument(
        "backup",
        metavar="BACKUP.db",
        help="a file written by `nexusd backup` (or a stopped daemon's or the v1 store's database)",
    )
    r.add_argument("--db", metavar="PATH", help=DB_HELP)
    r.add_argument("--config", metavar="FILE", help="the daemon's TOML file, to find its db")
    r.add_argument(
        "--no-keep",
        action="store_true",
        help="discard the previous database instead of keeping it as DB.bak",
    )
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.set_defaults(local=cmd_restore)


def cmd_restore(args: argparse.Namespace) -> int:
    from ..storage.restore import BadBackup, restore
    from ..storage.schema import SCHEMA_VERSION, StorageError

    for name in ("socket", "timeout"):  # given before the command, they would be ignored
        if hasattr(args, f"global_{name}"):
            return fail(f"--{name} applies to client commands, not restore", EXIT_USAGE)
    db = _database(args)
    if isinstance(db, int):
        return db
    backup = Path(args.backup)
    problem = not_a_regular_file(backup)
    if problem is not None:  # worded as `check` words it: "a fifo", "a socket"
        return fail(problem, EXIT_USAGE)
    if db.is_dir():
        return fail(f"{db} is a directory, not a database file", EXIT_USAGE)
    problem = not_a_regular_file(db)
    if problem is not None:
        return fail(problem, EXIT_USAGE)
    try:
        done = restore(backup, db, keep=not args.no_keep)
    except BadBackup as exc:
        return fail(exc.message, EXIT_USAGE)
    except StorageError as exc:  # RestoreRefused
        return fail(exc.message, EXIT_ERROR)
    except OSError as exc:
        return fail(f"not restored: {reason(exc)}", EXIT_ERROR)
    version = done.schema_version
    what = f"schema {version}, {done.messages} messages in {done.sessions} sessions"
    if version < SCHEMA_VERSION:
        what += f"; nexusd serve upgrades it to {SCHEMA_VERSION}"
    human = f"restored {db} from {backup} ({what}); "
    if done.kept is not None:
        human += f"kept the previous database as {done.kept}"
        if done.kept_beside:
            names = ", ".join(str(p) for p in done.kept_beside)
            human += f" (it could not be checkpointed: its log is kept beside it as {names})"
    elif done.previous:
        human += "discarded the previous database (--no-keep)"
    else:
        human += "there was no database there before"
    if done.unclean_pid is not None and done.previous:
        where = f"are in {done.kept}" if done.kept is not None else "were discarded with it"
        human += f"; the daemon before (pid {done.unclean_pid}) had not stopped cleanly: its"
        human += f" last commits {where}"
    verdict = {
        "db": str(done.db),
        "backup": str(backup),
        "schema_version": version,
        "messages": done.messages,
        "sessions": done.sessions,
        "kept": None if done.kept is None else str(done.kept),
        "kept_beside": [str(p) for p in done.kept_beside],
        "previous": done.previous,
    }
    out(args, verdict, safe(human))
    return EXIT_OK


def _database(args: argparse.Namespace) -> Path | int:
    """The database path as ``nexusd serve`` resolves it, or the exit code of a mistake."""
    from ..daemon.config import ConfigError, load_config
    from ..wire.paths import NoHomeDirectory

    if args.config is not None:
        problem = not_a_regular_file(args.config)
        if problem is not None:
            return fail(f"config file {problem}", EXIT_USAGE)
    instead = "restore PostgreSQL from pg_dump's file with pg_restore (docs/scaling.md)"
    if args.db and is_url(args.db):
        return not_for_postgres("restore", "--db", args.db, instead)
    try:
        cfg = load_config(file=args.config, flags={"db": args.db})
        if cfg.storage and not args.db:
            source = "NEXUSD_STORAGE" if os.environ.get("NEXUSD_STORAGE") else "the configuration"
            return not_for_postgres("restore", source, cfg.storage, instead)
        return cfg.db
    except (ConfigError, NoHomeDirectory) as exc:
        return fail(exc.message, EXIT_USAGE)
    except (OSError, ValueError) as exc:
        return fail(f"cannot load the configuration: {exc}", EXIT_USAGE)
