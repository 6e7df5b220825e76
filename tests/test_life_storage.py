"""A conversation's life in storage (issue 13): hidden clears and the sweep, delete by
id, fork, a session's own retention, retention by age.

Driven through the :class:`~nexusd.storage.base.Storage` seam, against each
backend (a real SQLite file; a fresh PostgreSQL database), with the full-text
index on (every removal must leave it consistent).  Rows "committed two hours
ago" are made by moving the commit marks back with a second connection, as
another program would: no clock is faked inside nexusd.  The few raw looks at
the stored data go through :class:`Data`, in SQL both backends share.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nexusd.storage import floors, ops
from nexusd.storage.base import (
    Change,
    ClearAll,
    ClearSession,
    Deleted,
    DeleteIds,
    Fork,
    Forked,
    Insert,
    NewRow,
    Op,
    PopNewest,
    Removed,
    Retention,
    SearchQuery,
    SetRetention,
    Storage,
)
from nexusd.storage.sqlite import SQLiteStorage
from nexusd.wire.errors import BadRequest, Conflict, NotFound, TooLarge
from tests.conftest import pg_database
from tests.test_storage import write

pytestmark = pytest.mark.anyio

BIG = floors.HIDE_FROM + 500
Opener = Callable[..., AbstractAsyncContextManager[Storage]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Data:
    """One test's stored data, as another program sees it: an SQLite file or a
    PostgreSQL database (``url``)."""

    kind: str
    path: Path
    url: str = ""

    def raw(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """``query`` (``?`` placeholders) on a connection of its own, committed."""
        if self.kind == "sqlite":
            with sqlite3.connect(self.path) as conn:
                return conn.execute(query, params).fetchall()
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as pg:
            cur = pg.execute(query.replace("?", "%s"), params)
            return [tuple(r) for r in cur.fetchall()] if cur.description else []

    def stored_rows(self, where: str = "") -> int:
        """Rows stored, hidden ones included."""
        return int(self.raw(f"SELECT COUNT(*) FROM nexus_messages {where}")[0][0])

    def age_everything(self, seconds: float) -> None:
        """As if every row stored so far had been committed ``seconds`` earlier."""
        self.raw("UPDATE nexus_marks SET second = second - ?, at = at - ?", int(seconds), seconds)

    def index_is_consistent(self) -> None:
        """The full-text index holds exactly the stored rows' words."""
        if self.kind == "sqlite":  # FTS5's own check
            with sqlite3.connect(self.path) as conn:
                conn.execute(
                    "INSERT INTO nexus_fts (nexus_fts, rank) VALUES ('integrity-check', 1)"
                )
            return
        import psycopg

        from nexusd.storage.postgres.search import INDEX

        with psycopg.connect(self.url) as pg:
            [(valid,)] = pg.execute(
                "SELECT indisvalid AND indisready FROM pg_index WHERE indexrelid = to_regclass(%s)",
                (INDEX,),
            ).fetchall()
            assert valid
            # Each word, looked up through the index only, finds exactly the rows
            # whose stored vector holds it.
            pg.execute("SET LOCAL enable_seqscan = off")
            words = pg.execute(
                "SELECT word, ndoc FROM ts_stat('SELECT tsv FROM nexus_messages')"
                ' ORDER BY word COLLATE "C" LIMIT 200'
            ).fetchall()
            for word, ndoc in words:
                [(n,)] = pg.execute(
                    "SELECT COUNT(*) FROM nexus_messages WHERE tsv @@ %s::tsquery",
                    (f"'{word}'",),
                ).fetchall()
                assert n == ndoc, word


@pytest.fixture(params=["sqlite", "postgres"])
def data(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Data]:
    with ExitStack() as stack:
        url = stack.enter_context(pg_database()) if request.param == "postgres" else ""
        yield Data(request.param, tmp_path / "n.db", url)


