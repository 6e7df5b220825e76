"""One batch of writes as one SQLite transaction: statements, ids, counts, pruning.

The writer actor (:mod:`nexusd.daemon.writer`) decides *when* a batch runs;
:class:`~nexusd.storage.sqlite.SQLiteStorage` hands it to its writer thread;
this module is *what* that thread runs, synchronously, on the writer's
connection: the inserts as one ``executemany`` (ids are consecutive:
there is one writer and the table is AUTOINCREMENT), pops and clears in order,
then the exact pruning of every session the batch grew, then COMMIT.

Pruning is exact only while the per-session counts are: the counts cached
between batches (:class:`CountCache`) are dropped whenever ``PRAGMA
data_version``, read inside the write transaction, says another connection
(the ``sqlite3`` shell, the v1 store, anything) committed to the file since our
last commit.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from ..wire.errors import NexusError
from ..wire.protocol import Message
from .base import Added, Change, ClearAll, ClearSession, Insert, Op, PopNewest, Removed, StoredRow
from .counts import CountCache, Counts
from .index import IndexState, Upkeep
from .schema import MESSAGE_COLUMNS, message_of
from .scope import NS_MARK, scope_bounds

__all__ = ["CountCache", "Outcome", "run"]

#: Sessions pruned per DELETE (SQLite allows 500 terms in a compound SELECT).
_PRUNE_CHUNK: Final = 200
_PRUNE_ONE: Final = (
    "SELECT id FROM (SELECT id FROM nexus_messages WHERE session_tag = ? ORDER BY id LIMIT ?)"
)
#: From this many rows on, one session's overflow goes as an id range (measured:
#: 25% cheaper than an id list for 100 rows, no better for one).
_PRUNE_RANGE_FROM: Final = 16
_CLEAR: Final = "DELETE FROM nexus_messages WHERE session_tag = ?"
_PRUNE_LAST: Final = (
    "SELECT id FROM nexus_messages WHERE session_tag = ? ORDER BY id LIMIT 1 OFFSET ?"
)
_PRUNE_RANGE: Final = "DELETE FROM nexus_messages WHERE session_tag = ? AND id <= ?"
_NEWEST: Final = (
    f"SELECT {MESSAGE_COLUMNS} FROM nexus_messages WHERE session_tag = ? ORDER BY id DESC LIMIT 1"
)


@dataclass(slots=True)
class Outcome:
    """What a committed batch did: per-op results, rows stored, rows pruned, and the
    changes in the order they happened (for watchers)."""

    results: list[Any]
    rows_added: int
    pruned: int
    changes: list[Change]


def run(
    conn: sqlite3.Connection,
    ops: Sequence[Op],
    *,
    now: str,
    counts_cache: CountCache,
    max_messages: int,
    lookup: bool,
    index: IndexState | None = None,
) -> Outcome:
    """Run ``ops`` as one transaction and commit; roll back and raise on any error.

    ``now`` is the timestamp of rows that bring none.  ``counts_cache`` holds
    committed per-session row counts; it is checked against ``data_version``
    once the write lock is held, and updated only if the commit succeeds.
    ``lookup`` looks every idempotency key up first (the careful path, after
    an IntegrityError told us a key is already stored).  ``index``: the
    full-text index's state when there is one; its upkeep goes last (:class:`~.search.Upkeep`).
    """
    results: list[Any] = []
    changes: list[Change] = []
    inserts = (_CheckedInserts if lookup else _PendingInserts)(conn, now, changes)
    rows_added = 0
    conn.execute("BEGIN IMMEDIATE")
    fts = None if index is None else Upkeep(conn, index)
    try:
        # First thing under the write lock: are the cached counts still true?
        counts_cache.sync(conn)
        counts = Counts(conn, counts_cache.counts)
        for op in ops:
            if isinstance(op, Insert):
                ids, added = inserts.add(op)
                results.append(ids)
                counts.add(op.session_tag, added)
                rows_added += added
                continue
            inserts.flush()
            if fts is not None:
                fts.catch_up(changes)
            if isinstance(op, PopNewest):
                popped = _pop(conn, op, counts)
                if isinstance(popped, Message):
                    changes.append(Removed(op.session_tag, ids=(popped.id,)))
                    if fts is not None:
                        fts.removed(popped.id, popped.content)
                results.append(popped)
            elif isinstance(op, ClearSession):
                tag = op.session_tag
                if fts is not None:
                    fts.removing("session_tag = ?", (tag,), tag.__eq__)
                n = conn.execute(
                    "DELETE FROM nexus_messages WHERE session_tag = ?", (tag,)
                ).rowcount
                counts.set(op.session_tag, 0)
                if n:
                    changes.append(Removed(op.session_tag, before_id=_next_id(conn)))
                results.append(n)
            elif isinstance(op, ClearAll):
                sql, params = _clear_all_sql(op.scope)
                if fts is not None:
                    if op.scope is None:
                        fts.removing_all()
                    else:
                        where = sql.split(" WHERE ", 1)[1]
                        fts.removing(where, params, functools.partial(_in_scope, op.scope))
                n = conn.execute(sql, params).rowcount
                counts.clear_all()
                if n:
                    changes.append(Removed(None, before_id=_next_id(conn), scope=op.scope))
                results.append(n)
            else:
                raise NotImplementedError(type(op).__name__)  # issue 13, under way
        inserts.flush()
        if fts is not None:
            fts.catch_up(changes)
        pruned = _prune(conn, counts, max_messages, changes, fts)
        if fts is not None:
            fts.flush()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    counts.commit()
    return Outcome(results, rows_added, pruned, changes)


def _in_scope(scope: str, tag: str) -> bool:
    """Whether a stored tag is among those ``clear_all`` of ``scope`` deletes."""
    if scope == "":
        return not tag.startswith(NS_MARK)
    return tag.startswith(scope)


def _next_id(conn: sqlite3.Connection) -> int:
    """The id the next stored row will get (AUTOINCREMENT never reuses one)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'nexus_messages'").fetchone()
    return 1 if row is None else int(row[0]) + 1


