"""The PostgreSQL backend's reads and sweep answer as the SQLite backend's, on the same rows.

Each test stores one set of rows (ids, contents of every size, meta, floors,
own retentions, commit marks) twice, by plain SQL: in an SQLite file made by
nexusd's own migrations, read through :class:`~nexusd.storage.sqlite.SQLiteStorage`,
and in a PostgreSQL database migrated by :func:`nexusd.storage.postgres.schema.migrate`,
with ``nexus_sessions`` as every write keeps it (each session's visible rows).
Then the same calls go to both: history pages with every cursor and byte
budget, feeds by scope, sessions pages, counts, and sweep steps of the same
size; every answer, and what each sweep leaves, must be equal.
"""

from __future__ import annotations

import functools
import json
import random
import sqlite3
from collections.abc import AsyncIterator, Generator, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nexusd.storage import sweep as sqlite_sweep
from nexusd.storage.counts import CountCache
from nexusd.storage.editing import Retentions
from nexusd.storage.marks import THIN_EVERY
from nexusd.storage.schema import open_writer
from nexusd.storage.scope import NS_MARK
from nexusd.storage.sqlite import SQLiteStorage
from tests.conftest import PG_ADMIN, pg_database

psycopg = pytest.importorskip("psycopg")

from nexusd.storage.postgres import log, reads, schema  # noqa: E402
from nexusd.storage.postgres import sweep as pg_sweep  # noqa: E402

pytestmark = pytest.mark.anyio

Row = tuple[int, str, str, str, str, "str | None"]
TS = "2024-05-01T10:00:00.000000Z"
NS1 = f"{NS_MARK}u1000{NS_MARK}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # psycopg's AsyncConnection and aiosqlite both need asyncio


@dataclass
class Data:
    """One set of rows and the tables beside them, for both backends."""

    rows: list[Row]
    floors: dict[str, int] = field(default_factory=dict)
    retention: dict[str, tuple[int | None, float | None]] = field(default_factory=dict)
    marks: list[tuple[int, int, float]] = field(default_factory=list)

    @property
    def tags(self) -> list[str]:
        return sorted({r[4] for r in self.rows} | {"missing"})


def _content(rng: random.Random) -> str:
    n = rng.choice([0, 1, 7, 40, 120, 600, 3000])
    return "".join(rng.choice("ab é日\n") for _ in range(n))


def make_data(seed: int, weights: dict[str, int]) -> Data:
    """Rows interleaved at random among sessions (by ``weights``), ids with gaps."""
    rng = random.Random(seed)
    tags = list(weights)
    rows: list[Row] = []
    rid = 0
    for _ in range(sum(weights.values())):
        rid += rng.choice([1, 1, 1, 2, 5])
        tag = rng.choices(tags, [weights[t] for t in tags])[0]
        meta = rng.choice([None, None, json.dumps({"k": rng.randrange(1000), "s": "é" * 3})])
        rows.append((rid, rng.choice(["user", "assistant"]), _content(rng), TS, tag, meta))
    return Data(rows)


@functools.cache
def reads_data() -> Data:  # (cached: no test changes it)
    data = make_data(
        15,
        {
            "a": 60,
            "b": 40,
            "big": 150,
            "hid": 20,
            "héllo": 15,
            "z": 10,
            "ts": 8,
            f"{NS1}a": 30,
            f"{NS1}z": 12,
            f"{NS_MARK}u2000{NS_MARK}a": 25,
        },
    )
    # A session's last row with a timestamp longer than SQLite reads inline.
    last_ts = max(i for i, r in enumerate(data.rows) if r[4] == "ts")
    r = data.rows[last_ts]
    data.rows[last_ts] = (r[0], r[1], r[2], "T" * 300, r[4], r[5])
    ids = {t: [r[0] for r in data.rows if r[4] == t] for t in data.tags}
    data.floors = {
        "a": ids["a"][25],  # hides the older ones
        "hid": ids["hid"][-1] + 1,  # hides all
        "b": ids["b"][0],  # hides none
        f"{NS1}z": ids[f"{NS1}z"][3],
    }
    data.retention = {"b": (5, None), "z": (None, 100.0), f"{NS1}a": (0, 0.0)}
    return data


