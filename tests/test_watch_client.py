"""The clients' watch iterators: blocking, and async on asyncio and on trio.

Against real daemons: the stored messages then the live ones with no gap and
no duplicate, several watches at once, resuming after a restart (from a
received id, and from "now" when nothing was received yet), removals that
keep a mirror exact, and a watch that lags and resumes.  Against a fake
daemon (tests/test_both_clients.py): what exactly is asked again after
``lagged`` and ``unavailable``, where "from now on" starts, errors of the
request, giving up, and closing (cancelled, or from another thread).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from nexusd import BadRequest, Client, DaemonNotRunning, Unavailable
from nexusd.client.watch_sync import Watcher
from nexusd.wire import protocol as p
from nexusd.wire.framing import encode_frame
from tests.conftest import Daemon, _new_daemon, write_config
from tests.test_both_clients import FLAVORS, Blocking, FakeDaemon, make, run

#: Every test on a daemon runs against SQLite and PostgreSQL storage (tests/conftest.py).
BOTH_BACKENDS = True


# ── one shape for both watchers ──────────────────────────────────────────────
class BlockingWatch:
    """A blocking :class:`Watcher` with the async one's shape, run inline."""

    def __init__(self, w: Watcher[Any]) -> None:
        self.w = w

    async def __aenter__(self) -> BlockingWatch:
        self.w.__enter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.w.__exit__(*exc)

    def __aiter__(self) -> BlockingWatch:
        return self

    async def __anext__(self) -> Any:
        try:
            return next(self.w)
        except StopIteration:
            raise StopAsyncIteration from None

    async def start(self) -> None:
        self.w.start()

    async def aclose(self) -> None:
        self.w.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.w, name)


def watch(c: Any, *args: Any, **kwargs: Any) -> Any:
    """``c.watch(...)`` for either client, as an async iterator."""
    if isinstance(c, Blocking):
        return BlockingWatch(c._client.watch(*args, **kwargs))
    return c.watch(*args, **kwargs)


async def take(w: Any, n: int, within: float = 20.0) -> list[Any]:
    """The next ``n`` items of ``w``; fails (not hangs) when they do not come in time."""
    got: list[Any] = []
    if isinstance(w, BlockingWatch):
        # Nothing bounds a blocking watch's wait: close it from another thread.
        timer = threading.Timer(within, w.w.close)
        timer.start()
        try:
            for item in w.w:
                got.append(item)
                if len(got) == n:
                    break
        finally:
            timer.cancel()
    else:
        with anyio.move_on_after(within):
            async for item in w:
                got.append(item)
                if len(got) == n:
                    break
    assert len(got) == n, f"{len(got)} of {n} items within {within}s: {got}"
    return got


def writer(path: Path, tag: str, contents: list[str]) -> threading.Thread:
    """A thread appending ``contents`` one call each, from a client of its own."""

    def work() -> None:
        with Client(path) as c:
            for text in contents:
                c.append("user", text, session_tag=tag)

    t = threading.Thread(target=work)
    t.start()
    return t


