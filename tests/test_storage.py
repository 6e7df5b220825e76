"""The storage seam's contract (nexusd/storage/base.py), run against each backend directly.

No daemon, no writer actor: a backend is opened and driven through its
:class:`~nexusd.storage.base.Storage` methods only, so a second backend runs the
same tests by adding it to ``BACKENDS``.  Tests that need one backend's
internals say so in their name and skip the others.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from nexusd.storage.base import (
    ClearAll,
    ClearSession,
    Insert,
    NewRow,
    Op,
    PopNewest,
    Storage,
)
from nexusd.storage.files import LockError
from nexusd.storage.schema import StorageError
from nexusd.storage.scope import NS_MARK
from nexusd.storage.sqlite import SQLiteStorage
from nexusd.wire.errors import NexusError, TooLarge, Unavailable
from nexusd.wire.protocol import Message, SessionInfo
from tests.conftest import pg_database

pytestmark = pytest.mark.anyio

Opener = Callable[..., AbstractAsyncContextManager[Storage]]
BACKENDS = ["sqlite", "postgres"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the SQLite backend's writer thread hands back through asyncio


@pytest.fixture(params=BACKENDS)
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """``async with opener(max_messages=N) as storage``: the test's stored data (an
    SQLite file, or a fresh PostgreSQL database), opened by a new backend."""
    kind: str = request.param
    with ExitStack() as stack:
        url = stack.enter_context(pg_database()) if kind == "postgres" else ""

        @asynccontextmanager
        async def open_one(*, max_messages: int = 0) -> AsyncIterator[Storage]:
            storage: Storage
            if kind == "postgres":
                from nexusd.storage.postgres.backend import PostgresStorage

                storage = PostgresStorage(
                    url,
                    max_messages=max_messages,
                    max_age=0,
                    readers=2,
                    search=False,
                    snapshot_dir=tmp_path,
                )
            else:
                storage = SQLiteStorage(
                    tmp_path / "n.db",
                    max_messages=max_messages,
                    synchronous="full",
                    wal_autocheckpoint=8000,
                    readers=2,
                )
            await storage.open()
            try:
                yield storage
            finally:
                await storage.close()

        yield open_one


@pytest.fixture
async def storage(opener: Opener) -> AsyncIterator[Storage]:
    async with opener() as s:
        yield s


def row(content: str, *, meta: str | None = None, key: str | None = None) -> NewRow:
    return ("user", content, None, meta, key)


async def write(storage: Storage, ops: list[Op]) -> list[Any]:
    """One batch; checks ``answer`` came exactly once, before ``write`` returned."""
    answers: list[list[Any]] = []
    await storage.write(ops, answers.append)
    assert len(answers) == 1
    assert len(answers[0]) == len(ops)
    return answers[0]


async def contents(storage: Storage, tag: str) -> list[str]:
    page = await storage.history(tag, 1000, before_id=None, after_id=None, budget=1 << 30)
    return [m.content for m in page.items]


# ── order and results ──────────────────────────────────────────────────────
async def test_results_come_in_op_order_and_new_ids_increase(storage: Storage) -> None:
    a, b, cleared, popped = await write(
        storage,
        [
            Insert("a", [row("a0"), row("a1"), row("a2")]),
            Insert("b", [row("b0"), row("b1")]),
            ClearSession("nothing-here"),
            PopNewest("a"),
        ],
    )
    assert a == list(range(a[0], a[0] + 3))  # one Insert: consecutive
    assert b == list(range(b[0], b[0] + 2)) and b[0] > a[-1]  # op order
    assert cleared == 0
    assert isinstance(popped, Message) and (popped.id, popped.content) == (a[-1], "a2")
    assert popped.session_tag == "a"
    [later] = await write(storage, [Insert("a", [row("a3")])])
    assert later[0] > b[-1]  # across batches
    assert await contents(storage, "a") == ["a0", "a1", "a3"]


async def test_ids_are_never_reused_after_a_clear(storage: Storage) -> None:
    [first] = await write(storage, [Insert("s", [row("x"), row("y")])])
    assert await write(storage, [ClearAll()]) == [2]
    [again] = await write(storage, [Insert("s", [row("z")])])
    assert again[0] > first[-1]


async def test_pop_gives_a_typed_message_with_meta_decoded(storage: Storage) -> None:
    [ids] = await write(storage, [Insert("s", [row("hi", meta='{"k": [1, 2.5], "n": null}')])])
    [msg] = await write(storage, [PopNewest("s")])
    assert isinstance(msg, Message)
    assert (msg.id, msg.role, msg.content, msg.session_tag) == (ids[0], "user", "hi", "s")
    assert msg.meta == {"k": [1, 2.5], "n": None}
    assert msg.timestamp.endswith("Z")
    assert await write(storage, [PopNewest("s")]) == [None]  # now empty


async def test_a_refused_pop_changes_nothing_and_the_rest_of_the_batch_commits(
    storage: Storage,
) -> None:
    seen: list[Message] = []

    def refuse(msg: Message) -> NexusError | None:
        seen.append(msg)
        return TooLarge("too big to answer")

    first, refused, last = await write(
        storage,
        [
            Insert("s", [row("kept", meta='{"a": 1}')]),
            PopNewest("s", refuse),
            Insert("s", [row("after")]),
        ],
    )
    assert isinstance(refused, TooLarge)
    assert [(m.id, m.content, m.meta) for m in seen] == [(first[0], "kept", {"a": 1})]
    assert await contents(storage, "s") == ["kept", "after"]
    assert last[0] > first[0]


# ── atomicity ──────────────────────────────────────────────────────────────
async def test_a_batch_that_crashes_commits_nothing_and_answers_nothing(storage: Storage) -> None:
    def crash(msg: Message) -> NexusError | None:
        raise RuntimeError("a bug in the check")

    answers: list[list[Any]] = []
    with pytest.raises(RuntimeError, match="a bug"):
        await storage.write(
            [Insert("s", [row("x")]), Insert("t", [row("y")]), PopNewest("s", crash)],
            answers.append,
        )
    assert answers == []
    assert await storage.count("s") == 0 and await storage.count("t") == 0
    # The backend goes on.
    [ids] = await write(storage, [Insert("s", [row("z")])])
    assert await contents(storage, "s") == ["z"] and len(ids) == 1


async def test_a_batch_given_to_storage_finishes_even_if_its_caller_is_cancelled(
    storage: Storage,
) -> None:
    answers: list[list[Any]] = []
    with anyio.CancelScope() as scope:
        scope.cancel()  # already cancelled when write starts
        await storage.write([Insert("s", [row("x")])], answers.append)
    assert len(answers) == 1 and len(answers[0][0]) == 1
    assert await storage.count("s") == 1


async def test_retention_prunes_in_the_same_transaction(opener: Opener) -> None:
    async with opener(max_messages=3) as storage:
        await write(storage, [Insert("s", [row("a")])])
        done = await write(storage, [Insert("s", [row("b"), row("c")]), Insert("s", [row("d")])])
        assert await contents(storage, "s") == ["b", "c", "d"]
        assert storage.write_stats.pruned == 1
        # Every id acknowledged is still stored.
        page = await storage.history("s", 10, before_id=None, after_id=None, budget=1 << 20)
        assert [m.id for m in page.items] == [*done[0], *done[1]]


async def test_an_idempotent_resend_gets_its_original_id(storage: Storage) -> None:
    [first] = await write(storage, [Insert("s", [row("a", key="k1")])])
    again, other = await write(
        storage, [Insert("s", [row("a (resend)", key="k1")]), Insert("t", [row("a", key="k1")])]
    )
    assert again == first and other != first  # keys are per session
    twice = await write(storage, [Insert("s", [row("b", key="k2")])] * 2)
    assert twice[0] == twice[1]
    assert await contents(storage, "s") == ["a", "b"]


# ── reads ──────────────────────────────────────────────────────────────────
async def test_a_read_that_starts_after_the_answer_sees_the_write(storage: Storage) -> None:
    for i in range(30):
        [ids] = await write(storage, [Insert("s", [row(f"m{i}")])])
        assert await storage.count("s") == i + 1
        page = await storage.history("s", 1, before_id=None, after_id=None, budget=1 << 20)
        assert [m.id for m in page.items] == ids


async def test_history_pages_are_bounded_by_bytes_from_the_side_they_start(
    storage: Storage,
) -> None:
    [ids] = await write(storage, [Insert("s", [row(str(i) * 1000) for i in range(10)])])
    newest = await storage.history("s", 10, before_id=None, after_id=None, budget=3500)
    assert newest.truncated and not newest.over
    assert [m.id for m in newest.items] == ids[-3:]
    oldest = await storage.history("s", 10, before_id=None, after_id=ids[0] - 1, budget=3500)
    assert [m.id for m in oldest.items] == ids[:3] and oldest.truncated
    whole = await storage.history("s", 4, before_id=ids[5], after_id=None, budget=1 << 20)
    assert [m.id for m in whole.items] == ids[1:5] and not whole.truncated
    lone = await storage.history("s", 10, before_id=None, after_id=None, budget=100)
    assert [m.id for m in lone.items] == ids[-1:] and lone.over  # never an empty page


async def test_sessions_are_typed_and_bounded(storage: Storage) -> None:
    ids = await write(storage, [Insert(t, [row("x"), row("y")]) for t in ("a", "b", "c")])
    page = await storage.sessions(after=None, limit=2, budget=1 << 20)
    assert page.truncated and not page.over
    assert all(isinstance(s, SessionInfo) for s in page.items)
    a, b = page.items
    assert (a.session_tag, a.count, a.first_id, a.last_id) == ("a", 2, ids[0][0], ids[0][1])
    assert b.session_tag == "b" and a.last_timestamp.endswith("Z")
    rest = await storage.sessions(after="b", limit=10, budget=1 << 20)
    assert [s.session_tag for s in rest.items] == ["c"] and not rest.truncated


async def test_a_namespace_scope_bounds_sessions_and_clear_all(storage: Storage) -> None:
    one, two = f"{NS_MARK}u1{NS_MARK}", f"{NS_MARK}u2{NS_MARK}"
    tags = ["plain", f"{one}a", f"{one}b", f"{two}a"]
    await write(storage, [Insert(t, [row("x")]) for t in tags])

    async def listed(scope: str | None) -> list[str]:
        page = await storage.sessions(after=None, limit=100, budget=1 << 20, scope=scope)
        return [s.session_tag for s in page.items]

    assert await listed(None) == sorted(tags)
    assert await listed("") == ["plain"]
    assert await listed(one) == [f"{one}a", f"{one}b"]
    assert await write(storage, [ClearAll(one)]) == [2]
    assert await listed(None) == sorted(["plain", f"{two}a"])
    assert await write(storage, [ClearAll("")]) == [1]
    assert await listed(None) == [f"{two}a"]


# ── backups ────────────────────────────────────────────────────────────────
async def test_a_backup_is_one_file_of_everything_committed(
    storage: Storage, tmp_path: Path
) -> None:
    [ids] = await write(storage, [Insert("s", [row(f"m{i}") for i in range(20)])])
    dest = tmp_path / "copy.db"
    if not isinstance(storage, SQLiteStorage):
        # PostgreSQL's backup of record is pg_dump: nexusd's is refused, leaving no file.
        with pytest.raises(Unavailable, match="pg_dump"):
            await storage.backup(dest)
        assert not dest.exists() and storage.live_files() == []
        return
    size = await storage.backup(dest)
    assert size == dest.stat().st_size > 0
    assert storage.size_bytes() >= size // 2
    if isinstance(storage, SQLiteStorage):  # the copy's format is the backend's own
        conn = sqlite3.connect(dest)
        try:
            got = conn.execute("SELECT id FROM nexus_messages ORDER BY id").fetchall()
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        finally:
            conn.close()
        assert [i for (i,) in got] == ids and mode == "delete"
        assert storage.files.db in storage.live_files()


async def test_a_backup_taken_while_writes_commit_holds_a_consistent_prefix(
    storage: Storage, tmp_path: Path
) -> None:
    if not isinstance(storage, SQLiteStorage):
        with pytest.raises(Unavailable, match="pg_dump"):  # as in the test above
            await storage.backup(tmp_path / "copy.db")
        return
    await write(storage, [Insert("s", [row("x" * 10_000) for _ in range(400)])])
    dest = tmp_path / "copy.db"
    written: list[int] = []

    async def keep_writing() -> None:
        for i in range(50):
            [ids] = await write(storage, [Insert("s", [row(f"w{i}")])])
            written.extend(ids)

    async with anyio.create_task_group() as tg:
        tg.start_soon(keep_writing)
        await storage.backup(dest)
    final = await storage.history("s", 1000, before_id=None, after_id=None, budget=1 << 30)
    conn = sqlite3.connect(dest)
    try:
        copied = [i for (i,) in conn.execute("SELECT id FROM nexus_messages ORDER BY id")]
    finally:
        conn.close()
    # Everything committed when the copy began, nothing half-way: a prefix of the rows.
    assert len(copied) >= 400 and copied == [m.id for m in final.items][: len(copied)]
    assert len(written) == 50


# ── one daemon per stored data ─────────────────────────────────────────────
async def test_a_second_open_on_the_same_data_is_refused_until_the_first_closes(
    opener: Opener,
) -> None:
    async with opener() as first:
        if not isinstance(first, SQLiteStorage):
            # PostgreSQL: many daemons share one database by design.  Both open,
            # both write, and each reads the other's rows.
            async with opener() as second:
                [[mine]] = await write(first, [Insert("s", [row("first's")])])
                [[theirs]] = await write(second, [Insert("s", [row("second's")])])
                assert theirs > mine
                for one in (first, second):
                    assert await contents(one, "s") == ["first's", "second's"]
                    assert await one.count("s") == 2
            return
        with pytest.raises(NexusError):
            async with opener():
                pass
        # The refused one took nothing from the first: it still writes and reads.
        assert await write(first, [Insert("s", [row("still mine")])]) == [[1]]
    async with opener() as again:
        assert await contents(again, "s") == ["still mine"]


def _sqlite(path: Path) -> SQLiteStorage:
    return SQLiteStorage(
        path, max_messages=0, synchronous="full", wal_autocheckpoint=8000, readers=1
    )


async def test_sqlite_lock_holds_the_file_by_any_name(tmp_path: Path) -> None:
    real = tmp_path / "real" / "n.db"
    real.parent.mkdir(mode=0o700)
    link = tmp_path / "link.db"
    link.symlink_to(real)
    first = _sqlite(real)
    await first.open()
    try:
        for name in (real, link):
            with pytest.raises(LockError, match="already serves") as refused:
                await _sqlite(name).open()
            assert str(name) in refused.value.message and "\n" not in refused.value.message
        # Snapshots go beside the file the link points to, not beside the link.
        assert _sqlite(link).snapshot_dir == real.parent == first.snapshot_dir
    finally:
        await first.close()
    through_link = _sqlite(link)
    await through_link.open()  # released by close(): a new one opens, by either name
    try:
        assert await write(through_link, [Insert("s", [row("x")])]) == [[1]]
        with pytest.raises(LockError):
            await _sqlite(real).open()
    finally:
        await through_link.close()
        await through_link.close()  # a second close does nothing


async def test_sqlite_open_that_fails_halfway_releases_the_lock(tmp_path: Path) -> None:
    db = tmp_path / "n.db"
    db.write_text("definitely not sqlite")
    with pytest.raises(StorageError, match="not an SQLite database"):
        await _sqlite(db).open()
    db.unlink()
    storage = _sqlite(db)
    await storage.open()  # the failed one's lock is gone with it
    await storage.close()


async def test_sqlite_open_warns_once_when_the_previous_daemon_did_not_stop_cleanly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "n.db"
    Path(f"{db}.lock").write_text("4242\n")  # what a killed daemon leaves behind
    caplog.set_level(logging.WARNING, logger="nexusd")
    storage = _sqlite(db)
    await storage.open()
    await storage.close()
    warned = [r for r in caplog.records if "did not stop cleanly" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert "pid 4242" in warned[0].getMessage()
    caplog.clear()
    storage = _sqlite(db)
    await storage.open()  # the clean close() left no pid behind
    await storage.close()
    assert not [r for r in caplog.records if "did not stop cleanly" in r.getMessage()]
