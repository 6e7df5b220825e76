"""The PostgreSQL backend's reads: history, count, feed and sessions, one statement each.

Every read is a single statement on an autocommit connection, so it sees one
snapshot (an append acknowledged before the read began is in it) and takes
no lock a writer waits for.  Answers are the SQLite backend's
(:mod:`nexusd.storage.reads`) for the same rows: the same rows per page, the
same cut by byte budget (sizes by :func:`.schema.row_size`, the same
estimate), the same ``truncated`` and ``over``.

A page is cut in SQL, as SQLite's windowed query does: over at most
``limit`` rows of the range, in page order, a running sum of their sizes; a
row comes back while the sum *before* it is within the budget, so the first
row that does not fit comes back as a sentinel (dropped here) and a first row
over the budget alone comes back alone, flagged.  ``octet_length`` reads a
stored value's length without decompressing or fetching it, and a row the
budget cuts off is never sent, so a page holds about one frame's worth of
content in the daemon whatever ``limit`` asks.  ``lead`` says whether a row
of the range follows, instead of a count over the whole window, so the window
streams.

``count`` and ``sessions`` read ``nexus_sessions``, each session's count of
visible rows, which every write keeps exact (rows under a floor are not in
it, rows past their age are until the sweep deletes them: SQLite's count).

Tag order and tag ranges (``sessions`` paging, scopes) are by code point, as
SQLite compares text: ``COLLATE "C"``, whatever the database's collation (in
ICU's en-US, say, ``B`` sorts after ``b`` and the namespace mark weighs
nothing).  An index serves that order only where its column is ``"C"`` too;
elsewhere ``sessions`` sorts ``nexus_sessions`` (one row per session) per page.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Final

import psycopg

from ...wire.protocol import Message, SessionInfo
from ..base import SESSION_OVERHEAD, Page, keep_sessions
from ..schema import message_of
from .schema import MESSAGE_COLUMNS, row_size, scope_clause, visible

__all__ = ["count", "feed", "history", "sessions"]

logger = logging.getLogger(__name__)


_MAX_ID: Final = (1 << 63) - 1

#: A history page's rows: one session's visible ones in an id range, as two row
#: comparisons (parameters: tag, tag, lowest id, tag, id above the highest).  Not
#: ``session_tag = %s AND id ...``: the planner then walks the primary key
#: backwards from the newest row of all when the session is a large share of
#: the table (200 ms for a session whose rows are a million ids old); a row
#: comparison only the ``(session_tag, id)`` index serves, as one range.
_ONE_SESSION: Final = (
    "(session_tag, id) >= (%s, greatest(coalesce("
    "(SELECT below_id FROM nexus_floors WHERE session_tag = %s), 0), %s))"
    " AND (session_tag, id) < (%s, %s)"
)
_BY_CODE_POINT: Final = 'COLLATE "C"'


@functools.cache
def _page_query(rows: str, newest_first: bool) -> str:
    """The one statement of a page of ``rows`` (a WHERE clause), in page order.

    Parameters: those of ``rows``, limit, budget.  Columns: :data:`MESSAGE_COLUMNS`,
    the running size up to the row, whether a row of the range follows it.
    """
    order = "DESC" if newest_first else "ASC"
    # One session's page is in index order, so the window needs no sort.
    key = f"session_tag {order}, " if rows == _ONE_SESSION else ""
    return (
        f"SELECT {MESSAGE_COLUMNS}, run, follows FROM ("
        f" SELECT r.*, sum(size) OVER w AS run, lead(id) OVER w IS NOT NULL AS follows FROM ("
        f"  SELECT {MESSAGE_COLUMNS}, {row_size()} AS size FROM nexus_messages"
        f"  WHERE {rows} ORDER BY {key}id {order} LIMIT %s"
        f" ) AS r WINDOW w AS (ORDER BY {key}id {order} ROWS UNBOUNDED PRECEDING)"
        f") AS p WHERE run - size <= %s ORDER BY {key}id {order}"
    )


async def _page(
    conn: psycopg.AsyncConnection[Any],
    rows: str,
    params: tuple[Any, ...],
    limit: int,
    budget: int,
    *,
    newest_first: bool,
) -> Page[Message]:
    """A page cut as SQLite's: the rows within the budget, the first row alone when it is
    over it (flagged), the first row that does not fit dropped."""
    cur = await conn.execute(_page_query(rows, newest_first), (*params, limit, budget))
    found = await cur.fetchall()
    if not found:
        return Page([], False)
    over = found[0][6] > budget
    if over:
        del found[1:]  # (the query already stops there)
    elif found[-1][6] > budget:
        found.pop()  # the sentinel: the first row that does not fit
    truncated = bool(found[-1][7])
    if newest_first:
        found.reverse()
    return Page([message_of(r) for r in found], truncated, over)


async def history(
    conn: psycopg.AsyncConnection[Any],
    tag: str,
    limit: int,
    *,
    before_id: int | None,
    after_id: int | None,
    budget: int,
) -> Page[Message]:
    """Messages oldest-first; whether the byte budget cut the page short; whether the
    page is one row whose size estimate alone is over the budget.

    No cursor, or only ``before_id``: the newest ``limit`` rows (older than
    ``before_id``).  ``after_id`` (with or without ``before_id``): the oldest
    ``limit`` rows newer than it.  An index range scan of ``(session_tag, id)``
    in page order, stopped after ``limit`` rows: no sort of the session.
    """
    if after_id is not None and after_id >= _MAX_ID:
        return Page([], False)  # (nothing is above; and after_id + 1 is not a bigint)
    low = 0 if after_id is None else after_id + 1
    high = _MAX_ID if before_id is None else before_id
    params = (tag, tag, low, tag, high)
    return await _page(conn, _ONE_SESSION, params, limit, budget, newest_first=after_id is None)


async def feed(
    conn: psycopg.AsyncConnection[Any],
    after_id: int,
    *,
    scope: str | None,
    limit: int,
    budget: int,
) -> Page[Message]:
    """Every session's visible messages in ``scope`` above ``after_id``, oldest first."""
    rows, params = scope_clause(scope)
    return await _page(
        conn,
        f"id > %s AND {rows} AND {visible()}",
        (after_id, *params),
        limit,
        budget,
        newest_first=False,
    )


