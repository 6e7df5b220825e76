"""The request handlers without a socket: a real writer and real storage on a SQLite file.

Each test drives :class:`~nexusd.daemon.handlers.Dispatcher` the way a
connection does (route by the row of the table, submit a write's job to the
writer, build the reply from the committed result), with no daemon process,
no socket and no mock.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from nexusd.daemon import binding
from nexusd.daemon.backups import Snapshots
from nexusd.daemon.binding import Services
from nexusd.daemon.handlers import Dispatcher
from nexusd.daemon.hub import Hub
from nexusd.daemon.limits import Limits
from nexusd.daemon.peers import Namespace, Peer, namespace_for
from nexusd.daemon.writer import Writer
from nexusd.storage.sqlite import SQLiteStorage
from nexusd.wire import protocol as p
from nexusd.wire.errors import BadRequest, NexusError, NotFound
from nexusd.wire.ops import BY_REQUEST, OPERATIONS, Runs

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


LIMITS = Limits(
    max_frame=1024 * 1024,
    max_content=1000,
    max_meta=200,
    max_inflight=64,
    enqueue_timeout=5.0,
    frame_timeout=5.0,
    idle_timeout=60.0,
)


class Daemonless:
    """Storage, a running writer and the handlers' services, in this process."""

    def __init__(self, storage: SQLiteStorage, writer: Writer, snapshots: Snapshots) -> None:
        self.storage = storage
        self.writer = writer
        self.services = Services(
            limits=LIMITS,
            readers=storage,
            snapshots=snapshots,
            hello=lambda rid: p.HelloReply(
                id=rid, version=p.PROTOCOL_VERSION, server="t", limits={}
            ),
            stats=lambda: {"answered": "here"},
            hub=Hub(buffer=1 << 20),
        )

    def dispatcher(self, ns: Namespace | None = None) -> Dispatcher:
        return Dispatcher(self.services, ns)

    async def ask(self, d: Dispatcher, req: Any) -> Any:
        """Answer ``req`` as a connection would: by its row's kind."""
        runs = BY_REQUEST[type(req)].runs
        if runs is Runs.LOCAL:
            return d.local(req)
        if runs is Runs.READ:
            return await d.read(req)
        job = d.write(req)
        settled = anyio.Event()
        box: list[Any] = []

        def done(result: Any) -> None:
            box.append(result)
            settled.set()

        await self.writer.submit(job.op, done, timeout=5.0)
        await settled.wait()
        if isinstance(box[0], NexusError):
            raise box[0]
        return job.build(req.id, box[0])


@asynccontextmanager
async def daemonless(tmp_path: Path) -> AsyncIterator[Daemonless]:
    storage = SQLiteStorage(
        tmp_path / "nexus.db",
        max_messages=500,
        synchronous="full",
        wal_autocheckpoint=1000,
        readers=2,
    )
    await storage.open()
    writer = Writer(storage, queue_size=64, batch_max=16)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            try:
                yield Daemonless(storage, writer, Snapshots(storage, tmp_path, max_snapshots=1))
            finally:
                writer.close()
    finally:
        await storage.close()


def isolated(uid: int) -> Namespace:
    ns = namespace_for(Peer(pid=1, uid=uid, gid=uid), isolate=True, admin_uids=set())
    assert ns is not None and ns.prefix
    return ns


async def test_an_append_is_answered_with_its_id_and_read_back_by_history(tmp_path: Path) -> None:
    async with daemonless(tmp_path) as dl:
        d = dl.dispatcher()
        first = await dl.ask(d, p.Append(id=1, role="user", content="hello", session_tag="s"))
        assert type(first) is p.AppendReply and first.id == 1
        many = await dl.ask(
            d,
            p.AppendMany(
                id=2,
                session_tag="s",
                messages=[
                    p.NewMessage(role="assistant", content="hi", meta={"k": [1, 2]}),
                    p.NewMessage(role="user", content="bye", timestamp="2026-01-02T03:04:05+01:00"),
                ],
            ),
        )
        assert many.message_ids == [first.message_id + 1, first.message_id + 2]
        history = await dl.ask(d, p.History(id=3, session_tag="s"))
        assert type(history) is p.HistoryReply and history.id == 3
        got = [(m.id, m.role, m.content, m.meta) for m in history.messages]
        assert got == [
            (first.message_id, "user", "hello", None),
            (first.message_id + 1, "assistant", "hi", {"k": [1, 2]}),
            (first.message_id + 2, "user", "bye", None),
        ]
        # A caller's timestamp is stored in UTC, in the server's own form.
        assert history.messages[2].timestamp == "2026-01-02T02:04:05.000000Z"
        assert (await dl.ask(d, p.Count(id=4, session_tag="s"))).count == 3
        popped = await dl.ask(d, p.Pop(id=5, session_tag="s"))
        assert type(popped) is p.PopReply and popped.message is not None
        assert popped.message.content == "bye"
        cleared = await dl.ask(d, p.Clear(id=6, session_tag="s"))
        assert type(cleared) is p.ClearReply and cleared.deleted == 2


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (p.Append(id=1, role="u", content="x" * 1001), "content"),
        (p.Append(id=1, role="u", content="x", meta={"f": float("nan")}), "meta.f"),
        (p.Append(id=1, role="u", content="x", meta={"big": "y" * 300}), "meta"),
        (p.Append(id=1, role="u", content="x", timestamp="yesterday"), "timestamp"),
        (
            p.AppendMany(
                id=1,
                messages=[
                    p.NewMessage(role="u", content="a", idem_key="k"),
                    p.NewMessage(role="u", content="b", idem_key="k"),
                ],
            ),
            "messages[1].idem_key",
        ),
    ],
    ids=["content", "nan", "meta-size", "timestamp", "idem-keys"],
)
async def test_a_write_the_limits_refuse_is_refused_before_the_writer_sees_it(
    tmp_path: Path, req: Any, field: str
) -> None:
    async with daemonless(tmp_path) as dl:
        d = dl.dispatcher()
        with pytest.raises(BadRequest) as info:
            d.write(req)
        assert info.value.field == field
        assert dl.writer.stats.ops == 0
        assert (await dl.ask(d, p.Count(id=2, session_tag=p.DEFAULT_SESSION))).count == 0


