"""Both Python clients against a real daemon subprocess; the async one on asyncio and trio."""

from __future__ import annotations

import signal
from pathlib import Path

import anyio
import pytest

from nexusd import AsyncClient, BadRequest, Client, DaemonNotRunning, Message, NexusError
from nexusd.wire.protocol import SessionInfo
from tests.conftest import Daemon, _new_daemon, write_config

pytestmark = pytest.mark.anyio
#: Every test on a daemon runs against SQLite and PostgreSQL storage (tests/conftest.py).
BOTH_BACKENDS = True


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


async def test_async_client_every_operation(shared_daemon: Daemon, tag: str, backend: str) -> None:
    async with AsyncClient(shared_daemon.socket) as c:
        await c.ping()
        hello = await c.hello()
        assert hello.version == 1 and hello.limits["max_content"] == 1024 * 1024
        a = await c.append("user", "hello", session_tag=tag, meta={"model": "x", "n": [1, 2]})
        b = await c.append(
            "assistant", "hi", session_tag=tag, timestamp="2026-01-02T04:05:06+01:00"
        )
        assert b > a
        ids = await c.append_many(
            [("user", "m1"), {"role": "tool", "content": "m2", "meta": {"ok": True}}],
            session_tag=tag,
        )
        assert ids == [b + 1, b + 2]
        hist = await c.get_history(tag)
        assert [m.content for m in hist] == ["hello", "hi", "m1", "m2"]
        assert isinstance(hist[0], Message) and hist[0].meta == {"model": "x", "n": [1, 2]}
        assert hist[1].timestamp == "2026-01-02T03:05:06.000000Z" and hist[0].session_tag == tag
        assert [m.id for m in await c.get_history(tag, 2, before_id=ids[0])] == [a, b]
        assert [m.id for m in await c.get_history(tag, 1, after_id=a)] == [b]
        assert await c.message_count(tag) == 4
        infos = {s.session_tag: s for s in await c.sessions()}
        assert isinstance(infos[tag], SessionInfo)
        assert (infos[tag].count, infos[tag].first_id, infos[tag].last_id) == (4, a, ids[1])
        popped = await c.pop(tag)
        assert popped is not None and popped.content == "m2" and popped.meta == {"ok": True}
        assert await c.clear(tag) == 3
        assert await c.pop(tag) is None
        st = await c.stats()
        assert st["rows_committed"] >= 4 and "commit_latency_p99_ms" in st
        assert st["storage"].startswith("postgresql://") == (backend == "postgres")


async def test_async_client_errors_raise_typed_exceptions(shared_daemon: Daemon, tag: str) -> None:
    async with AsyncClient(shared_daemon.socket) as c:
        with pytest.raises(BadRequest) as info:
            await c.append("", "x", session_tag=tag)
        assert info.value.code == "bad_request" and info.value.field == "role"
        with pytest.raises(BadRequest):
            await c.get_history(tag, limit=0)
        assert await c.append("user", "still fine", session_tag=tag) > 0


async def test_many_tasks_share_one_async_client(shared_daemon: Daemon, tag: str) -> None:
    async with AsyncClient(shared_daemon.socket) as c:
        ids: list[int] = []

        async def worker(w: int) -> None:
            for i in range(10):
                ids.append(await c.append("user", f"{w}:{i}", session_tag=tag))

        async with anyio.create_task_group() as tg:
            for w in range(40):
                tg.start_soon(worker, w)
        assert len(set(ids)) == 400
        assert await c.message_count(tag) == 400


async def test_64_clients_x_200_appends_lose_nothing(
    shared_daemon: Daemon, tag: str, anyio_backend: str
) -> None:
    per, clients = 200, 64
    sent: dict[int, str] = {}

    async def client(n: int) -> None:
        async with AsyncClient(shared_daemon.socket) as c:
            for i in range(per):
                content = f"{n}-{i}"
                sent[await c.append("user", content, session_tag=f"{tag}-{n}")] = content

    async with anyio.create_task_group() as tg:
        for n in range(clients):
            tg.start_soon(client, n)
    assert len(sent) == per * clients  # unique ids for all
    async with AsyncClient(shared_daemon.socket) as c:
        for n in range(clients):
            hist = await c.get_history(f"{tag}-{n}", limit=per)
            assert [m.content for m in hist] == [f"{n}-{i}" for i in range(per)]
            assert all(sent[m.id] == m.content for m in hist)


async def test_unreachable_daemon_says_how_to_start_it(short_dir: Path) -> None:
    with pytest.raises(DaemonNotRunning) as info:
        async with AsyncClient(short_dir / "nobody.sock"):
            pass
    assert "nexusd serve" in str(info.value)
    assert isinstance(info.value, ConnectionError)


async def test_history_pages_on_when_the_server_cuts_a_reply(
    short_dir: Path, daemon_storage: str | None
) -> None:
    cfg = write_config(short_dir / "small.toml", max_meta=16384)  # it must fit the frame too
    d = _new_daemon(
        short_dir,
        *("--config", str(cfg), "--max-frame", "65536", "--max-content", "40000"),
        *("--max-messages", "0"),
        storage=daemon_storage,
    ).start()
    try:
        async with AsyncClient(d.socket) as c:
            ids = [await c.append("u", str(i) * 30_000) for i in range(7)]
            got = await c.get_history(limit=6)
            assert [m.id for m in got] == ids[1:]
            fwd = await c.get_history(limit=5, after_id=ids[0])
            assert [m.id for m in fwd] == ids[1:6]
        with Client(d.socket) as sc:
            assert [m.id for m in sc.get_history(limit=7)] == ids
    finally:
        d.stop()