# ── real daemons ─────────────────────────────────────────────────────────────
@pytest.mark.parametrize("flavor", FLAVORS)
def test_stored_then_live_without_gap_or_duplicate(
    flavor: str, shared_daemon: Daemon, tag: str
) -> None:
    texts = [f"m{i}" for i in range(300)]

    async def scenario() -> None:
        async with make(flavor, shared_daemon.socket) as c:
            await c.append_many([("user", t) for t in texts[:100]], session_tag=tag)
            # The rest is written while the watch replays and goes live.
            t = writer(shared_daemon.socket, tag, texts[100:])
            try:
                async with watch(c, tag, after_id=0) as w:
                    got = await take(w, 300)
            finally:
                t.join()
            stored = await c.get_history(tag, 1000)
        assert [m.content for m in got] == texts
        assert [m.id for m in got] == [m.id for m in stored]
        assert w.last_id == stored[-1].id

    run(flavor, scenario)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_without_after_id_only_what_is_written_from_now_on(
    flavor: str, shared_daemon: Daemon, tag: str
) -> None:
    async def scenario() -> None:
        async with make(flavor, shared_daemon.socket) as c:
            await c.append_many([("user", "old1"), ("user", "old2")], session_tag=tag)
            async with watch(c, tag) as w:
                assert w.last_id is None
                await c.append("user", "new1", session_tag=tag)
                await c.append("user", "new2", session_tag=tag)
                got = await take(w, 2)
                assert [m.content for m in got] == ["new1", "new2"]
                assert w.last_id == got[-1].id and w.buffered == 0

    run(flavor, scenario)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_several_watches_at_once(flavor: str, daemon: Daemon) -> None:
    async def scenario() -> None:
        async with (
            make(flavor, daemon.socket) as c,
            watch(c, "a") as wa,
            watch(c, "b") as wb,
            watch(c, all=True) as wall,
            watch(c, "a", after_id=0) as wa2,
        ):
            for tag, text in [("a", "a1"), ("b", "b1"), ("a", "a2"), ("c", "c1")]:
                await c.append("user", text, session_tag=tag)
            assert [m.content for m in await take(wa, 2)] == ["a1", "a2"]
            assert [m.content for m in await take(wb, 1)] == ["b1"]
            everything = await take(wall, 4)
            assert [m.content for m in everything] == ["a1", "b1", "a2", "c1"]
            assert [m.content for m in await take(wa2, 2)] == ["a1", "a2"]
            await c.ping()  # the client's own calls are untouched by its watches

    run(flavor, scenario)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_watch_resumes_after_a_restart_without_loss_or_duplicate(
    flavor: str, short_dir: Path, daemon_storage: str | None
) -> None:
    d = _new_daemon(short_dir, storage=daemon_storage).start()

    async def restart() -> None:
        rc = await anyio.to_thread.run_sync(d.stop)
        assert rc == 0, f"the daemon exited with {rc}: {d.log}"
        await anyio.to_thread.run_sync(d.start)

    async def scenario() -> None:
        async with make(flavor, d.socket) as c:
            await c.append("user", "before", session_tag="t")
            async with watch(c, "t") as w:
                # Nothing received yet, and the message comes while it is
                # disconnected: resumed from where "now" was, not from nil.
                await restart()
                await c.append("user", "one", session_tag="t")
                assert [m.content for m in await take(w, 1)] == ["one"], w.resumes
                await c.append("user", "two", session_tag="t")
                await restart()
                await c.append("user", "three", session_tag="t")
                got = await take(w, 2)
                assert [m.content for m in got] == ["two", "three"]
                assert w.resumes == 2
                await c.append("user", "four", session_tag="t")
                assert [m.content for m in await take(w, 1)] == ["four"]

    try:
        run(flavor, scenario)
    finally:
        d.stop()


def _apply(mirror: dict[int, p.Message], tag: str, item: p.Message | p.Removal) -> None:
    if isinstance(item, p.Message):
        mirror[item.id] = item
        return
    assert item.session_tag in (None, tag)
    for i in item.ids:
        mirror.pop(i, None)
    if item.before_id is not None:
        for i in [i for i in mirror if i < item.before_id]:
            del mirror[i]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_removals_keep_a_mirror_exact(
    flavor: str, short_dir: Path, daemon_storage: str | None
) -> None:
    d = _new_daemon(
        short_dir, "--max-messages", "4", storage=daemon_storage
    ).start()  # retention prunes too

    async def scenario() -> None:
        async with (
            make(flavor, d.socket) as c,
            watch(c, "t", removals=True) as w,
            watch(c, "t") as plain,
        ):
            await c.append_many([("user", f"m{i}") for i in range(3)], session_tag="t")
            popped = await c.pop("t")
            assert popped is not None
            await c.append_many([("user", f"n{i}") for i in range(4)], session_tag="t")
            await c.clear("t")
            for k in range(2):  # 6 messages into a session that keeps 4
                await c.append_many([("user", f"k{k}{i}") for i in range(3)], session_tag="t")
            await c.pop("t")
            await c.append("user", "end", session_tag="t")
            mirror: dict[int, p.Message] = {}
            items: list[Any] = []
            while not items or getattr(items[-1], "content", None) != "end":
                items += await take(w, 1)
                _apply(mirror, "t", items[-1])
            assert p.Removal(session_tag="t", ids=[popped.id]) in items
            stored = await c.get_history("t")
            assert sorted(mirror) == [m.id for m in stored]
            # Without removals=True only the messages come.
            messages = [i for i in items if isinstance(i, p.Message)]
            assert await take(plain, len(messages)) == messages

    try:
        run(flavor, scenario)
    finally:
        d.stop()


