"""The PostgreSQL schema: tables, numbered migrations, the write lock, shared SQL.

The tables mirror the SQLite backend's (:mod:`nexusd.storage.schema`, version
4): ``nexus_messages`` with the same columns and meanings, ``nexus_floors``
(rows hidden until the sweep deletes them), ``nexus_retention`` (a session's
own retention), ``nexus_marks`` (commit times, for retention by age).  Three
are PostgreSQL's own, because several daemons share the database:

- ``nexus_sessions``: each session's count of visible rows, kept exact by
  every write.  The SQLite backend counts in the writer's memory; here another
  daemon may have written since, so the count lives with the rows.
- ``nexus_log``: what each commit changed, in commit order, so that the
  watches of every daemon see the commits of every other (:mod:`.follow`).
- ``nexus_schema_version``: the migration reached (SQLite's ``user_version``).

**The write lock.**  Every write transaction of every daemon begins with
``pg_advisory_xact_lock(WRITE_LOCK)`` (:data:`TAKE_WRITE_LOCK`) and holds it
to its commit.  So one transaction writes at a time, database-wide: ids,
taken from the sequence inside the lock, grow in commit order, per session
and across sessions; retention counts and idempotency lookups see no
concurrent writer; the log's order is the commit order.  Each daemon batches
its writes (group commit), so the lock is taken once per batch, not per
message.  Reads never take it.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import psycopg
from psycopg import sql

from ..schema import StorageError
from ..scope import NS_MARK, scope_bounds

__all__ = [
    "CHANNEL",
    "MESSAGE_COLUMNS",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "TAKE_WRITE_LOCK",
    "TEXT_CONFIG",
    "VISIBLE_ONE",
    "WRITE_LOCK",
    "migrate",
    "row_size",
    "scope_clause",
    "visible",
]

logger = logging.getLogger(__name__)

#: The database-wide write lock's key ("nexusd w" in ASCII).
WRITE_LOCK: Final = 0x6E65787573642077
#: Held while migrating, so daemons starting together migrate once.
MIGRATE_LOCK: Final = 0x6E6578757364206D
#: The first statement of every write transaction.
TAKE_WRITE_LOCK: Final = f"SELECT pg_advisory_xact_lock({WRITE_LOCK})"
#: Where commits are announced (payload: the log's seq).
CHANNEL: Final = "nexusd_commits"
#: The text search configuration of the ``tsv`` column: ``simple`` (lower case,
#: no stemming, no stop words: FTS5's unicode61 does neither), with accents
#: folded by ``unaccent`` where the extension can be created.
TEXT_CONFIG: Final = "nexus_text"

#: Characters of a message that are indexed: PostgreSQL refuses a ``tsvector``
#: over 1 MB (the INSERT would fail), and one character costs at most about
#: 6.5 bytes of it, so this prefix always fits.
INDEXED_CHARS: Final = 100_000
#: ASCII punctuation as a regular expression (ranges of ASCII, whatever the
#: locale): a space in the indexed text, as FTS5's unicode61 splits there (and
#: PostgreSQL's parser would otherwise read ``<b ...>`` as a tag and drop it, and
#: keep e-mail addresses, URLs and paths as one word).
PUNCTUATION_RE: Final = "[!-/:-@[-`{-~]"
TSV_FUNCTION_NAME: Final = "nexus_tsv"
#: The indexed text of a message: its first :data:`INDEXED_CHARS`, punctuation
#: as spaces.  A plain SQL function, inlined into the column's expression
#: (measured on 100k rows of ~130 characters: about 15 us a row over the raw
#: ``to_tsvector``'s 30; ``translate`` took 60, and a PL/pgSQL function catching
#: the size error runs a subtransaction per row, 2.7x the inserts' time).  The
#: configuration is an argument so that the column holds it as an OID, not a
#: name looked up in a caller's search_path.
TSV_FUNCTION: Final = (
    f"CREATE OR REPLACE FUNCTION {TSV_FUNCTION_NAME}(config regconfig, content text)"
    " RETURNS tsvector LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $fn$"
    f" SELECT to_tsvector(config, regexp_replace(left(content, {INDEXED_CHARS}),"
    f" '{PUNCTUATION_RE}', ' ', 'g')) $fn$"
)
#: Token types of the ``simple`` parser that may hold accented letters
#: (``numword``: ``über2``), mapped through ``unaccent`` in ``nexus_text``.
UNACCENT_TOKENS: Final = "hword, hword_part, word, numword, numhword, hword_numpart"

#: The columns of a message, in the order :func:`nexusd.storage.schema.message_of` reads them.
MESSAGE_COLUMNS: Final = "id, role, content, timestamp, session_tag, meta"
#: msgpack bytes per message map besides its strings (as the SQLite backend's).
ROW_OVERHEAD: Final = 96

#: For a query of one session: its rows at or above its floor (one more ``%s``,
#: the session's tag, bound after the others of the clause it joins).
VISIBLE_ONE: Final = "id >= coalesce((SELECT below_id FROM nexus_floors WHERE session_tag = %s), 0)"


def visible(table: str = "nexus_messages") -> str:
    """For a query over many sessions: ``table``'s row is at or above its session's floor."""
    return (
        f"{table}.id >= coalesce((SELECT fl.below_id FROM nexus_floors AS fl"
        f" WHERE fl.session_tag = {table}.session_tag), 0)"
    )


def scope_clause(scope: str | None, column: str = "session_tag") -> tuple[str, tuple[str, ...]]:
    """SQL (for a WHERE) and parameters of the tags in ``scope`` (as ``ClearAll``'s),
    compared as bytes (SQLite's order) and so served by the tag indexes:
    None every tag, ``""`` the unnamespaced ones, else those under the prefix."""
    if scope is None:
        return "true", ()
    col = f'{column} COLLATE "C"'
    if scope == "":
        lo, hi = scope_bounds(NS_MARK)
        return f"NOT ({col} >= %s AND {col} < %s)", (lo, hi)
    lo, hi = scope_bounds(scope)
    return f"{col} >= %s AND {col} < %s", (lo, hi)


def row_size(alias: str = "") -> str:
    """SQL for an upper bound of a row's size in a reply (as the SQLite backend's)."""
    a = alias
    return (
        f"octet_length({a}content) + octet_length({a}role) + octet_length({a}timestamp)"
        f" + octet_length({a}session_tag) + 3 * coalesce(octet_length({a}meta), 0)"
        f" + {ROW_OVERHEAD}"
    )


# Migration 1: everything, as of nexusd's first PostgreSQL release.  Tags and
# timestamps compare as bytes (COLLATE "C"), as SQLite compares them: session
# paging, scope ranges and since/until give the same order whatever the
# database's default collation.  The text
# search configuration comes first: the generated column names it.  Every
# statement is idempotent where PostgreSQL allows it, but each migration runs
# in one transaction with the version bump anyway (DDL is transactional here).
_V1: Final[tuple[str, ...]] = (
    TSV_FUNCTION,
    """CREATE SEQUENCE IF NOT EXISTS nexus_messages_id_seq""",
    """CREATE TABLE IF NOT EXISTS nexus_messages (
        id          bigint PRIMARY KEY DEFAULT nextval('nexus_messages_id_seq'),
        role        text   NOT NULL,
        content     text   NOT NULL,
        timestamp   text   COLLATE "C" NOT NULL,
        session_tag text   COLLATE "C" NOT NULL,
        meta        text,
        idem_key    text,
        tsv         tsvector GENERATED ALWAYS AS
                        (nexus_tsv('nexus_text'::regconfig, content)) STORED
    )""",
    """ALTER SEQUENCE nexus_messages_id_seq OWNED BY nexus_messages.id""",
    # Every query of a session is an id range of it.
    """CREATE INDEX IF NOT EXISTS nexus_messages_session
        ON nexus_messages (session_tag, id)""",
    """CREATE UNIQUE INDEX IF NOT EXISTS nexus_messages_idem
        ON nexus_messages (idem_key, session_tag) WHERE idem_key IS NOT NULL""",
    """CREATE TABLE IF NOT EXISTS nexus_sessions (
        session_tag text COLLATE "C" PRIMARY KEY,
        messages    bigint NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS nexus_floors (
        session_tag text COLLATE "C" PRIMARY KEY,
        below_id    bigint NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS nexus_retention (
        session_tag  text PRIMARY KEY,
        max_messages bigint,
        max_age      double precision
    )""",
    """CREATE TABLE IF NOT EXISTS nexus_marks (
        second  bigint PRIMARY KEY,
        last_id bigint NOT NULL,
        at      double precision NOT NULL
    )""",
    """CREATE SEQUENCE IF NOT EXISTS nexus_log_seq""",
    """CREATE TABLE IF NOT EXISTS nexus_log (
        seq     bigint PRIMARY KEY,
        at      double precision NOT NULL,
        origin  text NOT NULL,
        changes bytea NOT NULL
    )""",
)

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (_V1,)
SCHEMA_VERSION: Final = len(MIGRATIONS)


async def migrate(conn: psycopg.AsyncConnection[Any]) -> int:
    """Create or bring the schema up to :data:`SCHEMA_VERSION`; return the version found.

    One transaction, under :data:`MIGRATE_LOCK`: a second daemon starting at
    the same moment waits, then finds the work done.  A database whose schema
    is newer than this nexusd is refused with one line.  ``conn`` is in
    autocommit mode (psycopg's ``autocommit=True``) and is left so.
    """
    async with conn.transaction():
        await conn.execute(f"SELECT pg_advisory_xact_lock({MIGRATE_LOCK})")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS nexus_schema_version (version integer NOT NULL)"
        )
        cur = await conn.execute("SELECT max(version) FROM nexus_schema_version")
        row = await cur.fetchone()
        found = int(row[0]) if row is not None and row[0] is not None else 0
        if found > SCHEMA_VERSION:
            raise StorageError(
                f"database schema version {found} is newer than this nexusd supports "
                f"({SCHEMA_VERSION}); upgrade nexusd"
            )
        if found == 0:
            await _text_config(conn)
        for number in range(found + 1, SCHEMA_VERSION + 1):
            logger.info("applying PostgreSQL schema migration %d", number)
            for stmt in MIGRATIONS[number - 1]:
                await conn.execute(stmt)
            await conn.execute("DELETE FROM nexus_schema_version")
            await conn.execute("INSERT INTO nexus_schema_version VALUES (%s)", (number,))
    return found


async def _text_config(conn: psycopg.AsyncConnection[Any]) -> None:
    """Create :data:`TEXT_CONFIG`: ``simple``, with ``unaccent`` first when it can be had.

    ``unaccent`` ships with PostgreSQL (contrib) and is a trusted extension
    (PostgreSQL 13 on), so a database owner may create it; where it cannot
    be created, accents are not folded and the log says so once.
    """
    cur = await conn.execute(
        "SELECT 1 FROM pg_ts_config WHERE cfgname = %s"
        " AND cfgnamespace = current_schema()::regnamespace",
        (TEXT_CONFIG,),
    )
    if await cur.fetchone() is not None:
        return
    name = sql.Identifier(TEXT_CONFIG)
    await conn.execute(sql.SQL("CREATE TEXT SEARCH CONFIGURATION {} (COPY = simple)").format(name))
    try:
        async with conn.transaction():  # a savepoint: a refusal undoes only this
            await conn.execute("CREATE EXTENSION IF NOT EXISTS unaccent")
            await conn.execute(
                sql.SQL(
                    "ALTER TEXT SEARCH CONFIGURATION {} ALTER MAPPING FOR {} WITH unaccent, simple"
                ).format(name, sql.SQL(UNACCENT_TOKENS))
            )
    except psycopg.Error as exc:
        logger.warning(
            "the unaccent extension is not available (%s); search will not fold accents",
            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
        )
