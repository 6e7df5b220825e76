"""The writer actor in-process, on a real SQLite file (asyncio only)."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from nexusd.daemon.writer import Writer
from nexusd.storage.base import ClearAll, ClearSession, Fork, Insert, Op, PopNewest
from nexusd.storage.sqlite import SQLiteStorage
from nexusd.wire.errors import BadRequest, Internal, NexusError, Overloaded, Unavailable
from tests.conftest import session_rows

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def row(content: str, *, ts: str | None = None, key: str | None = None) -> tuple[Any, ...]:
    return ("user", content, ts, None, key)


async def call(w: Writer, op: Op, *, timeout: float = 5.0) -> Any:
    """Submit ``op`` the way the server does and wait for its committed result (or raise)."""
    event = anyio.Event()
    box: list[Any] = []

    def done(result: Any) -> None:
        box.append(result)
        event.set()

    await w.submit(op, done, timeout=timeout)
    await event.wait()
    if isinstance(box[0], NexusError):
        raise box[0]
    return box[0]


class Running:
    def __init__(self, writer: Writer) -> None:
        self.w = writer

    async def append(self, tag: str, content: str, **kw: Any) -> int:
        ids: list[int] = await call(self.w, Insert(tag, [row(content, ts=kw.get("ts"))]))
        return ids[0]


class WriterHarness:
    """Open storage, run a writer's loop over it in a task group; close and checkpoint on exit."""

    def __init__(
        self, db: Path, *, max_messages: int = 500, queue_size: int = 10_000, batch_max: int = 1_000
    ) -> None:
        self.storage = SQLiteStorage(
            db,
            max_messages=max_messages,
            synchronous="full",
            wal_autocheckpoint=8000,
            readers=1,
        )
        self.writer = Writer(self.storage, queue_size=queue_size, batch_max=batch_max)

    async def __aenter__(self) -> Writer:
        await self.storage.open()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self.writer.run)
        return self.writer

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()
        await self._tg.__aexit__(None, None, None)
        await self.storage.close()


async def test_concurrent_appends_are_batched_into_few_transactions(tmp_path: Path) -> None:
    async with WriterHarness(tmp_path / "n.db", max_messages=0) as w:
        ids: list[int] = []

        async def one(i: int) -> None:
            ids.extend(await call(w, Insert("t", [row(f"m{i}")])))

        async with anyio.create_task_group() as tg:
            for i in range(500):
                tg.start_soon(one, i)
        assert len(ids) == 500 and len(set(ids)) == 500
        assert w.stats.ops == 500
        # Group commit: far fewer transactions than appends.
        assert w.stats.batches < 100, w.stats.batches
    assert len(session_rows(tmp_path / "n.db", "t")) == 500


async def test_jobs_from_one_task_commit_in_submission_order(tmp_path: Path) -> None:
    async with WriterHarness(tmp_path / "n.db", max_messages=0) as w:
        results: dict[int, list[int]] = {}

        def keep(i: int) -> Any:
            return lambda r: results.__setitem__(i, r)

        for i in range(300):
            await w.submit(Insert("t", [row(str(i))]), keep(i))
        await call(w, Insert("t", [row("last")]))
        ids = [results[i][0] for i in range(300)]
        assert ids == sorted(ids)
    assert [c for _, c in session_rows(tmp_path / "n.db", "t")][:300] == [
        str(i) for i in range(300)
    ]


async def test_pruning_keeps_exactly_the_newest_n(tmp_path: Path) -> None:
    db = tmp_path / "n.db"
    async with WriterHarness(db, max_messages=5) as w:
        r = Running(w)
        for i in range(12):
            await r.append("a", f"a{i}")
        await call(w, Insert("b", [row(f"b{i}") for i in range(5)]))
        await call(w, Insert("b", [row(f"b{i}") for i in range(5, 9)]))
        await r.append("c", "c0")
        assert w.stats.pruned == 7 + 4
    assert [c for _, c in session_rows(db, "a")] == [f"a{i}" for i in range(7, 12)]
    assert [c for _, c in session_rows(db, "b")] == [f"b{i}" for i in range(4, 9)]
    assert [c for _, c in session_rows(db, "c")] == ["c0"]


async def test_pruning_counts_survive_restart_and_external_rows(tmp_path: Path) -> None:
    db = tmp_path / "n.db"
    async with WriterHarness(db, max_messages=3) as w:
        for i in range(3):
            await Running(w).append("s", f"x{i}")
    # A new writer must count what is already there, not start from zero.
    async with WriterHarness(db, max_messages=3) as w:
        await Running(w).append("s", "x3")
    assert [c for _, c in session_rows(db, "s")] == ["x1", "x2", "x3"]


