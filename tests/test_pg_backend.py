"""The PostgreSQL backend's write path and lifecycle, against a real server.

Run under scripts/with-postgres (the ``pg_url`` fixture: a database per test).
The same op script runs on the SQLite backend as the oracle; what only
PostgreSQL has is tested here: two backends (two daemons' worth) writing the
same sessions at once, the writer's connection killed mid-batch, a schema
from a newer nexusd, and the password kept out of every error and log line.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from nexusd.storage.base import (
    Added,
    Change,
    ClearAll,
    ClearSession,
    DeleteIds,
    Fork,
    Insert,
    NewRow,
    Op,
    PopNewest,
    Removed,
    Retention,
    SetRetention,
)
from nexusd.storage.postgres.backend import PostgresStorage
from nexusd.storage.postgres.schema import WRITE_LOCK
from nexusd.storage.schema import StorageError
from nexusd.storage.sqlite import SQLiteStorage
from nexusd.wire.errors import NexusError, TooLarge, Unavailable
from nexusd.wire.protocol import Message

pytestmark = pytest.mark.anyio

Opener = Callable[..., Any]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # psycopg's async connections run on asyncio


@pytest.fixture
def opener(pg_url: str, tmp_path: Path) -> Opener:
    @asynccontextmanager
    async def open_one(*, max_messages: int = 0, url: str = pg_url) -> AsyncIterator[Any]:
        storage = PostgresStorage(
            url,
            max_messages=max_messages,
            max_age=0.0,
            readers=2,
            search=False,
            snapshot_dir=tmp_path,
        )
        await storage.open()
        try:
            yield storage
        finally:
            await storage.close()

    return open_one


def row(content: str, *, meta: str | None = None, key: str | None = None) -> NewRow:
    return ("user", content, None, meta, key)


async def write(storage: Any, ops: list[Op]) -> list[Any]:
    answers: list[list[Any]] = []
    await storage.write(ops, answers.append)
    assert len(answers) == 1 and len(answers[0]) == len(ops)
    return answers[0]


async def ids_of(storage: Any, tag: str) -> list[int]:
    page = await storage.history(tag, 10_000, before_id=None, after_id=None, budget=1 << 30)
    return [m.id for m in page.items]


async def admin(url: str, query: str, params: tuple[Any, ...] = ()) -> list[Any]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall() if cur.description else []


# ── the same answers as SQLite ─────────────────────────────────────────────
def _refuse_big(m: Message) -> NexusError | None:
    return TooLarge("too big to pop") if m.content == "big" else None


SCRIPT: list[list[Op]] = [
    [Insert("a", [row("a0", key="k0"), row("a1", meta='{"x":1}')]), Insert("b", [row("b0")])],
    [Insert("a", [row("a0 again", key="k0"), row("a2")]), PopNewest("b"), PopNewest("b")],
    [Insert("a", [row("big")]), PopNewest("a", refuse=_refuse_big), PopNewest("zz")],
    [Fork("a", "f", "a"), Fork("a", "f", "a"), Fork("a", "g", "a", up_to_id=2)],
    [Fork("a", "g", "a", up_to_id=999), Fork("none", "h", "none"), Fork("a", "a", "a")],
    [Fork("a", "f", "a", append=True, max_meta=10), DeleteIds("a", (1, 2, 77, 2))],
    # (An append after a SetRetention in the same batch: SQLite prunes it by the
    # retention before, PostgreSQL by the new one; so they go apart here.)
    [SetRetention("f", Retention(2, None)), ClearSession("g")],
    [Insert("f", [row("f new")]), Insert("g", [row("g new")])],
    [Insert("\x1fu1\x1fp", [row("ns")]), ClearAll(""), Insert("c", [row("c0")])],
    [SetRetention("f", Retention(None, None)), ClearAll("\x1fu1"), ClearAll(None)],
]


def _plain(value: Any) -> Any:
    """A result without its timestamps (the two backends' clocks differ)."""
    if isinstance(value, Message):
        return ("message", value.id, value.role, value.content, value.session_tag, value.meta)
    if isinstance(value, NexusError):
        return (type(value).__name__, value.field)
    return value


async def test_the_op_script_answers_as_the_sqlite_backend_does(
    opener: Opener, tmp_path: Path
) -> None:
    sqlite = SQLiteStorage(
        tmp_path / "oracle.db",
        max_messages=3,
        synchronous="normal",
        wal_autocheckpoint=1000,
        readers=1,
    )
    await sqlite.open()
    try:
        async with opener(max_messages=3) as pg:
            for batch in SCRIPT:
                want = [_plain(r) for r in await write(sqlite, batch)]
                got = [_plain(r) for r in await write(pg, batch)]
                assert got == want, batch
                for tag in ("a", "b", "c", "f", "g", "\x1fu1\x1fp"):
                    assert await ids_of(pg, tag) == await ids_of(sqlite, tag), tag
                    assert await pg.count(tag) == await sqlite.count(tag), tag
            assert pg.write_stats.rows == sqlite.write_stats.rows
            assert pg.write_stats.pruned == sqlite.write_stats.pruned
    finally:
        await sqlite.close()


async def test_ids_follow_op_order_and_timestamps_never_go_back(opener: Opener) -> None:
    seen: list[Change] = []
    async with opener() as s:
        s.on_commit = seen.extend
        a, b = await write(
            s, [Insert("s", [row("0"), row("1"), row("2")]), Insert("t", [row("x")])]
        )
        assert a == [a[0], a[0] + 1, a[0] + 2] and b == [a[2] + 1]
        [c] = await write(s, [Insert("s", [("user", "given", "2001-01-01T00:00:00Z", None, None)])])
        page = await s.history("s", 10, before_id=None, after_id=None, budget=1 << 20)
        stamps = [m.timestamp for m in page.items]
        assert stamps[3] == "2001-01-01T00:00:00Z"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamps[0])
        assert stamps[0] == stamps[1] == stamps[2]  # one batch, one commit time
        added = [ch for ch in seen if isinstance(ch, Added)]
        assert [ch.first_id for ch in added] == [a[0], c[0]]
        assert [r[1] for r in added[0].rows] == ["0", "1", "2", "x"]
        assert added[0].rows[0][2] == stamps[0]


