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

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from ..wire.errors import NexusError
from ..wire.protocol import Message
from .base import Added, Change, ClearSession, Insert, Op, PopNewest, Removed, StoredRow
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
_PRUNE_LAST: Final = (
    "SELECT id FROM nexus_messages WHERE session_tag = ? ORDER BY id LIMIT 1 OFFSET ?"
)
_PRUNE_RANGE: Final = "DELETE FROM nexus_messages WHERE session_tag = ? AND id <= ?"
_NEWEST: Final = (
    f"SELECT {MESSAGE_COLUMNS} FROM nexus_messages WHERE session_tag = ? ORDER BY id DESC LIMIT 1"
)


class CountCache:
    """Committed per-session row counts, and the ``data_version`` they are true for.

    ``data_version`` of a connection changes when *another* connection commits
    to the database (our own commits leave it alone).  Read after ``BEGIN
    IMMEDIATE`` nobody else can commit until our COMMIT, so a value equal to
    the one seen in our previous transaction proves the counts are still
    exact; a different one drops them all and sessions are counted afresh.
    """

    __slots__ = ("counts", "data_version", "external_changes")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.data_version: int | None = None
        #: Transactions that found another writer's commit before them.
        self.external_changes = 0

    def sync(self, conn: sqlite3.Connection) -> bool:
        """Inside the write transaction: drop the counts if someone else wrote; True if so."""
        version: int = conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self.data_version:
            return False
        changed = self.data_version is not None
        self.data_version = version
        self.counts.clear()
        if changed:
            self.external_changes += 1
        return changed


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
) -> Outcome:
    """Run ``ops`` as one transaction and commit; roll back and raise on any error.

    ``now`` is the timestamp of rows that bring none.  ``counts_cache`` holds
    committed per-session row counts; it is checked against ``data_version``
    once the write lock is held, and updated only if the commit succeeds.
    ``lookup`` looks every idempotency key up first (the careful path, after
    an IntegrityError told us a key is already stored).
    """
    results: list[Any] = []
    changes: list[Change] = []
    inserts = (_CheckedInserts if lookup else _PendingInserts)(conn, now, changes)
    rows_added = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        # First thing under the write lock: are the cached counts still true?
        counts_cache.sync(conn)
        counts = _Counts(conn, counts_cache.counts)
        for op in ops:
            if isinstance(op, Insert):
                ids, added = inserts.add(op)
                results.append(ids)
                counts.add(op.session_tag, added)
                rows_added += added
                continue
            inserts.flush()
            if isinstance(op, PopNewest):
                popped = _pop(conn, op, counts)
                if isinstance(popped, Message):
                    changes.append(Removed(op.session_tag, ids=(popped.id,)))
                results.append(popped)
            elif isinstance(op, ClearSession):
                n = conn.execute(
                    "DELETE FROM nexus_messages WHERE session_tag = ?", (op.session_tag,)
                ).rowcount
                counts.set(op.session_tag, 0)
                if n:
                    changes.append(Removed(op.session_tag, before_id=_next_id(conn)))
                results.append(n)
            else:
                n = conn.execute(*_clear_all_sql(op.scope)).rowcount
                counts.clear_all()
                if n:
                    changes.append(Removed(None, before_id=_next_id(conn), scope=op.scope))
                results.append(n)
        inserts.flush()
        pruned = _prune(conn, counts, max_messages, changes)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    counts.commit()
    return Outcome(results, rows_added, pruned, changes)


def _next_id(conn: sqlite3.Connection) -> int:
    """The id the next stored row will get (AUTOINCREMENT never reuses one)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'nexus_messages'").fetchone()
    return 1 if row is None else int(row[0]) + 1


def _pop(conn: sqlite3.Connection, op: PopNewest, counts: _Counts) -> Message | NexusError | None:
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


def _prune(conn: sqlite3.Connection, counts: _Counts, keep: int, changes: list[Change]) -> int:
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
            conn.execute(_PRUNE_RANGE, (tag, last))
            below[tag] = last + 1
        else:
            small.append((tag, excess))
    for i in range(0, len(small), _PRUNE_CHUNK):
        chunk = small[i : i + _PRUNE_CHUNK]
        union = " UNION ALL ".join([_PRUNE_ONE] * len(chunk))
        params = [x for pair in chunk for x in pair]
        gone = conn.execute(
            f"DELETE FROM nexus_messages WHERE id IN ({union}) RETURNING session_tag, id", params
        ).fetchall()
        for tag, row_id in gone:
            if row_id >= below.get(tag, 0):
                below[tag] = row_id + 1
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


class _Counts:
    """Per-session row counts for one transaction, over the committed cache.

    Counts cached after a commit stay true until the next commit by anyone
    (:class:`CountCache` checks); a session not cached is counted once (index scan).
    Nothing reaches the cache unless the transaction commits.
    """

    __slots__ = ("_cache", "_cleared", "_conn", "_work", "grown")

    def __init__(self, conn: sqlite3.Connection, cache: dict[str, int]) -> None:
        self._conn = conn
        self._cache = cache
        self._work: dict[str, int] = {}
        self._cleared = False
        self.grown: set[str] = set()

    def get(self, tag: str) -> int:
        n = self._work.get(tag)
        if n is None:
            n = None if self._cleared else self._cache.get(tag)
            if n is None:
                n = self._conn.execute(
                    "SELECT COUNT(*) FROM nexus_messages WHERE session_tag = ?", (tag,)
                ).fetchone()[0]
            self._work[tag] = n
        return n

    def add(self, tag: str, n: int) -> None:
        self._work[tag] = self.get(tag) + n
        if n > 0:
            self.grown.add(tag)

    def set(self, tag: str, n: int) -> None:
        self._work[tag] = n

    def clear_all(self) -> None:
        self._cleared = True
        self._work.clear()

    def commit(self) -> None:
        if self._cleared:
            self._cache.clear()
        self._cache.update(self._work)


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