async def test_counts_stay_right_after_pop_and_clear(tmp_path: Path) -> None:
    db = tmp_path / "n.db"
    async with WriterHarness(db, max_messages=3) as w:
        r = Running(w)
        for i in range(3):
            await r.append("s", f"x{i}")
        popped = await call(w, PopNewest("s"))
        assert popped.content == "x2"
        await r.append("s", "y")  # 3 rows again: nothing pruned
        assert [c for _, c in session_rows(db, "s")] == ["x0", "x1", "y"]
        assert await call(w, ClearSession("s")) == 3
        for i in range(3):
            await r.append("s", f"z{i}")
        assert [c for _, c in session_rows(db, "s")] == ["z0", "z1", "z2"]
        await r.append("other", "o")
        assert await call(w, ClearAll()) == 4
        await r.append("s", "after")
        assert await call(w, PopNewest("empty")) is None
    assert [c for _, c in session_rows(db, "s")] == ["after"]


async def test_unbounded_when_max_messages_is_zero(tmp_path: Path) -> None:
    async with WriterHarness(tmp_path / "n.db", max_messages=0) as w:
        await call(w, Insert("s", [row(str(i)) for i in range(700)]))
        assert w.stats.pruned == 0
    assert len(session_rows(tmp_path / "n.db", "s")) == 700


async def test_insert_many_gets_consecutive_ids_and_one_timestamp(tmp_path: Path) -> None:
    db = tmp_path / "n.db"
    async with WriterHarness(db) as w:
        ids = await call(w, Insert("s", [row(str(i)) for i in range(10)]))
        assert ids == list(range(ids[0], ids[0] + 10))
        given = await call(w, Insert("s", [row("mine", ts="yesterday")]))
    conn = sqlite3.connect(db)
    stamps = [r[0] for r in conn.execute("SELECT timestamp FROM nexus_messages ORDER BY id")]
    conn.close()
    assert len(set(stamps[:10])) == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamps[0])
    assert stamps[10] == "yesterday" and given == [ids[-1] + 1]


async def test_timestamps_are_non_decreasing(tmp_path: Path) -> None:
    db = tmp_path / "n.db"
    async with WriterHarness(db) as w:
        for i in range(50):
            await Running(w).append("s", str(i))
    conn = sqlite3.connect(db)
    stamps = [r[0] for r in conn.execute("SELECT timestamp FROM nexus_messages ORDER BY id")]
    conn.close()
    assert stamps == sorted(stamps)


async def test_storage_fault_fails_the_whole_batch_and_the_writer_recovers(tmp_path: Path) -> None:
    db = tmp_path / "n.db"
    async with WriterHarness(db, max_messages=0) as w:
        r = Running(w)
        kept = [await r.append("s", f"ok{i}") for i in range(5)]
        conn = w.storage._conn  # type: ignore[attr-defined]
        assert conn is not None
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is now "full"
        big = "x" * 50_000
        errors: list[BaseException] = []

        async def fail(i: int) -> None:
            try:
                await call(w, Insert("s", [row(big), row(big)]))
            except NexusError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(fail, i)
        assert len(errors) == 8
        assert all(isinstance(e, Unavailable) for e in errors)
        assert "nothing was written" in str(errors[0])
        conn.execute("PRAGMA max_page_count = 1073741823")  # the fault clears
        after = await r.append("s", "after")
    rows = session_rows(db, "s")
    assert [i for i, _ in rows] == [*kept, after]
    assert not any(c == big for _, c in rows)


async def test_closed_writer_refuses_new_jobs(tmp_path: Path) -> None:
    async with WriterHarness(tmp_path / "n.db") as w:
        await Running(w).append("s", "x")
        w.close()
        with pytest.raises(Unavailable):
            await Running(w).append("s", "y")


async def test_full_queue_makes_producers_wait_then_overloaded(
    tmp_path: Path, slow_writer: Callable[[float], None]
) -> None:
    slow_writer(0.2)
    async with WriterHarness(tmp_path / "n.db", queue_size=2, batch_max=1) as w:
        outcomes: list[str] = []

        async def produce(i: int) -> None:
            try:
                await w.submit(Insert("s", [row(str(i))]), lambda r: None, timeout=0.05)
                outcomes.append("queued")
            except Overloaded as exc:
                assert exc.retry_after > 0
                outcomes.append("overloaded")

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(produce, i)
        assert "overloaded" in outcomes
        assert outcomes.count("queued") <= 4


