"""The SQLite schema: the v1 table, numbered migrations and connection set-up.

(The contract every backend keeps is :class:`~nexusd.storage.base.Storage`.)

The table ``nexus_messages`` is exactly what the v1 store created, so a v1
``nexus.db`` opens in place.  Everything nexusd adds comes through numbered
migrations recorded in ``PRAGMA user_version``; none rewrites the table.  This
module is synchronous on purpose: it runs inside the writer's thread at start-up
and in tools (``nexusd check``) that need no event loop.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import msgspec

from ..wire.errors import NexusError
from ..wire.protocol import Message

logger = logging.getLogger(__name__)

TABLE: Final = "nexus_messages"
#: The columns of a message, in the order :func:`message_of` reads them.
MESSAGE_COLUMNS: Final = "id, role, content, timestamp, session_tag, meta"
#: msgpack bytes per message map besides its strings (keys, headers, the id), with room.
ROW_OVERHEAD: Final = 96


def row_size(alias: str = "") -> str:
    """SQL for an upper bound of a row's size in a reply (``alias``: its table's, with the dot).

    Its strings' bytes, meta at three times its JSON (a float like 0.5 is 3
    bytes of JSON, 9 of msgpack), and the map's overhead.
    """
    a = alias
    return (
        f"length(CAST({a}content AS BLOB)) + length(CAST({a}role AS BLOB))"
        f" + length(CAST({a}timestamp AS BLOB)) + length(CAST({a}session_tag AS BLOB))"
        f" + 3 * coalesce(length(CAST({a}meta AS BLOB)), 0) + {ROW_OVERHEAD}"
    )


#: For a query of one session: its rows at or above its floor (one more ``?``,
#: the session's tag, bound after the others of the clause it joins).
VISIBLE_ONE: Final = "id >= coalesce((SELECT below_id FROM nexus_floors WHERE session_tag = ?), 0)"


def visible(table: str = "nexus_messages") -> str:
    """For a query over many sessions (see :mod:`.floors`): ``table``'s row is visible."""
    return (
        f"{table}.id >= coalesce((SELECT fl.below_id FROM nexus_floors AS fl"
        f" WHERE fl.session_tag = {table}.session_tag), 0)"
    )


#: How long a connection waits for another's lock before SQLITE_BUSY (ms).
BUSY_TIMEOUT_MS: Final = 5000
_decode_meta = msgspec.json.decode

# Migration 1 is the v1 store's DDL verbatim: on a v1 database it is a no-op.
_V1_DDL: Final = """\
CREATE TABLE IF NOT EXISTS nexus_messages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    role        TEXT    NOT NULL,
    content     TEXT    NOT NULL,
    timestamp   TEXT    NOT NULL,
    session_tag TEXT    NOT NULL DEFAULT 'nexus'
);
CREATE INDEX IF NOT EXISTS idx_nexus_session ON nexus_messages(session_tag);
CREATE INDEX IF NOT EXISTS idx_nexus_ts ON nexus_messages(timestamp);
"""

# Migration 2: per-message metadata.  Every query of the daemon is a range of
# one session in id order, and v1's own idx_nexus_session serves it as is: an
# index entry ends with the rowid, which *is* id, so (session_tag) orders by id
# within a tag and seeks on id ranges with no second index.  Nothing reads by
# timestamp: dropping idx_nexus_ts saves an index update per insert and per
# pruned row (v1, if ever run again on this file, recreates it).
_V2_DDL: Final = """\
ALTER TABLE nexus_messages ADD COLUMN meta TEXT;
CREATE INDEX IF NOT EXISTS idx_nexus_session ON nexus_messages(session_tag);
DROP INDEX IF EXISTS idx_nexus_ts;
"""

# Migration 3: idempotency keys.  A retried append carrying the key of a row
# its session still holds returns that row's id instead of storing a copy.
# The partial index costs nothing for rows without a key, and leads with the
# key rather than the tag: clients number their keys in order, so a batch's
# new entries land together at the end of the index, not on a page per session.
_V3_DDL: Final = """\
ALTER TABLE nexus_messages ADD COLUMN idem_key TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS idx_nexus_idem ON nexus_messages(idem_key, session_tag)
    WHERE idem_key IS NOT NULL;
"""

