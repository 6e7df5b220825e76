"""Full-text search in the SQLite backend (storage/search.py): index upkeep, building, queries.

Through the real backend on a real file: rows go in as the daemon's writer
batches them, and the index is checked with FTS5's own ``integrity-check``
against the table it indexes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from nexusd.storage import search as fts
from nexusd.storage.base import ClearAll, ClearSession, Insert, NewRow, Op, PopNewest, SearchQuery
from nexusd.storage.schema import open_writer
from nexusd.storage.sqlite import SQLiteStorage
from nexusd.wire.errors import BadRequest, Unavailable
from nexusd.wire.protocol import SearchHit

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the writer thread hands back through asyncio


@asynccontextmanager
async def opened(db: Path, *, search: bool = True, keep: int = 0) -> AsyncIterator[SQLiteStorage]:
    storage = SQLiteStorage(
        db, max_messages=keep, synchronous="full", wal_autocheckpoint=8000, readers=2, search=search
    )
    await storage.open()
    try:
        yield storage
    finally:
        await storage.close()


def row(content: str, role: str = "user", ts: str | None = None) -> NewRow:
    return (role, content, ts, None, None)


async def write(storage: SQLiteStorage, ops: list[Op]) -> list[Any]:
    answers: list[list[Any]] = []
    await storage.write(ops, answers.append)
    assert len(answers) == 1
    return answers[0]


async def find(storage: SQLiteStorage, q: str, **kw: Any) -> list[SearchHit]:
    return (await storage.search(SearchQuery(q, **{"limit": 50, **kw}))).items


def index_is_exact(db: Path) -> None:
    """FTS5's own check that the index holds exactly the table's rows."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("INSERT INTO nexus_fts(nexus_fts, rank) VALUES('integrity-check', 1)")
    finally:
        conn.close()


def trigger_conditions(db: Path) -> set[bool]:
    """Whether each of the index's triggers asks how far the build has come."""
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name GLOB 'nexus_fts*'"
        ).fetchall()
    finally:
        conn.close()
    assert len(rows) == 3
    return {"nexus_fts_state" in sql for (sql,) in rows}


async def test_search_sees_exactly_what_is_committed(tmp_path: Path) -> None:
    db = tmp_path / "n.db"
    async with opened(db, keep=3) as s:
        await write(s, [Insert("a", [row("the quick brown fox"), row("a lazy dog")])])
        await write(s, [Insert("b", [row("quick thinking", role="assistant")])])
        hits = await find(s, "quick")
        assert sorted(h.message.content for h in hits) == ["quick thinking", "the quick brown fox"]
        fox = next(h for h in hits if h.message.session_tag == "a")
        assert fox.snippet == "the quick brown fox"
        assert [fox.snippet[a:b] for a, b in fox.highlights] == ["quick"]
        assert [h.message.content for h in await find(s, "quick", sessions=("b",))] == [
            "quick thinking"
        ]
        assert [h.message.role for h in await find(s, "quick", role="assistant")] == ["assistant"]
        # Pruning (keep 3), pop and clear take their rows out of the index in the same commit.
        await write(s, [Insert("a", [row("one"), row("two")])])  # prunes "the quick brown fox"
        assert [h.message.content for h in await find(s, "quick")] == ["quick thinking"]
        await write(s, [PopNewest("b")])
        assert await find(s, "quick") == []
        await write(s, [ClearSession("a")])
        assert await find(s, "two") == []
    index_is_exact(db)


async def test_plain_words_are_never_fts_syntax(tmp_path: Path) -> None:
    async with opened(tmp_path / "n.db") as s:
        await write(s, [Insert("s", [row('she said "NEAR(x" AND -y OR z*'), row("x y z")])])
        hits = await find(s, 'NEAR(x" AND')
        assert [h.message.content for h in hits] == ['she said "NEAR(x" AND -y OR z*']
        assert len(await find(s, "z y x")) == 2  # every word, in any order
        assert len(await find(s, "z said")) == 1
        with pytest.raises(BadRequest):
            fts.match_expression("  \t ", syntax=False)


