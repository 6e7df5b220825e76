"""Full-text search on PostgreSQL (storage/postgres/search.py, snippets.py).

Rows go in with plain SQL after ``schema.migrate``; where the answer must be
the SQLite backend's, the same rows are written through a real
:class:`SQLiteStorage` and the same queries must find the same messages.
The cases where the two legitimately differ are asserted as such, so that a
change of either side shows up here.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import psycopg
import pytest

from nexusd.storage import search as fts
from nexusd.storage.base import Insert, NewRow, SearchQuery
from nexusd.storage.postgres import schema
from nexusd.storage.postgres import search as pgs
from nexusd.storage.scope import NS_MARK
from nexusd.storage.sqlite import SQLiteStorage
from nexusd.wire.errors import BadRequest, Unavailable
from nexusd.wire.protocol import SearchHit

pytestmark = pytest.mark.anyio

Conn = psycopg.AsyncConnection[Any]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def adopt_search_ddl(conn: Conn) -> None:
    """The ``tsv`` column and ``nexus_text`` mapping that search.py asks of schema.py's
    migration 1 (a no-op once migration 1 carries them)."""
    expr = await _tsv_expression(conn)
    if pgs.TSV_FUNCTION_NAME in expr:
        return
    await conn.execute(pgs.TSV_FUNCTION)
    await conn.execute("ALTER TABLE nexus_messages DROP COLUMN tsv")
    await conn.execute(f"ALTER TABLE nexus_messages ADD COLUMN {pgs.TSV_COLUMN}")
    cur = await conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'unaccent'")
    if await cur.fetchone():
        await conn.execute(
            f"ALTER TEXT SEARCH CONFIGURATION {schema.TEXT_CONFIG}"
            f" ALTER MAPPING FOR {pgs.UNACCENT_TOKENS} WITH unaccent, simple"
        )


async def _tsv_expression(conn: Conn) -> str:
    cur = await conn.execute(
        "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef AS d JOIN pg_attribute AS a"
        " ON a.attrelid = d.adrelid AND a.attnum = d.adnum"
        " WHERE d.adrelid = 'nexus_messages'::regclass AND a.attname = 'tsv'"
    )
    row = await cur.fetchone()
    assert row is not None
    return str(row[0])


@asynccontextmanager
async def pg(url: str, *, raw: bool = False) -> AsyncIterator[Conn]:
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    try:
        await schema.migrate(conn)
        if not raw:
            await adopt_search_ddl(conn)
        yield conn
    finally:
        await conn.close()


async def ready(conn: Conn) -> pgs.PgSearch:
    s = pgs.PgSearch(True)
    await s.prepare(conn)
    await s.build(conn)
    assert s.status == "ready"
    return s


TS = "2026-01-01T00:00:{:02d}.000000Z"


async def insert(
    conn: Conn | psycopg.AsyncConnection[Any],
    rows: Sequence[str | tuple[str, str, str, str]],
    tag: str = "s",
) -> list[int]:
    """Rows (content, or (content, role, timestamp, tag)) as the writer stores them."""
    ids = []
    for i, r in enumerate(rows):
        content, role, ts, t = r if isinstance(r, tuple) else (r, "user", TS.format(i % 60), tag)
        cur = await conn.execute(
            "INSERT INTO nexus_messages (id, role, content, timestamp, session_tag)"
            " VALUES (nextval('nexus_messages_id_seq'), %s, %s, %s, %s) RETURNING id",
            (role, content, ts, t),
        )
        row = await cur.fetchone()
        assert row is not None
        ids.append(int(row[0]))
    return ids


async def find(s: pgs.PgSearch, conn: Conn, text: str, **kw: Any) -> list[SearchHit]:
    return (await s.search(conn, SearchQuery(text, **{"limit": 100, **kw}))).items


@asynccontextmanager
async def sqlite_with(tmp: Path, rows: Sequence[str]) -> AsyncIterator[SQLiteStorage]:
    st = SQLiteStorage(
        tmp / "n.db",
        max_messages=0,
        synchronous="normal",
        wal_autocheckpoint=8000,
        readers=2,
        search=True,
    )
    await st.open()
    try:
        new: list[NewRow] = [("user", c, TS.format(i % 60), None, None) for i, c in enumerate(rows)]
        await st.write([Insert("s", new)], lambda _: None)
        yield st
    finally:
        await st.close()


# Every row and query here finds the same messages on both backends.
CORPUS = [
    "Über das Café",
    "uber cafe in town",
    "hello world",
    "mail bob@example.com today",
    "see https://example.com/a/b?x=1 now",
    "foo-bar baz",
    "foo bar",
    "foo.bar() and obj->field",
    "3.14 is pi, 1,000,000 is big",
    "a<b and c>d in code",
    "<script> alert(1) </script> after",
    "path /usr/lib/x.so here",
    "date 2024-01-02 12:30",
    "snake_case CamelCase don't",
    "東京タワーに行った",
    "naïve FÊTE über2",
    'she said "NEAR(x" AND -y OR z*',
]
SAME = [
    "uber CAFE",
    "café",
    "hello",
    "hello !!!",
    "bob",
    "example",
    "bob@example.com",
    "foo-bar",
    "foo.bar",
    "foo",
    "bar baz",
    "field",
    "3",
    "14",
    "000",
    "b and c",
    "alert",
    "after",
    "lib",
    "x.so",
    "01",
    "2024-01-02",
    "snake",
    "case",
    "t",
    "東京タワーに行った",
    "タワー",
    "naive fete",
    "uber2",
    'NEAR(x" AND',
    "z y",
    "!!!",
    "nothing-here",
]


async def test_plain_words_find_what_sqlite_finds(pg_url: str, tmp_path: Path) -> None:
    async with pg(pg_url) as conn, sqlite_with(tmp_path, CORPUS) as lite:
        await insert(conn, CORPUS)
        s = await ready(conn)
        for q in SAME:
            want = {h.message.id for h in (await lite.search(SearchQuery(q, limit=100))).items}
            got = {h.message.id for h in await find(s, conn, q)}
            assert got == want, q
        assert await find(s, conn, "'") == []
        for q in ("   ", "\t\n"):
            with pytest.raises(BadRequest) as err:
                await find(s, conn, q)
            assert err.value.field == "query"


async def test_where_the_backends_differ(pg_url: str, tmp_path: Path) -> None:
    """Tokenising that legitimately differs from FTS5's (documented)."""
    long_word = "q" * 3000
    thai = "สวัสดีครับ"
    rows = [thai, f"{long_word} end", "x" * 10 + " 😀"]
    async with pg(pg_url) as conn, sqlite_with(tmp_path, rows) as lite:
        await insert(conn, rows)
        s = await ready(conn)

        async def both(q: str) -> tuple[int, int]:
            lhits = (await lite.search(SearchQuery(q, limit=10))).items
            return len(lhits), len(await find(s, conn, q))

        # Thai: unicode61 cuts at combining vowel and tone marks, PostgreSQL does not.
        assert await both("ครับ") == (1, 0)
        assert await both(thai) == (1, 1)
        # A word over 2047 bytes is not indexed by PostgreSQL.
        assert await both(long_word) == (1, 0)
        assert await both("end") == (1, 1)