async def test_a_resent_key_is_stored_once_and_a_cleared_holder_gives_way(opener: Opener) -> None:
    async with opener() as s:
        [first] = await write(s, [Insert("s", [row("m", key="k")])])
        both = await write(s, [Insert("s", [row("m", key="k"), row("n", key="k2")])])
        assert both[0][0] == first[0] and both[0][1] > first[0]
        [twice] = await write(s, [Insert("s", [row("p", key="k3"), row("p", key="k3")])])
        assert twice[0] == twice[1]
        assert await s.count("s") == 3
        # A big session is hidden by clear (not deleted): its keys are free again.
        await write(s, [Insert("big", [row(f"{i}", key=f"b{i}") for i in range(2000)])])
        assert await write(s, [ClearSession("big")]) == [2000]
        [again] = await write(s, [Insert("big", [row("new", key="b7")])])
        assert await ids_of(s, "big") == again and await s.count("big") == 1


async def test_text_with_nul_is_refused_alone(opener: Opener) -> None:
    async with opener() as s:
        bad, good = await write(s, [Insert("s", [row("a\x00b")]), Insert("s", [row("fine")])])
        assert isinstance(bad, NexusError) and bad.code == "bad_request"
        assert await ids_of(s, "s") == good
        assert await s.count("a\x00") == 0
        # A read that would look NUL up is the same bad request, not an internal error.
        with pytest.raises(NexusError) as caught:
            await s.sessions(after="h\x00", limit=10, budget=1 << 20)
        assert caught.value.code == "bad_request" and "NUL" in caught.value.message


async def test_a_write_whose_caller_is_cancelled_still_finishes(opener: Opener) -> None:
    async with opener() as s:
        answers: list[list[Any]] = []
        with anyio.CancelScope() as scope:
            scope.cancel()
            await s.write([Insert("s", [row("kept")])], answers.append)
        assert len(answers) == 1 and await ids_of(s, "s") == answers[0][0]


