"""The write ops that edit a conversation: delete by id, fork, a session's own retention.

Each runs inside the batch's transaction (:func:`~.writes.run` calls them
in op order), keeps the per-session counts exact, tells the full-text index
what it removes, and records what watchers must hear.  Per-session retention
lives in ``nexus_retention``; :class:`Retentions` is the writer's copy of it,
changed only after the commit that stored the change.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from typing import Final

from ..wire.errors import NexusError
from . import ops
from .counts import Counts
from .floors import hide_below
from .ops import (
    Change,
    Deleted,
    DeleteIds,
    Fork,
    NewRow,
    Removed,
    Retention,
    SetRetention,
)
from .schema import VISIBLE_ONE, row_size

__all__ = ["Retentions", "delete_ids", "fork_rows", "set_retention"]

#: Ids per DELETE statement (well under SQLite's 32766 bound variables).
_IDS_CHUNK: Final = 500
#: A copy's meta: the original's with ``forked_from`` (one ``?``: the source's tag).
_LINKED: Final = (
    "json_set(coalesce(meta, '{}'), '$.forked_from', json_object('session_tag', ?, 'id', id))"
)


class Retentions:
    """Every session's own retention (``nexus_retention``), and the daemon's defaults."""

    __slots__ = ("_ages", "default_age", "default_messages", "own")

    def __init__(self, default_messages: int, default_age: float) -> None:
        self.default_messages = default_messages
        self.default_age = default_age
        #: Changed on the writer's thread only; the event loop only looks tags up.
        self.own: dict[str, Retention] = {}
        #: How many sessions have each age of their own (for :meth:`shortest_age`).
        self._ages: Counter[float] = Counter()

    def load(self, conn: sqlite3.Connection) -> None:
        self.own = {}
        self._ages.clear()
        for tag, n, age in conn.execute(
            "SELECT session_tag, max_messages, max_age FROM nexus_retention"
        ):
            self.update(tag, Retention(n, age))

    def shortest_age(self) -> float:
        """The shortest age limit in force (0: none)."""
        ages = [age for age in self._ages if age] + [self.default_age]
        return min((a for a in ages if a), default=0.0)

    def max_messages(self, tag: str) -> int:
        """Rows ``tag`` keeps (0: unbounded)."""
        own = self.own.get(tag)
        if own is None or own.max_messages is None:
            return self.default_messages
        return own.max_messages

    def update(self, tag: str, retention: Retention) -> None:
        """After the commit that stored it (the writer's thread)."""
        before = self.own.pop(tag, None)
        if before is not None and before.max_age is not None:
            self._ages[before.max_age] -= 1
            if not self._ages[before.max_age]:
                del self._ages[before.max_age]
        if retention.max_messages is not None or retention.max_age is not None:
            self.own[tag] = retention
            if retention.max_age is not None:
                self._ages[retention.max_age] += 1


def delete_ids(
    conn: sqlite3.Connection, op: DeleteIds, counts: Counts, changes: list[Change]
) -> tuple[Deleted, list[tuple[int, str]]]:
    """Delete ``op.ids`` that ``op.session_tag`` holds (visible ones); also return the
    deleted rows' (id, content), for the full-text index."""
    tag = op.session_tag
    wanted = sorted(set(op.ids))
    gone: list[tuple[int, str]] = []
    for i in range(0, len(wanted), _IDS_CHUNK):
        chunk = wanted[i : i + _IDS_CHUNK]
        marks = ", ".join("?" * len(chunk))
        gone += conn.execute(
            f"DELETE FROM nexus_messages WHERE session_tag = ? AND id IN ({marks})"
            f" AND {VISIBLE_ONE} RETURNING id, content",
            (tag, *chunk, tag),
        ).fetchall()
    deleted = sorted(row_id for row_id, _ in gone)
    if deleted:
        counts.deleted(tag, len(deleted))
        changes.append(Removed(tag, ids=tuple(deleted)))
    found = set(deleted)
    return Deleted(deleted, [i for i in wanted if i not in found]), gone


def fork_rows(conn: sqlite3.Connection, op: Fork, counts: Counts) -> list[NewRow] | NexusError:
    """The rows :class:`Fork` stores (to insert like an append's), or why it refuses.

    Each copy keeps role, content, timestamp and meta, and gains in meta
    ``forked_from``: the source's tag (as its client names it) and the
    original's id.  No idempotency key: a copy is not a resend.
    """
    refused = ops.fork_refused(op, counts.get(op.new_tag))
    if refused is not None:
        return refused
    src = op.source_tag
    upto = op.up_to_id if op.up_to_id is not None else 2**63 - 1
    where = f"session_tag = ? AND id <= ? AND {VISIBLE_ONE}"
    params = (src, upto, src)
    if op.up_to_id is not None:
        hit = conn.execute(
            f"SELECT 1 FROM nexus_messages WHERE id = ? AND {where}", (op.up_to_id, *params)
        ).fetchone()
        if hit is None:
            return ops.fork_missing(op, up_to=True)
    n, size = conn.execute(
        f"SELECT COUNT(*), coalesce(SUM({row_size()}), 0) FROM nexus_messages WHERE {where}",
        params,
    ).fetchone()
    if n == 0:
        return ops.fork_missing(op, up_to=False)
    too_large = ops.fork_too_large(n, size)
    if too_large is not None:
        return too_large
    if op.max_meta:
        over = conn.execute(
            f"SELECT id FROM nexus_messages WHERE {where} AND length(CAST({_LINKED} AS BLOB)) > ?"
            " ORDER BY id LIMIT 1",
            (*params, op.link_tag, op.max_meta),
        ).fetchone()
        if over is not None:
            return ops.fork_meta_too_big(op, over[0])
    return [
        (role, content, ts, meta, None)
        for role, content, ts, meta in conn.execute(
            f"SELECT role, content, timestamp, {_LINKED}"
            f" FROM nexus_messages WHERE {where} ORDER BY id",
            (op.link_tag, *params),
        )
    ]


def set_retention(
    conn: sqlite3.Connection,
    op: SetRetention,
    counts: Counts,
    retentions: Retentions,
    changes: list[Change],
) -> Retention | NexusError:
    """Store ``op``'s retention; hide the overflow a lower ``max_messages`` leaves."""
    tag, r = op.session_tag, op.retention
    full = ops.retentions_full(len(retentions.own), tag in retentions.own)
    if full is not None:
        return full
    if r.max_messages is None and r.max_age is None:
        conn.execute("DELETE FROM nexus_retention WHERE session_tag = ?", (tag,))
    else:
        conn.execute(
            "INSERT OR REPLACE INTO nexus_retention (session_tag, max_messages, max_age)"
            " VALUES (?, ?, ?)",
            (tag, r.max_messages, r.max_age),
        )
    keep = retentions.default_messages if r.max_messages is None else r.max_messages
    excess = counts.get(tag) - keep if keep else 0
    if excess > 0:
        (first_kept,) = conn.execute(
            f"SELECT id FROM nexus_messages WHERE session_tag = ? AND {VISIBLE_ONE}"
            " ORDER BY id LIMIT 1 OFFSET ?",
            (tag, tag, excess),
        ).fetchone()
        hide_below(conn, tag, first_kept)
        counts.set(tag, keep)
        changes.append(Removed(tag, before_id=first_kept))
    return r
