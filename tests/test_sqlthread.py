"""The writer's thread: results, errors, order, the hand-back, stopping."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import anyio
import pytest

from nexusd.storage.thread import SQLiteThread
from nexusd.wire.errors import Unavailable

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the hand-back is an asyncio future: the daemon runs on asyncio


async def test_calls_run_on_one_thread_in_order_and_return_results(tmp_path: Path) -> None:
    th = SQLiteThread("t")
    th.start()
    try:
        conn = await th.call(sqlite3.connect, tmp_path / "x.db")  # same-thread check on
        seen: list[tuple[int, int | None]] = []

        def step(i: int) -> int:
            seen.append((i, threading.get_ident()))
            conn.execute("CREATE TABLE IF NOT EXISTS t (i)")
            conn.execute("INSERT INTO t VALUES (?)", (i,))
            return i * 2

        results: list[int] = []

        async def one(i: int) -> None:
            results.append(await th.call(step, i))

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(one, i)
        assert sorted(results) == [i * 2 for i in range(50)]
        assert [i for i, _ in seen] == list(range(50))  # handed over in this order
        assert len({ident for _, ident in seen}) == 1
        assert threading.get_ident() not in {ident for _, ident in seen}
        rows = await th.call(lambda: conn.execute("SELECT i FROM t ORDER BY rowid").fetchall())
        assert [r[0] for r in rows] == list(range(50))
        await th.call(conn.close)
    finally:
        th.stop()


async def test_an_exception_reaches_the_caller_and_the_thread_goes_on() -> None:
    th = SQLiteThread("t")
    th.start()
    try:
        with pytest.raises(ZeroDivisionError):
            await th.call(lambda: 1 // 0)
        assert await th.call(lambda: 41 + 1) == 42
    finally:
        th.stop()


async def test_then_runs_in_the_loop_before_the_caller_resumes() -> None:
    th = SQLiteThread("t")
    th.start()
    order: list[str] = []
    try:

        def then(x: int, result: int) -> None:
            order.append(
                f"then {x} -> {result} on loop: {threading.current_thread() is threading.main_thread()}"
            )

        assert await th.call(lambda x: x + 1, 1, then=then) == 2
        order.append("resumed")
        assert order == ["then 1 -> 2 on loop: True", "resumed"]
    finally:
        th.stop()


async def test_a_cancelled_caller_does_not_stop_the_call() -> None:
    th = SQLiteThread("t")
    th.start()
    release = threading.Event()
    handed_back = anyio.Event()
    try:
        with anyio.move_on_after(0.05):
            await th.call(release.wait, then=lambda result: handed_back.set())
        release.set()  # the call is still running on the thread: let it finish
        with anyio.fail_after(5):
            await handed_back.wait()
        assert await th.call(lambda: "still serving") == "still serving"
    finally:
        th.stop()


async def test_stopped_thread_refuses_calls_and_ends() -> None:
    th = SQLiteThread("nexusd-test")
    th.start()
    assert await th.call(lambda: 1) == 1
    (thread,) = [t for t in threading.enumerate() if t.name == "nexusd-test"]
    th.stop()
    with pytest.raises(Unavailable):
        await th.call(lambda: 1)
    await anyio.to_thread.run_sync(thread.join, 5)
    assert not thread.is_alive()
