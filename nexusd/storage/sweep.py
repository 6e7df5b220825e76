"""The sweep: deleting, a little at a time between batches, what no read may see any more.

Two kinds of rows go this way, never in one long transaction that would
hold every other session's appends:

- rows under a session's floor (:mod:`.floors`): a big ``clear`` or
  ``clear_all``, or a lowered ``max_messages``, hid them at once; here they
  are deleted, and the floor dropped once nothing is left under it;
- rows past their age: the daemon's ``max_age``, or a session's own.  A
  row's age is its commit time, known from ``nexus_marks`` (every row up to
  ``last_id`` was committed by ``at``), not the timestamp a caller may have
  supplied.  Rows past their age are visible until swept: the sweep runs
  at least every tenth of the shortest age (from 1 s to 60 s apart).

One step is one transaction of at most :attr:`Pace.rows` deletions (sized
from the steps before so that one takes a few milliseconds); the index loses the same rows in the
same transaction, the counts stay exact, and watchers hear of rows past
their age as any other removal.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from typing import ClassVar, Final

from . import index as fts
from . import marks
from .counts import CountCache, Counts
from .editing import Retentions
from .index import IndexState, Upkeep
from .ops import Change, Removed
from .schema import write_transaction

__all__ = ["Pace", "SweepOutcome", "next_due", "step"]

#: Floors looked at per step.
_FLOORS: Final = 16
#: Most and least time between two sweeps of rows past their age.
_LONGEST: Final = 60.0
_SHORTEST: Final = 1.0
#: Sessions with an age of their own looked at per step.
_OWN_PER_STEP: Final = 64
#: Most merge slices after the deleting is done (~2 ms each).
_TAIL_SLICES: Final = 2_000


class Pace:
    """How many rows a step deletes: as many as take about :data:`SECONDS` (rows with
    long contents, or a full-text index to keep, take longer), between bounds."""

    #: Seconds one step may hold the writer (an append may wait that long).
    SECONDS: ClassVar[float] = 0.002
    LEAST: Final = 10
    MOST: Final = 5_000

    __slots__ = ("cursor", "held", "merge_next", "rows", "tail", "thinned")

    def __init__(self) -> None:
        self.rows = 200
        #: The sweep holds the index's own merging (:func:`~.index.hold_merges`).
        self.held = False
        #: The next step is a slice of the index's merging, not deletions.
        self.merge_next = False
        #: When the commit marks were last thinned (:func:`~.marks.thin`).
        self.thinned = 0.0
        #: Merge slices since the deleting ended.
        self.tail = 0
        #: The last session with an age of its own that a step looked at ("": none).
        self.cursor = ""

    def took(self, seconds: float, deleted: int) -> None:
        """A step deleted ``deleted`` rows in ``seconds``: size the next one."""
        if deleted < self.rows:
            return  # it ran out of work: its time says nothing of a full step
        fits = int(self.rows * self.SECONDS / max(seconds, 1e-4))
        self.rows = max(self.LEAST, min(self.MOST, (fits + self.rows) // 2))


@dataclass(slots=True)
class SweepOutcome:
    """What one step deleted: hidden rows, rows past their age; and whether work is left."""

    swept: int = 0
    expired: int = 0
    more: bool = False
    changes: list[Change] = field(default_factory=list)
    #: Seconds until the next sweep is worth it (:func:`next_due`).
    next_in: float = marks.THIN_EVERY


def next_due(retentions: Retentions) -> float:
    """Seconds until the next sweep is worth it: a tenth of the shortest age (1 s to
    60 s), else the next thinning of the commit marks (:mod:`.marks`).  On the
    writer's thread, where retention changes."""
    shortest = retentions.shortest_age()
    if not shortest:
        return marks.THIN_EVERY
    return min(_LONGEST, max(_SHORTEST, shortest / 10))


def step(
    conn: sqlite3.Connection,
    *,
    counts_cache: CountCache,
    retentions: Retentions,
    clock: float,
    index: IndexState | None,
    pace: Pace,
) -> SweepOutcome:
    """One transaction of at most ``pace.rows`` deletions; commits only if it deleted any."""
    out = SweepOutcome()
    rows = pace.rows
    started = time.perf_counter()
    # Without an fsync of its own: a step lost in a crash deletes nothing
    # anyone relies on (the floor still hides the rows, an aged row ages on,
    # the next sweep does it again), and the next acknowledged commit's fsync
    # of the WAL makes the step durable too.  A step then costs the appends
    # queued behind it its CPU time only.
    level = conn.execute("PRAGMA synchronous").fetchone()[0]
    conn.execute("PRAGMA synchronous = NORMAL")
    try:
        if pace.merge_next and index is not None:
            pace.merge_next = False
            with write_transaction(conn):
                fts.merge_slice(conn)
            out.more = True
            return out
        _step(conn, counts_cache, retentions, clock, index, rows, pace, out)
        if index is not None and (out.swept or out.expired):
            pace.merge_next = True  # the index's merging goes on between deletions
            out.more = True
        elif not out.more and pace.held:
            # Deleting is done; the index's merging goes on in slices until
            # nothing is left to merge, then commits merge by themselves again.
            # (Bounded: appends meanwhile add segments of their own.)
            with write_transaction(conn):
                pace.tail += 1
                if pace.tail < _TAIL_SLICES and fts.merge_slice(conn):
                    out.more = True
                else:
                    fts.release_merges(conn)
                    pace.held = False
                    pace.tail = 0
        elif not out.more and clock - pace.thinned >= marks.THIN_EVERY:
            with write_transaction(conn):
                marks.thin(conn, clock)
            pace.thinned = clock
    finally:
        conn.execute(f"PRAGMA synchronous = {int(level)}")
        out.next_in = next_due(retentions)
    pace.took(time.perf_counter() - started, out.swept + out.expired)
    return out