def _visible(data: Data) -> list[Row]:
    return [r for r in data.rows if r[0] >= data.floors.get(r[4], 0)]


def store_sqlite(path: Path, data: Data) -> None:
    conn = open_writer(path)
    try:
        conn.execute("BEGIN")
        conn.execute("DELETE FROM nexus_marks")  # (the migration marks "now")
        conn.executemany(
            "INSERT INTO nexus_messages (id, role, content, timestamp, session_tag, meta)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            data.rows,
        )
        conn.executemany("INSERT INTO nexus_floors VALUES (?, ?)", list(data.floors.items()))
        conn.executemany(
            "INSERT INTO nexus_retention VALUES (?, ?, ?)",
            [(t, n, a) for t, (n, a) in data.retention.items()],
        )
        conn.executemany("INSERT INTO nexus_marks VALUES (?, ?, ?)", data.marks)
        conn.execute("COMMIT")
    finally:
        conn.close()


async def store_pg(conn: Any, data: Data) -> None:
    await schema.migrate(conn)
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO nexus_messages (id, role, content, timestamp, session_tag, meta)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            data.rows,
        )
        await cur.executemany("INSERT INTO nexus_floors VALUES (%s, %s)", list(data.floors.items()))
        await cur.executemany(
            "INSERT INTO nexus_retention VALUES (%s, %s, %s)",
            [(t, n, a) for t, (n, a) in data.retention.items()],
        )
        await cur.executemany("INSERT INTO nexus_marks VALUES (%s, %s, %s)", data.marks)
    counts: dict[str, int] = {}
    for r in _visible(data):
        counts[r[4]] = counts.get(r[4], 0) + 1
    async with conn.cursor() as cur:  # as the writer keeps it: visible rows, none at 0
        await cur.executemany("INSERT INTO nexus_sessions VALUES (%s, %s)", list(counts.items()))
    await conn.execute("SELECT setval('nexus_messages_id_seq', %s)", (data.rows[-1][0],))


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[Any]:
    conn = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
    try:
        yield conn
    finally:
        await conn.close()


@contextmanager
def icu_database() -> Iterator[str]:
    """A database whose collation is not code point order (ICU's en-US: case and
    punctuation weigh less, control characters nothing); its URL."""
    with pg_database() as url:  # (only for its skip, name and clean-up)
        name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}"')
            admin.execute(
                f'CREATE DATABASE "{name}" TEMPLATE template0'
                " LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
            )
        yield url


@pytest.fixture(params=["default", "icu"])
async def loaded(
    request: pytest.FixtureRequest, tmp_path: Path, pg_url: str
) -> AsyncIterator[tuple[SQLiteStorage, Any, Data]]:
    """The reads' data set in both backends: (SQLite storage, PostgreSQL connection, data),
    in a database of the test cluster's collation and in one of ICU's en-US."""
    data = reads_data()
    store_sqlite(tmp_path / "n.db", data)
    with ExitStack() as stack:
        url = pg_url if request.param == "default" else stack.enter_context(icu_database())
        pg = await psycopg.AsyncConnection.connect(url, autocommit=True)
        try:
            await store_pg(pg, data)
            lite = SQLiteStorage(
                tmp_path / "n.db",
                max_messages=0,
                synchronous="full",
                wal_autocheckpoint=8000,
                readers=1,
            )
            await lite.open()
            try:
                yield lite, pg, data
            finally:
                await lite.close()
        finally:
            await pg.close()


def _budgets() -> list[int]:
    # Under any one row (first row over, alone), a few rows, everything.
    return [50, 200, 700, 3000, 12_000, 1 << 24]