async def test_idempotency_key_returns_the_original_id_and_stores_nothing(tmp_path: Path) -> None:
    db = tmp_path / "n.db"
    async with WriterHarness(db, max_messages=0) as w:
        first = await call(w, Insert("s", [row("a", key="k1")]))
        again = await call(w, Insert("s", [row("a (retry)", key="k1")]))
        assert again == first
        other_session = await call(w, Insert("t", [row("a", key="k1")]))
        assert other_session != first  # keys are per session
        # A retry racing its original into the same batch, and mixed batches.
        results: list[list[int]] = []
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(
                    lambda: _collect(w, results, [row("b", key="k2"), row("c", key="k3")])
                )
        assert results[0] == results[1] == results[2]
        mixed = await call(w, Insert("s", [row("d", key="k2"), row("e"), row("f", key="k4")]))
        assert mixed[0] == results[0][0] and mixed[1] < mixed[2]
        assert w.stats.rows == 1 + 1 + 2 + 2
    assert [c for _, c in session_rows(db, "s")] == ["a", "b", "c", "e", "f"]


async def _collect(w: Writer, out: list[list[int]], rows: list[Any]) -> None:
    out.append(await call(w, Insert("s", rows)))


async def test_a_key_is_free_again_once_its_row_is_gone(tmp_path: Path) -> None:
    async with WriterHarness(tmp_path / "n.db", max_messages=0) as w:
        first = await call(w, Insert("s", [row("a", key="k")]))
        await call(w, ClearSession("s"))
        second = await call(w, Insert("s", [row("a", key="k")]))
        assert second[0] > first[0]


async def test_pruning_many_sessions_in_one_batch(tmp_path: Path) -> None:
    # More sessions than one DELETE statement takes: the prune is chunked.
    db = tmp_path / "n.db"
    async with WriterHarness(db, max_messages=1, batch_max=10_000) as w:
        done: list[Any] = []
        for i in range(450):
            await w.submit(Insert(f"s{i}", [row("old")]), done.append)
            await w.submit(Insert(f"s{i}", [row("new")]), done.append)
        await call(w, Insert("last", [row("x")]))
        assert w.stats.pruned == 450
        assert w.stats.batches <= 3  # they really shared a transaction or two
    conn = sqlite3.connect(db)
    contents = conn.execute(
        "SELECT session_tag, content FROM nexus_messages WHERE session_tag LIKE 's%'"
    ).fetchall()
    conn.close()
    assert len(contents) == 450 and {c for _, c in contents} == {"new"}


async def test_large_overflow_is_pruned_exactly(tmp_path: Path) -> None:
    # The range path: one session over its cap by many rows in one batch.
    db = tmp_path / "n.db"
    async with WriterHarness(db, max_messages=10) as w:
        await call(w, Insert("big", [row(f"a{i}") for i in range(10)]))
        done: list[Any] = []
        for k in range(5):  # queued together with "c": one transaction, 51 over the cap
            assert w.submit_nowait(Insert("big", [row(f"b{k}{i}") for i in range(10)]), done.append)
        await call(w, Insert("big", [row("c")]))
        assert w.stats.pruned == 51 and w.stats.batches == 2
    assert [c for _, c in session_rows(db, "big")] == [f"b4{i}" for i in range(1, 10)] + ["c"]


async def test_lowering_max_messages_prunes_the_whole_overflow_at_once(tmp_path: Path) -> None:
    db = tmp_path / "n.db"
    async with WriterHarness(db, max_messages=0) as w:
        await call(w, Insert("s", [row(f"a{i}") for i in range(60)]))
    async with WriterHarness(db, max_messages=10) as w:
        ids = await call(w, Insert("s", [row("new")]))
        assert w.stats.pruned == 51
    assert [c for _, c in session_rows(db, "s")] == [f"a{i}" for i in range(51, 60)] + ["new"]
    assert session_rows(db, "s")[-1][0] == ids[0]


async def test_append_many_over_max_messages_is_refused_naming_it(tmp_path: Path) -> None:
    # Its oldest rows would be pruned in the commit that acknowledges them.
    db = tmp_path / "n.db"
    async with WriterHarness(db, max_messages=3) as w:
        with pytest.raises(BadRequest, match=r"max_messages \(3\)") as err:
            await call(w, Insert("s", [row(str(i)) for i in range(4)]))
        assert err.value.field == "messages"
        assert len(await call(w, Insert("s", [row(str(i)) for i in range(3)]))) == 3
    assert [c for _, c in session_rows(db, "s")] == ["0", "1", "2"]


