"""Hidden rows: a session's floor, below which its rows are gone though not yet deleted.

Clearing a session of a million rows in one transaction held the writer
(and so every other session's appends) for seconds.  Instead a big clear
commits one row, ``nexus_floors(session_tag, below_id)``: every read adds
:func:`visible` to its query and no longer sees the rows below the floor;
:mod:`.sweep` deletes them afterwards, a few hundred per transaction,
between batches, and drops the floor once its session holds no row under
it.  Small clears (the usual case) still delete at once: a floor would only
leave work behind.  A lowered ``max_messages`` hides its overflow the same way.

Counts (:mod:`.counts`) count visible rows only, so retention, ``count`` and
``sessions`` agree with what reads return from the moment of the commit.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from typing import Final

from .counts import Counts
from .schema import VISIBLE_ONE, visible
from .scope import NS_MARK, scope_bounds

__all__ = [
    "HIDE_FROM",
    "VISIBLE_ONE",
    "hide_below",
    "in_scope",
    "scope_clause",
    "sessions_in",
    "visible",
]

#: From this many rows on, ``clear`` hides a session instead of deleting it.
HIDE_FROM: Final = 2_000


def scope_clause(scope: str | None, column: str = "session_tag") -> tuple[str, tuple[str, ...]]:
    """SQL (for a WHERE) and parameters of the tags in ``scope`` (see ``ClearAll``)."""
    if scope is None:
        return "1", ()
    if scope == "":
        lo, hi = scope_bounds(NS_MARK)
        return f"NOT ({column} >= ? AND {column} < ?)", (lo, hi)
    lo, hi = scope_bounds(scope)
    return f"{column} >= ? AND {column} < ?", (lo, hi)


def in_scope(scope: str | None, tag: str) -> bool:
    """Whether a stored tag is among those ``clear_all`` of ``scope`` deletes."""
    if scope is None:
        return True
    if scope == "":
        return not tag.startswith(NS_MARK)
    return tag.startswith(scope)


def sessions_in(conn: sqlite3.Connection, scope: str | None) -> Iterator[str]:
    """Every session tag with a stored row in ``scope``, visible or not, in tag order.

    One index seek per session (SQLite does not skip-scan a DISTINCT), so a
    database of a million rows in ten sessions costs ten seeks, not a scan.
    """
    if scope == "":
        # The unnamespaced tags are below and above the namespaced range.
        lo, hi = scope_bounds(NS_MARK)
        yield from _tags(conn, None, lo)
        yield from _tags(conn, hi, None, inclusive=True)
        return
    if scope is None:
        yield from _tags(conn, None, None)
        return
    lo, hi = scope_bounds(scope)
    yield from _tags(conn, lo, hi, inclusive=True)


def _tags(
    conn: sqlite3.Connection, lo: str | None, hi: str | None, *, inclusive: bool = False
) -> Iterator[str]:
    tag = lo
    first = inclusive
    while True:
        if tag is None:
            row = conn.execute(
                "SELECT session_tag FROM nexus_messages ORDER BY session_tag LIMIT 1"
            ).fetchone()
        else:
            op = ">=" if first else ">"
            row = conn.execute(
                f"SELECT session_tag FROM nexus_messages WHERE session_tag {op} ?"
                " ORDER BY session_tag LIMIT 1",
                (tag,),
            ).fetchone()
        first = False
        if row is None or (hi is not None and row[0] >= hi):
            return
        tag = row[0]
        yield tag


def hide_below(conn: sqlite3.Connection, tag: str, below_id: int) -> None:
    """Hide every row of ``tag`` under ``below_id`` (a floor only ever rises)."""
    conn.execute(
        "INSERT INTO nexus_floors (session_tag, below_id) VALUES (?, ?)"
        " ON CONFLICT (session_tag) DO UPDATE SET below_id = max(below_id, excluded.below_id)",
        (tag, below_id),
    )


def floor_of(conn: sqlite3.Connection, tag: str) -> int:
    """The lowest visible id ``tag`` may have (0: nothing hidden)."""
    row = conn.execute("SELECT below_id FROM nexus_floors WHERE session_tag = ?", (tag,)).fetchone()
    return 0 if row is None else int(row[0])


def clear_session(
    conn: sqlite3.Connection,
    tag: str,
    counts: Counts,
    next_id: int,
    removing: Callable[[str, tuple[object, ...]], None] | None,
) -> int:
    """Clear ``tag``: delete a small session at once, hide a big one; return rows cleared.

    ``removing(where, params)`` is told before rows are deleted (the full-text
    index takes them out in the same transaction).
    """
    n = counts.get(tag)
    # Rows already hidden are the sweep's: deleting them here, all in this
    # transaction, would be the stall that hiding avoids.
    if n >= HIDE_FROM or floor_of(conn, tag):
        hide_below(conn, tag, next_id)
    else:
        if removing is not None:
            removing("session_tag = ?", (tag,))
        conn.execute("DELETE FROM nexus_messages WHERE session_tag = ?", (tag,))
        conn.execute("DELETE FROM nexus_floors WHERE session_tag = ?", (tag,))
    counts.set(tag, 0)
    return n


def clear_scope(
    conn: sqlite3.Connection,
    scope: str | None,
    counts: Counts,
    next_id: int,
    removing: Callable[[str, tuple[object, ...]], None] | None,
) -> int:
    """Clear every session of ``scope`` (as :func:`clear_session` each); return rows cleared."""
    tags = [(tag, counts.get(tag)) for tag in sessions_in(conn, scope)]
    total = sum(n for _, n in tags)
    where, params = scope_clause(scope)
    hidden = conn.execute(f"SELECT 1 FROM nexus_floors WHERE {where} LIMIT 1", params).fetchone()
    if total < HIDE_FROM and hidden is None:
        if removing is not None:
            removing(where, params)
        conn.execute(f"DELETE FROM nexus_messages WHERE {where}", params)
        conn.execute(f"DELETE FROM nexus_floors WHERE {where}", params)
    else:
        for tag, n in tags:
            if n:
                hide_below(conn, tag, next_id)
    counts.clear_all()  # every later count is taken afresh, floors included
    return total
