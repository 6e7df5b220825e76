"""The appends of one batch: runs of them as one INSERT each, and who gets which id.

:func:`~.writes.run` queues each :class:`~nexusd.storage.ops.Insert` here and
flushes the run before any other op, so ids follow op order.  One statement
per run stores the rows (ids consecutive: ``nextval`` in ``unnest`` order,
under the write lock), raises ``nexus_sessions`` and moves the commit mark;
its ids are read back only when the log needs them (:meth:`Batch.resolve`),
so a batch of appends waits for the server once before its log row.

Idempotency without burning ids: a row whose key its session already holds
is left out by the INSERT itself, before ``nextval``, and its caller gets the
holder's id; a key twice in a run is stored once.  A holder that is hidden
(cleared, not yet swept) must give way to the new row: that is the careful
path's (``lookup``: keys looked up first, hidden holders deleted), which the
backend runs when a batch finds one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import psycopg

from ..ops import Added, Change, Insert, NewRow, StoredRow

__all__ = ["Batch"]

Conn = psycopg.AsyncConnection[Any]

#: One run of appends: rows whose key their session already holds are left out
#: (before ``nextval``: they burn no id), the others stored with consecutive ids
#: in op order; their sessions' counts raised; the commit mark moved.
_INSERT: Final = (
    "WITH ins AS (INSERT INTO nexus_messages"
    " (id, role, content, timestamp, session_tag, meta, idem_key)"
    " SELECT nextval('nexus_messages_id_seq'), r, c, coalesce(t, current_setting('nexusd.now')),"
    " g, m, k FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[],"
    " %b::text[]) WITH ORDINALITY AS x(r, c, t, g, m, k, o)"
    " WHERE k IS NULL OR NOT EXISTS (SELECT 1 FROM nexus_messages AS h"
    " WHERE h.idem_key = x.k AND h.session_tag = x.g)"
    " ORDER BY o RETURNING id, session_tag),"
    " up AS (INSERT INTO nexus_sessions (session_tag, messages)"
    " SELECT session_tag, count(*) FROM ins GROUP BY session_tag ON CONFLICT (session_tag)"
    " DO UPDATE SET messages = nexus_sessions.messages + excluded.messages),"
    " mk AS (INSERT INTO nexus_marks (second, last_id, at)"
    " SELECT floor(c)::bigint, (SELECT max(id) FROM ins), c"
    " FROM (SELECT current_setting('nexusd.clock')::float8 AS c) AS x"
    " WHERE EXISTS (SELECT 1 FROM ins)"
    " ON CONFLICT (second) DO UPDATE SET last_id = excluded.last_id, at = excluded.at)"
    " SELECT id FROM ins ORDER BY id"
)
#: Every session the batch grew, when over its retention (its own in
#: ``nexus_retention``, else the daemon's default), loses exactly its oldest
#: visible overflow and its count becomes its retention; one statement, after
#: the batch's last op.  (Rows under a floor are left to the sweep.)
#: Params: the daemon's default, the tags.
_PRUNE: Final = (
    "WITH a AS (SELECT s.session_tag AS tag, s.messages AS total,"
    " coalesce((SELECT r.max_messages FROM nexus_retention AS r"
    " WHERE r.session_tag = s.session_tag), %s) AS keep FROM nexus_sessions AS s"
    " WHERE s.session_tag = ANY(%s::text[])),"
    " g AS (SELECT * FROM a WHERE keep > 0 AND total > keep),"
    " up AS (UPDATE nexus_sessions AS s SET messages = g.keep FROM g WHERE s.session_tag = g.tag),"
    " d AS (DELETE FROM nexus_messages AS m USING (SELECT o.id FROM g CROSS JOIN LATERAL"
    " (SELECT id FROM nexus_messages WHERE session_tag = g.tag AND id >= coalesce((SELECT"
    " below_id FROM nexus_floors AS f WHERE f.session_tag = g.tag), 0) ORDER BY id"
    " LIMIT g.total - g.keep) AS o) AS v WHERE m.id = v.id RETURNING m.session_tag, m.id)"
    " SELECT session_tag, max(id), count(*) FROM d GROUP BY session_tag"
)
#: A key's holder in its session: id, and whether it is visible (not cleared).
_KEYED: Final = (
    "SELECT k.g, k.k, m.id, m.id >= coalesce(f.below_id, 0)"
    " FROM unnest(%s::text[], %s::text[]) AS k(g, k)"
    " JOIN nexus_messages AS m ON m.idem_key = k.k AND m.session_tag = k.g"
    " LEFT JOIN nexus_floors AS f ON f.session_tag = k.g"
)


@dataclass(slots=True)
class _Pending:
    """One run's INSERT, sent; its ids are read back by :meth:`Batch.resolve`."""

    cursor: Any
    rows: list[NewRow]
    tags: list[str]
    fills: list[list[tuple[list[int], int]]]
    change_at: int