async def test_history_pages_as_sqlite(loaded: tuple[SQLiteStorage, Any, Data]) -> None:
    lite, pg, data = loaded
    rng = random.Random(1)
    top = data.rows[-1][0]
    checked = cut = over = 0
    for tag in data.tags:
        ids = [r[0] for r in data.rows if r[4] == tag] or [1]
        edges = [0, 1, top, top + 5, ids[0], ids[-1], *rng.sample(ids, min(4, len(ids)))]
        for _ in range(60):
            before = rng.choice([None, None, *edges])
            after = rng.choice([None, None, *edges])
            limit = rng.choice([1, 2, 5, 20, 1000])
            budget = rng.choice(_budgets())
            kw = (before, after, budget)
            want = await lite.history(tag, limit, before_id=before, after_id=after, budget=budget)
            got = await reads.history(
                pg, tag, limit, before_id=before, after_id=after, budget=budget
            )
            assert got == want, (tag, limit, kw)
            checked += 1
            cut += got.truncated
            over += got.over
    assert checked and cut > 20 and over > 5  # the cuts were exercised, not just whole pages


async def test_history_pages_a_session_back_to_its_floor(
    loaded: tuple[SQLiteStorage, Any, Data],
) -> None:
    lite, pg, data = loaded
    for tag in ("a", "big", f"{NS1}z", "hid"):
        before: int | None = None
        pages = 0
        while True:
            want = await lite.history(tag, 7, before_id=before, after_id=None, budget=2000)
            got = await reads.history(pg, tag, 7, before_id=before, after_id=None, budget=2000)
            assert got == want
            if not got.items:
                break
            before = got.items[0].id
            pages += 1
        seen = [r[0] for r in _visible(data) if r[4] == tag]
        assert pages >= (len(seen) + 6) // 7


async def test_feed_as_sqlite(loaded: tuple[SQLiteStorage, Any, Data]) -> None:
    lite, pg, data = loaded
    rng = random.Random(2)
    ids = [r[0] for r in data.rows]
    for scope in (None, "", NS1, f"{NS_MARK}u2000{NS_MARK}", "b", "nothing"):
        for _ in range(25):
            after = rng.choice([0, -3, ids[-1], *rng.sample(ids, 3)])
            limit = rng.choice([1, 3, 50, 1000])
            budget = rng.choice(_budgets())
            want = await lite.feed(after, scope=scope, limit=limit, budget=budget)
            got = await reads.feed(pg, after, scope=scope, limit=limit, budget=budget)
            assert got == want, (scope, after, limit, budget)
    # A whole feed, in pages: every visible row in scope once, in id order.
    seen: list[int] = []
    after = 0
    while page := (await reads.feed(pg, after, scope=NS1, limit=9, budget=5000)).items:
        seen += [m.id for m in page]
        after = page[-1].id
    assert seen == [r[0] for r in _visible(data) if r[4].startswith(NS1)]


async def test_count_as_sqlite(loaded: tuple[SQLiteStorage, Any, Data]) -> None:
    lite, pg, data = loaded
    for tag in data.tags:
        assert await reads.count(pg, tag) == await lite.count(tag), tag
    assert await reads.count(pg, "hid") == 0  # every row under its floor
    assert await reads.count(pg, "a") == sum(1 for r in _visible(data) if r[4] == "a")


async def test_sessions_as_sqlite(loaded: tuple[SQLiteStorage, Any, Data]) -> None:
    lite, pg, data = loaded
    for scope in (None, "", NS1, "b", "nothing"):
        for after in (None, "", "a", "b", "big", "zz", NS1, f"{NS1}a"):
            for limit in (1, 2, 4, 100):
                for budget in (100, 300, 700, 1 << 20):
                    kw = dict(after=after, limit=limit, budget=budget, scope=scope)
                    want = await lite.sessions(**kw)  # type: ignore[arg-type]
                    got = await reads.sessions(pg, **kw)  # type: ignore[arg-type]
                    assert got == want, kw
    whole = await reads.sessions(pg, after=None, limit=100, budget=1 << 20)
    by_tag = {s.session_tag: s for s in whole.items}
    assert "hid" not in by_tag  # every row hidden: no session
    assert by_tag["ts"].last_timestamp == "T" * 300
    assert by_tag["b"].max_messages == 5 and by_tag["z"].max_age == 100.0
    assert by_tag["a"].first_id == data.floors["a"]


