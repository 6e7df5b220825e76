"""The inserts of one batch: queued, then one ``executemany``, and who gets which id.

:func:`~.writes.run` queues each append's rows here and flushes them before
any other op (so ids follow op order).  Two flavours: the fast path inserts
as is; the careful path (after an IntegrityError said a key is stored)
looks every idempotency key up first.
"""

from __future__ import annotations

import sqlite3
from typing import Final

from .index import Upkeep
from .ops import Added, Change, Insert, StoredRow
from .schema import VISIBLE_ONE

__all__ = ["CheckedInserts", "PendingInserts"]

#: A key's row in a session: id, content, whether it is visible (not cleared).
_KEYED: Final = (
    f"SELECT id, content, {VISIBLE_ONE} FROM nexus_messages WHERE idem_key = ? AND session_tag = ?"
)


class PendingInserts:
    """Rows waiting to go into one ``executemany``, and who gets which id.

    This is the fast path: rows go in as they are.  A row whose idempotency key
    its session already holds makes the unique index raise IntegrityError; the
    writer then redoes the batch with :class:`CheckedInserts`.
    """

    __slots__ = ("_changes", "_conn", "_now", "_rows", "_spans", "fts", "last_id")

    def __init__(self, conn: sqlite3.Connection, now: str, changes: list[Change]) -> None:
        self._conn = conn
        self._now = now
        #: The full-text index's upkeep, told of hidden rows a key frees (None: no index).
        self.fts: Upkeep | None = None
        #: The newest id stored so far (0: none).
        self.last_id = 0
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
        self.last_id = last
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


class CheckedInserts(PendingInserts):
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
                found = self._conn.execute(_KEYED, (tag, key, tag)).fetchone()
                if found is not None:
                    if found[2]:
                        ids[i] = found[0]
                        continue
                    # Its row was cleared, only not swept yet: it goes now.
                    self._conn.execute("DELETE FROM nexus_messages WHERE id = ?", (found[0],))
                    if self.fts is not None:
                        self.fts.removed(found[0], found[1])
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