@pytest.fixture
def opener(data: Data, tmp_path: Path) -> Opener:
    @asynccontextmanager
    async def open_one(*, max_messages: int = 0, max_age: float = 0.0) -> AsyncIterator[Any]:
        storage: Storage
        if data.kind == "postgres":
            from nexusd.storage.postgres.backend import PostgresStorage

            storage = PostgresStorage(
                data.url,
                max_messages=max_messages,
                max_age=max_age,
                readers=2,
                search=True,
                snapshot_dir=tmp_path,
            )
        else:
            storage = SQLiteStorage(
                data.path,
                max_messages=max_messages,
                max_age=max_age,
                synchronous="normal",
                wal_autocheckpoint=8000,
                readers=2,
                search=True,
            )
        await storage.open()
        try:
            await storage.build_search_index()
            yield storage
        finally:
            await storage.close()

    return open_one


@pytest.fixture
async def storage(opener: Opener) -> AsyncIterator[Storage]:
    async with opener() as s:
        yield s


@pytest.fixture
def limits(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, int], None]:
    """``limits(name, n)``: lower a bound of the editing ops (nexusd/storage/ops.py,
    where every backend's refusals read it)."""

    def lower(name: str, n: int) -> None:
        monkeypatch.setattr(ops, name, n)

    return lower


def row(content: str, *, key: str | None = None, ts: str | None = None) -> NewRow:
    return ("user", content, ts, None, key)


async def one(storage: Storage, op: Op) -> Any:
    return (await write(storage, [op]))[0]


async def contents(storage: Storage, tag: str) -> list[str]:
    page = await storage.history(tag, 10_000, before_id=None, after_id=None, budget=1 << 30)
    return [m.content for m in page.items]


async def found(storage: Storage, word: str) -> list[str]:
    page = await storage.search(SearchQuery(word, limit=1000, newest=True))
    return [h.message.session_tag for h in page.items]


async def sweep_all(storage: Storage) -> int:
    removed = 0
    for _ in range(10_000):
        swept = await storage.sweep()
        removed += swept.removed
        if not swept.more:
            return removed
    raise AssertionError("the sweep never finished")


def upkeep(data: Data) -> float:
    """Seconds to a sweep's next step when no age is set: SQLite's marks' thinning, or
    PostgreSQL's trim of the commit log the daemons share."""
    if data.kind == "sqlite":
        return 3600.0
    from nexusd.storage.postgres.sweep import LOG_TRIM_EVERY

    return LOG_TRIM_EVERY


# ── clear: hidden at once, deleted by the sweep ────────────────────────────
async def test_a_big_clear_hides_at_once_and_the_sweep_deletes_later(
    storage: Storage, data: Data
) -> None:
    await one(storage, Insert("big", [row(f"needle {i}") for i in range(BIG)]))
    await one(storage, Insert("other", [row("needle other")]))
    assert await one(storage, ClearSession("big")) == BIG
    # Hidden from every read at once, though still stored.
    assert await storage.count("big") == 0
    assert await contents(storage, "big") == []
    assert await found(storage, "needle") == ["other"]
    page = await storage.sessions(after=None, limit=100, budget=1 << 20)
    assert [s.session_tag for s in page.items] == ["other"]
    assert data.raw("SELECT COUNT(*) FROM nexus_messages WHERE session_tag = 'big'") == [(BIG,)]
    assert await one(storage, PopNewest("big")) is None
    # New rows are visible; the sweep deletes only the hidden ones.
    (new,) = await one(storage, Insert("big", [row("needle again")]))
    assert await contents(storage, "big") == ["needle again"]
    assert await sweep_all(storage) == BIG
    assert data.raw("SELECT id FROM nexus_messages WHERE session_tag = 'big'") == [(new,)]
    assert data.raw("SELECT COUNT(*) FROM nexus_floors") == [(0,)]
    assert sorted(await found(storage, "needle")) == ["big", "other"]
    assert storage.write_stats.swept == BIG
    data.index_is_consistent()
    if data.kind == "sqlite":
        # The sweep held FTS5's own merging while it deleted; it is back.
        assert data.raw("SELECT v FROM nexus_fts_config WHERE k = 'automerge'") == [(4,)]


