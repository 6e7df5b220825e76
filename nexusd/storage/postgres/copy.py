"""Moving up: an SQLite nexusd database copied into PostgreSQL (``nexusd migrate``).

The source is opened read-only (``mode=ro``) and never migrated: a file of
any schema version is read as it is, the columns a v1 file lacks (``meta``,
``idem_key``) read as NULL, the v4 tables (floors, retention, marks) copied
when present.  One SQLite read transaction spans the whole copy, so what is
copied is one consistent snapshot of the file.

**Ids are kept.**  The id sequence is set past the source's highest id ever
handed out (``sqlite_sequence``, not only the highest present) *first*, in
the first transaction: a daemon already serving the target meanwhile takes
ids above every copied one.  The rows follow in id order, :data:`CHUNK` per
transaction, each under the database-wide write lock (so a copy never
interleaves with a daemon's batch) and with its sessions' counts
(``nexus_sessions``: visible rows, floors applied) in the same transaction.

**Rerunnable.**  A copy cut short (Ctrl-C, ``kill -9``, a lost connection)
leaves whole chunks; a rerun goes on after the highest id the target holds,
with ``ON CONFLICT DO NOTHING`` besides, and the small tables are inserted
``ON CONFLICT DO NOTHING``: a rerun of a finished copy changes nothing.

**The rule for a non-empty target:** every message it holds must be the
source's message of the same id, equal in every column (a copy of this file,
whole or cut short, possibly thinned by a daemon's retention since).  Any
other message (an id the file does not have, different content, an id above
the file's highest) is refused before anything is written: the copy would
mix two histories.  The check reads the target's messages once.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import psycopg

from ..files import DbFiles
from ..schema import SCHEMA_VERSION, StorageError, reader_uri
from . import schema

__all__ = ["CHUNK", "CopyRefused", "Copied", "Source", "SourceBusy", "SourceRefused", "copy"]

logger = logging.getLogger(__name__)

#: Rows per PostgreSQL transaction (each holds the write lock for one chunk).
CHUNK: Final = 5000
#: The columns copied, in both databases' names and this order.
COLUMNS: Final = ("id", "role", "content", "timestamp", "session_tag", "meta", "idem_key")
_MAGIC: Final = b"SQLite format 3\x00"

#: ``progress(done, total)``: messages of the source at or below the copy's position.
Progress = Callable[[int, int], None]


class SourceRefused(StorageError):
    """The SQLite file is not one to copy: missing, not SQLite, not nexusd's, too new."""

    code = "bad_request"


class SourceBusy(StorageError):
    """A nexusd daemon serves the SQLite file: what it stores after the snapshot would be lost."""


class CopyRefused(StorageError):
    """The target holds messages that are not this file's: nothing was written."""

    code = "conflict"


@dataclass(frozen=True, slots=True)
class Copied:
    """What :func:`copy` did."""

    #: Messages in the source (its snapshot).
    messages: int
    #: Of them, inserted by this run; the rest were there already.
    inserted: int
    sessions: int
    schema_version: int
    floors: int
    retention: int
    marks: int
    #: The id sequence's value afterwards (the next id is above it).
    next_id_after: int
    seconds: float


