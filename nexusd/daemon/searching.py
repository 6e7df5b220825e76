"""What a ``search`` request asks of storage, and the cursor that pages it on.

The request's filters become a backend-neutral
:class:`~nexusd.storage.base.SearchQuery`: timestamps in the stored form
(so ``since``/``until`` compare with stored ones), the peer's namespace as
the query's scope, the frame's room as its byte budget.  The cursor is
opaque to clients but plain here: ``n:<id>`` pages newest-first hits on
below that id, ``r:<rank>:<id>`` pages ranked hits on after that (rank, id),
the rank written exactly (``float.hex``), so no hit is skipped or repeated
by rounding.  A cursor that does not parse, or belongs to the other order,
is ``bad_request`` (field ``cursor``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..storage.base import Page, SearchQuery
from ..wire import protocol as p
from ..wire.errors import BadRequest
from ..wire.timestamps import parse_timestamp

__all__ = ["next_cursor", "search_query"]


def search_query(
    req: p.Search, *, sessions: Sequence[str] | None, scope: str | None, budget: int
) -> SearchQuery:
    """The storage query of ``req`` (``sessions``: its tags as stored)."""
    if not req.query.strip():
        raise BadRequest("the query has no words", field="query")
    newest = req.order == "newest"
    since = None if req.since is None else parse_timestamp(req.since, "since")
    until = None if req.until is None else parse_timestamp(req.until, "until")
    return SearchQuery(
        text=req.query,
        syntax=req.syntax,
        sessions=None if sessions is None else tuple(sessions),
        role=req.role,
        since=since,
        until=until,
        scope=scope,
        newest=newest,
        after=None if req.cursor is None else _parse_cursor(req.cursor, newest),
        limit=req.limit,
        budget=budget,
    )


def next_cursor(page: Page[p.SearchHit], newest: bool) -> str | None:
    """The cursor of the page after ``page`` (None: it was the last)."""
    if not page.truncated or not page.items:
        return None
    last = page.items[-1]
    if newest:
        return f"n:{last.message.id}"
    return f"r:{float(last.rank).hex()}:{last.message.id}"


def _parse_cursor(cursor: str, newest: bool) -> tuple[float, int]:
    kind, _, rest = cursor.partition(":")
    try:
        if kind == "n" and newest:
            return 0.0, _row_id(rest)
        if kind == "r" and not newest:
            rank, _, row = rest.rpartition(":")
            value = float.fromhex(rank)
            if math.isfinite(value):
                return value, _row_id(row)
    except ValueError:
        pass
    order = "newest" if newest else "rank"
    raise BadRequest(
        f"cursor {cursor[:64]!r} is not one a search in order {order!r} returned", field="cursor"
    )


def _row_id(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise ValueError(text)
    return int(text)