async def test_merging_held_by_a_sweep_cut_short_is_released_at_open(
    opener: Opener, data: Data
) -> None:
    async with opener() as storage:
        await one(storage, Insert("big", [row("m")] * BIG))
        await one(storage, ClearSession("big"))
        await storage.sweep()  # one step, then the daemon "stops"
        if data.kind == "sqlite":  # FTS5's merging (PostgreSQL's GIN index has none to hold)
            assert data.raw("SELECT v FROM nexus_fts_config WHERE k = 'automerge'") == [(0,)]
    async with opener() as storage:
        if data.kind == "sqlite":
            assert data.raw("SELECT v FROM nexus_fts_config WHERE k = 'automerge'") == [(4,)]
        await sweep_all(storage)
        assert data.raw("SELECT COUNT(*) FROM nexus_messages") == [(0,)]


async def test_a_small_clear_still_deletes_at_once(storage: Storage, data: Data) -> None:
    await one(storage, Insert("s", [row("a"), row("b")]))
    assert await one(storage, ClearSession("s")) == 2
    assert data.raw("SELECT COUNT(*) FROM nexus_messages") == [(0,)]
    assert (await storage.sweep()).removed == 0


async def test_the_key_of_a_cleared_row_stores_a_new_row(storage: Storage, data: Data) -> None:
    old = await one(storage, Insert("s", [row(f"m{i}", key=f"k{i}") for i in range(BIG)]))
    await one(storage, ClearSession("s"))
    (again,) = await one(storage, Insert("s", [row("again", key="k5")]))
    assert again > old[-1]
    assert await contents(storage, "s") == ["again"]
    # And its resend is the new row, not a third one.
    assert await one(storage, Insert("s", [row("again", key="k5")])) == [again]
    await sweep_all(storage)
    assert await contents(storage, "s") == ["again"]
    data.index_is_consistent()


async def test_a_big_clear_all_hides_every_session_of_its_scope(
    storage: Storage, data: Data
) -> None:
    half = BIG // 2 + 1
    await write(storage, [Insert("a", [row("x")] * half), Insert("b", [row("y")] * half)])
    assert await one(storage, ClearAll()) == 2 * half
    assert await storage.count("a") == await storage.count("b") == 0
    assert (await storage.sessions(after=None, limit=10, budget=1 << 20)).items == []
    await one(storage, Insert("a", [row("after")]))
    assert await sweep_all(storage) == 2 * half
    assert await contents(storage, "a") == ["after"]
    data.index_is_consistent()


async def test_watchers_hear_a_hidden_clear_at_once(storage: Storage) -> None:
    heard: list[Change] = []
    storage.on_commit = heard.extend
    (*_, last) = await one(storage, Insert("s", [row("m")] * BIG))
    await one(storage, ClearSession("s"))
    assert heard[-1] == Removed("s", before_id=last + 1)


# ── delete by id ───────────────────────────────────────────────────────────
async def test_delete_removes_exactly_those_ids_and_reports_the_missing(
    opener: Opener, data: Data
) -> None:
    async with opener(max_messages=4) as storage:
        heard: list[Change] = []
        storage.on_commit = heard.extend
        ids = await one(storage, Insert("s", [row(c) for c in "abcd"]))
        (other,) = await one(storage, Insert("t", [row("t")]))
        done = await one(storage, DeleteIds("s", (ids[3], ids[1], other, 10**9, ids[1])))
        assert done == Deleted([ids[1], ids[3]], [other, 10**9])
        assert heard[-1] == Removed("s", ids=(ids[1], ids[3]))
        assert await contents(storage, "s") == ["a", "c"]
        assert await contents(storage, "t") == ["t"]
        # Deleting again is harmless; the count stays exact for retention.
        assert await one(storage, DeleteIds("s", (ids[1],))) == Deleted([], [ids[1]])
        await one(storage, Insert("s", [row(c) for c in "xyz"]))
        assert await contents(storage, "s") == ["c", "x", "y", "z"]
        assert await found(storage, "b") == []
        data.index_is_consistent()