def _step(
    conn: sqlite3.Connection,
    counts_cache: CountCache,
    retentions: Retentions,
    clock: float,
    index: IndexState | None,
    rows: int,
    pace: Pace,
    out: SweepOutcome,
) -> None:
    conn.execute("BEGIN IMMEDIATE")
    upkeep = None if index is None else Upkeep(conn, index)
    try:
        counts_cache.sync(conn)
        counts = Counts(conn, counts_cache.counts)
        budget = rows - _hidden(conn, rows, upkeep, out)
        if budget > 0 and not out.more:
            # Only once no floor is left: every row is visible, so each one
            # deleted here lowers its session's count by one.
            budget -= _aged(conn, budget, clock, retentions, counts, upkeep, out, pace)
        out.more = out.more or budget <= 0
        if not out.swept and not out.expired:
            conn.execute("ROLLBACK")
            return
        if upkeep is not None:
            if not pace.held:
                fts.hold_merges(conn)  # (see :func:`~.index.hold_merges`)
            upkeep.flush()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    counts.commit()
    if upkeep is not None:
        pace.held = True


def _hidden(conn: sqlite3.Connection, rows: int, upkeep: Upkeep | None, out: SweepOutcome) -> int:
    """Delete rows under floors (already hidden: no count changes, no news)."""
    budget = rows
    floors = conn.execute(
        f"SELECT session_tag, below_id FROM nexus_floors LIMIT {_FLOORS}"
    ).fetchall()
    for tag, below in floors:
        gone = conn.execute(
            "DELETE FROM nexus_messages WHERE id IN (SELECT id FROM nexus_messages"
            " WHERE session_tag = ? AND id < ? ORDER BY id LIMIT ?) RETURNING id, content",
            (tag, below, budget),
        ).fetchall()
        if upkeep is not None:
            for row_id, content in gone:
                upkeep.removed(row_id, content)
        budget -= len(gone)
        out.swept += len(gone)
        if budget <= 0:
            out.more = True
            break
        conn.execute(
            "DELETE FROM nexus_floors WHERE session_tag = ? AND below_id = ?", (tag, below)
        )
    else:
        out.more = len(floors) == _FLOORS
    return rows - budget


def _aged(
    conn: sqlite3.Connection,
    rows: int,
    clock: float,
    retentions: Retentions,
    counts: Counts,
    upkeep: Upkeep | None,
    out: SweepOutcome,
    pace: Pace,
) -> int:
    """Delete rows past their age, oldest first; return how many."""
    budget = rows
    # Sessions with an age of their own first, a few per step, where the
    # previous step stopped (they may be many, most with no messages at all).
    start = pace.cursor
    own = conn.execute(
        "SELECT session_tag, max_age FROM nexus_retention WHERE max_age > 0 AND session_tag > ?"
        " ORDER BY session_tag LIMIT ?",
        (start, _OWN_PER_STEP),
    ).fetchall()
    pace.cursor = own[-1][0] if len(own) == _OWN_PER_STEP else ""
    if pace.cursor:
        out.more = True  # the pass over them goes on
    bounds: dict[float, int] = {}
    for i, (tag, age) in enumerate(own):
        if budget <= 0:  # this one's turn comes again next step
            pace.cursor = own[i - 1][0] if i else start
            out.more = True
            break
        last = bounds.get(age)
        if last is None:
            last = bounds[age] = marks.boundary(conn, clock - age)
        if last:
            budget -= _expire(
                conn,
                "session_tag = ? AND id <= ?",
                (tag, last),
                budget,
                counts,
                upkeep,
                out,
            )
    if retentions.default_age and budget > 0:
        last = marks.boundary(conn, clock - retentions.default_age)
        if last:
            budget -= _expire(
                conn,
                "id <= ? AND session_tag NOT IN"
                " (SELECT session_tag FROM nexus_retention WHERE max_age IS NOT NULL)",
                (last,),
                budget,
                counts,
                upkeep,
                out,
            )
    return rows - budget


def _expire(
    conn: sqlite3.Connection,
    where: str,
    params: tuple[object, ...],
    budget: int,
    counts: Counts,
    upkeep: Upkeep | None,
    out: SweepOutcome,
) -> int:
    """Delete the oldest ``budget`` rows matching ``where``; every row of a session they
    touch up to the newest one deleted is gone (they go in id order)."""
    gone = conn.execute(
        "DELETE FROM nexus_messages WHERE id IN (SELECT id FROM nexus_messages"
        f" WHERE {where} ORDER BY id LIMIT ?) RETURNING session_tag, id, content",
        (*params, budget),
    ).fetchall()
    if not gone:
        return 0
    newest = max(row_id for _, row_id, _ in gone)
    per: dict[str, int] = {}
    for tag, row_id, content in gone:
        per[tag] = per.get(tag, 0) + 1
        if upkeep is not None:
            upkeep.removed(row_id, content)
    for tag, n in per.items():
        counts.deleted(tag, n)
        out.changes.append(Removed(tag, before_id=newest + 1))
    out.expired += len(gone)
    if len(gone) == budget:
        out.more = True
    return len(gone)