@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_watch_that_lags_resumes_and_loses_nothing(
    flavor: str, short_dir: Path, daemon_storage: str | None
) -> None:
    cfg = write_config(short_dir / "w.toml", watch_buffer=16384, max_messages=0)
    d = _new_daemon(short_dir, "--config", str(cfg), storage=daemon_storage).start()
    texts = [f"{i:04d}" + "x" * 8000 for i in range(500)]  # ~4 MB: far past every buffer

    async def scenario() -> None:
        async with make(flavor, d.socket) as c:
            async with watch(c, "t") as w:
                # Not read while this is written: the daemon gives up on it.
                for i in range(0, len(texts), 50):
                    await c.append_many([("user", t) for t in texts[i : i + 50]], session_tag="t")
                got = await take(w, len(texts), within=60)
                assert [m.content for m in got] == texts
                assert w.resumes >= 1
            assert (await c.stats())["watches_lagged"] >= 1

    try:
        run(flavor, scenario)
    finally:
        d.stop()


# ── a fake daemon: what is asked, exactly ────────────────────────────────────
class Fake(FakeDaemon):
    """:class:`FakeDaemon` that also counts the connections it has seen end."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.ended = 0
        super().__init__(*args, **kwargs)

    def _serve(self, conn: socket.socket) -> None:
        super()._serve(conn)
        self.ended += 1


@pytest.fixture
def fake(short_dir: Path) -> Iterator[Callable[..., Fake]]:
    made: list[Fake] = []

    def start(answer: Callable[[dict[str, Any], int], bytes | None]) -> Fake:
        made.append(Fake(short_dir / "fake.sock", answer))
        return made[-1]

    yield start
    for f in made:
        f.close()


def msg(i: int, tag: str = "t") -> p.Message:
    return p.Message(
        id=i, role="user", content=f"m{i}", timestamp="2026-01-01T00:00:00Z", session_tag=tag
    )


def frames(*replies: Any) -> bytes:
    return b"".join(encode_frame(p.encoder.encode(r)) for r in replies)


def pushed(rid: int, ids: list[int], live: bool = True) -> p.WatchReply:
    return p.WatchReply(id=rid, messages=[msg(i) for i in ids], live=live)


def error(rid: int, code: str, last_id: int | None = None) -> p.ErrorReply:
    return p.ErrorReply(id=rid, code=code, message=f"{code} (fake)", last_id=last_id)


def asked(server: FakeDaemon) -> list[tuple[str, Any]]:
    return [(r["op"], r.get("after_id")) for r in server.requests]


def wait_until(check: Callable[[], bool], within: float = 3.0) -> None:
    end = time.monotonic() + within
    while not check():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)  # poll interval of a deadline loop


@pytest.mark.parametrize("flavor", FLAVORS)
def test_after_lagged_it_watches_again_from_the_last_id_received(
    flavor: str, fake: Callable[..., Fake], short_dir: Path
) -> None:
    def answer(req: dict[str, Any], n: int) -> bytes | None:
        if n == 0:  # replays 6, 7, then falls behind
            return frames(pushed(req["id"], [6], False), pushed(req["id"], [7])) + frames(
                error(req["id"], "lagged", last_id=7)
            )
        return frames(pushed(req["id"], [7, 8]))  # 7 again: must not be yielded twice

    server = fake(answer)

    async def scenario() -> None:
        c = make(flavor, short_dir / "fake.sock")
        async with watch(c, "t", after_id=5) as w:
            assert [m.id for m in await take(w, 3)] == [6, 7, 8]
            assert w.resumes == 1 and w.last_id == 8

    run(flavor, scenario)
    assert asked(server) == [("watch", 5), ("watch", 7)]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_after_unavailable_it_reconnects_and_watches_again(
    flavor: str, fake: Callable[..., Fake], short_dir: Path
) -> None:
    def answer(req: dict[str, Any], n: int) -> bytes | None:
        if n == 0:  # the daemon shuts down
            return frames(pushed(req["id"], [1]), error(req["id"], "unavailable"))
        return frames(pushed(req["id"], [2]))

    server = fake(answer)

    async def scenario() -> None:
        c = make(flavor, short_dir / "fake.sock")
        async with watch(c, "t", after_id=0) as w:
            assert [m.id for m in await take(w, 2)] == [1, 2]

    run(flavor, scenario)
    assert asked(server) == [("watch", 0), ("watch", 1)]
    assert server.connections == 2


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("everything", [False, True], ids=["session", "all"])
def test_from_now_on_starts_after_the_newest_id_it_covers(
    flavor: str, everything: bool, fake: Callable[..., Fake], short_dir: Path
) -> None:
    def info(tag: str, last: int) -> p.SessionInfo:
        return p.SessionInfo(
            session_tag=tag, count=1, first_id=last, last_id=last, last_timestamp="x"
        )

    def answer(req: dict[str, Any], n: int) -> bytes | None:
        rid = req["id"]
        if req["op"] == "history":
            assert req["limit"] == 1
            return frames(p.HistoryReply(id=rid, messages=[msg(41)]))
        if req["op"] == "sessions" and req.get("after") is None:  # two pages
            page = [info("a", 10), info("b", 30)]
            return frames(p.SessionsReply(id=rid, sessions=page, truncated=True))
        if req["op"] == "sessions":
            return frames(p.SessionsReply(id=rid, sessions=[info("c", 20)]))
        return frames(pushed(rid, []))

    server = fake(answer)

    async def scenario() -> None:
        c = make(flavor, short_dir / "fake.sock")
        async with watch(c, "t", all=everything):
            pass

    run(flavor, scenario)
    if everything:
        assert asked(server) == [("sessions", None), ("sessions", None), ("watch", 30)]
    else:
        assert asked(server) == [("history", None), ("watch", 41)]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_refused_watch_raises_and_ends_the_iterator(
    flavor: str, fake: Callable[..., Fake], short_dir: Path
) -> None:
    def answer(req: dict[str, Any], n: int) -> bytes | None:
        return frames(p.ErrorReply(id=req["id"], code="bad_request", message="bad tag", field="x"))

    fake(answer)

    async def scenario() -> None:
        c = make(flavor, short_dir / "fake.sock")
        w = watch(c, "t", after_id=0)
        with pytest.raises(BadRequest, match="bad tag"):
            await anext(w)
        with pytest.raises(StopAsyncIteration):
            await anext(w)

    run(flavor, scenario)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_it_gives_up_after_retry_for_and_not_at_all_on_first_contact(
    flavor: str, fake: Callable[..., Fake], short_dir: Path
) -> None:
    server = fake(lambda req, n: frames(error(req["id"], "unavailable")))

    async def scenario() -> None:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            async with watch(make(flavor, short_dir / "fake.sock", retry_for=0.3), after_id=0):
                pass
        assert time.monotonic() - started < 5
        assert len(server.requests) >= 2  # tried again (backoff 0.05 s, then 0.1 s, ...)
        started = time.monotonic()
        with pytest.raises(DaemonNotRunning):  # never reached: said at once
            async with watch(make(flavor, short_dir / "none.sock", retry_for=30)):
                pass
        assert time.monotonic() - started < 5

    run(flavor, scenario)


@pytest.mark.parametrize("flavor", ["asyncio", "trio"])
def test_a_cancelled_wait_closes_the_connection_and_the_next_resumes(
    flavor: str, fake: Callable[..., Fake], short_dir: Path
) -> None:
    def answer(req: dict[str, Any], n: int) -> bytes | None:
        return frames(pushed(req["id"], [3] if n == 0 else [4]))

    server = fake(answer)

    async def scenario() -> None:
        w = make(flavor, short_dir / "fake.sock").watch("t", after_id=2)
        assert (await anext(w)).id == 3
        with anyio.move_on_after(0.2) as scope:
            await anext(w)  # nothing more comes on this connection
        assert scope.cancelled_caught
        await anyio.to_thread.run_sync(wait_until, lambda: server.ended == 1)
        assert (await anext(w)).id == 4  # a new watch, after the last id received
        await w.aclose()
        await anyio.to_thread.run_sync(wait_until, lambda: server.ended == 2)
        with pytest.raises(StopAsyncIteration):
            await anext(w)

    run(flavor, scenario)
    assert asked(server) == [("watch", 2), ("watch", 3)]


def test_a_blocking_watch_closed_from_another_thread_stops(
    fake: Callable[..., Fake], short_dir: Path
) -> None:
    server = fake(lambda req, n: frames(pushed(req["id"], [1])))
    with Client(short_dir / "fake.sock").watch("t", after_id=0) as w:
        threading.Timer(0.2, w.close).start()
        assert [m.id for m in w] == [1]  # then blocked until closed: the loop ends
    wait_until(lambda: server.ended == 1)
    assert asked(server) == [("watch", 0)]