async def test_daemon_gone_raises_connection_error_after_the_retry_window(short_dir: Path) -> None:
    d = _new_daemon(short_dir).start()
    async with AsyncClient(d.socket, retry_for=0.3) as c:
        await c.ping()
        assert d.stop() == 0
        with pytest.raises(NexusError) as info:
            await c.ping()
        assert isinstance(info.value, ConnectionError)


async def test_daemon_restart_mid_stream_neither_loses_nor_duplicates(
    short_dir: Path, daemon_storage: str | None
) -> None:
    d = _new_daemon(short_dir, "--max-messages", "0", storage=daemon_storage).start()
    acked: list[int] = []
    restarted = anyio.Event()
    under_way = anyio.Event()
    try:
        async with AsyncClient(d.socket) as c:

            async def writer(w: int) -> None:
                i = 0
                while not restarted.is_set() or i < 30:
                    acked.append(await c.append("user", f"{w}:{i}"))
                    i += 1
                    if len(acked) >= 200:
                        under_way.set()

            async with anyio.create_task_group() as tg:
                for w in range(8):
                    tg.start_soon(writer, w)
                await under_way.wait()
                d.stop(signal.SIGKILL)  # answers in flight are lost with it
                d.start()
                restarted.set()
            hist = await c.get_history(limit=10_000)
    finally:
        d.stop()
    contents = [m.content for m in hist]
    assert len(contents) == len(set(contents)), "a retried append was stored twice"
    assert sorted(acked) == [m.id for m in hist]  # every ack is there, nothing else


class ReplyEatingProxy:
    """Forwards to the daemon, but the first ``eat`` connections lose their first reply.

    The request reaches the daemon and commits; the connection then drops before
    the answer gets back: exactly the case idempotent retries exist for.
    """

    def __init__(self, upstream: Path, listen: Path, eat: int = 1) -> None:
        self.upstream, self.listen, self.eat = upstream, listen, eat
        self.eaten = 0

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with await anyio.create_unix_listener(self.listen) as listener:
            task_status.started()
            await listener.serve(self._handle)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        async with client, await anyio.connect_unix(self.upstream) as up:
            if self.eaten < self.eat:
                self.eaten += 1
                await up.send(await client.receive())
                await up.receive()  # the daemon's answer: swallowed
                return  # and the client's connection dropped
            async with anyio.create_task_group() as tg:
                tg.start_soon(_pipe, client, up)
                await _pipe(up, client)
                await client.aclose()  # ends the other pipe without cancelling it


async def _pipe(src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream) -> None:
    try:
        async for chunk in src:
            await dst.send(chunk)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass


async def test_append_whose_answer_was_lost_is_retried_and_stored_once(
    shared_daemon: Daemon, short_dir: Path, tag: str
) -> None:
    proxy = ReplyEatingProxy(shared_daemon.socket, short_dir / "proxy.sock")
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        async with AsyncClient(proxy.listen) as c:
            mid = await c.append("user", "only once", session_tag=tag)
            assert proxy.eaten == 1
        tg.cancel_scope.cancel()
    async with AsyncClient(shared_daemon.socket) as c:
        hist = await c.get_history(tag)
    assert [(m.id, m.content) for m in hist] == [(mid, "only once")]


async def test_without_keys_the_same_loss_would_duplicate(
    shared_daemon: Daemon, short_dir: Path, tag: str
) -> None:
    """The control for the test above: the proxy really does lose committed answers."""
    proxy = ReplyEatingProxy(shared_daemon.socket, short_dir / "proxy.sock")
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        async with AsyncClient(proxy.listen, idempotent_appends=False) as c:
            with pytest.raises(NexusError):  # not retried: no key makes it safe
                await c.append("user", "maybe twice", session_tag=tag)
            await c.append("user", "maybe twice", session_tag=tag)  # the caller's own retry
        tg.cancel_scope.cancel()
    async with AsyncClient(shared_daemon.socket) as c:
        assert await c.message_count(tag) == 2


async def test_a_flood_through_one_client_is_throttled_not_lost(short_dir: Path, tag: str) -> None:
    # SQLite only: tests/slow_daemon.py slows SQLite's write transactions, and
    # what is tested here is the transport's back-pressure, not the storage.
    # The daemon reads slowly (slow writer, small queue): the client's writes
    # back up, its transport pauses, and every call still completes.  On the
    # plain asyncio loop (what runs without the fast extra), where frames
    # arrive in callbacks outside any task and their backlog worker must still
    # be started in the daemon's task group (with sniffio installed, anyio
    # could not tell asyncio was running there: connections were dropped).
    cfg = short_dir / "c.toml"
    cfg.write_text("queue_size = 16\nmax_messages = 0\nuvloop = false\n")
    d = _new_daemon(short_dir, "--config", str(cfg), commit_delay=0.01).start()
    try:
        async with AsyncClient(d.socket) as c:
            ids: list[int] = []

            async def one(i: int) -> None:
                ids.append(await c.append("user", f"{i}:" + "w" * 20_000, session_tag=tag))

            async with anyio.create_task_group() as tg:
                for i in range(600):
                    tg.start_soon(one, i)
            assert len(set(ids)) == 600
            assert await c.message_count(tag) == 600
    finally:
        d.stop()
    assert "Fatal error" not in d.log and "Traceback" not in d.log, d.log