# ── fork ───────────────────────────────────────────────────────────────────
async def test_a_fork_copies_every_field_with_a_link_to_its_source(
    storage: Storage, data: Data
) -> None:
    ids = await one(
        storage,
        Insert(
            "src",
            [
                ("user", "hello", "2001-02-03T04:05:06.000000Z", '{"k": [1, "x"]}', "key1"),
                ("assistant", "world", None, None, None),
                ("tool", "third", None, None, None),
            ],
        ),
    )
    forked = await one(storage, Fork("src", "dst", "src-as-named"))
    assert isinstance(forked, Forked) and forked.count == 3
    assert forked.first_id > ids[-1] and forked.last_id == forked.first_id + 2
    src = (await storage.history("src", 10, before_id=None, after_id=None, budget=1 << 20)).items
    dst = (await storage.history("dst", 10, before_id=None, after_id=None, budget=1 << 20)).items
    assert [m.id for m in dst] == list(range(forked.first_id, forked.last_id + 1))
    for a, b in zip(src, dst, strict=True):
        assert (a.role, a.content, a.timestamp) == (b.role, b.content, b.timestamp)
        assert b.meta is not None
        assert b.meta["forked_from"] == {"session_tag": "src-as-named", "id": a.id}
        assert {k: v for k, v in b.meta.items() if k != "forked_from"} == (a.meta or {})
    assert sorted(await found(storage, "hello")) == ["dst", "src"]
    data.index_is_consistent()


async def test_a_fork_up_to_an_id_and_its_refusals(storage: Storage) -> None:
    ids = await one(storage, Insert("src", [row(c) for c in "abc"]))
    part = await one(storage, Fork("src", "part", "src", up_to_id=ids[1]))
    assert part.count == 2 and await contents(storage, "part") == ["a", "b"]
    taken = await one(storage, Fork("src", "part", "src"))
    assert isinstance(taken, Conflict) and taken.field == "new_tag"
    more = await one(storage, Fork("src", "part", "src", append=True))
    assert more.count == 3 and await contents(storage, "part") == list("ababc")
    missing = await one(storage, Fork("src", "x", "src", up_to_id=ids[-1] + 1000))
    assert isinstance(missing, NotFound) and missing.field == "up_to_id"
    empty = await one(storage, Fork("nothing", "x", "nothing"))
    assert isinstance(empty, NotFound)
    itself = await one(storage, Fork("src", "src", "src"))
    assert isinstance(itself, BadRequest)
    assert await storage.count("x") == 0


async def test_a_fork_past_its_bound_is_refused_whole(
    storage: Storage, limits: Callable[[str, int], None]
) -> None:
    limits("MAX_FORK_MESSAGES", 2)
    await one(storage, Insert("src", [row(c) for c in "abc"]))
    refused = await one(storage, Fork("src", "dst", "src"))
    assert isinstance(refused, TooLarge) and "export" in refused.message
    assert await storage.count("dst") == 0


async def test_a_fork_refuses_a_copy_whose_meta_its_link_would_make_too_big(
    storage: Storage,
) -> None:
    big = '{"k": "' + "x" * 1000 + '"}'
    ids = await one(
        storage,
        Insert("src", [("user", "a", None, None, None), ("user", "b", None, big, None)]),
    )
    refused = await one(storage, Fork("src", "dst", "src", max_meta=len(big) + 10))
    assert isinstance(refused, TooLarge) and str(ids[1]) in refused.message
    assert await storage.count("dst") == 0
    fits = await one(storage, Fork("src", "dst", "src", up_to_id=ids[0], max_meta=len(big) + 10))
    assert fits.count == 1


async def test_a_fork_does_not_copy_cleared_rows(storage: Storage) -> None:
    await one(storage, Insert("src", [row("old")] * BIG))
    await one(storage, ClearSession("src"))
    await one(storage, Insert("src", [row("new")]))
    assert (await one(storage, Fork("src", "dst", "src"))).count == 1
    assert await contents(storage, "dst") == ["new"]


