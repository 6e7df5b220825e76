"""The full-text index of the SQLite backend: its tables, who keeps it, and its building.

The index is an FTS5 table over ``nexus_messages.content`` with external
content (the text is stored once, in the table; FTS5 keeps only the index and
reads the text back for snippets).  It is kept in the same transaction as
every write, so a search sees exactly what is committed: pruning, ``clear``
and ``pop`` take their rows out of the index in the commit that deletes them.
The daemon's writer keeps it itself, at the end of each batch
(:class:`Upkeep`: one FTS5 segment per commit); triggers keep it for rows
another program writes into the file (the v1 store, the sqlite3 shell), and
leave the writer's connection alone (it runs with :data:`WRITER_CACHE`).

A database that had no index (older files, v1 files, or search switched back
on) gets one built behind the writes, oldest rows first, one chunk per
transaction on the writer's thread between batches: ``boundary`` is the
largest id when the index was created (every row above it is indexed as it
is written), ``built`` how far the chunks have come (every row up to it is
indexed).  Rows in between are left to a later chunk, so no row is indexed
twice or deleted from the index before it was added.

With search switched off the index, its triggers and its state are dropped:
nothing is maintained, and switching it on again builds it afresh.  The
tokenizer is ``unicode61`` with ``remove_diacritics 2``.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from .base import Added, Change, StoredRow
from .schema import write_transaction

logger = logging.getLogger(__name__)

__all__ = [
    "CHUNK_ROWS",
    "TOKENIZE",
    "WRITER_CACHE",
    "IndexState",
    "Upkeep",
    "hold_merges",
    "merge_slice",
    "merges_held",
    "release_merges",
    "build_step",
    "drop",
    "ensure",
]

TOKENIZE: Final = "unicode61 remove_diacritics 2"
#: Rows indexed per chunk while an index is built (one transaction on the writer's thread).
CHUNK_ROWS: Final = 5_000

_IN_RANGE: Final = (
    "({row}.id > (SELECT boundary FROM nexus_fts_state)"
    " OR {row}.id <= (SELECT built FROM nexus_fts_state))"
)

_TABLES: Final = (
    "CREATE VIRTUAL TABLE nexus_fts USING fts5("
    f"content, content='nexus_messages', content_rowid='id', tokenize='{TOKENIZE}')",
    "CREATE TABLE nexus_fts_state (boundary INTEGER NOT NULL, built INTEGER NOT NULL)",
    "INSERT INTO nexus_fts_state (boundary, built)"
    " SELECT coalesce(max(id), 0), 0 FROM nexus_messages",
)
_DROP_TRIGGERS: Final = (
    "DROP TRIGGER IF EXISTS nexus_fts_insert",
    "DROP TRIGGER IF EXISTS nexus_fts_delete",
    "DROP TRIGGER IF EXISTS nexus_fts_update",
)
_DROP: Final = (
    *_DROP_TRIGGERS,
    "DROP TABLE IF EXISTS nexus_fts",
    "DROP TABLE IF EXISTS nexus_fts_state",
)


#: The writer's connection runs with this ``cache_size`` (KiB, negative: a size
#: in KiB), which is how the triggers tell it from every other connection.
WRITER_CACHE: Final = -8191
_NOT_WRITER: Final = f"(SELECT cache_size FROM pragma_cache_size) != {WRITER_CACHE}"


def _triggers(*, building: bool) -> tuple[str, ...]:
    """The triggers that keep the index for *other* programs' writes (the v1 store,
    the sqlite3 shell): the daemon's writer keeps it itself (:class:`Upkeep`).
    While the index is being built they also leave alone the rows the build has
    yet to reach."""

    def when(row: str) -> str:
        cond = _NOT_WRITER + (f" AND {_IN_RANGE.format(row=row)}" if building else "")
        return f" WHEN {cond}"

    return (
        *_DROP_TRIGGERS,
        f"CREATE TRIGGER nexus_fts_insert AFTER INSERT ON nexus_messages{when('new')} BEGIN"
        " INSERT INTO nexus_fts (rowid, content) VALUES (new.id, new.content); END",
        f"CREATE TRIGGER nexus_fts_delete AFTER DELETE ON nexus_messages{when('old')} BEGIN"
        " INSERT INTO nexus_fts (nexus_fts, rowid, content) VALUES ('delete', old.id, old.content);"
        " END",
        f"CREATE TRIGGER nexus_fts_update AFTER UPDATE OF content ON nexus_messages{when('old')}"
        " BEGIN"
        " INSERT INTO nexus_fts (nexus_fts, rowid, content) VALUES ('delete', old.id, old.content);"
        " INSERT INTO nexus_fts (rowid, content) VALUES (new.id, new.content); END",
    )


@dataclass(frozen=True, slots=True)
class IndexState:
    """How far the index is built: every row up to ``built`` and above ``boundary``."""

    boundary: int
    built: int

    @property
    def complete(self) -> bool:
        return self.built >= self.boundary

    def indexed(self, row_id: int) -> bool:
        """Whether the row ``row_id`` (if stored) is in the index."""
        return row_id > self.boundary or row_id <= self.built

    def indexed_sql(self) -> str:
        """The same, as SQL over ``id`` (the numbers are the daemon's own, inlined)."""
        return f"(id > {int(self.boundary)} OR id <= {int(self.built)})"

    def percent(self) -> int:
        return 100 if self.complete else int(100 * self.built / max(1, self.boundary))


def _state(conn: sqlite3.Connection) -> IndexState | None:
    try:
        row = conn.execute("SELECT boundary, built FROM nexus_fts_state").fetchone()
    except sqlite3.OperationalError:  # no such table: no index
        return None
    return IndexState(int(row[0]), int(row[1])) if row is not None else None


def _run(conn: sqlite3.Connection, statements: tuple[str, ...]) -> None:
    for stmt in statements:
        conn.execute(stmt)


def ensure(conn: sqlite3.Connection) -> IndexState:
    """Writer's connection, at start-up: the index exists (created empty if it did not),
    and its triggers, made by this version, know the writer's connection."""
    conn.execute(f"PRAGMA cache_size = {WRITER_CACHE}")
    state = _state(conn)
    if state is not None:
        with write_transaction(conn):  # (older files' triggers indexed every writer)
            _run(conn, _triggers(building=not state.complete))
            if merges_held(conn):  # a sweep was cut short: merge by itself again
                release_merges(conn)
        return state
    with write_transaction(conn):
        _run(conn, _DROP + _TABLES)  # drop first: a half-made index from elsewhere
        state = _state(conn)
        assert state is not None
        _run(conn, _triggers(building=not state.complete))
    if not state.complete:
        logger.info(
            "search index created; indexing the %d stored ids in the background", state.boundary
        )
    return state


def drop(conn: sqlite3.Connection) -> bool:
    """Writer's connection, at start-up with search off: remove the index; True if there was one."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE name GLOB 'nexus_fts*'").fetchone():
        return False
    with write_transaction(conn):
        _run(conn, _DROP)
    logger.info("search is off: search index removed")
    return True


def build_step(conn: sqlite3.Connection, rows: int = CHUNK_ROWS) -> IndexState:
    """Writer's connection: index the next ``rows`` ids of an unfinished index (one transaction)."""
    with write_transaction(conn):
        state = _state(conn)
        if state is None or state.complete:
            return state or IndexState(0, 0)
        # The next ``rows`` ids that exist (ids have gaps: pruned rows), by the rowid.
        upto = conn.execute(
            "SELECT max(id) FROM (SELECT id FROM nexus_messages WHERE id > ? AND id <= ?"
            " ORDER BY id LIMIT ?)",
            (state.built, state.boundary, rows),
        ).fetchone()[0]
        upto = state.boundary if upto is None else int(upto)
        conn.execute(
            "INSERT INTO nexus_fts (rowid, content)"
            " SELECT id, content FROM nexus_messages WHERE id > ? AND id <= ?",
            (state.built, upto),
        )
        conn.execute("UPDATE nexus_fts_state SET built = ?", (upto,))
        state = IndexState(state.boundary, upto)
        if state.complete:  # every row is indexed: the triggers need not ask any more
            _run(conn, _triggers(building=False))
    return state


class Upkeep:
    """The index kept by the writer in its own transaction, one batch at a time.

    Triggers would do it row by row, and FTS5 writes its pending terms out as a
    new segment at every statement that fires one: a segment per appended row,
    then merged again (measured: the write transaction at 0.41-0.45x of no
    index with 32 appends per commit).  Here the batch's message writes run
    first and the index gets, at the end, its deletes then its inserts, each as
    one ``executemany``: one segment per commit.  Rows stored by this batch and
    removed by it again never reach the index; rows the build has not reached
    yet are left to it (:meth:`IndexState.indexed`).
    """

    __slots__ = ("_conn", "_deletes", "_first", "_pending", "_seen", "state")

    def __init__(self, conn: sqlite3.Connection, state: IndexState) -> None:
        self._conn = conn
        self.state = state
        #: Rows this batch stored, not yet in the index: id -> (content, tag).
        self._pending: dict[int, tuple[str, str]] = {}
        #: The first id this batch stored (None: none yet).
        self._first: int | None = None
        self._deletes: list[tuple[int, str]] = []
        self._seen = 0

    def catch_up(self, changes: list[Change]) -> None:
        """Take in the rows the batch stored since the last call (its ``changes`` so far)."""
        for change in changes[self._seen :]:
            if type(change) is Added:
                self.added(change.first_id, change.rows)
        self._seen = len(changes)

    def added(self, first_id: int, rows: list[StoredRow]) -> None:
        if self._first is None:
            self._first = first_id
        pending = self._pending
        for i, row in enumerate(rows):
            pending[first_id + i] = (row[1], row[3])

    def removed(self, row_id: int, content: str) -> None:
        """A row deleted by this batch (pop, pruning), before :meth:`flush`."""
        if self._pending.pop(row_id, None) is None and self.state.indexed(row_id):
            self._deletes.append((row_id, content))

    def removing(
        self,
        where: str,
        params: tuple[object, ...],
        tags: Callable[[str], bool],
        upto: int | None = None,
    ) -> None:
        """Before ``DELETE FROM nexus_messages WHERE <where>``: take those rows out of
        the index (``tags``: whether a session's rows are among them; ``upto``: only
        ids up to that one are)."""
        last = upto if upto is not None else 1 << 63
        for row_id in [i for i, (_, tag) in self._pending.items() if i <= last and tags(tag)]:
            del self._pending[row_id]
        older = "" if self._first is None else f" AND id < {int(self._first)}"
        self._conn.execute(
            "INSERT INTO nexus_fts (nexus_fts, rowid, content) SELECT 'delete', id, content"
            f" FROM nexus_messages WHERE ({where}) AND {self.state.indexed_sql()}{older}",
            params,
        )

    def removing_all(self) -> None:
        """Before every row is deleted."""
        self._pending.clear()
        self._deletes.clear()
        self._conn.execute("INSERT INTO nexus_fts (nexus_fts) VALUES ('delete-all')")

    def flush(self) -> None:
        """The batch's index writes, last thing before COMMIT."""
        conn = self._conn
        if self._deletes:
            self._deletes.sort()
            conn.executemany(
                "INSERT INTO nexus_fts (nexus_fts, rowid, content) VALUES ('delete', ?, ?)",
                self._deletes,
            )
        if self._pending:
            conn.executemany(
                "INSERT INTO nexus_fts (rowid, content) VALUES (?, ?)",
                [(i, content) for i, (content, _) in self._pending.items()],
            )


# FTS5 merges its segments at commit ("automerge"), and now and then a merge is
# big: a commit of a few hundred deletions took 30-55 ms at its 99th
# percentile, against 3 ms at its median.  While the sweep deletes (a
# million rows may go), the merging is its own work instead, in slices of
# MERGE_PAGES leaf pages (measured: 2-3 ms each), taking turns with the
# writer's batches; once the sweep is done, slices go on until nothing is left
# to merge (else the first appends after it would pay the whole debt: 67 ms
# p99), and then automerge is back to FTS5's default.
MERGE_PAGES: Final = 12
_AUTOMERGE: Final = 4  # FTS5's default


def hold_merges(conn: sqlite3.Connection) -> None:
    """Inside a transaction: commits stop merging segments by themselves."""
    conn.execute("INSERT INTO nexus_fts (nexus_fts, rank) VALUES ('automerge', 0)")


def merge_slice(conn: sqlite3.Connection) -> bool:
    """Inside a transaction: one bounded slice of segment merging; False if there was
    nothing left to merge (no level holds FTS5's ``usermerge`` segments)."""
    before = conn.total_changes
    conn.execute("INSERT INTO nexus_fts (nexus_fts, rank) VALUES ('merge', ?)", (MERGE_PAGES,))
    # FTS5's documented tell: a merge that did nothing changes fewer than 2 rows.
    return conn.total_changes - before >= 2


def release_merges(conn: sqlite3.Connection) -> None:
    """Inside a transaction: commits merge segments by themselves again (FTS5's default)."""
    conn.execute("INSERT INTO nexus_fts (nexus_fts, rank) VALUES ('automerge', ?)", (_AUTOMERGE,))


def merges_held(conn: sqlite3.Connection) -> bool:
    """Whether a sweep that did not finish (the daemon stopped) left merging held."""
    row = conn.execute("SELECT v FROM nexus_fts_config WHERE k = 'automerge'").fetchone()
    return row is not None and int(row[0]) == 0