async def test_syntax_is_websearch(pg_url: str) -> None:
    async with pg(pg_url) as conn:
        await insert(conn, ["alpha beta gamma", "alphabet soup", "beta-carotene"])
        s = await ready(conn)
        assert len(await find(s, conn, '"alpha beta"', syntax=True)) == 1
        assert len(await find(s, conn, '"beta alpha"', syntax=True)) == 0
        assert len(await find(s, conn, "alpha or soup", syntax=True)) == 2
        assert len(await find(s, conn, "beta -gamma", syntax=True)) == 1
        assert len(await find(s, conn, "beta-carotene", syntax=True)) == 1
        # FTS5's own syntax does not carry over: no prefix, no NEAR; nothing is refused.
        assert await find(s, conn, "alph*", syntax=True) == []
        for odd in ('"unterminated', "AND AND", "nosuchcol: x", "NEAR(", "*", "-", "&|!:*()"):
            await find(s, conn, odd, syntax=True)
        with pytest.raises(BadRequest) as err:
            await find(s, conn, "  ", syntax=True)
        assert err.value.field == "query"


async def test_filters_scope_and_floors(pg_url: str) -> None:
    ns = f"{NS_MARK}u1000{NS_MARK}"
    async with pg(pg_url) as conn:
        ids = await insert(
            conn,
            [
                ("needle one", "user", TS.format(1), "a"),
                ("needle two", "assistant", TS.format(2), "a"),
                ("needle three", "user", TS.format(3), "b"),
                ("needle four", "user", TS.format(4), ns + "a"),
                ("needle five", "user", TS.format(5), ns + "b"),
            ],
        )
        s = await ready(conn)

        async def hit_ids(**kw: Any) -> set[int]:
            return {h.message.id for h in await find(s, conn, "needle", **kw)}

        assert await hit_ids() == set(ids)
        assert await hit_ids(sessions=("a", "b")) == set(ids[:3])
        assert await hit_ids(role="assistant") == {ids[1]}
        assert await hit_ids(since=TS.format(2), until=TS.format(4)) == {ids[1], ids[2]}
        assert await hit_ids(scope="") == set(ids[:3])
        assert await hit_ids(scope=ns) == set(ids[3:])
        hits = await find(s, conn, "needle", scope=ns, sessions=(ns + "b",))
        assert [h.message.session_tag for h in hits] == [ns + "b"]
        # A floor hides its session's rows below it, as every read does.
        await conn.execute(
            "INSERT INTO nexus_floors (session_tag, below_id) VALUES ('a', %s)", (ids[1],)
        )
        assert await hit_ids() == set(ids[1:])