# Migration 4: a conversation's life (issue 13).
# - nexus_floors: a session's rows below ``below_id`` are gone (``clear``, a
#   lowered retention) though not yet deleted: every read hides them at once,
#   and the sweep deletes them in small transactions that never stall appends.
# - nexus_retention: a session's own retention, overriding the daemon's.
# - nexus_marks: when rows were committed, for retention by age, at one row
#   per second of writing rather than a column per message: every row with
#   ``id <= last_id`` was committed at or before ``at`` (Unix seconds).  Rows
#   stored before this migration count as committed by it.
_V4_DDL: Final = """\
CREATE TABLE IF NOT EXISTS nexus_floors (
    session_tag TEXT PRIMARY KEY,
    below_id    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nexus_retention (
    session_tag  TEXT PRIMARY KEY,
    max_messages INTEGER,
    max_age      REAL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nexus_marks (
    second  INTEGER PRIMARY KEY,
    last_id INTEGER NOT NULL,
    at      REAL    NOT NULL
);
INSERT OR IGNORE INTO nexus_marks (second, last_id, at)
    SELECT CAST(strftime('%s', 'now') AS INTEGER), max(id),
           (julianday('now') - 2440587.5) * 86400.0
    FROM nexus_messages HAVING max(id) IS NOT NULL
"""

MIGRATIONS: Final[tuple[str, ...]] = (_V1_DDL, _V2_DDL, _V3_DDL, _V4_DDL)
SCHEMA_VERSION: Final = len(MIGRATIONS)


def message_of(row: Sequence[Any]) -> Message:
    """The message of a row selected as :data:`MESSAGE_COLUMNS` (meta decoded here, once)."""
    meta = row[5]
    return Message(
        id=row[0],
        role=row[1],
        content=row[2],
        timestamp=row[3],
        session_tag=row[4],
        meta=_decode_meta(meta) if meta is not None else None,
    )


