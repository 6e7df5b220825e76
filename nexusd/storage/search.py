"""Full-text search in the SQLite backend: the queries over the FTS5 index.

The index itself (its tables, its upkeep, its building) is :mod:`.index`.
Queries: plain words by default, each quoted so user input is never FTS5
syntax (``"a" "b"``: every word, in any order); the FTS5 syntax (phrases,
``prefix*``, ``NEAR``, ``AND``/``OR``/``NOT``) only when asked for.  The
tokenizer folds case and accents (``Über`` finds ``uber``); scripts written
without spaces (Chinese, Japanese) are indexed as runs of characters between
punctuation, so a word inside a run is found only as the run's prefix
(``"東京"*``), not in its middle.  A page is made in up to three steps
(:func:`hits_query`, :func:`sizes_query`, :func:`page_query`), so snippets and
sizes are computed for the page only.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from typing import Final

from ..wire.errors import BadRequest
from .base import SearchQuery
from .floors import scope_clause
from .schema import MESSAGE_COLUMNS, row_size, visible

logger = logging.getLogger(__name__)

__all__ = [
    "MARK_CLOSE",
    "MARK_OPEN",
    "SNIPPET_CHARS",
    "hits_query",
    "is_syntax_error",
    "match_expression",
    "page_query",
    "sizes_query",
    "split_snippet",
]

_WORD: Final = re.compile(r"\S+")


def match_expression(query: str, *, syntax: bool) -> str:
    """The FTS5 MATCH expression for ``query``: its words, each quoted, unless ``syntax``.

    Raises BadRequest (field ``query``) for a query with no word in it.
    """
    if syntax:
        if not query.strip():
            raise BadRequest("the query is empty", field="query")
        return query
    words = _WORD.findall(query)
    if not words:
        raise BadRequest("the query has no words", field="query")
    return " ".join('"' + w.replace('"', '""') + '"' for w in words)


#: Around each matched term in a snippet, as SQLite returns it (private-use
#: characters, then turned into spans by :func:`split_snippet`).
MARK_OPEN: Final = "\ue000"
MARK_CLOSE: Final = "\ue001"
#: Tokens of context in a snippet.
SNIPPET_TOKENS: Final = 16
#: Longest snippet, in characters (a "token" may be a long run without spaces).
SNIPPET_CHARS: Final = 400
#: Bytes a hit adds to its message in a reply (keys, rank, the spans), with room.
HIT_OVERHEAD: Final = 160
#: Characters of the snippet kept before its first match when it is cut.
_LEAD: Final = 120
# FTS5's snippet (16 tokens around the best matches; a "token" may be thousands
# of characters), cut in SQL to a window that starts a little before its first
# match, plus that window's start; :func:`split_snippet` makes the rest.  (The
# snippet is computed per use: three times, for the page's rows only.)
_S: Final = (
    f"snippet(nexus_fts, 0, char({ord(MARK_OPEN)}), char({ord(MARK_CLOSE)}), '…', {SNIPPET_TOKENS})"
)
_FROM: Final = f"max(1, instr({_S}, char({ord(MARK_OPEN)})) - {_LEAD})"
_SNIPPET: Final = f"substr({_S}, {_FROM}, {SNIPPET_CHARS + _LEAD + 100}), {_FROM}"


def hits_query(q: SearchQuery, match: str, *, hidden: bool = False) -> tuple[str, list[object]]:
    """SQL and parameters of up to ``q.limit + 1`` hits: (id, rank, snippet, its start, size).

    Ordered by relevance (bm25, best first; ties by id) or, with ``newest``,
    by id descending.  ``after`` is the (rank, id) of the last hit of the
    previous page (only the id counts when ``newest``).  ``hidden``: some
    session has rows under its floor, which must not be found.  Newest first, FTS5
    walks its index in that order and stops at the limit, so the snippets and
    sizes come along for just those rows.  Best first, every match is ranked
    and sorted, and the sorter would compute every column for every match:
    snippet and size are NULL then, made for the page only (:func:`sizes_query`,
    :func:`page_query`).
    """
    where = ["nexus_fts MATCH ?"]
    params: list[object] = [match]
    if q.sessions is not None:
        where.append(f"m.session_tag IN ({', '.join('?' * len(q.sessions))})")
        params += q.sessions
    if q.role is not None:
        where.append("m.role = ?")
        params.append(q.role)
    if q.since is not None:
        where.append("m.timestamp >= ?")
        params.append(q.since)
    if q.until is not None:
        where.append("m.timestamp < ?")
        params.append(q.until)
    if q.scope is not None:
        clause, bounds = scope_clause(q.scope, "m.session_tag")
        where.append(clause)
        params += bounds
    if hidden:  # some sessions have rows cleared but not yet swept (:mod:`.floors`)
        where.append(visible("m"))
    joined = q.newest or len(where) > 1
    if q.after is not None:
        if q.newest:
            where.append("f.rowid < ?")
            params.append(q.after[1])
        else:
            where.append("(bm25(nexus_fts) > ? OR (bm25(nexus_fts) = ? AND f.rowid > ?))")
            params += [q.after[0], q.after[0], q.after[1]]
    params.append(q.limit + 1)
    join = " JOIN nexus_messages AS m ON m.id = f.rowid" if joined else ""
    if q.newest:
        columns = f"{_SNIPPET}, {row_size('m.')}"
        order = "f.rowid DESC"
    else:
        columns, order = "NULL, NULL, NULL", "bm25(nexus_fts), f.rowid"
    sql = (
        f"SELECT f.rowid, bm25(nexus_fts), {columns} FROM nexus_fts AS f{join}"
        f" WHERE {' AND '.join(where)} ORDER BY {order} LIMIT ?"
    )
    return sql, params


def sizes_query(ids: list[int]) -> tuple[str, list[object]]:
    """(id, size in a reply) of the messages ``ids``."""
    return (
        f"SELECT id, {row_size()} FROM nexus_messages WHERE id IN ({', '.join('?' * len(ids))})",
        list(ids),
    )


def page_query(match: str | None, ids: list[int]) -> tuple[str, list[object]]:
    """The messages ``ids`` (as :data:`~.schema.MESSAGE_COLUMNS`), with their snippets
    for ``match`` (None: the snippets are made already)."""
    marks = ", ".join("?" * len(ids))
    if match is None:
        return (
            f"SELECT {MESSAGE_COLUMNS}, NULL, NULL FROM nexus_messages WHERE id IN ({marks})",
            [*ids],
        )
    return (
        f"SELECT m.id, m.role, m.content, m.timestamp, m.session_tag, m.meta, {_SNIPPET}"
        " FROM nexus_fts AS f JOIN nexus_messages AS m ON m.id = f.rowid"
        f" WHERE nexus_fts MATCH ? AND f.rowid IN ({marks})",
        [match, *ids],
    )


def split_snippet(marked: str, start: int) -> tuple[str, list[tuple[int, int]]]:
    """A snippet window as SQLite cut it -> at most :data:`SNIPPET_CHARS` characters
    of text (``…`` where cut) and the [start, end) of each matched term in it.

    ``start`` is where the window began in FTS5's snippet (1: at its start).
    """
    text: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    if start > 1:  # cut before its first match: say so
        text.append("…")
        pos = 1
    begun = -1
    for ch in marked:
        if ch == MARK_OPEN:
            begun = pos
        elif ch == MARK_CLOSE:
            if begun >= 0:
                spans.append((begun, pos))
            begun = -1
        else:
            text.append(ch)
            pos += 1
    if len(text) > SNIPPET_CHARS:  # cut after: keep what fits, then "…"
        del text[SNIPPET_CHARS - 1 :]
        text.append("…")
        end = SNIPPET_CHARS - 1
        spans = [(a, min(b, end)) for a, b in spans if a < end]
    return "".join(text), spans


_SYNTAX: Final = ("fts5: ", "unterminated string", "no such column", "unknown special query")


def is_syntax_error(exc: sqlite3.OperationalError) -> bool:
    """Whether FTS5 refused the query expression itself (as opposed to a storage failure)."""
    return str(exc).startswith(_SYNTAX)