# ── many daemons, one database ─────────────────────────────────────────────
async def test_two_backends_writing_the_same_sessions_stay_exact(
    opener: Opener, pg_url: str
) -> None:
    keep, batches, tags = 20, 60, ["s0", "s1", "s2"]
    acked: dict[str, list[int]] = {t: [] for t in tags}
    async with opener(max_messages=keep) as one, opener(max_messages=keep) as two:
        over: list[tuple[str, int]] = []
        done = anyio.Event()

        async def writer(s: Any, name: str) -> None:
            for i in range(batches):
                ops: list[Op] = [Insert(t, [row(f"{name}{i}"), row(f"{name}{i}b")]) for t in tags]
                for t, ids in zip(tags, await write(s, ops), strict=True):
                    acked[t] += ids
                    # Never pruned by the commit that acknowledged it.
                    assert set(ids) <= set(await ids_of(s, t))

        async def watch() -> None:
            while not done.is_set():
                for t, n in await admin(
                    pg_url, "SELECT session_tag, count(*) FROM nexus_messages GROUP BY 1"
                ):
                    if n > keep:
                        over.append((t, n))
                await anyio.sleep(0.005)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            async with anyio.create_task_group() as writers:
                writers.start_soon(writer, one, "one")
                writers.start_soon(writer, two, "two")
            done.set()
        assert over == []
        every = [i for ids in acked.values() for i in ids]
        assert len(every) == len(set(every))  # ids unique across both
        for t in tags:
            # Exactly the newest `keep` acknowledged rows remain, in id order.
            assert await ids_of(one, t) == sorted(acked[t])[-keep:] == await ids_of(two, t)
            assert await one.count(t) == keep
        # Ids in commit order: the log's seq order is the ids' order.
        logged = await admin(pg_url, "SELECT seq, changes FROM nexus_log ORDER BY seq")
        from nexusd.storage.postgres.log import decode

        firsts = [
            c.first_id for _, data in logged for c in decode(bytes(data)) if isinstance(c, Added)
        ]
        assert firsts == sorted(firsts)
        assert await admin(
            pg_url, "SELECT session_tag, messages FROM nexus_sessions ORDER BY 1"
        ) == [(t, keep) for t in tags]


async def test_the_same_retry_through_two_backends_is_stored_once(opener: Opener) -> None:
    async with opener() as one, opener() as two:
        for n in range(10):
            got: list[Any] = []

            async def send(s: Any, key: str = f"retry-{n}", got: list[Any] = got) -> None:
                got.append(await write(s, [Insert("s", [row("r", key=key)])]))

            async with anyio.create_task_group() as tg:
                tg.start_soon(send, one)
                tg.start_soon(send, two)
            assert got[0] == got[1]
        assert await one.count("s") == 10


# ── connection loss ────────────────────────────────────────────────────────
async def _wait_for_lock_waiter(url: str, pid: int) -> None:
    with anyio.fail_after(10):
        while True:
            if await admin(
                url,
                "SELECT 1 FROM pg_locks WHERE pid = %s AND locktype = 'advisory' AND NOT granted",
                (pid,),
            ):
                return
            await anyio.sleep(0.01)


async def test_a_connection_lost_mid_batch_answers_unavailable_then_recovers(
    opener: Opener, pg_url: str
) -> None:
    async with opener() as s:
        [before] = await write(s, [Insert("s", [row("acknowledged")])])
        pid = s._writer.info.backend_pid
        answers: list[list[Any]] = []
        holder = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
        async with holder, holder.transaction():
            # Hold the write lock: the batch waits inside its transaction.
            await holder.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            async with anyio.create_task_group() as tg:
                tg.start_soon(s.write, [Insert("s", [row("lost")]), PopNewest("s")], answers.append)
                await _wait_for_lock_waiter(pg_url, pid)
                await holder.execute("SELECT pg_terminate_backend(%s)", (pid,))
        [results] = answers
        assert all(
            isinstance(r, Unavailable) and "nothing was written" in r.message for r in results
        )
        assert s.write_stats.failed_batches == 1
        # Reads go on; the next batch reconnects; nothing acknowledged is lost.
        assert await ids_of(s, "s") == before
        [after] = await write(s, [Insert("s", [row("after")])])
        assert await ids_of(s, "s") == before + after