class Source:
    """An SQLite nexusd database opened read-only, inside one read transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        _check_file(path)
        self._locks = _hold_off_daemons(path)
        try:
            self.conn = sqlite3.connect(reader_uri(path), uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            _unlock(self._locks)
            raise SourceRefused(f"cannot open {path}: {exc}") from None
        try:
            self.conn.execute("PRAGMA query_only = 1")
            self.conn.execute("BEGIN")  # one snapshot for everything read below
            tables = {
                str(r[0])
                for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            if "nexus_messages" not in tables:
                raise SourceRefused(
                    f"{path} is not a nexusd database (it has no nexus_messages table)"
                )
            self.version = int(self.conn.execute("PRAGMA user_version").fetchone()[0])
            if self.version > SCHEMA_VERSION:
                raise SourceRefused(
                    f"{path} has schema version {self.version}, newer than this nexusd"
                    f" reads ({SCHEMA_VERSION}); upgrade nexusd"
                )
            have = {str(r[1]) for r in self.conn.execute("PRAGMA table_info(nexus_messages)")}
            # A v1 file has neither meta nor idem_key: read as NULL.
            self._select = ", ".join(c if c in have else f"NULL AS {c}" for c in COLUMNS)
            self.tables = tables
            self.count, self.max_id = self.conn.execute(
                "SELECT count(*), coalesce(max(id), 0) FROM nexus_messages"
            ).fetchone()
            seq = 0
            if "sqlite_sequence" in tables:
                row = self.conn.execute(
                    "SELECT seq FROM sqlite_sequence WHERE name = 'nexus_messages'"
                ).fetchone()
                seq = int(row[0]) if row is not None and row[0] is not None else 0
            #: The highest id the file ever handed out (AUTOINCREMENT never reuses one).
            self.last_id = max(int(self.max_id), seq)
        except sqlite3.Error as exc:
            self.close()
            raise SourceRefused(f"cannot read {path}: {exc}") from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        # SQLite's own locks are POSIX locks, dropped when *any* descriptor of the
        # file closes: the connection goes first, then the descriptors of ours.
        self.conn.close()
        _unlock(self._locks)

    def rows(self, after: int, upto: int | None = None) -> Iterator[list[tuple[Any, ...]]]:
        """The messages with ``after < id (<= upto)``, in id order, :data:`CHUNK` at a time."""
        while True:
            if upto is None:
                sql = f"SELECT {self._select} FROM nexus_messages WHERE id > ? ORDER BY id LIMIT ?"
                args: tuple[int, ...] = (after, CHUNK)
            else:
                sql = (
                    f"SELECT {self._select} FROM nexus_messages WHERE id > ? AND id <= ?"
                    " ORDER BY id LIMIT ?"
                )
                args = (after, upto, CHUNK)
            chunk = self.conn.execute(sql, args).fetchall()
            if not chunk:
                return
            yield chunk
            after = int(chunk[-1][0])

    def below(self, upto: int) -> int:
        """How many messages have ``id <= upto``."""
        return int(
            self.conn.execute(
                "SELECT count(*) FROM nexus_messages WHERE id <= ?", (upto,)
            ).fetchone()[0]
        )

    def table(self, name: str, columns: str) -> list[tuple[Any, ...]]:
        """A small v4 table's rows, or none when the file predates it."""
        if name not in self.tables:
            return []
        return self.conn.execute(f"SELECT {columns} FROM {name}").fetchall()


def _check_file(path: Path) -> None:
    if not path.exists():
        raise SourceRefused(f"{path} does not exist")
    if path.is_dir():
        raise SourceRefused(f"{path} is a directory, not a database file")
    if not path.is_file():
        raise SourceRefused(f"{path} is not a regular file")
    try:
        with path.open("rb") as fh:
            magic = fh.read(16)
    except OSError as exc:
        raise SourceRefused(f"cannot read {path}: {exc.strerror or exc}") from None
    if magic != _MAGIC:
        raise SourceRefused(f"{path} is not an SQLite database")


def _hold_off_daemons(path: Path) -> list[int]:
    """Share the daemon's single-instance locks (:class:`~nexusd.storage.files.InstanceLock`).

    A daemon serving the file holds them exclusively: refused, since what it
    stores after the snapshot would not be copied.  Held shared for the whole
    copy, they make a daemon started meanwhile refuse to start instead.
    """
    files = DbFiles.of(path)
    fds: list[int] = []
    lock_fd: int | None = None
    try:
        for target in (files.lock, files.db):
            try:
                fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue  # no .lock: no daemon has ever served it (a v1 file)
            fds.append(fd)
            if target == files.lock:
                lock_fd = fd
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = ""
                if lock_fd is not None:  # the daemon writes its pid there
                    holder = os.pread(lock_fd, 64, 0).decode(errors="replace").strip()
                raise SourceBusy(
                    f"a nexusd daemon (pid {holder or 'unknown'}) serves {path}; stop it first:"
                    " what it stores after the copy begins would not be copied"
                ) from None
    except OSError as exc:
        _unlock(fds)
        raise SourceRefused(f"cannot open {path}: {exc.strerror or exc}") from None
    except BaseException:
        _unlock(fds)
        raise
    return fds


