"""The PostgreSQL backend's sweep: deleting, a step at a time, what no read may see any more.

The same work as the SQLite backend's :mod:`nexusd.storage.sweep`, with the
same answers for the same rows: rows under a session's floor (hidden by a big
``clear``, a ``clear_all`` or a lowered ``max_messages``) are deleted, the
floor dropped once nothing is under it; then, once no floor is left, rows
past their age (commit time from ``nexus_marks``; the session's own
``max_age`` from ``nexus_retention``, else the daemon's), oldest first, each
removal told to watchers as a :class:`~nexusd.storage.ops.Removed` with the
same ``before_id`` SQLite gives.  Besides, the database's own upkeep: commit
log rows older than :data:`.log.LOG_KEEP` go, and the marks are thinned as
:func:`nexusd.storage.marks.thin` does, at most once per ``THIN_EVERY``.

One step is one short transaction under the database-wide write lock (so
other daemons' batches wait for it: it is sized by :class:`Pace` to a few
milliseconds), keeping ``nexus_sessions`` exact and recording its removals in
``nexus_log`` (:func:`.log.record`) for every daemon's watches.  Rows past
their age in the sessions with an age of their own go in one statement for a
step's share of those sessions, not one per session: SQLite's loop deletes
the oldest rows session by session in tag order while the budget lasts,
which is the first ``budget`` rows in (tag, id) order.

Unlike SQLite's, a step is worth running at least every minute even without
any age limit: the commit log must be trimmed (``next_in``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Final

import psycopg

from .. import sweep as sqlite_sweep
from ..marks import THIN_EVERY
from ..ops import Change, Removed
from . import log
from .schema import TAKE_WRITE_LOCK

__all__ = ["LOG_TRIM_EVERY", "Pace", "SweepOutcome", "step"]

logger = logging.getLogger(__name__)

#: Floors looked at per step.
_FLOORS: Final = 16
#: Most time between two steps even without any age: the commit log's trim
#: (rows older than ``log.LOG_KEEP``), upkeep SQLite has no need of (its sweep
#: then waits an hour, for the marks' thinning alone).
LOG_TRIM_EVERY: Final = 60.0
#: Most and least time between two sweeps of rows past their age.
_LONGEST: Final = LOG_TRIM_EVERY
_SHORTEST: Final = 1.0
#: Sessions with an age of their own looked at per step.
_OWN_PER_STEP: Final = 64
#: Commit log rows deleted per step, at most.
_LOG_ROWS: Final = 10_000
_DAY: Final = 86_400
_MONTH: Final = 30 * _DAY
_BY_CODE_POINT: Final = 'COLLATE "C"'


class Pace(sqlite_sweep.Pace):
    """How many rows a step deletes (sized as the SQLite backend's steps are), here
    timed under the write lock, from taking it to COMMIT."""

    #: More than SQLite's 2 ms: a step is a handful of round trips to the server
    #: whatever it deletes.
    SECONDS = 0.005
    __slots__ = ()


@dataclass(slots=True)
class SweepOutcome:
    """What one step deleted: hidden rows, rows past their age; the watchers' news;
    whether work is left; seconds until the next step is worth it."""

    swept: int = 0
    expired: int = 0
    changes: list[Change] = field(default_factory=list)
    more: bool = False
    next_in: float = _LONGEST
    #: Its row in the commit log (0: it changed nothing).
    seq: int = 0


async def step(
    conn: psycopg.AsyncConnection[Any],
    *,
    default_messages: int,
    default_age: float,
    clock: float | None,
    pace: Pace,
    origin: str,
) -> SweepOutcome:
    """One transaction of at most ``pace.rows`` deletions, under the write lock.

    ``clock``: now, in Unix seconds, on the clock the marks were written with;
    None takes the server's (read under the lock), which every daemon's marks
    share.  ``default_messages`` is not needed here (a lowered count hides rows
    under a floor when it is set) and is taken for the interface's sake.
    """
    del default_messages
    out = SweepOutcome()
    thinned = False
    async with conn.transaction():
        await conn.execute(TAKE_WRITE_LOCK)
        started = time.perf_counter()
        if clock is None:
            cur = await conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
            row = await cur.fetchone()
            assert row is not None
            clock = float(row[0])
        budget = pace.rows - await _hidden(conn, pace.rows, out)
        if budget > 0 and not out.more:
            # Only once no floor is left: every row is visible and counted, so
            # each one deleted here lowers its session's count by one.
            budget -= await _aged(conn, budget, clock, default_age, pace, out)
        out.more = out.more or budget <= 0
        if await _trim_log(conn, clock - log.LOG_KEEP):
            out.more = True
        if not out.more and clock - pace.thinned >= THIN_EVERY:
            await _thin(conn, clock)
            thinned = True
        if out.changes:
            out.seq = await log.record(conn, out.changes, origin=origin, clock=clock)
        out.next_in = await _next_due(conn, default_age)
        held = time.perf_counter() - started
    if thinned:
        pace.thinned = clock
    pace.took(held, out.swept + out.expired)
    return out


async def _next_due(conn: psycopg.AsyncConnection[Any], default_age: float) -> float:
    """A tenth of the shortest age limit in force (1 s to 60 s), else 60 s: the log's trim."""
    cur = await conn.execute("SELECT min(max_age) FROM nexus_retention WHERE max_age > 0")
    row = await cur.fetchone()
    ages = [a for a in (default_age, None if row is None else row[0]) if a]
    if not ages:
        return _LONGEST
    return min(_LONGEST, max(_SHORTEST, min(ages) / 10))


async def _hidden(conn: psycopg.AsyncConnection[Any], rows: int, out: SweepOutcome) -> int:
    """Delete rows under floors (already hidden and uncounted: no count changes, no
    news); drop each floor with nothing left under it."""
    budget = rows
    # In tag order, as SQLite's table (keyed by tag) gives them.
    cur = await conn.execute(
        "SELECT session_tag, below_id FROM nexus_floors"
        f" ORDER BY session_tag {_BY_CODE_POINT} LIMIT {_FLOORS}"
    )
    floors = await cur.fetchall()
    for tag, below in floors:
        # The floor goes in the same statement when fewer rows than the budget
        # were left under it (so none are now).
        cur = await conn.execute(
            "WITH gone AS (DELETE FROM nexus_messages WHERE id IN (SELECT id FROM nexus_messages"
            "  WHERE (session_tag, id) >= (%s, 0) AND (session_tag, id) < (%s, %s)"
            "  ORDER BY session_tag, id LIMIT %s) RETURNING 1),"
            " n AS (SELECT count(*) AS n FROM gone),"
            " fl AS (DELETE FROM nexus_floors WHERE session_tag = %s AND below_id = %s"
            "  AND (SELECT n FROM n) < %s)"
            " SELECT n FROM n",
            (tag, tag, below, budget, tag, below, budget),
        )
        row = await cur.fetchone()
        gone = 0 if row is None else int(row[0])
        budget -= gone
        out.swept += gone
        if budget <= 0:
            out.more = True
            break
    else:
        out.more = len(floors) == _FLOORS
    return rows - budget


# Deletes the rows a ``doomed`` CTE names (it selects session_tag, id) and keeps
# nexus_sessions exact: each session's count lowered, its row gone at zero.
# Returns, per session touched: its tag, rows deleted, newest and oldest id.
_EXPIRE: Final = (
    " gone AS (DELETE FROM nexus_messages AS m USING doomed WHERE m.id = doomed.id"
    "  RETURNING m.session_tag, m.id),"
    " per AS (SELECT session_tag, count(*) AS n, max(id) AS newest, min(id) AS oldest"
    "  FROM gone GROUP BY session_tag),"
    " fewer AS (UPDATE nexus_sessions AS s SET messages = s.messages - per.n FROM per"
    "  WHERE s.session_tag = per.session_tag AND s.messages > per.n),"
    " emptied AS (DELETE FROM nexus_sessions AS s USING per"
    "  WHERE s.session_tag = per.session_tag AND s.messages <= per.n)"
    " SELECT session_tag, n, newest, oldest FROM per"
)


async def _aged(
    conn: psycopg.AsyncConnection[Any],
    rows: int,
    clock: float,
    default_age: float,
    pace: Pace,
    out: SweepOutcome,
) -> int:
    """Delete rows past their age, oldest first; return how many."""
    budget = rows
    # Sessions with an age of their own first, a few per step, where the
    # previous step stopped (they may be many, most with no messages at all),
    # each with the highest id committed before its age (0: none).
    start = pace.cursor
    cur = await conn.execute(
        "SELECT o.session_tag, coalesce(b.last_id, 0) FROM ("
        "  SELECT session_tag, max_age FROM nexus_retention"
        f"  WHERE max_age > 0 AND session_tag {_BY_CODE_POINT} > %s"
        f"  ORDER BY session_tag {_BY_CODE_POINT} LIMIT %s) AS o"
        " LEFT JOIN LATERAL (SELECT last_id FROM nexus_marks"
        "  WHERE second <= trunc(%s - o.max_age) AND at <= %s - o.max_age"
        "  ORDER BY second DESC LIMIT 1) AS b ON true"
        f" ORDER BY o.session_tag {_BY_CODE_POINT}",
        (start, _OWN_PER_STEP, clock, clock),
    )
    own: list[tuple[str, int]] = [(str(t), int(last)) for t, last in await cur.fetchall()]
    pace.cursor = own[-1][0] if len(own) == _OWN_PER_STEP else ""
    if pace.cursor:
        out.more = True  # the pass over them goes on
    due = [(tag, last) for tag, last in own if last]
    per: dict[str, tuple[int, int]] = {}
    if due:
        cur = await conn.execute(
            "WITH doomed AS (SELECT d.session_tag, d.id"
            "  FROM unnest(%s::text[], %s::bigint[]) AS b(tag, last)"
            "  CROSS JOIN LATERAL (SELECT session_tag, id FROM nexus_messages"
            "   WHERE (session_tag, id) >= (b.tag, 0) AND (session_tag, id) <= (b.tag, b.last)"
            "   ORDER BY session_tag, id LIMIT %s) AS d"
            f"  ORDER BY d.session_tag {_BY_CODE_POINT}, d.id LIMIT %s)," + _EXPIRE,
            ([t for t, _ in due], [last for _, last in due], budget, budget),
        )
        per = {str(t): (int(n), int(newest)) for t, n, newest, _ in await cur.fetchall()}
    # As SQLite's loop over the sessions in tag order, each deleting what is
    # left of the budget: the same rows, the same news, the same cursor.
    for i, (tag, _) in enumerate(own):
        if budget <= 0:  # this one's turn comes again next step
            pace.cursor = own[i - 1][0] if i else start
            out.more = True
            break
        n, newest = per.get(tag, (0, 0))
        if n:
            if n == budget:
                out.more = True
            budget -= n
            out.expired += n
            out.changes.append(Removed(tag, before_id=newest + 1))
    if default_age and budget > 0:
        cutoff = clock - default_age
        cur = await conn.execute(
            "WITH doomed AS (SELECT session_tag, id FROM nexus_messages"
            "  WHERE id <= coalesce((SELECT last_id FROM nexus_marks"
            "   WHERE second <= %s AND at <= %s ORDER BY second DESC LIMIT 1), 0)"
            "  AND session_tag NOT IN"
            "   (SELECT session_tag FROM nexus_retention WHERE max_age IS NOT NULL)"
            "  ORDER BY id LIMIT %s)," + _EXPIRE + " ORDER BY oldest",
            (int(cutoff), cutoff, budget),
        )
        found = await cur.fetchall()
        if found:
            # Every row of each session up to the newest deleted is gone (they
            # go in id order): SQLite's news, one per session.
            newest = max(int(r[2]) for r in found)
            gone = sum(int(r[1]) for r in found)
            out.changes += [Removed(str(r[0]), before_id=newest + 1) for r in found]
            out.expired += gone
            if gone == budget:
                out.more = True
            budget -= gone
    return rows - budget


async def _trim_log(conn: psycopg.AsyncConnection[Any], cutoff: float) -> bool:
    """Delete the commit log's rows older than ``cutoff`` (up to its first younger row,
    in seq order: cheap, by the primary key); True when more are left than a step takes."""
    cur = await conn.execute(
        "WITH old AS (DELETE FROM nexus_log WHERE seq IN (SELECT seq FROM nexus_log"
        "  WHERE seq < coalesce((SELECT seq FROM nexus_log WHERE at >= %s"
        "   ORDER BY seq LIMIT 1), 9223372036854775807)"
        "  ORDER BY seq LIMIT %s) RETURNING 1)"
        " SELECT count(*) FROM old",
        (cutoff, _LOG_ROWS),
    )
    row = await cur.fetchone()
    return row is not None and int(row[0]) >= _LOG_ROWS


async def _thin(conn: psycopg.AsyncConnection[Any], clock: float) -> None:
    """Drop the marks no row needs, and coarsen the old ones (as SQLite's ``marks.thin``)."""
    await conn.execute(
        "DELETE FROM nexus_marks WHERE last_id < (SELECT min(id) FROM nexus_messages)"
        " AND second < (SELECT max(second) FROM nexus_marks)"
    )
    for older, every in ((int(clock) - _DAY, 60), (int(clock) - _MONTH, 3600)):
        await conn.execute(
            "DELETE FROM nexus_marks WHERE second < %s AND second NOT IN"
            " (SELECT max(second) FROM nexus_marks WHERE second < %s GROUP BY second / %s)",
            (older, older, every),
        )