async def count(conn: psycopg.AsyncConnection[Any], tag: str) -> int:
    """Visible rows of ``tag`` (kept exact in ``nexus_sessions`` by every write)."""
    cur = await conn.execute(
        "SELECT coalesce((SELECT messages FROM nexus_sessions WHERE session_tag = %s), 0)",
        (tag,),
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


@functools.cache
def _sessions_query(where: str) -> str:
    """The one statement of a ``sessions`` page: the page's tags (one more than asked)
    from ``nexus_sessions``, then each one's last row, running size, first visible
    row and own retention.  Parameters: budget, overhead, those of ``where``, limit."""
    return (
        "SELECT p.session_tag, p.messages, f.id, p.last_id,"
        "  CASE WHEN p.rn = 1 OR p.run <= %s THEN p.ts END, p.size,"
        "  r.max_messages, r.max_age"
        " FROM ("
        "  SELECT q.*, row_number() OVER w AS rn, sum(q.size + %s) OVER w AS run FROM ("
        "   SELECT s.session_tag, s.messages, l.id AS last_id, l.timestamp AS ts,"
        "    octet_length(s.session_tag) + octet_length(l.timestamp) AS size"
        "   FROM (SELECT session_tag, messages FROM nexus_sessions AS s"
        f"    WHERE {where} ORDER BY session_tag {_BY_CODE_POINT} LIMIT %s) AS s"
        "   CROSS JOIN LATERAL ("
        "    SELECT id, timestamp FROM nexus_messages AS m"
        "    WHERE (m.session_tag, m.id) >= (s.session_tag, 0)"
        f"    AND (m.session_tag, m.id) <= (s.session_tag, {_MAX_ID})"
        "    ORDER BY m.session_tag DESC, m.id DESC LIMIT 1) AS l"
        f"  ) AS q WINDOW w AS (ORDER BY q.session_tag {_BY_CODE_POINT} ROWS UNBOUNDED PRECEDING)"
        " ) AS p"
        " CROSS JOIN LATERAL ("
        "  SELECT id FROM nexus_messages AS m WHERE (m.session_tag, m.id) >= (p.session_tag,"
        "   coalesce((SELECT fl.below_id FROM nexus_floors AS fl"
        "    WHERE fl.session_tag = p.session_tag), 0))"
        f"  AND (m.session_tag, m.id) <= (p.session_tag, {_MAX_ID})"
        "  ORDER BY m.session_tag, m.id LIMIT 1) AS f"
        " LEFT JOIN nexus_retention AS r ON r.session_tag = p.session_tag"
        f" ORDER BY p.session_tag {_BY_CODE_POINT}"
    )


async def sessions(
    conn: psycopg.AsyncConnection[Any],
    *,
    after: str | None,
    limit: int,
    budget: int,
    scope: str | None = None,
) -> Page[SessionInfo]:
    """Per tag, by tag: its count, first and last visible id, last timestamp and own
    retention; more follow?; is the page one entry whose size estimate alone is over
    ``budget``?

    At most ``limit`` entries, as many as fit ``budget`` by their tags' and last
    timestamps' lengths (plus :data:`SESSION_OVERHEAD` each); the first always
    comes back, flagged when it alone is over.  The statement walks
    ``nexus_sessions`` in tag order (only sessions with a visible row are there)
    and finds each one's first and last row by the ``(session_tag, id)`` index;
    timestamps come back only for the entries that fit.
    """
    where: list[str] = []
    params: list[Any] = []
    if after is not None:
        where.append(f"s.session_tag {_BY_CODE_POINT} > %s")
        params.append(after)
    rows_sql, bounds = scope_clause(scope, "s.session_tag")
    where.append(rows_sql)
    params += bounds
    cur = await conn.execute(
        _sessions_query(" AND ".join(where)), (budget, SESSION_OVERHEAD, *params, limit + 1)
    )
    found = await cur.fetchall()
    if not found:
        return Page([], False)
    kept, more, over = keep_sessions(found, limit, budget)
    infos = [
        SessionInfo(
            session_tag=t,
            count=int(n),
            first_id=int(f),
            last_id=int(la),
            last_timestamp=ts,
            max_messages=None if own_n is None else int(own_n),
            max_age=own_age,
        )
        for t, n, f, la, ts, _, own_n, own_age in kept
    ]
    return Page(infos, more, over)
