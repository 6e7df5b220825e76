"""When rows were committed: ``nexus_marks``, for retention by age.

A row's age is its commit time, not the timestamp its caller may have
supplied.  Rather than a column per message, the writer keeps one row per
second of writing: ``(second, last_id, at)`` says every row with an id up to
``last_id`` was committed at or before ``at`` (Unix seconds).  Ids only grow,
so that bounds every row's commit time, including rows other programs
stored between two of our commits (they are attributed to the next mark:
a little later, never earlier, so never deleted too soon).

The table is thinned once an hour by the sweep: marks of rows already gone
go, and older marks keep one per minute (past a day) or per hour (past 30
days), so it stays small however long the daemon writes.  Thinning only
moves a row's known commit time later, by at most that step.
"""

from __future__ import annotations

import sqlite3
from typing import Final

__all__ = ["THIN_EVERY", "boundary", "mark", "thin"]

#: Seconds between two thinnings of the table.
THIN_EVERY: Final = 3600.0
_DAY: Final = 86_400
_MONTH: Final = 30 * _DAY


def mark(conn: sqlite3.Connection, last_id: int, clock: float) -> None:
    """In the batch's transaction: every row up to ``last_id`` is committed by ``clock``."""
    conn.execute(
        "INSERT INTO nexus_marks (second, last_id, at) VALUES (?, ?, ?)"
        " ON CONFLICT (second) DO UPDATE SET last_id = excluded.last_id, at = excluded.at",
        (int(clock), last_id, clock),
    )


def boundary(conn: sqlite3.Connection, cutoff: float) -> int:
    """The highest id surely committed at or before ``cutoff`` (0: none)."""
    row = conn.execute(
        "SELECT last_id FROM nexus_marks WHERE second <= ? AND at <= ?"
        " ORDER BY second DESC LIMIT 1",
        (int(cutoff), cutoff),
    ).fetchone()
    return 0 if row is None else int(row[0])


def thin(conn: sqlite3.Connection, clock: float) -> None:
    """In a transaction: drop the marks no row needs, and coarsen the old ones."""
    conn.execute(
        "DELETE FROM nexus_marks WHERE last_id < (SELECT min(id) FROM nexus_messages)"
        " AND second < (SELECT max(second) FROM nexus_marks)"
    )
    for older, step in ((int(clock) - _DAY, 60), (int(clock) - _MONTH, 3600)):
        conn.execute(
            "DELETE FROM nexus_marks WHERE second < ? AND second NOT IN"
            " (SELECT max(second) FROM nexus_marks WHERE second < ? GROUP BY second / ?)",
            (older, older, step),
        )