async def test_fts_syntax_on_request_and_its_errors_are_bad_request(tmp_path: Path) -> None:
    async with opened(tmp_path / "n.db") as s:
        await write(s, [Insert("s", [row("alpha beta gamma"), row("alphabet soup")])])
        assert len(await find(s, "alph*", syntax=True)) == 2
        assert len(await find(s, '"alpha beta"', syntax=True)) == 1
        assert len(await find(s, "alpha NOT gamma", syntax=True)) == 0
        for bad in ('"unterminated', "AND AND", "nosuchcol: x", "NEAR(", "*"):
            with pytest.raises(BadRequest) as err:
                await find(s, bad, syntax=True)
            assert err.value.field == "query"


async def test_accents_and_case_fold_and_cjk_is_found_by_prefix(tmp_path: Path) -> None:
    async with opened(tmp_path / "n.db") as s:
        await write(s, [Insert("s", [row("Über das Café"), row("東京タワーに行った")])])
        assert [h.message.content for h in await find(s, "uber CAFE")] == ["Über das Café"]
        assert len(await find(s, "東京タワーに行った")) == 1  # the whole run
        assert await find(s, "タワー") == []  # inside a run: not a token of its own
        assert len(await find(s, '"東京"*', syntax=True)) == 1


async def test_newest_first_and_paging(tmp_path: Path) -> None:
    async with opened(tmp_path / "n.db") as s:
        [ids] = await write(s, [Insert("s", [row(f"needle {i}") for i in range(7)])])
        newest = await find(s, "needle", newest=True, limit=3)
        assert [h.message.id for h in newest] == ids[::-1][:3]
        rest = await find(s, "needle", newest=True, after=(0.0, newest[-1].message.id))
        assert [h.message.id for h in rest] == ids[::-1][3:]
        ranked = await find(s, "needle", limit=4)
        more = await find(s, "needle", after=(ranked[-1].rank, ranked[-1].message.id))
        assert sorted(h.message.id for h in ranked + more) == ids


async def test_an_existing_database_gets_its_index_built_behind_live_writes(
    tmp_path: Path,
) -> None:
    db = tmp_path / "n.db"
    conn = open_writer(db)  # a database from before search: 12 000 rows, no index
    conn.executemany(
        "INSERT INTO nexus_messages (role, content, timestamp, session_tag)"
        " VALUES ('user', ?, '2026-01-01T00:00:00Z', 's')",
        [(f"old message {i}",) for i in range(12_000)],
    )
    conn.close()
    async with opened(db) as s:
        assert s.index_state is not None and not s.index_state.complete
        assert trigger_conditions(db) == {True}  # leave alone what the build has yet to reach
        with pytest.raises(Unavailable, match="being built"):
            await find(s, "old")
        # A row written and one deleted before the build reaches them.
        await write(s, [Insert("s", [row("new message")])])
        await write(s, [PopNewest("s")])
        await write(s, [Insert("s", [row("newer message")])])
        async with anyio.create_task_group() as tg:
            tg.start_soon(s.build_search_index)
            await write(s, [Insert("t", [row("during the build")])])
        assert s.index_state is not None and s.index_state.complete
        assert trigger_conditions(db) == {False}  # built: no lookup of the state per row
        assert len(await find(s, "old", limit=20_000, budget=1 << 30)) == 12_000
        assert [h.message.content for h in await find(s, "new")] == []
        assert [h.message.content for h in await find(s, "newer")] == ["newer message"]
        assert len(await find(s, "during build")) == 1
    index_is_exact(db)