# ── a session's own retention ─────────────────────────────────────────────
async def test_a_session_retention_overrides_the_default_and_survives_a_restart(
    opener: Opener, data: Data
) -> None:
    async with opener(max_messages=10) as storage:
        await one(storage, Insert("s", [row(str(i)) for i in range(10)]))
        await one(storage, Insert("t", [row(str(i)) for i in range(10)]))
        assert await one(storage, SetRetention("s", Retention(max_messages=3))) == Retention(3)
        assert await contents(storage, "s") == ["7", "8", "9"]  # at once
        assert storage.max_messages_of("s") == 3 and storage.max_messages_of("t") == 10
        await one(storage, SetRetention("t", Retention(max_age=86400)))
        page = await storage.sessions(after=None, limit=10, budget=1 << 20)
        own = {i.session_tag: (i.max_messages, i.max_age) for i in page.items}
        assert own == {"s": (3, None), "t": (None, 86400.0)}
        await sweep_all(storage)
        assert data.raw("SELECT COUNT(*) FROM nexus_messages WHERE session_tag='s'") == [(3,)]
    async with opener(max_messages=10) as storage:
        await one(storage, Insert("s", [row("10")]))
        assert await contents(storage, "s") == ["8", "9", "10"]
        # Unbounded for this one session, then back to the default.
        await one(storage, SetRetention("s", Retention(max_messages=0)))
        await one(storage, Insert("s", [row(str(i)) for i in range(11, 20)]))
        assert await storage.count("s") == 12
        await one(storage, SetRetention("s", Retention()))
        await one(storage, Insert("s", [row("20")]))
        assert await storage.count("s") == 10
        assert storage.max_messages_of("s") == 10


# ── retention by age ───────────────────────────────────────────────────────
async def test_rows_past_the_age_go_by_commit_time_not_by_their_timestamp(
    opener: Opener, data: Data
) -> None:
    async with opener(max_age=3600) as storage:
        heard: list[Change] = []
        storage.on_commit = heard.extend
        await one(storage, Insert("s", [row("old1"), row("old2")]))
        await one(storage, Insert("t", [row("old3")]))
        data.age_everything(7200)
        # Claims to be from 2001, but committed now: it stays.
        await one(storage, Insert("s", [row("new", ts="2001-01-01T00:00:00Z")]))
        assert await sweep_all(storage) == 3
        assert await contents(storage, "s") == ["new"]
        assert await contents(storage, "t") == []
        assert await storage.count("s") == 1
        assert storage.write_stats.expired == 3
        assert {c.session_tag for c in heard if isinstance(c, Removed)} == {"s", "t"}
        assert await found(storage, "old1") == []
        data.index_is_consistent()


async def test_a_session_age_of_its_own_overrides_the_default(opener: Opener, data: Data) -> None:
    async with opener(max_age=3600) as storage:
        await one(storage, SetRetention("forever", Retention(max_age=0)))
        await one(storage, SetRetention("short", Retention(max_age=60)))
        await write(
            storage,
            [Insert(t, [row(t)]) for t in ("forever", "short", "default")],
        )
        data.age_everything(120)  # past short's minute, within the hour
        await sweep_all(storage)
        assert [await storage.count(t) for t in ("forever", "short", "default")] == [1, 0, 1]
        data.age_everything(7200)
        await sweep_all(storage)
        assert [await storage.count(t) for t in ("forever", "short", "default")] == [1, 0, 0]
        assert (await storage.sweep()).next_in == 6.0  # a tenth of the shortest age


async def test_without_an_age_nothing_expires(storage: Storage, data: Data) -> None:
    await one(storage, Insert("s", [row("a")]))
    data.age_everything(10**8)
    swept = await storage.sweep()
    assert swept.removed == 0 and swept.next_in == upkeep(data)
    assert await contents(storage, "s") == ["a"]


