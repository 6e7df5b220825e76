"""What a ``search`` request asks of storage, and the cursor that pages it on.

The request's filters become a backend-neutral
:class:`~nexusd.storage.base.SearchQuery`: timestamps in the stored form
(so ``since``/``until`` compare with stored ones), the peer's namespace as
the query's scope, the frame's room as its byte budget.  The cursor is
opaque to clients but plain here: ``n:<id>:<fp>`` pages newest-first hits on
below that id, ``r:<rank>:<id>:<fp>`` pages ranked hits on after that (rank,
id), the rank written exactly (``float.hex``), so no hit is skipped or
repeated by rounding.  ``<fp>`` is a short hash of the query, its filters and
its order: a cursor sent with another search, or one that does not parse, is
``bad_request`` (field ``cursor``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from ..storage.base import Page, SearchQuery
from ..wire import protocol as p
from ..wire.errors import BadRequest
from ..wire.timestamps import parse_timestamp

__all__ = ["Cursors", "search_query"]


class Cursors:
    """The cursors of one search request: parsed from it, made for its next pages."""

    __slots__ = ("_fp", "newest")

    def __init__(self, req: p.Search) -> None:
        self.newest = req.order == "newest"
        what = p.encoder.encode(
            (req.query, req.syntax, req.session_tags, req.role, req.since, req.until, req.order)
        )
        self._fp = hashlib.blake2b(what, digest_size=6).hexdigest()

    def after(self, page: Page[p.SearchHit]) -> str | None:
        """The cursor of the page after ``page`` (None: it was the last)."""
        if not page.truncated or not page.items:
            return None
        return self.past(page.items[-1])

    def past(self, hit: p.SearchHit) -> str:
        """The cursor of the hits after ``hit``."""
        if self.newest:
            return f"n:{hit.message.id}:{self._fp}"
        return f"r:{float(hit.rank).hex()}:{hit.message.id}:{self._fp}"

    def parse(self, cursor: str) -> tuple[float, int]:
        """The (rank, id) a cursor of this search pages on from."""
        kind, _, rest = cursor.partition(":")
        rest, _, fp = rest.rpartition(":")
        try:
            if fp == self._fp:
                if kind == "n" and self.newest:
                    return 0.0, _row_id(rest)
                if kind == "r" and not self.newest:
                    rank, _, row = rest.rpartition(":")
                    value = float.fromhex(rank)
                    if math.isfinite(value):
                        return value, _row_id(row)
        except ValueError:
            pass
        raise BadRequest(
            f"cursor {cursor[:64]!r} is not one this search returned (the same query,"
            " filters and order)",
            field="cursor",
        )


def search_query(
    req: p.Search,
    cursors: Cursors,
    *,
    sessions: Sequence[str] | None,
    scope: str | None,
    budget: int,
) -> SearchQuery:
    """The storage query of ``req`` (``sessions``: its tags as stored)."""
    if not req.query.strip():
        raise BadRequest("the query is empty", field="query")
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
        newest=cursors.newest,
        after=None if req.cursor is None else cursors.parse(req.cursor),
        limit=req.limit,
        budget=budget,
    )


def _row_id(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 19 or int(text) > p.MAX_REQUEST_ID:
        raise ValueError(text)  # (ids are SQLite integers: at most 2^63 - 1)
    return int(text)