class StorageError(NexusError):
    """The database cannot be used (not SQLite, corrupt, too new, unwritable)."""

    code = "unavailable"


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to :data:`SCHEMA_VERSION`; return the version found.

    Each migration runs in its own transaction together with the bump of
    ``user_version``, so a crash mid-way leaves a consistent, resumable state.
    """
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise StorageError(
            f"database schema version {found} is newer than this nexusd supports "
            f"({SCHEMA_VERSION}); upgrade nexusd"
        )
    for number in range(found + 1, SCHEMA_VERSION + 1):
        script = MIGRATIONS[number - 1]
        logger.info("applying schema migration %d", number)
        statements = [s.strip() for s in script.split(";") if s.strip()]
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in statements:
                conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {number}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return found


def open_writer(
    path: Path, *, synchronous: str | None = None, wal_autocheckpoint: int | None = None
) -> sqlite3.Connection:
    """Open (creating if needed) the read-write connection and migrate it.

    ``synchronous`` (``"full"`` or ``"normal"``) and ``wal_autocheckpoint``
    (pages) come from the daemon's configuration, which holds their defaults;
    None leaves SQLite's own setting (for tools and tests that do not care).

    Raises :class:`StorageError` with a clear message when the file is not a
    usable SQLite database; in that case the file is not modified.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _refuse_non_sqlite(path)
    try:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one per batch.
        conn = _connect(str(path), uri=False, autocommit=True)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open database {path}: {exc}") from exc
    try:
        _check_quick(conn, path)
        _refuse_foreign(conn, path)  # before journal_mode=WAL, which writes the header
        conn.execute("PRAGMA journal_mode=WAL")
        if synchronous is not None:
            conn.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
        if wal_autocheckpoint is not None:
            conn.execute(f"PRAGMA wal_autocheckpoint={int(wal_autocheckpoint)}")
        migrate(conn)
    except sqlite3.Error as exc:
        conn.close()
        raise StorageError(f"cannot use database {path}: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def open_reader(path: Path) -> sqlite3.Connection:
    """A read-only connection (``mode=ro`` and ``query_only``) for the reader pool."""
    conn = _connect(reader_uri(path), uri=True)
    try:
        conn.execute("PRAGMA query_only = 1")
    except BaseException:
        conn.close()
        raise
    return conn


def _connect(target: str, *, uri: bool, autocommit: bool = False) -> sqlite3.Connection:
    """Every long-lived connection of the daemon is made here.

    ``timeout`` is SQLite's busy timeout: how long a statement waits for
    another connection's lock (another program's, or a checkpoint) before
    failing with "database is locked".  ``check_same_thread`` off: each
    connection is used by one thread at a time, but not the one that made it.
    ``autocommit``: no implicit transactions (``isolation_level=None``).
    """
    conn = sqlite3.connect(target, uri=uri, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    if autocommit:
        conn.isolation_level = None
    return conn


def _refuse_non_sqlite(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb") as fh:
        magic = fh.read(16)
    if magic != b"SQLite format 3\x00":
        raise StorageError(f"{path} is not an SQLite database; refusing to touch it")


def _refuse_foreign(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse an SQLite file that holds other tables but not ours: another program's."""
    tables = {
        str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    others = sorted(t for t in tables if not t.startswith("sqlite_"))
    if TABLE not in tables and others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise StorageError(
            f"{path} is an SQLite database of another program (tables {shown}; "
            f"no {TABLE}); refusing to touch it"
        )


def _check_quick(conn: sqlite3.Connection, path: Path) -> None:
    rows = conn.execute("PRAGMA quick_check").fetchall()
    if [tuple(r) for r in rows] != [("ok",)]:
        detail = "; ".join(str(r[0]) for r in rows[:5])
        raise StorageError(f"{path} fails quick_check ({detail}); run `nexusd check`")


def reader_uri(path: Path) -> str:
    """URI for a read-only connection to ``path`` (``mode=ro``)."""
    return path.resolve().as_uri() + "?mode=ro"


def integrity_check(path: Path) -> list[str]:
    """Run ``PRAGMA integrity_check`` read-only; return its lines (``["ok"]`` when sound)."""
    _refuse_non_sqlite(path)
    conn = sqlite3.connect(reader_uri(path), uri=True)
    try:
        _refuse_foreign(conn, path)
        return [str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall()]
    finally:
        conn.close()


def snapshot(path: Path, dest: Path) -> int:
    """Copy the database consistently to ``dest`` (a new file); return its size.

    One-step online backup on a read-only connection: it reads one snapshot
    of the database in a single read transaction, so under WAL the writer is
    never blocked and the copy holds exactly what was committed when it began.
    The copy is switched to the rollback journal so it is one self-contained file.
    """
    src = sqlite3.connect(reader_uri(path), uri=True)
    try:
        dst = sqlite3.connect(dest)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
    finally:
        src.close()
    return dest.stat().st_size


def describe(path: Path) -> dict[str, int]:
    """Schema version, messages and sessions of a database, read-only."""
    conn = sqlite3.connect(reader_uri(path), uri=True)
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        messages, sessions = conn.execute(
            f"SELECT COUNT(*), COUNT(DISTINCT session_tag) FROM {TABLE}"
        ).fetchone()
        return {"schema_version": version, "messages": messages, "sessions": sessions}
    finally:
        conn.close()


class SnapshotJob:
    """A snapshot taken on a worker thread that removes its file if abandoned.

    A cancelled task stops waiting but cannot stop the thread: whichever of
    the two finishes last removes the file.
    """

    def __init__(self, db_path: Path, dest: Path) -> None:
        self.db_path = db_path
        self.dest = dest
        self._lock = threading.Lock()
        self._abandoned = False

    def run(self) -> int:
        try:
            size = snapshot(self.db_path, self.dest)
        except BaseException:
            self.dest.unlink(missing_ok=True)
            raise
        with self._lock:
            if self._abandoned:
                self.dest.unlink(missing_ok=True)
        return size

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
        self.dest.unlink(missing_ok=True)


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` on the writer's connection; rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
