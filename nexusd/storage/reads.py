"""The SQLite backend's reads: a pool of read-only aiosqlite connections.

Reads never touch the writer's queue.  Each connection is opened ``mode=ro``
with ``query_only`` on, and thanks to WAL a read runs concurrently with the
writer's transaction; a read that starts after an append was acknowledged sees
it.  Every query is a single ``execute_fetchall`` (one thread hop).

History pages are bounded by bytes in SQL, so a request for 10 000 rows of
1 MiB never materialises more than one frame's worth of rows in the daemon: a
plain query guarded by the page's total size answers when everything fits (the
usual case); otherwise a running sum over the rows in query order finds where
to cut.  A first row that alone is over the estimate is returned alone and
flagged, so the caller checks its real size instead of answering an empty page.
``sessions`` pages are bounded the same way, by the real lengths of the tags
and timestamps (rows stored by older versions may hold long ones).
"""

from __future__ import annotations

import functools
import logging
import math
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import aiosqlite
import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..wire.errors import BadRequest, Unavailable
from ..wire.protocol import Message, SearchHit, SessionInfo
from . import search as fts
from .base import Page, SearchQuery, keep_sessions
from .floors import scope_clause
from .schema import (
    MESSAGE_COLUMNS,
    VISIBLE_ONE,
    StorageError,
    message_of,
    open_reader,
    row_size,
    visible,
)

logger = logging.getLogger(__name__)

#: How long one search may run (seconds of its reader's time) before it is stopped.
SEARCH_SECONDS: Final = 2.0
#: Timestamps up to this many bytes are read with their session's entry.
_SHORT: Final = 256

# Rows are kept while the running sum of their sizes (:func:`.schema.row_size`)
# *before* them is under the budget, which returns one row past the budget as a
# sentinel; the window's row count tells "cut" from "complete".  The window runs
# over (id, size) only, so no content is copied into SQLite's temporary table.
_SIZE: Final = row_size()


#: A row if some session has rows cleared but not yet swept.
_ANY_FLOOR: Final = "SELECT 1 FROM nexus_floors LIMIT 1"
#: Which rows a page is of: one session's (else every session's in a scope).
_ONE_SESSION: Final = f"session_tag = ? AND {VISIBLE_ONE}"


@functools.cache
def _history_queries(
    before: bool, after: bool, newest_first: bool, rows: str = _ONE_SESSION
) -> tuple[str, str]:
    """(guarded, windowed) SQL for one shape of history request (``rows``: whose)."""
    where = ""
    if after:
        where += " AND id > ?"
    if before:
        where += " AND id < ?"
    order = "DESC" if newest_first else "ASC"
    guarded = (
        f"SELECT {MESSAGE_COLUMNS} FROM nexus_messages WHERE {rows}{where}"
        f" AND (SELECT SUM(size) FROM (SELECT {_SIZE} AS size FROM nexus_messages"
        f"      WHERE {rows}{where} ORDER BY id {order} LIMIT ?)) <= ?"
        f" ORDER BY id {order} LIMIT ?"
    )
    windowed = (
        f"SELECT m.id, m.role, m.content, m.timestamp, m.session_tag, m.meta, w.run, w.total"
        f" FROM ("
        f"  SELECT id, size, SUM(size) OVER (ORDER BY id {order} ROWS UNBOUNDED PRECEDING) AS run,"
        f"  COUNT(*) OVER () AS total"
        f"  FROM (SELECT id, {_SIZE} AS size FROM nexus_messages"
        f"        WHERE {rows}{where} ORDER BY id {order} LIMIT ?)"
        f") AS w JOIN nexus_messages AS m ON m.id = w.id"
        f" WHERE w.run - w.size < ? ORDER BY m.id {order}"
    )
    return guarded, windowed