async def test_pages_have_no_duplicate_and_no_gap(pg_url: str) -> None:
    rng = random.Random(15)
    rows = [
        " ".join(["needle"] * rng.randint(1, 4) + ["hay"] * rng.randint(0, 30)) for _ in range(30)
    ]
    rows += ["needle hay"] * 5  # equal ranks: ties go by id
    async with pg(pg_url) as conn:
        ids = await insert(conn, rows)
        s = await ready(conn)
        whole = await find(s, conn, "needle", limit=100)
        assert sorted(h.message.id for h in whole) == ids
        ranks = [(h.rank, h.message.id) for h in whole]
        assert ranks == sorted(ranks) and len({r for r, _ in ranks}) > 3
        for newest in (False, True):
            seen: list[SearchHit] = []
            after: tuple[float, int] | None = None
            pages = 0
            while True:
                page = await s.search(
                    conn, SearchQuery("needle", newest=newest, after=after, limit=12)
                )
                seen += page.items
                pages += 1
                if not page.truncated:
                    break
                last = page.items[-1]
                after = (last.rank, last.message.id)
            assert pages == 3
            got = [h.message.id for h in seen]
            assert got == (sorted(ids, reverse=True) if newest else [i for _, i in ranks])


async def test_the_budget_cuts_a_page_and_an_oversized_hit_comes_alone(pg_url: str) -> None:
    async with pg(pg_url) as conn:
        ids = await insert(conn, ["needle " + "x" * 3000] * 4)
        s = await ready(conn)
        per = 3000 + 7 + 4 + 27 + 1 + schema.ROW_OVERHEAD + fts.SNIPPET_CHARS * 4 + fts.HIT_OVERHEAD
        page = await s.search(conn, SearchQuery("needle", newest=True, budget=2 * per + 10))
        assert [h.message.id for h in page.items] == ids[::-1][:2]
        assert page.truncated and not page.over
        page = await s.search(conn, SearchQuery("needle", budget=100))
        assert len(page.items) == 1 and page.over and page.truncated