async def test_an_isolated_peer_sees_its_own_tags_only(tmp_path: Path) -> None:
    async with daemonless(tmp_path) as dl:
        alice, bob = (
            dl.dispatcher(isolated(os.getuid() + 1)),
            dl.dispatcher(isolated(os.getuid() + 2)),
        )
        plain = dl.dispatcher()
        await dl.ask(alice, p.Append(id=1, role="u", content="a's", session_tag="shared"))
        await dl.ask(bob, p.Append(id=2, role="u", content="b's", session_tag="shared"))
        mine = await dl.ask(alice, p.History(id=3, session_tag="shared"))
        # The peer sees its tag as it sent it; the prefix never leaves the daemon.
        assert [(m.content, m.session_tag) for m in mine.messages] == [("a's", "shared")]
        sessions = await dl.ask(alice, p.Sessions(id=4))
        assert [s.session_tag for s in sessions.sessions] == ["shared"]
        # Stored under two different tags: a peer without a namespace sees both prefixes.
        stored = await dl.ask(plain, p.Sessions(id=5))
        assert len(stored.sessions) == 2
        assert all(s.session_tag.endswith("shared") for s in stored.sessions)
        assert {s.session_tag for s in stored.sessions}.isdisjoint({"shared"})
        # clear_all of one peer clears its namespace only.
        assert (await dl.ask(alice, p.ClearAll(id=6))).deleted == 1
        assert (await dl.ask(bob, p.Count(id=7, session_tag="shared"))).count == 1


async def test_local_requests_are_answered_from_the_services(tmp_path: Path) -> None:
    async with daemonless(tmp_path) as dl:
        d = dl.dispatcher()
        assert await dl.ask(d, p.Ping(id=1)) == p.PingReply(id=1)
        assert (await dl.ask(d, p.Stats(id=2))).stats == {"answered": "here"}
        assert type(await dl.ask(d, p.Hello(id=3))) is p.HelloReply
        refused = await dl.ask(d, p.Hello(id=4, version=p.PROTOCOL_VERSION + 1))
        assert type(refused) is p.ErrorReply and refused.field == "version"


async def test_a_backup_handle_of_another_connection_is_not_found(tmp_path: Path) -> None:
    async with daemonless(tmp_path) as dl:
        mine, theirs = dl.dispatcher(), dl.dispatcher()
        began = await dl.ask(mine, p.BackupBegin(id=1))
        with pytest.raises(NotFound):
            await dl.ask(theirs, p.BackupRead(id=2, backup=began.backup, offset=0))
        chunk = await dl.ask(mine, p.BackupRead(id=3, backup=began.backup, offset=0))
        assert chunk.data.startswith(b"SQLite format 3\x00")
        await dl.ask(mine, p.BackupEnd(id=4, backup=began.backup))
        mine.release()


def test_every_row_of_the_table_is_bound_and_a_second_handler_is_refused() -> None:
    kinds: dict[Runs, Callable[[Any], Any]] = {
        Runs.LOCAL: binding.on_local,
        Runs.WRITE: binding.on_write,
        Runs.READ: binding.on_read,
        Runs.WATCH: binding.on_watch,
    }
    for op in OPERATIONS:
        # Binding a second handler to a row is refused at import time.
        with pytest.raises(RuntimeError, match="two handlers"):
            kinds[op.runs](op.request)(lambda *a: None)


async def test_a_backup_ended_while_its_read_waits_is_not_found(tmp_path: Path) -> None:
    # backup_end pipelined behind a backup_read can remove the snapshot before
    # the read's thread opens it: that read is "no such backup", not internal.
    async with daemonless(tmp_path) as dl:
        d = dl.dispatcher()
        began = await dl.ask(d, p.BackupBegin(id=1))
        (snapshot,) = tmp_path.glob(f"*{began.backup}*")
        snapshot.unlink()  # what backup_end does, a moment early
        with pytest.raises(NotFound) as info:
            await dl.ask(d, p.BackupRead(id=2, backup=began.backup, offset=0))
        assert info.value.field == "backup"
        d.release()


async def test_a_namespace_mark_is_refused_naming_the_key_it_came_in(tmp_path: Path) -> None:
    async with daemonless(tmp_path) as dl:
        peer = dl.dispatcher(isolated(os.getuid() + 1))
        with pytest.raises(BadRequest) as info:
            await dl.ask(peer, p.Sessions(id=1, after="\x1fu0\x1f"))
        assert info.value.field == "after"
        with pytest.raises(BadRequest) as info:
            await dl.ask(peer, p.Count(id=2, session_tag="\x1fu0\x1fx"))
        assert info.value.field == "session_tag"