def _unlock(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()


_INSERT: Final = (
    "WITH ins AS (INSERT INTO nexus_messages"
    " (id, role, content, timestamp, session_tag, meta, idem_key)"
    " SELECT * FROM unnest(%b::bigint[], %b::text[], %b::text[], %b::text[], %b::text[],"
    " %b::text[], %b::text[])"
    " ON CONFLICT (id) DO NOTHING RETURNING id, session_tag),"
    " counted AS (INSERT INTO nexus_sessions (session_tag, messages)"
    f" SELECT session_tag, count(*) FROM ins WHERE {schema.visible('ins')}"
    " GROUP BY session_tag"
    " ON CONFLICT (session_tag) DO UPDATE"
    " SET messages = nexus_sessions.messages + excluded.messages)"
    " SELECT count(*) FROM ins"
)


async def copy(
    conn: psycopg.AsyncConnection[Any],
    source: Source,
    *,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.time,
) -> Copied:
    """Copy ``source`` into the database of ``conn`` (autocommit; migrated here first).

    Raises :class:`CopyRefused` (nothing written) when the target holds
    messages that are not the source's; psycopg errors go up unmapped.
    """
    started = time.monotonic()
    await schema.migrate(conn)
    resume = await _check_target(conn, source)
    floors = source.table("nexus_floors", "session_tag, below_id")
    retention = source.table("nexus_retention", "session_tag, max_messages, max_age")
    marks = source.table("nexus_marks", "second, last_id, at")
    if "nexus_marks" not in source.tables and source.max_id:
        # As SQLite's migration 4 does: the rows already there count as committed now.
        now = clock()
        marks = [(int(now), int(source.max_id), now)]
    async with conn.transaction():
        await conn.execute(schema.TAKE_WRITE_LOCK)
        next_id_after = await _bump_sequence(conn, source.last_id)
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO nexus_floors (session_tag, below_id) VALUES (%s, %s)"
                " ON CONFLICT DO NOTHING",
                floors,
            )
            await cur.executemany(
                "INSERT INTO nexus_retention (session_tag, max_messages, max_age)"
                " VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                retention,
            )
            if "nexus_marks" not in source.tables and marks:
                # Only once: a rerun at another second must not add a second mark.
                await cur.execute(
                    "SELECT 1 FROM nexus_marks WHERE last_id >= %s LIMIT 1", (source.max_id,)
                )
                if await cur.fetchone() is not None:
                    marks = []
            await cur.executemany(
                "INSERT INTO nexus_marks (second, last_id, at) VALUES (%s, %s, %s)"
                " ON CONFLICT DO NOTHING",
                marks,
            )
    done = source.below(resume)
    inserted = 0
    if progress is not None:
        progress(done, source.count)
    for chunk in source.rows(resume):
        columns = [list(c) for c in zip(*chunk, strict=True)]
        try:
            async with conn.transaction():
                await conn.execute(schema.TAKE_WRITE_LOCK)
                cur = await conn.execute(_INSERT, columns)
                row = await cur.fetchone()
        except psycopg.DataError:
            _refuse_unstorable(chunk)
            raise
        inserted += int(row[0]) if row is not None else 0
        done += len(chunk)
        if progress is not None:
            progress(done, source.count)
    cur = await conn.execute("SELECT count(*) FROM nexus_sessions")
    row = await cur.fetchone()
    return Copied(
        messages=int(source.count),
        inserted=inserted,
        sessions=int(row[0]) if row is not None else 0,
        schema_version=source.version,
        floors=len(floors),
        retention=len(retention),
        marks=len(source.table("nexus_marks", "second")),
        next_id_after=next_id_after,
        seconds=time.monotonic() - started,
    )


def _refuse_unstorable(chunk: list[tuple[Any, ...]]) -> None:
    """A NUL character: SQLite text may hold one, PostgreSQL text cannot."""
    for row in chunk:
        if any(isinstance(v, str) and "\x00" in v for v in row):
            raise CopyRefused(
                f"stopped at message id {row[0]}: it holds a NUL character, which PostgreSQL"
                " text cannot store (the chunks before its chunk are copied)"
            )


async def _bump_sequence(conn: psycopg.AsyncConnection[Any], last_id: int) -> int:
    """Set the id sequence at or past ``last_id`` (never back); return its value."""
    cur = await conn.execute("SELECT last_value, is_called FROM nexus_messages_id_seq")
    row = await cur.fetchone()
    assert row is not None
    current = int(row[0]) if row[1] else 0
    if last_id > current:
        await conn.execute("SELECT setval('nexus_messages_id_seq', %s, true)", (last_id,))
        return last_id
    return current


async def _check_target(conn: psycopg.AsyncConnection[Any], source: Source) -> int:
    """Check the rule of the module doc; return the target's highest id (0: empty)."""
    highest = 0
    after = 0
    while True:
        cur = await conn.execute(
            f"SELECT {', '.join(COLUMNS)} FROM nexus_messages WHERE id > %s ORDER BY id LIMIT %s",
            (after, CHUNK),
        )
        have = await cur.fetchall()
        if not have:
            return highest
        last = int(have[-1][0])
        if last > source.max_id:
            raise CopyRefused(
                "not copied: the target already holds messages this file does not"
                f" (id {last} is above the file's highest, {source.max_id}):"
                " migrate into an empty database"
            )
        theirs = {int(r[0]): r for chunk in source.rows(after, last) for r in chunk}
        for mine in have:
            other = theirs.get(int(mine[0]))
            if other is None or tuple(other) != tuple(mine):
                what = "is not in this file" if other is None else "differs from this file's"
                raise CopyRefused(
                    "not copied: the target already holds messages that are not this"
                    f" file's (message id {mine[0]} {what}): migrate into an empty database"
                )
        highest = after = last