async def test_search_off_drops_the_index_and_on_again_rebuilds_it(tmp_path: Path) -> None:
    db = tmp_path / "n.db"
    async with opened(db) as s:
        await write(s, [Insert("s", [row("kept through the switch")])])
    async with opened(db, search=False) as s:
        with pytest.raises(Unavailable, match="search is off"):
            await find(s, "kept")
        await write(s, [Insert("s", [row("written while off")])])
    conn = sqlite3.connect(db)
    assert (
        conn.execute("SELECT name FROM sqlite_master WHERE name LIKE 'nexus_fts%'").fetchall() == []
    )
    conn.close()
    async with opened(db) as s:
        await s.build_search_index()
        assert len(await find(s, "kept")) == 1
        assert len(await find(s, "written while off")) == 1
    index_is_exact(db)


async def test_a_snippet_is_cut_around_its_match_and_says_where(tmp_path: Path) -> None:
    async with opened(tmp_path / "n.db") as s:
        long_before = "y" * 5000 + " needle"
        long_after = "needle " + "z" * 5000
        await write(s, [Insert("s", [row(long_before), row(long_after), row("a short needle")])])
        for newest in (False, True):
            hits = {h.message.content: h for h in await find(s, "needle", newest=newest)}
            for content, h in hits.items():
                assert len(h.snippet) <= fts.SNIPPET_CHARS
                assert [h.snippet[a:b] for a, b in h.highlights] == ["needle"], content
            assert hits[long_before].snippet.startswith("…")
            assert hits[long_before].snippet.endswith("y needle")
            assert hits[long_after].snippet.startswith("needle z")
            assert hits[long_after].snippet.endswith("…")
            assert hits["a short needle"].snippet == "a short needle"


async def test_one_batch_that_stores_and_removes_keeps_the_index_exact(tmp_path: Path) -> None:
    db = tmp_path / "n.db"
    async with opened(db, keep=20) as s:
        await write(s, [Insert("a", [row(f"old a {i}") for i in range(5)])])
        batch: list[Op] = [
            Insert("a", [row("fresh a")]),
            PopNewest("a"),  # the row this batch stored, gone before the index saw it
            Insert("b", [row(f"b {i}") for i in range(3)]),
            ClearSession("b"),  # all of b, stored by this batch
            Insert("c", [row(f"c {i}") for i in range(40)]),  # prunes 20 (the range path)
            Insert("a", [row("last a")]),
            PopNewest("a"),
            PopNewest("a"),  # an older row, indexed by an earlier batch
        ]
        await write(s, batch)
        assert [h.message.content for h in await find(s, "fresh")] == []
        assert await find(s, "b") == []
        assert len(await find(s, "c", limit=100)) == 20
        assert sorted(h.message.content for h in await find(s, "old")) == [
            f"old a {i}" for i in range(4)
        ]
        # Another program's writes are indexed by the triggers.
        other = sqlite3.connect(db)
        other.execute(
            "INSERT INTO nexus_messages (role, content, timestamp, session_tag)"
            " VALUES ('user', 'from the shell', '2026-01-01T00:00:00Z', 'x')"
        )
        other.execute("DELETE FROM nexus_messages WHERE content = 'old a 0'")
        other.commit()
        other.close()
        assert [h.message.content for h in await find(s, "shell")] == ["from the shell"]
        assert len(await find(s, "old")) == 3
        await write(s, [Insert("z", [row("z one")]), ClearAll(None), Insert("z", [row("z two")])])
        assert [h.message.content for h in await find(s, "z")] == ["z two"]
    index_is_exact(db)


async def test_a_search_that_runs_too_long_is_stopped_and_the_reader_goes_on(
    tmp_path: Path,
) -> None:
    async with opened(tmp_path / "n.db") as s:
        await write(s, [Insert("s", [row(f"common word{i}") for i in range(400)])] * 50)
        s._readers.search_seconds = 0.0  # every search is already over its time
        with pytest.raises(BadRequest, match="was stopped") as err:
            await find(s, "common", limit=10)
        assert err.value.field == "query"
        s._readers.search_seconds = 10.0
        found = await find(s, "common word7")  # the same readers serve on
        assert found and {h.message.content for h in found} == {"common word7"}
        assert (await s.history("s", 1, before_id=None, after_id=None, budget=1 << 20)).items