async def test_a_crash_inside_a_batch_answers_internal_and_the_writer_goes_on(
    tmp_path: Path,
) -> None:
    async with WriterHarness(tmp_path / "n.db") as w:
        # Not an Op: writes.run trips over it (TypeError), which is a bug
        # rather than a storage error; its caller must still get an answer.
        with pytest.raises(Internal, match="TypeError"):
            await call(w, object())  # type: ignore[arg-type]
        ids = await call(w, Insert("t", [row("after the crash")]))
        assert len(ids) == 1
    assert session_rows(tmp_path / "n.db", "t") == [(ids[0], "after the crash")]


async def test_rows_deleted_by_another_connection_are_recounted_before_pruning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "n.db"
    async with WriterHarness(db, max_messages=3) as w:
        r = Running(w)
        for i in range(3):
            await r.append("s", f"old{i}")
        other = sqlite3.connect(db)  # e.g. the sqlite3 shell: the writer's counts are stale
        other.execute("DELETE FROM nexus_messages WHERE session_tag = 's'")
        other.commit()
        other.close()
        new = await r.append("s", "new")
        assert w.stats.pruned == 0 and w.snapshot()["external_writes_seen"] == 1
        for i in range(3):
            await r.append("s", f"n{i}")
        assert w.stats.pruned == 1
    assert [c for _, c in session_rows(db, "s")] == ["n0", "n1", "n2"]
    assert sum("another program committed" in r.message for r in caplog.records) == 1
    assert new < session_rows(db, "s")[0][0]


async def test_a_resend_in_a_batch_that_prunes_its_row_gets_the_original_id(
    tmp_path: Path,
) -> None:
    # The careful (lookup) path: a resend finds its row, which the newer rows of
    # the same commit age out, as if they had come first.  The counts stay
    # exact: the found row is not counted twice.
    db = tmp_path / "n.db"
    async with WriterHarness(db, max_messages=3) as w:
        original = await call(w, Insert("s", [row("r", key="k")]))
        await call(w, Insert("s", [row("a")]))
        await call(w, Insert("s", [row("b")]))
        done: list[Any] = []
        assert w.submit_nowait(Insert("s", [row("c")]), done.append)
        assert w.submit_nowait(Insert("s", [row("r (resend)", key="k")]), done.append)
        await call(w, Insert("other", [row("x")]))  # answered after both
        assert done[1] == original and w.stats.pruned == 1
        await call(w, Insert("s", [row("d")]))
        assert w.stats.pruned == 2
    assert [c for _, c in session_rows(db, "s")] == ["b", "c", "d"]


async def test_a_producer_told_overloaded_never_has_its_job_committed(
    tmp_path: Path, slow_writer: Callable[[float], None]
) -> None:
    """The deadline and the writer taking the job may land in the same instant:
    the producer's answer must follow what happened to the job, not which woke first."""
    import random

    slow_writer(0.001)
    rng = random.Random(9)
    async with WriterHarness(tmp_path / "n.db", queue_size=1, batch_max=1) as w:
        committed: set[int] = set()
        told: dict[int, str] = {}

        async def produce(i: int) -> None:
            def done(result: Any) -> None:
                if not isinstance(result, NexusError):
                    committed.add(i)

            await anyio.sleep(rng.random() * 0.1)
            try:
                await w.submit(Insert("s", [row(str(i))]), done, timeout=rng.random() * 0.01)
                told[i] = "queued"
            except Overloaded:
                told[i] = "overloaded"

        async with anyio.create_task_group() as tg:
            for i in range(800):
                tg.start_soon(produce, i)
        await call(w, Insert("s", [row("last")]))  # everything queued is committed by now
    overloaded = {i for i, how in told.items() if how == "overloaded"}
    queued = {i for i, how in told.items() if how == "queued"}
    assert overloaded and queued  # both outcomes happened
    assert overloaded & committed == set()
    assert queued == committed


async def test_a_fork_runs_in_a_transaction_of_its_own(tmp_path: Path) -> None:
    """A fork may copy megabytes: appends queued with it must not share its transaction."""
    async with WriterHarness(tmp_path / "n.db", max_messages=0) as w:
        await call(w, Insert("src", [row("a"), row("b")]))
        answers: list[Any] = []
        all_in = anyio.Event()

        def done(result: Any) -> None:
            answers.append(result)
            if len(answers) == 5:
                all_in.set()

        before = w.stats.batches
        # Queued together, before the writer's task runs again.
        for op in (
            Insert("x", [row("1")]),
            Fork("src", "f1", "src"),
            Fork("src", "f2", "src"),
            Insert("y", [row("2")]),
            Insert("z", [row("3")]),
        ):
            assert w.submit_nowait(op, done)
        with anyio.fail_after(10):
            await all_in.wait()
        assert not [a for a in answers if isinstance(a, NexusError)]
        # [x], [f1], [f2], [y, z]: each fork alone, the appends around it batched.
        assert w.stats.batches - before == 4