def sweep_data() -> Data:
    weights = {"a": 80, "b": 60, "hid": 90, "z": 50, "keep": 30, "r003": 20, "r061": 20}
    data = make_data(16, weights)
    ids = [r[0] for r in data.rows]
    per = {t: [r[0] for r in data.rows if r[4] == t] for t in weights}
    data.floors = {"hid": per["hid"][-1] + 1, "b": per["b"][40]}
    # More sessions with an age of their own than a step looks at (most without
    # rows), so that the pass over them goes on across steps.
    data.retention = {f"r{i:03d}": (None, 100.0) for i in range(70)}
    data.retention |= {"z": (None, 100.0), "keep": (None, 0.0), "a": (3, None)}
    third = len(ids) // 3
    data.marks = [
        (1000, ids[third], 1000.5),
        (2000, ids[2 * third], 2000.25),
        (3000, ids[-1], 3000.0),
    ]
    return data


def _sqlite_state(path: Path) -> tuple[list[Any], ...]:
    with sqlite3.connect(path) as conn:
        return tuple(
            conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
            for t in ("nexus_messages", "nexus_floors", "nexus_marks")
        )


async def _pg_state(conn: Any) -> tuple[list[Any], ...]:
    out = []
    for sql in (
        "SELECT id, role, content, timestamp, session_tag, meta, idem_key"
        " FROM nexus_messages ORDER BY 1",
        "SELECT * FROM nexus_floors ORDER BY 1",
        "SELECT * FROM nexus_marks ORDER BY 1",
    ):
        cur = await conn.execute(sql)
        out.append([tuple(r) for r in await cur.fetchall()])
    return tuple(out)


async def _pg_counts(conn: Any) -> tuple[dict[str, int], dict[str, int]]:
    """nexus_sessions, and each session's visible rows counted."""
    cur = await conn.execute("SELECT session_tag, messages FROM nexus_sessions")
    kept = {str(t): int(n) for t, n in await cur.fetchall()}
    cur = await conn.execute(
        "SELECT session_tag, count(*) FROM nexus_messages AS m"
        f" WHERE {schema.visible('m')} GROUP BY session_tag"
    )
    return kept, {str(t): int(n) for t, n in await cur.fetchall()}


def _sqlite_steps(
    path: Path, default_age: float, clock: float, rows: Iterator[int]
) -> Generator[sqlite_sweep.SweepOutcome, None, None]:
    conn = open_writer(path)
    retentions = Retentions(0, default_age)
    retentions.load(conn)
    pace, cache = sqlite_sweep.Pace(), CountCache()
    try:
        for n in rows:
            pace.rows = n
            yield sqlite_sweep.step(
                conn, counts_cache=cache, retentions=retentions, clock=clock, index=None, pace=pace
            )
    finally:
        conn.close()


@pytest.mark.parametrize("default_age", [0.0, 1500.0])
async def test_sweep_steps_as_sqlite(tmp_path: Path, pg: Any, default_age: float) -> None:
    data = sweep_data()
    path = tmp_path / "n.db"
    store_sqlite(path, data)
    await store_pg(pg, data)
    clock = 3050.0
    sizes = [7, 7, 30, 3, 200, 7] * 20
    lite = _sqlite_steps(path, default_age, clock, iter(sizes))
    pace = pg_sweep.Pace()
    totals = [0, 0]
    for i, n in enumerate(sizes):
        want = next(lite)
        pace.rows = n
        got = await pg_sweep.step(
            pg, default_messages=0, default_age=default_age, clock=clock, pace=pace, origin="t"
        )
        where = (i, n)
        assert (got.swept, got.expired, got.more) == (want.swept, want.expired, want.more), where
        assert got.changes == want.changes, where
        assert got.next_in == want.next_in, where  # (an age is in force: its tenth)
        kept, counted = await _pg_counts(pg)
        assert kept == counted, where  # nexus_sessions exact after every step
        assert await _pg_state(pg) == _sqlite_state(path), where
        totals[0] += got.swept
        totals[1] += got.expired
        if not got.more:
            break
    else:
        pytest.fail("the sweep never finished")
    lite.close()
    hidden = len(data.rows) - len(_visible(data))
    assert totals[0] == hidden and totals[1] > 0
    cur = await pg.execute("SELECT count(*) FROM nexus_floors")
    assert (await cur.fetchone())[0] == 0
    # Past their age: rows up to the mark before each age, in the sessions it applies to.
    cur = await pg.execute("SELECT session_tag, min(id) FROM nexus_messages GROUP BY 1")
    first = dict(await cur.fetchall())
    assert first.get("z", 1 << 62) > data.marks[1][1]  # z's own age: the mark of 2000
    assert first["keep"] < data.marks[0][1]  # max_age 0: never aged
    if default_age:
        assert first["a"] > data.marks[0][1]  # the default age: the mark of 1000