def _pop(conn: sqlite3.Connection, op: PopNewest, counts: Counts) -> Message | NexusError | None:
    tag = op.session_tag
    row = conn.execute(_NEWEST, (tag,)).fetchone()
    if row is None:
        return None
    msg = message_of(row)
    refusal = op.refuse(msg) if op.refuse is not None else None
    if refusal is not None:
        return refusal
    conn.execute("DELETE FROM nexus_messages WHERE id = ?", (msg.id,))
    counts.add(tag, -1)
    return msg


def _prune(
    conn: sqlite3.Connection,
    counts: Counts,
    keep: int,
    changes: list[Change],
    fts: Upkeep | None = None,
) -> int:
    """Delete exactly the oldest overflow of every session this batch grew.

    The writer knows every session's count (exact: :class:`CountCache`), so it
    can delete exactly the overflow, found by an index range scan of
    ``idx_nexus_session``.  A large overflow is deleted as one id range of its
    session; many small ones (the usual case: a row or two per session) go
    together, up to :data:`_PRUNE_CHUNK` sessions per statement.  Each pruned
    session's new first id is recorded in ``changes``: the oldest rows go, so
    every row below it is gone.
    """
    if not keep:
        return 0
    small: list[tuple[str, int]] = []
    pruned = 0
    below: dict[str, int] = {}
    for tag in counts.grown:
        excess = counts.get(tag) - keep
        if excess <= 0:
            continue
        counts.set(tag, keep)
        pruned += excess
        if excess >= _PRUNE_RANGE_FROM:
            (last,) = conn.execute(_PRUNE_LAST, (tag, excess - 1)).fetchone()
            if fts is not None:
                fts.removing("session_tag = ? AND id <= ?", (tag, last), tag.__eq__, last)
            conn.execute(_PRUNE_RANGE, (tag, last))
            below[tag] = last + 1
        else:
            small.append((tag, excess))
    for i in range(0, len(small), _PRUNE_CHUNK):
        chunk = small[i : i + _PRUNE_CHUNK]
        union = " UNION ALL ".join([_PRUNE_ONE] * len(chunk))
        params = [x for pair in chunk for x in pair]
        gone = conn.execute(
            f"DELETE FROM nexus_messages WHERE id IN ({union}) RETURNING session_tag, id, content",
            params,
        ).fetchall()
        for tag, row_id, content in gone:
            if row_id >= below.get(tag, 0):
                below[tag] = row_id + 1
            if fts is not None:
                fts.removed(row_id, content)
    changes += [Removed(tag, before_id=first) for tag, first in below.items()]
    return pruned