async def test_snippets_and_spans(pg_url: str, tmp_path: Path) -> None:
    long_before = "y" * 5000 + " needle"
    long_after = "needle " + "z" * 5000
    words = " ".join(f"w{i}" for i in range(40))
    rows = [
        long_before,
        long_after,
        "a short needle",
        f"{words} needle {words}",
        f"{words} needle",
        f"needle {words}",
        "one two needle " + words,
        "Needle, NEEDLE; néédle",
        "tab\tneedle\nnewline",
    ]
    async with pg(pg_url) as conn, sqlite_with(tmp_path, rows) as lite:
        await insert(conn, rows)
        s = await ready(conn)
        for newest in (False, True):
            hits = {h.message.content: h for h in await find(s, conn, "needle", newest=newest)}
            assert set(hits) == set(rows)
            for content, h in hits.items():
                assert len(h.snippet) <= fts.SNIPPET_CHARS
                assert h.highlights, content
                for a, b in h.highlights:
                    assert h.snippet[a:b].lower() in ("needle", "néédle"), content
            assert hits[long_before].snippet.startswith("…")
            assert hits[long_before].snippet.endswith("y needle")
            assert hits[long_after].snippet.startswith("needle z")
            assert hits[long_after].snippet.endswith("…")
            assert hits["a short needle"].snippet == "a short needle"
            mid = hits[f"{words} needle {words}"].snippet
            assert mid == "…w33 w34 w35 w36 w37 w38 w39 needle w0 w1 w2 w3 w4 w5 w6 w7…"
            assert hits["Needle, NEEDLE; néédle"].highlights == [(0, 6), (8, 14), (16, 22)]
        # Around one match, the snippet is SQLite's, spans and all.
        lhits = {h.message.content: h for h in (await lite.search(SearchQuery("needle"))).items}
        for content in rows[2:]:
            assert (hits[content].snippet, hits[content].highlights) == (
                lhits[content].snippet,
                lhits[content].highlights,
            )


async def test_hostile_input_is_words(pg_url: str) -> None:
    hostile = [
        "'; DROP TABLE nexus_messages; --",
        "\" ' \\ & | ! : * ( ) <-> <2> :* :A",
        "a:*&b|!c",
        "$$ $fn$ E'\\x00' %s %(x)s {}",
        "\ue000 mark \ue001",
    ]
    async with pg(pg_url) as conn:
        ids = await insert(conn, [*hostile, "drop table here", "plain mark"])
        s = await ready(conn)
        assert {h.message.id for h in await find(s, conn, hostile[0])} == {ids[0]}
        assert {h.message.id for h in await find(s, conn, "drop table")} == {ids[0], ids[5]}
        for q in hostile:
            for syntax in (False, True):
                await find(s, conn, q, syntax=syntax)  # never an error
        assert {h.message.id for h in await find(s, conn, "mark")} == {ids[4], ids[6]}
        big = " ".join(f"w{i}:*|&!" for i in range(1500))[:10_000]
        assert len(big) == 10_000
        assert await find(s, conn, big) == []
        await find(s, conn, "x" * 10_000)
        await find(s, conn, big, syntax=True)
        cur = await conn.execute("SELECT count(*) FROM nexus_messages")
        assert (await cur.fetchone()) == (len(ids),)


async def test_a_huge_row_is_stored_and_found(pg_url: str) -> None:
    # ~1.1 MB of distinct words: over PostgreSQL's 1 MB tsvector as a whole.
    huge = " ".join(f"{i:x}k{i * 7919:x}" for i in range(90_000))
    assert len(huge.encode()) > 1_000_000
    async with pg(pg_url) as conn:
        [big, small] = await insert(conn, [huge + " needle", "needle small"])
        s = await ready(conn)
        first = f"{5:x}k{5 * 7919:x}"
        hits = await find(s, conn, first)
        assert [h.message.id for h in hits] == [big]
        h = hits[0]
        assert len(h.message.content) == len(huge) + 7
        assert len(h.snippet) <= fts.SNIPPET_CHARS and h.snippet.endswith("…")
        assert [h.snippet[a:b] for a, b in h.highlights] == [first]
        # Past the indexed prefix (INDEXED_CHARS), words are not found.
        assert [x.message.id for x in await find(s, conn, "needle")] == [small]