async def test_sweep_records_its_removals_and_trims_the_log(pg: Any) -> None:
    data = sweep_data()
    data.marks.insert(0, (500, 0, 500.0))  # under every row: thinning drops it
    await store_pg(pg, data)
    clock = 3050.0
    keep = log.LOG_KEEP
    async with pg.transaction():
        for at in (clock - keep - 60, clock - keep - 1, clock - keep + 1, clock - 5):
            await log.record(pg, [], origin="other", clock=at)
    seen: list[Any] = []
    pace = pg_sweep.Pace()
    pace.thinned = clock - THIN_EVERY  # (a thinning is due once the deleting is done)
    for _ in range(50):
        out = await pg_sweep.step(
            pg, default_messages=0, default_age=1500.0, clock=clock, pace=pace, origin="me"
        )
        seen += out.changes
        if not out.more:
            break
    entries = await log.entries_after(pg, 0)
    assert [e[1] for e in entries[:2]] == ["other", "other"]  # the two younger than LOG_KEEP
    mine = [c for _, origin, changes in entries if origin == "me" for c in changes]
    assert mine == seen and seen  # every removal told to the other daemons' watches
    kept, counted = await _pg_counts(pg)
    assert kept == counted
    # Marks were thinned once the work was done: none left under the oldest row.
    cur = await pg.execute("SELECT second FROM nexus_marks ORDER BY 1")
    assert [r[0] for r in await cur.fetchall()] == [m[0] for m in data.marks[1:]]
    assert pace.thinned == clock


async def test_sweep_without_work_changes_nothing(pg: Any) -> None:
    data = make_data(3, {"a": 10})
    data.marks = [(100, data.rows[-1][0], 100.0)]
    await store_pg(pg, data)
    before = await _pg_state(pg)
    out = await pg_sweep.step(
        pg, default_messages=0, default_age=0.0, clock=None, pace=pg_sweep.Pace(), origin="me"
    )
    assert (out.swept, out.expired, out.changes, out.more) == (0, 0, [], False)
    assert out.next_in == 60.0  # no age in force: the log's trim still comes round
    assert await _pg_state(pg) == before
    assert await log.entries_after(pg, 0) == []


async def test_history_is_an_index_range_scan(pg: Any) -> None:
    """A 100k-row session whose rows are all older than 20k others: the page
    is read from ``(session_tag, id)``, never by walking the primary key or sorting."""
    await schema.migrate(pg)
    await pg.execute(
        "INSERT INTO nexus_messages (id, role, content, timestamp, session_tag)"
        " SELECT g, 'user', repeat('x', 100), %s,"
        "  CASE WHEN g <= 100000 THEN 'old' ELSE 's' || (g %% 50) END"
        " FROM generate_series(1, 120000) AS g",
        (TS,),
    )
    await pg.execute("ANALYZE nexus_messages")
    sql = reads._page_query(reads._ONE_SESSION, True)
    for mode in ("force_custom_plan", "force_generic_plan"):
        await pg.execute(f"SET plan_cache_mode = {mode}")
        for low, high in ((0, reads._MAX_ID), (0, 50_000), (90_001, reads._MAX_ID)):
            cur = await pg.execute(
                "EXPLAIN (FORMAT JSON) " + sql, ("old", "old", low, "old", high, 200, 1 << 20)
            )
            plan = json.dumps((await cur.fetchone())[0])
            assert '"Index Name": "nexus_messages_session"' in plan, (mode, plan)
            assert "nexus_messages_pkey" not in plan and '"Sort"' not in plan, (mode, plan)
    await pg.execute("RESET plan_cache_mode")
    page = await reads.history(pg, "old", 200, before_id=None, after_id=None, budget=1 << 24)
    assert [m.id for m in page.items] == list(range(99_801, 100_001))
