"""Full-text search in the PostgreSQL backend: the GIN index's life, and the queries.

Every row's ``tsv`` column (a generated ``tsvector``, see :mod:`.schema`) is
always there; what search adds is the GIN index over it,
``nexus_messages_tsv``, made by :meth:`PgSearch.build` with ``CREATE INDEX
CONCURRENTLY`` (writes go on meanwhile), under a session advisory lock so
that of several daemons one builds and the others wait for it.  A build cut
short (daemon stopped, connection lost) leaves an INVALID index behind: the
next build drops it and starts again.  Until the index is valid, ``search``
is ``unavailable`` ("being built (N% done)"), as in the SQLite backend.
With search off nothing is dropped: other daemons may share the database
and search it (drop ``nexus_messages_tsv`` by hand to save its upkeep).

Queries mirror the SQLite backend's (:mod:`nexusd.storage.search`): plain
words by default, each word a phrase of its tokens (``phraseto_tsquery``)
and every word required, so nothing a user types is query syntax; with
``syntax`` the text goes to ``websearch_to_tsquery`` (``"a phrase"``,
``or``, ``-word``), which refuses nothing.  Ranked by ``ts_rank`` (length
normalised, negated so that lower is better, as bm25), ties by id; or newest
first.  One statement per page: the hits (one more than ``limit``), their
sizes against the byte budget, and headlines for the kept ones only
(:mod:`.snippets`).

**Punctuation.**  PostgreSQL's parser keeps e-mail addresses, URLs, paths,
``a.b`` host names and signed numbers as single tokens and skips what looks
like an XML tag (``a<b and c>d`` loses ``b and c``).  FTS5's ``unicode61``
splits on every character that is not a letter or digit.  The indexed text
is therefore the content with ASCII punctuation turned into spaces
(:data:`TSV_FUNCTION`, one character for one, so positions carry over to the
snippets), and the query's words get the same treatment, when the schema's
``tsv`` column is made by :data:`TSV_FUNCTION_NAME`; with a schema that
indexes the raw content, queries use the raw words too (detected at
:meth:`PgSearch.prepare`).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Final

import anyio
import psycopg
from psycopg import sql

from ...wire.errors import SEARCH_INDEX, BadRequest, Unavailable
from ...wire.protocol import SearchHit
from ..base import Page, SearchQuery
from ..schema import message_of
from ..scope import NS_MARK
from ..search import HIT_OVERHEAD, MARK_CLOSE, MARK_OPEN, SNIPPET_CHARS
from .schema import (
    INDEXED_CHARS,
    PUNCTUATION_RE,
    TEXT_CONFIG,
    TSV_FUNCTION,
    TSV_FUNCTION_NAME,
    UNACCENT_TOKENS,
    row_size,
    visible,
)
from .snippets import LEAD_CHARS, WINDOW_CHARS, snippet

__all__ = [
    "BUILD_LOCK",
    "INDEX",
    "PUNCTUATION",
    "PUNCTUATION_RE",
    "INDEXED_CHARS",
    "SEARCH_SECONDS",
    "TSV_COLUMN",
    "TSV_FUNCTION",
    "TSV_FUNCTION_NAME",
    "UNACCENT_TOKENS",
    "PgSearch",
    "build_percent",
]

logger = logging.getLogger(__name__)

#: The GIN index over ``nexus_messages.tsv``.
INDEX: Final = "nexus_messages_tsv"
#: Held (session level) by the daemon building the index ("nexusd i").
BUILD_LOCK: Final = 0x6E65787573642069
#: How long one search may run before the server stops it (as the SQLite backend's).
SEARCH_SECONDS: Final = 2.0
#: Seconds between looks while another daemon builds the index.
_POLL: Final = 0.5
#: ASCII punctuation: a space in the indexed text (FTS5's unicode61 splits there).
PUNCTUATION: Final = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
#: The ``tsv`` column of ``nexus_messages`` (as migration 1 makes it).
TSV_COLUMN: Final = (
    f"tsv tsvector GENERATED ALWAYS AS ({TSV_FUNCTION_NAME}('{TEXT_CONFIG}'::regconfig, content))"
    " STORED"
)

_PUNCT_TABLE: Final = str.maketrans(PUNCTUATION, " " * len(PUNCTUATION))
_WORDS: Final = re.compile(r"\S+")
# In websearch syntax: ASCII punctuation other than '"' and a '-' that begins a word.
_SYNTAX_PUNCT: Final = re.compile(
    "(?:(?<=\\S)-|-(?=\\s|$)|[" + re.escape(PUNCTUATION.replace('"', "").replace("-", "")) + "])"
)
_OPTIONS: Final = f"HighlightAll=true, StartSel={MARK_OPEN}, StopSel={MARK_CLOSE}"
_CONFIG: Final = f"'{TEXT_CONFIG}'::regconfig"
# (PostgreSQL's regular expressions repeat at most 255 times.)
_LONG_RUN: Final = "(\\S{250}\\S{250})\\S"
_Q: Final = "(SELECT q FROM query)"
_RANK: Final = f"(-ts_rank(m.tsv, {_Q}, 1)::float8)"


def build_percent(phase: str | None, counts: tuple[int | None, ...]) -> int:
    """How far a ``CREATE INDEX CONCURRENTLY`` is, from ``pg_stat_progress_create_index``.

    Its two table scans take nearly all the time: the build's (0-70%) and the
    validation's (80-99%); ``counts`` is (blocks_total, blocks_done,
    tuples_total, tuples_done).
    """
    if not phase:
        return 0
    bt, bd, tt, td = (int(c or 0) for c in counts)
    for prefix, lo, hi, total, done in (
        ("building index: scanning table", 0, 70, bt, bd),
        ("building index", 70, 75, tt, td),
        ("waiting for writers before validation", 75, 75, 0, 0),
        ("index validation: scanning index", 75, 80, bt, bd),
        ("index validation: sorting", 80, 80, 0, 0),
        ("index validation: scanning table", 80, 99, bt, bd),
        ("waiting for old snapshots", 99, 99, 0, 0),
        ("waiting for readers", 99, 99, 0, 0),
    ):
        if phase.startswith(prefix):
            return lo + (hi - lo) * min(done, total) // total if total > 0 else lo
    return 0


class PgSearch:
    """The search index of one open PostgreSQL database (``enabled`` False: search is off)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._ready = False
        self._percent = 0
        #: The ``tsv`` column indexes the text with punctuation as spaces.
        self._split = True

    @property
    def status(self) -> str:
        if not self.enabled:
            return "off"
        return "ready" if self._ready else f"building {self._percent}%"

    async def prepare(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """At open: how ``tsv`` is made, and whether the index is there and valid."""
        cur = await conn.execute(
            "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef AS d"
            " JOIN pg_attribute AS a ON a.attrelid = d.adrelid AND a.attnum = d.adnum"
            " WHERE d.adrelid = 'nexus_messages'::regclass AND a.attname = 'tsv'"
        )
        row = await cur.fetchone()
        self._split = row is not None and TSV_FUNCTION_NAME in str(row[0])
        if not self._split:
            logger.warning(
                "the tsv column indexes raw text (%s): search splits words as PostgreSQL's"
                " parser does (e-mail addresses, URLs and paths are single words)",
                row[0] if row else "missing",
            )
        if self.enabled:
            await self.refresh(conn)

    async def refresh(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Look again at the index (another daemon may have built it); True if it is ready."""
        if self._ready or not self.enabled:
            return self._ready
        valid = await _valid(conn)
        if valid:
            self._ready, self._percent = True, 100
            return True
        cur = await conn.execute(
            "SELECT phase, blocks_total, blocks_done, tuples_total, tuples_done"
            " FROM pg_stat_progress_create_index"
            " WHERE relid = to_regclass('nexus_messages') AND datname = current_database()"
        )
        progress = await cur.fetchone()
        if progress is not None:
            self._percent = build_percent(progress[0], tuple(progress[1:]))
        return False

    async def build(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Make the index (``conn`` in autocommit mode, used for nothing else meanwhile).

        Returns at once when it is ready or search is off; when another daemon
        builds it, waits for that one (and takes over if it stops).
        """
        while self.enabled and not await self.refresh(conn):
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (BUILD_LOCK,))
            row = await cur.fetchone()
            if row is None or not row[0]:
                await anyio.sleep(_POLL)  # another daemon builds it: look again shortly
                continue
            try:
                await self._build_locked(conn)
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (BUILD_LOCK,))

    async def _build_locked(self, conn: psycopg.AsyncConnection[Any]) -> None:
        name = sql.Identifier(INDEX)
        if await _valid(conn) is False:  # INVALID: a build that was cut short
            logger.warning("dropping the search index an interrupted build left invalid")
            await conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(name))
        elif await _valid(conn):
            return
        logger.info("building the search index (CREATE INDEX CONCURRENTLY %s)", INDEX)
        await conn.execute(
            sql.SQL(
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON nexus_messages USING gin (tsv)"
            ).format(name)
        )
        logger.info("search index complete")

    async def search(self, conn: psycopg.AsyncConnection[Any], q: SearchQuery) -> Page[SearchHit]:
        """One page of hits (see :class:`~nexusd.storage.base.SearchQuery`)."""
        if not self.enabled:
            raise Unavailable(
                "search is off in this daemon (setting search = false)", field=SEARCH_INDEX
            )
        if not await self.refresh(conn):
            raise Unavailable(
                f"the search index is being built ({self._percent}% done); try again shortly",
                field=SEARCH_INDEX,
            )
        query, params = self._query(q)
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL statement_timeout = {int(SEARCH_SECONDS * 1000)}")
                cur = await conn.execute(query, params)
                rows = await cur.fetchall()
        except psycopg.errors.QueryCanceled:
            raise BadRequest(
                f"the search ran for over {SEARCH_SECONDS:g} s and was stopped;"
                " narrow it: more or rarer words, a session, a time range, or newest first",
                field="query",
            ) from None
        except psycopg.errors.ProgramLimitExceeded as exc:  # e.g. a tsquery too large
            raise BadRequest(f"search query refused: {exc}", field="query") from None
        hits: list[SearchHit] = []
        for row in rows:
            if row[3] is None:  # not kept: over the budget, or the one past the limit
                break
            text, spans = snippet(row[5], row[9], row[10] or 1)
            hits.append(
                SearchHit(message=message_of(row[3:9]), snippet=text, highlights=spans, rank=row[2])
            )
        over = bool(rows) and rows[0][1] > q.budget
        return Page(hits, len(hits) < len(rows), over)

    def _tsquery(self, q: SearchQuery) -> tuple[str, dict[str, Any]]:
        """SQL of the query's tsquery, and its parameters; nothing of the text becomes SQL."""
        if q.syntax:
            if not q.text.strip():
                raise BadRequest("the query is empty", field="query")
            text = _SYNTAX_PUNCT.sub(" ", q.text) if self._split else q.text
            return f"websearch_to_tsquery({_CONFIG}, %(text)s)", {"text": text}
        words = _WORDS.findall(q.text)
        if not words:
            raise BadRequest("the query has no words", field="query")
        if self._split:
            words = [w.translate(_PUNCT_TABLE) for w in words]
        # Each word a phrase of its tokens; words with none (``!!!``) drop out, as
        # in FTS5; the tsquery's text form quotes every lexeme, so it reads back exactly.
        return (
            "(SELECT coalesce(string_agg('(' || t::text || ')', ' & '), '')::tsquery"
            f" FROM (SELECT phraseto_tsquery({_CONFIG}, w) AS t"
            " FROM unnest(%(words)s::text[]) AS w) AS x WHERE numnode(t) > 0)",
            {"words": words},
        )

    def _query(self, q: SearchQuery) -> tuple[str, dict[str, Any]]:
        """The page's one statement: hits, their running sizes, and the kept ones' rows."""
        tsquery, params = self._tsquery(q)
        where = [f"m.tsv @@ {_Q}", visible("m")]
        if q.sessions is not None:
            where.append("m.session_tag = ANY(%(sessions)s::text[])")
            params["sessions"] = list(q.sessions)
        if q.role is not None:
            where.append("m.role = %(role)s")
            params["role"] = q.role
        # Timestamps and tags compare as bytes, as in SQLite, whatever the collation.
        if q.since is not None:
            where.append('m.timestamp COLLATE "C" >= %(since)s')
            params["since"] = q.since
        if q.until is not None:
            where.append('m.timestamp COLLATE "C" < %(until)s')
            params["until"] = q.until
        if q.scope is not None:
            params["scope"] = q.scope or NS_MARK
            neg = "NOT " if q.scope == "" else ""
            where.append(f"{neg}starts_with(m.session_tag, %(scope)s)")
        if q.after is not None:
            params["after_rank"], params["after_id"] = q.after
            where.append(
                "m.id < %(after_id)s"
                if q.newest
                else f"({_RANK}, m.id) > (%(after_rank)s::float8, %(after_id)s::bigint)"
            )
        if q.newest:
            hits = "SELECT m.id, NULL::float8 AS rank FROM nexus_messages AS m"
            order, rank = "m.id DESC", _RANK
            window = "h.id DESC"
        else:
            hits = f"SELECT m.id, {_RANK} AS rank FROM nexus_messages AS m"
            order, rank = "rank, m.id", "h.rank"
            window = "h.rank, h.id"
        text = "m.content"
        if self._split:  # the indexed text (a prefix of the message's, as long)
            text = f"regexp_replace(left(m.content, {INDEXED_CHARS}), %(punct)s, ' ', 'g')"
            params["punct"] = PUNCTUATION_RE
        # ts_headline leaves out the words too long to index (over 2047 bytes), which
        # would shift every position after them: a space in every run of 500
        # characters keeps its text the message's length (no such word matched).
        text = f"regexp_replace({text}, %(long)s, %(cut)s, 'g')"
        params["long"], params["cut"] = _LONG_RUN, "\\1 "
        params.update(
            n=q.limit + 1,
            limit=q.limit,
            budget=q.budget,
            extra=SNIPPET_CHARS * 4 + HIT_OVERHEAD,
            options=_OPTIONS,
            mark=MARK_OPEN,
            lead=LEAD_CHARS,
            window=WINDOW_CHARS,
        )
        statement = (
            f"WITH query AS MATERIALIZED (SELECT {tsquery} AS q),"
            f" hits AS ({hits} WHERE {' AND '.join(where)} ORDER BY {order} LIMIT %(n)s),"
            f" sized AS (SELECT h.id, {rank} AS rank, row_number() OVER w AS k,"
            f" sum({row_size('m.')} + %(extra)s) OVER w AS run"
            " FROM hits AS h JOIN nexus_messages AS m ON m.id = h.id"
            f" WINDOW w AS (ORDER BY {window}))"
            " SELECT s.k, s.run, s.rank, m.id, m.role, m.content, m.timestamp, m.session_tag,"
            " m.meta, substr(hl.h, hl.start, %(window)s), hl.start"
            " FROM sized AS s LEFT JOIN nexus_messages AS m ON m.id = s.id"
            " AND s.k <= %(limit)s AND (s.run <= %(budget)s OR s.k = 1)"
            f" LEFT JOIN LATERAL (SELECT h, greatest(1, strpos(h, %(mark)s) - %(lead)s) AS start"
            f" FROM ts_headline({_CONFIG}, {text}, {_Q}, %(options)s) AS h) AS hl ON true"
            " ORDER BY s.k"
        )
        return statement, params


async def _valid(conn: psycopg.AsyncConnection[Any]) -> bool | None:
    """Whether the index is valid (None: there is none)."""
    cur = await conn.execute(
        "SELECT indisvalid AND indisready FROM pg_index WHERE indexrelid = to_regclass(%s)",
        (INDEX,),
    )
    row = await cur.fetchone()
    return None if row is None else bool(row[0])