async def test_the_index_is_built_over_existing_rows(pg_url: str) -> None:
    async with pg(pg_url) as conn:
        ids = await insert(conn, [f"row {i} needle" for i in range(2000)])
        off = pgs.PgSearch(False)
        await off.prepare(conn)
        await off.build(conn)
        assert off.status == "off"
        with pytest.raises(Unavailable, match="search is off"):
            await find(off, conn, "needle")
        s = pgs.PgSearch(True)
        await s.prepare(conn)
        assert s.status == "building 0%"
        with pytest.raises(Unavailable, match=r"being built \(0% done\)") as err:
            await find(s, conn, "needle")
        assert err.value.field == "search"
        await s.build(conn)
        assert s.status == "ready"
        assert len(await find(s, conn, "needle", limit=1000, budget=1 << 30)) == 1000
        assert await pgs._valid(conn) is True
        # A second daemon finds it ready at once.
        other = pgs.PgSearch(True)
        await other.prepare(conn)
        assert other.status == "ready"
        assert [h.message.id for h in await find(other, conn, "1999")] == [ids[-1]]


async def test_an_interrupted_build_is_dropped_and_made_again(pg_url: str) -> None:
    async with (
        pg(pg_url) as conn,
        await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as builder,
        await psycopg.AsyncConnection.connect(pg_url) as writer,
    ):
        await insert(conn, [f"row {i} needle" for i in range(100)])
        # An open write makes CREATE INDEX CONCURRENTLY wait; cancelled there, it
        # leaves its catalog entry INVALID, as a daemon stopped mid-build does.
        await insert(writer, ["uncommitted"])
        pid = builder.info.backend_pid
        failed: list[BaseException] = []

        async def build() -> None:
            try:
                await builder.execute(
                    f"CREATE INDEX CONCURRENTLY {pgs.INDEX} ON nexus_messages USING gin (tsv)"
                )
            except psycopg.Error as exc:
                failed.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(build)
            with anyio.fail_after(10):
                while True:  # poll until the build waits on the writer
                    cur = await conn.execute(
                        "SELECT phase FROM pg_stat_progress_create_index WHERE pid = %s", (pid,)
                    )
                    row = await cur.fetchone()
                    if row is not None and str(row[0]).startswith("waiting"):
                        break
                    await anyio.sleep(0.02)
            s = pgs.PgSearch(True)
            await s.prepare(conn)
            await s.refresh(conn)
            assert s.status == "building 0%"  # (waiting for writers: 0%)
            await conn.execute("SELECT pg_cancel_backend(%s)", (pid,))
        assert failed and isinstance(failed[0], psycopg.errors.QueryCanceled)
        await writer.rollback()
        assert await pgs._valid(conn) is False
        await s.build(conn)
        assert s.status == "ready" and await pgs._valid(conn) is True
        assert len(await find(s, conn, "needle")) == 100


async def test_a_second_daemon_waits_for_the_first_ones_build(pg_url: str) -> None:
    async with (
        pg(pg_url) as conn,
        await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as other_conn,
    ):
        await insert(conn, [f"row {i} needle" for i in range(200)])
        await other_conn.execute("SELECT pg_advisory_lock(%s)", (pgs.BUILD_LOCK,))
        s = pgs.PgSearch(True)
        await s.prepare(conn)
        async with anyio.create_task_group() as tg:
            tg.start_soon(s.build, conn)
            await anyio.lowlevel.checkpoint()  # (the build asks for the lock, then polls)
            await other_conn.execute(
                f"CREATE INDEX CONCURRENTLY {pgs.INDEX} ON nexus_messages USING gin (tsv)"
            )
            await other_conn.execute("SELECT pg_advisory_unlock(%s)", (pgs.BUILD_LOCK,))
        assert s.status == "ready"
        cur = await conn.execute(
            "SELECT count(*) FROM pg_indexes WHERE tablename = 'nexus_messages'"
            " AND indexdef LIKE '%%gin%%'"
        )
        assert (await cur.fetchone()) == (1,)


def test_build_percent_follows_the_phases() -> None:
    assert pgs.build_percent(None, ()) == 0
    assert pgs.build_percent("building index: scanning table", (100, 50, 0, 0)) == 35
    assert pgs.build_percent("index validation: scanning table", (10, 10, 0, 0)) == 99
    assert pgs.build_percent("waiting for writers before build", (0, 0, 0, 0)) == 0