class _PendingInserts:
    """Rows waiting to go into one ``executemany``, and who gets which id.

    This is the fast path: rows go in as they are.  A row whose idempotency key
    its session already holds makes the unique index raise IntegrityError; the
    writer then redoes the batch with :class:`_CheckedInserts`.
    """

    __slots__ = ("_changes", "_conn", "_now", "_rows", "_spans")

    def __init__(self, conn: sqlite3.Connection, now: str, changes: list[Change]) -> None:
        self._conn = conn
        self._now = now
        #: Each flush's rows go here too, with their first id (no copy).
        self._changes = changes
        self._rows: list[StoredRow] = []
        self._spans: list[tuple[list[int], int]] = []  # (ids to fill, how many)

    def add(self, op: Insert) -> tuple[list[int], int]:
        """Queue ``op``'s rows; return its id list (filled by :meth:`flush`) and its size."""
        tag, now, n = op.session_tag, self._now, len(op.rows)
        self._rows += [(r, c, ts or now, tag, m, k) for r, c, ts, m, k in op.rows]
        ids: list[int] = []
        self._spans.append((ids, n))
        return ids, n

    def _insert(self) -> int:
        """Insert the queued rows; return the first new id."""
        rows = self._rows
        conn = self._conn
        conn.executemany(
            "INSERT INTO nexus_messages (role, content, timestamp, session_tag, meta, idem_key) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        # One writer, AUTOINCREMENT, one statement: the new ids are consecutive.
        last: int = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
        first = last - len(rows) + 1
        self._changes.append(Added(first, rows))
        return first

    def flush(self) -> None:
        if not self._rows:
            return
        first = self._insert()
        for ids, n in self._spans:
            ids += range(first, first + n)
            first += n
        self._rows = []
        self._spans = []


class _CheckedInserts(_PendingInserts):
    """The careful path: every key is looked up, in the database and in the batch.

    A row whose key its session already holds is not inserted again; its
    caller gets the original id.
    """

    __slots__ = ("_fills", "_keys")

    def __init__(self, conn: sqlite3.Connection, now: str, changes: list[Change]) -> None:
        super().__init__(conn, now, changes)
        self._fills: list[list[tuple[list[int], int]]] = []  # per queued row: who gets its id
        self._keys: dict[tuple[str, str], int] = {}  # (tag, key) -> queued row

    def add(self, op: Insert) -> tuple[list[int], int]:
        tag = op.session_tag
        ids = [0] * len(op.rows)
        added = 0
        for i, (role, content, ts, meta, key) in enumerate(op.rows):
            if key is not None:
                j = self._keys.get((tag, key))
                if j is not None:  # the same key earlier in this batch
                    self._fills[j].append((ids, i))
                    continue
                found = self._conn.execute(
                    "SELECT id FROM nexus_messages WHERE idem_key = ? AND session_tag = ?",
                    (key, tag),
                ).fetchone()
                if found is not None:
                    ids[i] = found[0]
                    continue
                self._keys[(tag, key)] = len(self._rows)
            self._rows.append((role, content, ts or self._now, tag, meta, key))
            self._fills.append([(ids, i)])
            added += 1
        return ids, added

    def flush(self) -> None:
        if not self._rows:
            return
        first = self._insert()
        for j, fills in enumerate(self._fills):
            for ids, i in fills:
                ids[i] = first + j
        self._rows = []
        self._fills = []
        self._keys.clear()


def _clear_all_sql(scope: str | None) -> tuple[str, tuple[str, ...]]:
    if scope is None:
        return "DELETE FROM nexus_messages", ()
    if scope == "":
        lo, hi = scope_bounds(NS_MARK)
        return "DELETE FROM nexus_messages WHERE NOT (session_tag >= ? AND session_tag < ?)", (
            lo,
            hi,
        )
    lo, hi = scope_bounds(scope)
    return "DELETE FROM nexus_messages WHERE session_tag >= ? AND session_tag < ?", (lo, hi)