async def test_while_the_database_refuses_connections_batches_fail_at_once(
    opener: Opener, pg_url: str
) -> None:
    from tests.conftest import PG_ADMIN

    name = psycopg.conninfo.conninfo_to_dict(pg_url)["dbname"]
    async with opener() as s:
        await write(s, [Insert("s", [row("one")])])
        await admin(PG_ADMIN, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            await admin(PG_ADMIN, "SELECT pg_terminate_backend(%s)", (s._writer.info.backend_pid,))
            [[lost]] = [await write(s, [Insert("s", [row("x")])])]  # finds it gone
            assert isinstance(lost, Unavailable)
            [[down]] = [await write(s, [Insert("s", [row("y")])])]  # reconnect refused
            assert isinstance(down, Unavailable) and "connection is down" in down.message
            with anyio.fail_after(2):  # inside the backoff: answered without trying
                [[soon]] = [await write(s, [Insert("s", [row("z")])])]
            assert isinstance(soon, Unavailable)
        finally:
            await admin(PG_ADMIN, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        with anyio.fail_after(15):
            while True:  # until the backoff runs out and the reconnection is let in
                if isinstance((await write(s, [Insert("s", [row("back")])]))[0], list):
                    break
                await anyio.sleep(0.05)
        assert await s.count("s") == 2


# ── lifecycle ──────────────────────────────────────────────────────────────
async def test_a_newer_schema_is_refused_with_one_line(opener: Opener, pg_url: str) -> None:
    async with opener():
        pass
    await admin(pg_url, "UPDATE nexus_schema_version SET version = 99")
    with pytest.raises(StorageError) as err:
        async with opener():
            pass
    text = str(err.value)
    assert "\n" not in text and "99" in text and "newer" in text


async def test_the_password_is_never_shown(opener: Opener, pg_url: str, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "s3cret-Pw"
    bad = pg_url.replace("nexusd@", f"nexusd:{secret}@").replace("/t_", "/missing_t_")
    with pytest.raises(StorageError) as err:
        async with opener(url=bad):
            pass
    assert secret not in str(err.value) and "\n" not in str(err.value)
    assert "missing_t_" in str(err.value)
    good = pg_url.replace("nexusd@", f"nexusd:{secret}@")
    async with opener(url=good) as s:
        await write(s, [Insert("s", [row("x")])])
        await admin(pg_url, "SELECT pg_terminate_backend(%s)", (s._writer.info.backend_pid,))
        [[lost]] = [await write(s, [Insert("s", [row("y")])])]
        assert isinstance(lost, Unavailable) and secret not in lost.message
        assert secret not in s.shown
    assert caplog.records and all(secret not in r.getMessage() for r in caplog.records)


async def test_backup_live_files_and_size(opener: Opener, tmp_path: Path) -> None:
    async with opener() as s:
        assert s.snapshot_dir == tmp_path and s.live_files() == []
        assert s.size_bytes() > 0
        with pytest.raises(Unavailable, match="pg_dump"):
            await s.backup(tmp_path / "b.db")
        assert not (tmp_path / "b.db").exists()


async def test_the_sweep_deletes_what_a_big_clear_hid(opener: Opener, pg_url: str) -> None:
    woken: list[int] = []
    async with opener() as s:
        s.on_sweep = lambda: woken.append(1)
        await write(s, [Insert("big", [row(f"{i}") for i in range(2500)])])
        assert await write(s, [ClearSession("big")]) == [2500] and woken
        assert await s.count("big") == 0
        with anyio.fail_after(30):
            while (await s.sweep()).more:
                pass
        assert await admin(pg_url, "SELECT count(*) FROM nexus_messages") == [(0,)]
        assert s.write_stats.swept == 2500


async def test_a_sweeps_removals_reach_watchers_after_earlier_commits_of_others(
    opener: Opener, pg_url: str
) -> None:
    # Watchers hear every commit in commit order, the sweep's too: a row another
    # daemon committed before this daemon's sweep step comes before its removals,
    # even with no listener running to deliver it first.
    async with opener() as one, opener() as two:
        heard: list[Change] = []
        one.on_commit = heard.extend
        await write(one, [SetRetention("s", Retention(max_age=60.0))])
        (old,) = (await write(one, [Insert("s", [row("old")])]))[0]
        await admin(pg_url, "UPDATE nexus_marks SET at = at - 3600, second = second - 3600")
        (theirs,) = (await write(two, [Insert("t", [row("theirs")])]))[0]
        heard.clear()
        swept = await one.sweep()
        assert swept.removed == 1
        kinds = [(type(c).__name__, getattr(c, "first_id", None)) for c in heard]
        assert kinds == [("Added", theirs), ("Removed", None)], kinds
        gone = heard[1]
        assert isinstance(gone, Removed) and gone.session_tag == "s"
        assert old in gone.ids or (gone.before_id is not None and old < gone.before_id)