def _fit(sizes: list[int], budget: int) -> tuple[int, bool]:
    """How many leading hits fit ``budget``, and whether the page is one hit whose
    estimate alone is over it (it comes back alone, to be measured)."""
    total = 0
    for i, size in enumerate(sizes):
        total += size + fts.SNIPPET_CHARS * 4 + fts.HIT_OVERHEAD
        if total > budget:
            return (1, True) if i == 0 else (i, False)
    return len(sizes), False


class ReaderPool:
    """A fixed set of read-only connections, lent out one query at a time."""

    def __init__(self, db_path: Path, *, size: int, search_seconds: float = SEARCH_SECONDS) -> None:
        if size < 1:
            raise ValueError("reader pool size must be >= 1")
        self.db_path = db_path
        #: How long one search may run before SQLite is told to stop it.
        self.search_seconds = search_seconds
        #: Searches at once: one reader is always left for everything else.
        self._searches = anyio.Semaphore(max(1, size - 1))
        #: Per connection, when the search running on it must stop (read by
        #: SQLite's progress handler on the connection's own thread).
        self._deadline: dict[int, float] = {}
        self.size = size
        self._conns: list[aiosqlite.Connection] = []
        self._idle_send: MemoryObjectSendStream[aiosqlite.Connection]
        self._idle_recv: MemoryObjectReceiveStream[aiosqlite.Connection]
        self._idle_send, self._idle_recv = anyio.create_memory_object_stream[aiosqlite.Connection](
            size
        )

    async def open(self) -> None:
        #: The last storage failure logged (each different one once, not per query).
        self._logged_failure: str | None = None
        path = self.db_path
        for _ in range(self.size):
            try:
                # aiosqlite's own thread per connection runs the set-up of schema.py.
                conn = await aiosqlite.Connection(functools.partial(open_reader, path), 64)
            except sqlite3.Error as exc:
                raise StorageError(f"cannot open a reader on {self.db_path}: {exc}") from None
            await conn.set_progress_handler(functools.partial(self._too_long, id(conn)), 10_000)
            self._conns.append(conn)
            self._idle_send.send_nowait(conn)

    async def aclose(self) -> None:
        conns, self._conns = self._conns, []
        with anyio.CancelScope(shield=True):
            for conn in conns:
                await conn.close()

    def _too_long(self, key: int) -> bool:
        """SQLite's progress handler: True stops the statement ("interrupted")."""
        return time.monotonic() > self._deadline.get(key, math.inf)

    @asynccontextmanager
    async def _lend(self) -> AsyncIterator[aiosqlite.Connection]:
        conn = await self._idle_recv.receive()
        try:
            yield conn
        finally:
            self._idle_send.send_nowait(conn)

    async def fetch(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """Run one query; a failure of SQLite underneath it is ``unavailable``, logged once."""
        try:
            async with self._lend() as conn:
                return list(await conn.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise self._failed(exc) from None

    def _failed(self, exc: sqlite3.Error) -> Unavailable:
        # A storage failure (file deleted or replaced, I/O error, corrupt
        # page), not a bug: say so to the caller, and to the log once.
        what = f"{type(exc).__name__}: {exc}"
        if what != self._logged_failure:
            self._logged_failure = what
            logger.error("reading %s failed: %s", self.db_path, what)
        return Unavailable(f"storage failure while reading: {exc}")

    # ── queries ───────────────────────────────────────────────────────────
    async def search(self, q: SearchQuery) -> Page[SearchHit]:
        """One page of hits (see :class:`~nexusd.storage.base.SearchQuery`).

        Up to three queries in one read transaction: the hits' ids and ranks
        (one more than ``limit``, to tell whether more follow; newest first,
        with their snippets and sizes), the sizes of their messages (best
        first), then the messages (and, best first, the snippets) of those that
        fit ``budget``, so a page never holds more than a frame's worth of
        messages in the daemon and only the page's snippets are made.  An expression
        FTS5 refuses is ``bad_request`` (field ``query``), never a storage failure.
        """
        match = fts.match_expression(q.text, syntax=q.syntax)
        try:
            async with self._searches, self._lend() as conn:
                # Shielded: a cancelled search must not lend its connection on
                # with its transaction open (a snapshot pinned for the next user).
                with anyio.CancelScope(shield=True):
                    self._deadline[id(conn)] = time.monotonic() + self.search_seconds
                    await conn.execute("BEGIN")
                    try:
                        hidden = await conn.execute_fetchall(_ANY_FLOOR)
                        sql, params = fts.hits_query(q, match, hidden=bool(hidden))
                        found = list(await conn.execute_fetchall(sql, params))
                        ids = [row[0] for row in found[: q.limit]]
                        if q.newest:  # sizes and snippets came with the hits
                            sizes = {row[0]: row[4] for row in found}
                        else:
                            measured = await conn.execute_fetchall(*fts.sizes_query(ids))
                            sizes = {row[0]: row[1] for row in measured}
                        kept, over = _fit([sizes.get(i, 0) for i in ids], q.budget)
                        rows = await conn.execute_fetchall(
                            *fts.page_query(None if q.newest else match, ids[:kept])
                        )
                    finally:
                        self._deadline.pop(id(conn), None)
                        await conn.commit()
        except sqlite3.Error as exc:
            if isinstance(exc, sqlite3.OperationalError) and fts.is_syntax_error(exc):
                raise BadRequest(f"search query refused: {exc}", field="query") from None
            if isinstance(exc, sqlite3.OperationalError) and str(exc) == "interrupted":
                raise BadRequest(
                    f"the search ran for over {self.search_seconds:g} s and was stopped;"
                    " narrow it: more or rarer words, a session, a time range, or newest first",
                    field="query",
                ) from None
            raise self._failed(exc) from None
        by_id = {row[0]: row for row in rows}
        hits = []
        for hit_id, rank, snippet, start, _ in found[:kept]:
            row = by_id[hit_id]
            if not q.newest:
                snippet, start = row[6], row[7]
            text, spans = fts.split_snippet(snippet, start)
            hits.append(
                SearchHit(message=message_of(row), snippet=text, highlights=spans, rank=rank)
            )
        return Page(hits, kept < len(found), over)

    async def history(
        self,
        tag: str,
        limit: int,
        *,
        before_id: int | None,
        after_id: int | None,
        budget: int,
    ) -> Page[Message]:
        """Messages oldest-first; whether the byte budget cut the page short; whether
        the page is one row whose size *estimate* alone is over the budget.

        No cursor, or only ``before_id``: the newest ``limit`` rows (older than
        ``before_id``).  ``after_id`` (with or without ``before_id``): the
        oldest ``limit`` rows newer than it.  A cut keeps the rows nearest the
        side the page starts from, so the caller pages on from the edge.  The
        page is never empty while the range holds a row: a first row over the
        estimate comes back alone, flagged, for the caller to measure.
        """
        return await self._page(
            _ONE_SESSION, (tag, tag), limit, before_id=before_id, after_id=after_id, budget=budget
        )

    async def feed(
        self, after_id: int, *, scope: str | None, limit: int, budget: int
    ) -> Page[Message]:
        """Every session's messages in ``scope`` above ``after_id``, oldest first (watch)."""
        rows, params = scope_clause(scope)
        return await self._page(
            f"{rows} AND {visible()}",
            params,
            limit,
            before_id=None,
            after_id=after_id,
            budget=budget,
        )

    async def _page(
        self,
        rows_sql: str,
        rows_params: tuple[str, ...],
        limit: int,
        *,
        before_id: int | None,
        after_id: int | None,
        budget: int,
    ) -> Page[Message]:
        newest_first = after_id is None
        where: list[Any] = [*rows_params]
        if after_id is not None:
            where.append(after_id)
        if before_id is not None:
            where.append(before_id)
        shape = (before_id is not None, after_id is not None, newest_first, rows_sql)
        # Usually the whole page fits: one plain query, guarded by the page's
        # size bound.  Only when the guard says no (or the page is empty) does
        # the windowed query work out where to cut.
        guarded, windowed = _history_queries(*shape)
        rows = await self.fetch(guarded, (*where, *where, limit, budget, limit))
        truncated = over = False
        if not rows:
            rows = await self.fetch(windowed, (*where, limit, budget))
            if rows:
                total = rows[0][7]
                over = rows[0][6] > budget
                if over:
                    del rows[1:]  # (the query already stops there)
                elif rows[-1][6] > budget:
                    rows.pop()  # the sentinel: the first row that does not fit
                truncated = len(rows) < total
        if newest_first:
            rows.reverse()
        return Page([message_of(r) for r in rows], truncated, over)

    async def count(self, tag: str) -> int:
        rows = await self.fetch(
            f"SELECT COUNT(*) FROM nexus_messages WHERE session_tag = ? AND {VISIBLE_ONE}",
            (tag, tag),
        )
        return int(rows[0][0])

    async def sessions(
        self, *, after: str | None, limit: int, budget: int, scope: str | None = None
    ) -> Page[SessionInfo]:
        """Per tag, by tag: its count, first and last id and last timestamp; more
        follow?; is the page one entry whose size estimate alone is over ``budget``?

        At most ``limit`` entries, and as many as fit ``budget`` bytes by their
        tags' and timestamps' real lengths (plus :data:`SESSION_OVERHEAD` each);
        the first entry always comes back, flagged when it is over the budget.
        ``scope`` as for :class:`~nexusd.storage.base.ClearAll`: None for every tag,
        ``""`` for the unprefixed tags, else the tags under that prefix.
        """
        where: list[str] = [visible()]
        params: list[Any] = []
        if after is not None:
            where.append("session_tag > ?")
            params.append(after)
        if scope is not None:
            rows_sql, bounds = scope_clause(scope)
            where.append(rows_sql)
            params += bounds
        clause = f"WHERE {' AND '.join(where)}"
        # Each entry comes with its size; a long timestamp (an old row's) is
        # not read here but only if its entry is kept, so a page never holds
        # much more than the budget, whatever is stored.
        rows = await self.fetch(
            "SELECT s.session_tag, s.n, s.first, s.last,"
            f" CASE WHEN length(CAST(m.timestamp AS BLOB)) <= {_SHORT} THEN m.timestamp END,"
            " length(CAST(s.session_tag AS BLOB)) + length(CAST(m.timestamp AS BLOB)),"
            " r.max_messages, r.max_age FROM ("
            "  SELECT session_tag, COUNT(*) AS n, MIN(id) AS first, MAX(id) AS last"
            f"  FROM nexus_messages {clause} GROUP BY session_tag"
            "  ORDER BY session_tag LIMIT ?"
            ") AS s JOIN nexus_messages AS m ON m.id = s.last"
            " LEFT JOIN nexus_retention AS r ON r.session_tag = s.session_tag"
            " ORDER BY s.session_tag",
            (*params, limit + 1),
        )
        if not rows:
            return Page([], False)
        kept, more, over = keep_sessions(rows, limit, budget)
        stamps = {r[3]: r[4] for r in kept}
        long = [last for last, ts in stamps.items() if ts is None]
        if long:  # rare: rows stored before timestamps were validated
            marks = ",".join("?" * len(long))
            for rid, ts in await self.fetch(
                f"SELECT id, timestamp FROM nexus_messages WHERE id IN ({marks})", tuple(long)
            ):
                stamps[rid] = ts
        infos = [
            SessionInfo(
                session_tag=t,
                count=n,
                first_id=f,
                last_id=la,
                last_timestamp=stamps[la],
                max_messages=own_n,
                max_age=own_age,
            )
            for t, n, f, la, _, _, own_n, own_age in kept
        ]
        return Page(infos, more, over)