async def test_what_a_big_clear_hid_is_left_to_the_sweep_by_every_later_delete(
    opener: Opener, data: Data
) -> None:
    """A small clear, clear_all or prune after a big clear must not delete the hidden
    rows in its own transaction (that was the stall hiding avoids)."""
    async with opener(max_messages=0) as storage:
        await one(storage, Insert("big", [row("m")] * BIG))
        await one(storage, ClearSession("big"))
        await one(storage, Insert("big", [row("new")]))
        assert await one(storage, ClearSession("big")) == 1
        assert data.stored_rows() == BIG + 1  # all hidden, none deleted yet
        assert await storage.count("big") == 0
        await one(storage, Insert("big", [row("again")]))
        assert await one(storage, ClearAll()) == 1
        assert data.stored_rows() == BIG + 2
        # A prune by count, taking an id range, leaves them too.
        await one(storage, SetRetention("big", Retention(max_messages=5)))
        await one(storage, Insert("big", [row(str(i)) for i in range(5)]))
        await one(storage, Insert("big", [row(str(i)) for i in range(5, 25)]))
        assert await contents(storage, "big") == [str(i) for i in range(20, 25)]
        assert data.stored_rows() >= BIG
        await sweep_all(storage)
        assert data.stored_rows() == 5
        data.index_is_consistent()


async def test_own_retentions_are_bounded(
    storage: Storage, limits: Callable[[str, int], None]
) -> None:
    limits("MAX_OWN_RETENTIONS", 2)
    for tag in ("a", "b"):
        await one(storage, SetRetention(tag, Retention(max_age=60)))
    refused = await one(storage, SetRetention("c", Retention(max_age=60)))
    assert isinstance(refused, BadRequest) and "at most 2" in refused.message
    # Changing or resetting one of them is still fine, and frees a place.
    assert await one(storage, SetRetention("a", Retention(max_age=30))) == Retention(None, 30)
    await one(storage, SetRetention("b", Retention()))
    assert await one(storage, SetRetention("c", Retention(max_age=60))) == Retention(None, 60)


async def test_ages_of_their_own_reach_every_session_however_many(
    opener: Opener, data: Data
) -> None:
    async with opener() as storage:
        tags = [f"s{i:03}" for i in range(150)]  # more than a step looks at
        for tag in tags:
            await one(storage, SetRetention(tag, Retention(max_age=60)))
        await write(storage, [Insert(tag, [row(tag)]) for tag in tags])
        data.age_everything(120)
        assert await sweep_all(storage) == 150
        assert data.stored_rows() == 0


async def test_counts_stay_exact_when_a_session_is_first_touched_by_a_removal(
    opener: Opener,
) -> None:
    """After a restart nothing is counted yet: the first delete, pop or fork of a
    session must not count its change twice (retention then kept too many, or
    pruned rows it should keep)."""
    async with opener(max_messages=5) as storage:
        ids = await one(storage, Insert("d", [row(f"d{i}") for i in range(5)]))
        await one(storage, Insert("p", [row(f"p{i}") for i in range(5)]))
        await one(storage, Insert("src", [row(f"s{i}") for i in range(3)]))
        await one(storage, Insert("f", [row("f0")]))
    async with opener(max_messages=5) as storage:  # a fresh writer: no counts cached
        await one(storage, DeleteIds("d", (ids[0],)))
        await one(storage, PopNewest("p"))
        assert (await one(storage, Fork("src", "f", "src", append=True))).count == 3
        await write(
            storage, [Insert(t, [row(f"{t}-new{i}") for i in range(3)]) for t in ("d", "p")]
        )
        for tag in ("d", "p"):
            assert await storage.count(tag) == 5
            assert len(await contents(storage, tag)) == 5
        assert await contents(storage, "f") == ["f0", "s0", "s1", "s2"]
        await one(storage, Insert("f", [row("f1")]))
        assert await contents(storage, "f") == ["f0", "s0", "s1", "s2", "f1"]
