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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ..wire.errors import NexusError
from ..wire.protocol import Message
from . import editing, floors, marks
from .counts import CountCache, Counts
from .editing import Retentions
from .index import IndexState, Upkeep
from .inserts import CheckedInserts, PendingInserts
from .ops import (
    Change,
    ClearAll,
    ClearSession,
    DeleteIds,
    Fork,
    Forked,
    Insert,
    Op,
    PopNewest,
    Removed,
    Retention,
    SetRetention,
)
from .schema import MESSAGE_COLUMNS, VISIBLE_ONE, message_of

__all__ = ["CountCache", "Outcome", "run"]

#: Sessions pruned per DELETE (SQLite allows 500 terms in a compound SELECT).
_PRUNE_CHUNK: Final = 200
_PRUNE_ONE: Final = (
    "SELECT id FROM (SELECT id FROM nexus_messages WHERE session_tag = ?"
    f" AND {VISIBLE_ONE} ORDER BY id LIMIT ?)"
)
#: From this many rows on, one session's overflow goes as an id range (measured:
#: 25% cheaper than an id list for 100 rows, no better for one).
_PRUNE_RANGE_FROM: Final = 16
_PRUNE_LAST: Final = (
    f"SELECT id FROM nexus_messages WHERE session_tag = ? AND {VISIBLE_ONE}"
    " ORDER BY id LIMIT 1 OFFSET ?"
)
#: (Rows under a floor are left to the sweep: deleting them here would hold the writer.)
_PRUNE_RANGE: Final = (
    f"DELETE FROM nexus_messages WHERE session_tag = ? AND id <= ? AND {VISIBLE_ONE}"
)
_NEWEST: Final = (
    f"SELECT {MESSAGE_COLUMNS} FROM nexus_messages WHERE session_tag = ? AND {VISIBLE_ONE}"
    " ORDER BY id DESC LIMIT 1"
)


@dataclass(slots=True)
class Outcome:
    """What a committed batch did: per-op results, rows stored, rows pruned, the
    changes in the order they happened (for watchers), the retention it set
    (for the writer's copy, once committed), and whether it hid rows (the
    sweep has work)."""

    results: list[Any]
    rows_added: int
    pruned: int
    changes: list[Change]
    retention: list[tuple[str, Retention]] = field(default_factory=list)
    hid: bool = False


def run(
    conn: sqlite3.Connection,
    ops: Sequence[Op],
    *,
    now: str,
    clock: float,
    counts_cache: CountCache,
    retentions: Retentions,
    lookup: bool,
    index: IndexState | None = None,
) -> Outcome:
    """Run ``ops`` as one transaction and commit; roll back and raise on any error.

    ``now`` is the timestamp of rows that bring none, ``clock`` the same
    instant in Unix seconds (the commit time retention by age goes by).
    ``counts_cache`` holds committed per-session row counts; it is checked
    against ``data_version`` once the write lock is held, and updated only if
    the commit succeeds.  ``retentions``: how many rows each session keeps.
    ``lookup`` looks every idempotency key up first (the careful path, after
    an IntegrityError told us a key is already stored).  ``index``: the
    full-text index's state when there is one; its upkeep goes last (:class:`~.index.Upkeep`).
    """
    results: list[Any] = []
    changes: list[Change] = []
    inserts = (CheckedInserts if lookup else PendingInserts)(conn, now, changes)
    out = Outcome(results, 0, 0, changes)
    conn.execute("BEGIN IMMEDIATE")
    fts = None if index is None else Upkeep(conn, index)
    inserts.fts = fts
    try:
        # First thing under the write lock: are the cached counts still true?
        counts_cache.sync(conn)
        counts = Counts(conn, counts_cache.counts)
        for op in ops:
            if isinstance(op, Insert):
                ids, added = inserts.add(op)
                results.append(ids)
                counts.add(op.session_tag, added)
                out.rows_added += added
                continue
            inserts.flush()
            if fts is not None:
                fts.catch_up(changes)
            results.append(_edit(conn, op, counts, inserts, fts, retentions, out))
        inserts.flush()
        if fts is not None:
            fts.catch_up(changes)
        out.pruned = _prune(conn, counts, retentions, changes, fts)
        if fts is not None:
            fts.flush()
        if inserts.last_id:
            marks.mark(conn, inserts.last_id, clock)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    counts.commit()
    return out