class Batch:
    """The appends of one transaction: runs queued, sent, and their ids read back."""

    def __init__(
        self,
        conn: Conn,
        changes: list[Change],
        *,
        lookup: bool,
        clock: Any,
        default_messages: int,
    ) -> None:
        self.conn = conn
        self.default_messages = default_messages
        #: The batch's changes, in order (each run's Added goes in at its place).
        self.changes = changes
        self.rows_added = 0
        #: The commit time (Unix seconds), once read back.
        self.clock = 0.0
        self.lookup = lookup
        self.clock_cursor = clock
        self.now = ""
        self.run: list[tuple[Insert, list[int]]] = []
        self.pending: list[_Pending] = []
        self.grown: set[str] = set()
        #: The ids one run stored (while its left-out rows are sorted out).
        self.stored_now: set[int] = set()

    def add(self, op: Insert) -> list[int]:
        ids = [0] * len(op.rows)
        self.run.append((op, ids))
        return ids

    async def flush(self, *, last: bool = False) -> Any:
        """Send the queued run as one INSERT (after its key lookup on the careful path);
        after the ``last`` run, the pruning (its cursor, or None)."""
        run, self.run = self.run, []
        if run:
            await self._insert(run)
        if not last or not self.grown:
            return None
        return await self.conn.execute(_PRUNE, (self.default_messages, list(self.grown)))

    async def _insert(self, run: list[tuple[Insert, list[int]]]) -> None:
        """Send one INSERT of the run's rows (a key twice in the run: stored once)."""
        found = await self._lookup(run) if self.lookup else {}
        rows: list[NewRow] = []
        tags: list[str] = []
        fills: list[list[tuple[list[int], int]]] = []
        queued: dict[tuple[str, str], int] = {}
        for op, ids in run:
            tag = op.session_tag
            for i, row in enumerate(op.rows):
                key = row[4]
                if key is not None:
                    j = queued.get((tag, key))
                    if j is not None:  # the same key earlier in this run
                        fills[j].append((ids, i))
                        continue
                    held = found.get((tag, key))
                    if held is not None:
                        ids[i] = held
                        continue
                    queued[(tag, key)] = len(rows)
                rows.append(row)
                tags.append(tag)
                fills.append([(ids, i)])
        if not rows:
            return
        params = (
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] or None for r in rows],  # none (or ""): the commit time
            tags,
            [r[3] for r in rows],
            [r[4] for r in rows],
        )
        cur = await self.conn.execute(_INSERT, params)
        self.grown.update(tags)
        self.changes.append(Added(0, []))  # its place; filled by resolve()
        self.pending.append(_Pending(cur, rows, tags, fills, len(self.changes) - 1))

    async def _lookup(self, run: list[tuple[Insert, list[int]]]) -> dict[tuple[str, str], int]:
        """Ids of the run's keys held by visible rows; hidden holders are deleted."""
        pairs = {(op.session_tag, row[4]) for op, _ in run for row in op.rows if row[4] is not None}
        if not pairs:
            return {}
        tags, keys = [p[0] for p in pairs], [p[1] for p in pairs]
        cur = await self.conn.execute(_KEYED, (tags, keys))
        found: dict[tuple[str, str], int] = {}
        hidden: list[int] = []
        for tag, key, row_id, visible in await cur.fetchall():
            if visible:
                found[(tag, key)] = int(row_id)
            else:  # cleared, only not swept yet: it goes now (it was not counted)
                hidden.append(int(row_id))
        if hidden:
            await self.conn.execute("DELETE FROM nexus_messages WHERE id = ANY(%s)", (hidden,))
        return found

    async def resolve(self) -> None:
        """Read back the ids of every run sent; fill the results and the changes."""
        if not self.now:
            row = await self.clock_cursor.fetchone()
            self.clock, self.now = float(row[0]), str(row[1])
        now = self.now
        for p in self.pending:
            ids = [int(r[0]) for r in await p.cursor.fetchall()]
            if ids and ids[-1] - ids[0] != len(ids) - 1:
                # Only another program's nextval() between ours could do this.
                raise psycopg.errors.InternalError("the ids of one insert are not consecutive")
            if len(ids) < len(p.rows):  # keys already stored: a resend
                self.stored_now = set(ids)
                await self._held(p)
            self.rows_added += len(p.rows)
            next_id = iter(ids)
            for fills in p.fills:
                row_id = next(next_id)
                for target, i in fills:
                    target[i] = row_id
            stored: list[StoredRow] = [
                (r, c, t or now, g, m, k) for (r, c, t, m, k), g in zip(p.rows, p.tags, strict=True)
            ]
            self.changes[p.change_at] = Added(ids[0] if ids else 0, stored)
        self.pending = []
        changes = self.changes
        changes[:] = [c for c in changes if not (type(c) is Added and not c.rows)]

    async def _held(self, p: _Pending) -> None:
        """Some rows of ``p`` were left out, their keys already stored: answer the
        holders' ids.  A holder that is hidden (cleared, not swept) should have
        given way: that is the careful path's to do (the batch runs again)."""
        tags = [g for g, r in zip(p.tags, p.rows, strict=True) if r[4] is not None]
        keys = [r[4] for r in p.rows if r[4] is not None]
        cur = await self.conn.execute(_KEYED, (tags, keys))
        held = {(g, k): (int(i), bool(v)) for g, k, i, v in await cur.fetchall()}
        keep = []
        for j, (g, r) in enumerate(zip(p.tags, p.rows, strict=True)):
            holder = held.get((g, r[4])) if r[4] is not None else None
            if holder is None or holder[0] in self.stored_now:
                keep.append(j)
                continue
            if not holder[1]:
                raise psycopg.errors.UniqueViolation("a key is held by a cleared row")
            for target, i in p.fills[j]:
                target[i] = holder[0]
        p.rows = [p.rows[j] for j in keep]
        p.tags = [p.tags[j] for j in keep]
        p.fills = [p.fills[j] for j in keep]