def _edit(
    conn: sqlite3.Connection,
    op: Op,
    counts: Counts,
    inserts: PendingInserts,
    fts: Upkeep | None,
    retentions: Retentions,
    out: Outcome,
) -> Any:
    """Run one op other than an insert; its result."""
    changes = out.changes
    if isinstance(op, PopNewest):
        popped = _pop(conn, op, counts)
        if isinstance(popped, Message):
            changes.append(Removed(op.session_tag, ids=(popped.id,)))
            if fts is not None:
                fts.removed(popped.id, popped.content)
        return popped
    if isinstance(op, ClearSession):
        tag = op.session_tag
        removing = None if fts is None else _removing(fts, tag.__eq__)
        n = floors.clear_session(conn, tag, counts, _next_id(conn), removing)
        out.hid |= n >= floors.HIDE_FROM
        if n:
            changes.append(Removed(tag, before_id=_next_id(conn)))
        return n
    if isinstance(op, ClearAll):
        removing = (
            None if fts is None else _removing(fts, functools.partial(floors.in_scope, op.scope))
        )
        n = floors.clear_scope(conn, op.scope, counts, _next_id(conn), removing)
        out.hid |= n >= floors.HIDE_FROM
        if n:
            changes.append(Removed(None, before_id=_next_id(conn), scope=op.scope))
        return n
    if isinstance(op, DeleteIds):
        deleted, gone = editing.delete_ids(conn, op, counts, changes)
        if fts is not None:
            for row_id, content in gone:
                fts.removed(row_id, content)
        return deleted
    if isinstance(op, Fork):
        rows = editing.fork_rows(conn, op, counts)
        if isinstance(rows, NexusError):
            return rows
        counts.get(op.new_tag)  # counted before the copies go in, not after
        ids, added = inserts.add(Insert(op.new_tag, rows))
        inserts.flush()
        counts.add(op.new_tag, added)
        out.rows_added += added
        return Forked(len(ids), ids[0], ids[-1])
    if isinstance(op, SetRetention):
        done = editing.set_retention(conn, op, counts, retentions, changes)
        if not isinstance(done, NexusError):
            out.retention.append((op.session_tag, done))
            out.hid = True
        return done
    raise TypeError(f"not a write op: {op!r}")


def _removing(
    fts: Upkeep, tags: Callable[[str], bool]
) -> Callable[[str, tuple[object, ...]], None]:
    return lambda where, params: fts.removing(where, params, tags)


def _next_id(conn: sqlite3.Connection) -> int:
    """The id the next stored row will get (AUTOINCREMENT never reuses one)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'nexus_messages'").fetchone()
    return 1 if row is None else int(row[0]) + 1


def _pop(conn: sqlite3.Connection, op: PopNewest, counts: Counts) -> Message | NexusError | None:
    tag = op.session_tag
    row = conn.execute(_NEWEST, (tag, tag)).fetchone()
    if row is None:
        return None
    msg = message_of(row)
    refusal = op.refuse(msg) if op.refuse is not None else None
    if refusal is not None:
        return refusal
    conn.execute("DELETE FROM nexus_messages WHERE id = ?", (msg.id,))
    counts.deleted(tag, 1)
    return msg


def _prune(
    conn: sqlite3.Connection,
    counts: Counts,
    retentions: Retentions,
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
    small: list[tuple[str, int]] = []
    pruned = 0
    below: dict[str, int] = {}
    for tag in counts.grown:
        keep = retentions.max_messages(tag)
        if not keep:
            continue
        excess = counts.get(tag) - keep
        if excess <= 0:
            continue
        counts.set(tag, keep)
        pruned += excess
        if excess >= _PRUNE_RANGE_FROM:
            (last,) = conn.execute(_PRUNE_LAST, (tag, tag, excess - 1)).fetchone()
            if fts is not None:
                fts.removing(
                    f"session_tag = ? AND id <= ? AND {VISIBLE_ONE}",
                    (tag, last, tag),
                    tag.__eq__,
                    last,
                )
            conn.execute(_PRUNE_RANGE, (tag, last, tag))
            below[tag] = last + 1
        else:
            small.append((tag, excess))
    for i in range(0, len(small), _PRUNE_CHUNK):
        chunk = small[i : i + _PRUNE_CHUNK]
        union = " UNION ALL ".join([_PRUNE_ONE] * len(chunk))
        params = [x for tag, excess in chunk for x in (tag, tag, excess)]
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
