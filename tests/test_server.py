"""The server in-process over a real Unix socket, spoken to with raw frames."""

from __future__ import annotations

import os
import socket
import sqlite3
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from nexusd.daemon.server import Server, StartupError
from nexusd.wire.framing import FrameDecoder, encode_frame
from tests.conftest import make_config, make_v1_db, running_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Raw:
    """A deliberately dumb client: sends whatever bytes it is told to."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.dec = FrameDecoder(64 * 1024 * 1024)
        self.ready: list[bytes] = []

    @classmethod
    async def connect(cls, path: Path) -> Raw:
        return cls(await anyio.connect_unix(path))

    async def send(self, obj: Any) -> None:
        body = obj if isinstance(obj, bytes) else msgspec.msgpack.encode(obj)
        await self.stream.send(encode_frame(body))

    async def recv(self) -> dict[str, Any]:
        with anyio.fail_after(10):
            while not self.ready:
                self.ready = self.dec.feed(await self.stream.receive())
        return msgspec.msgpack.decode(self.ready.pop(0))  # type: ignore[no-any-return]

    async def call(self, obj: Any) -> dict[str, Any]:
        await self.send(obj)
        return await self.recv()

    async def closed(self) -> bool:
        with anyio.fail_after(10):
            try:
                data = await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return True
        return data == b""


async def test_every_operation_roundtrips(short_dir: Path) -> None:
    async with running_server(make_config(short_dir)) as server:
        c = await Raw.connect(server.config.socket)
        hello = await c.call({"op": "hello", "id": 1, "version": 1})
        assert hello["op"] == "hello" and hello["limits"]["max_frame"] == 4 * 1024 * 1024
        assert await c.call({"op": "ping", "id": 2}) == {"op": "ping", "id": 2}
        a = await c.call(
            {"op": "append", "id": 3, "role": "user", "content": "hi", "meta": {"k": [1, "v"]}}
        )
        assert a["op"] == "append" and a["message_id"] >= 1
        m = await c.call(
            {
                "op": "append_many",
                "id": 4,
                "session_tag": "s2",
                "messages": [
                    {"role": "a", "content": "x"},
                    {"role": "b", "content": "y", "timestamp": "2026-11-26T07:41:50Z"},
                ],
            }
        )
        assert m["message_ids"] == [a["message_id"] + 1, a["message_id"] + 2]
        h = await c.call({"op": "history", "id": 5})
        assert [x["content"] for x in h["messages"]] == ["hi"] and h["messages"][0]["meta"] == {
            "k": [1, "v"]
        }
        assert (await c.call({"op": "count", "id": 6, "session_tag": "s2"}))["count"] == 2
        s = await c.call({"op": "sessions", "id": 7})
        assert [(x["session_tag"], x["count"]) for x in s["sessions"]] == [("nexus", 1), ("s2", 2)]
        assert s["sessions"][1]["last_timestamp"] == "2026-11-26T07:41:50.000000Z"
        pop = await c.call({"op": "pop", "id": 8, "session_tag": "s2"})
        assert pop["message"]["content"] == "y"
        assert (await c.call({"op": "clear", "id": 9, "session_tag": "s2"}))["deleted"] == 1
        st = await c.call({"op": "stats", "id": 10})
        assert st["stats"]["rows_committed"] == 3 and st["stats"]["connections"] == 1
        assert (await c.call({"op": "clear_all", "id": 11}))["deleted"] == 1
        assert (await c.call({"op": "pop", "id": 12}))["message"] is None


async def test_pipelined_appends_commit_in_send_order_and_batch(short_dir: Path) -> None:
    async with running_server(make_config(short_dir, max_messages=0)) as server:
        c = await Raw.connect(server.config.socket)
        n = 400
        frames = b"".join(
            encode_frame(
                msgspec.msgpack.encode({"op": "append", "id": i, "role": "u", "content": str(i)})
            )
            for i in range(n)
        )
        await c.stream.send(frames)
        replies = [await c.recv() for _ in range(n)]
        by_req = {r["id"]: r["message_id"] for r in replies}
        ids = [by_req[i] for i in range(n)]
        assert ids == sorted(ids) and len(set(ids)) == n
        stats = (await c.call({"op": "stats", "id": n}))["stats"]
        assert stats["ops_committed"] == n
        assert stats["batches_committed"] < n / 4, stats  # batching really happened
        assert stats["mean_batch_size"] > 4


async def test_reads_and_writes_interleave_out_of_order(
    short_dir: Path, slow_writer: Callable[[float], None]
) -> None:
    slow_writer(0.05)
    async with running_server(make_config(short_dir)) as server:
        c = await Raw.connect(server.config.socket)
        await c.send({"op": "append", "id": 1, "role": "u", "content": "x"})
        await c.send({"op": "ping", "id": 2})
        first = await c.recv()
        assert first["id"] == 2  # the ping overtook the slow commit
        assert (await c.recv())["id"] == 1


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        ({"op": "append", "id": 5, "role": "", "content": "x"}, "role"),
        ({"op": "append", "id": 5, "role": "r" * 65, "content": "x"}, "role"),
        (
            {"op": "append", "id": 5, "role": "r", "content": "x", "session_tag": "t" * 257},
            "session_tag",
        ),
        ({"op": "append", "id": 5, "role": "r", "content": 42}, "content"),
        ({"op": "append", "id": 5, "role": "r", "content": "x" * 2000}, "content"),
        ({"op": "append", "id": 5, "role": "r", "content": "x", "meta": {"b": b"\x00"}}, "meta.b"),
        (
            {"op": "append", "id": 5, "role": "r", "content": "x", "meta": {"f": float("nan")}},
            "meta.f",
        ),
        (
            {
                "op": "append_many",
                "id": 5,
                "messages": [{"role": "r", "content": "ok"}, {"role": "r", "content": "é" * 1500}],
            },
            "messages[1].content",
        ),
        ({"op": "history", "id": 5, "limit": 0}, "limit"),
        ({"op": "history", "id": 5, "limit": 10_001}, "limit"),
        ({"op": "teleport", "id": 5}, "op"),
    ],
)
async def test_bad_input_gets_bad_request_naming_the_field_and_the_connection_lives(
    short_dir: Path, request_: dict[str, Any], field: str
) -> None:
    async with running_server(
        make_config(short_dir, max_content=1024, max_frame=64 * 1024, max_meta=16 * 1024)
    ) as server:
        c = await Raw.connect(server.config.socket)
        err = await c.call(request_)
        assert err["op"] == "error" and err["code"] == "bad_request"
        assert err["id"] == 5 and err["field"] == field
        assert field.split(".")[0].split("[")[0] in err["message"] or field in err["message"]
        ok = await c.call({"op": "append", "id": 6, "role": "r", "content": "fine"})
        assert ok["op"] == "append"
        h = await c.call({"op": "history", "id": 7})
        assert [m["content"] for m in h["messages"]] == ["fine"]  # nothing of the bad one stored


async def test_undecodable_body_gets_an_error_without_id(short_dir: Path) -> None:
    async with running_server(make_config(short_dir)) as server:
        c = await Raw.connect(server.config.socket)
        err = await c.call(b"\xc1\xc1\xc1")
        assert err["code"] == "bad_request" and err["id"] is None
        assert (await c.call({"op": "ping", "id": 1}))["op"] == "ping"


async def test_oversized_frame_gets_too_large_then_close(short_dir: Path) -> None:
    async with running_server(
        make_config(short_dir, max_frame=64 * 1024, max_meta=16 * 1024, max_content=1024)
    ) as server:
        c = await Raw.connect(server.config.socket)
        await c.stream.send(struct.pack(">I", 0xFFFFFFFF) + b"x" * 100)
        err = await c.recv()
        assert err["code"] == "too_large" and err["id"] is None
        assert await c.closed()
        # Other clients are undisturbed.
        d = await Raw.connect(server.config.socket)
        assert (await d.call({"op": "ping", "id": 1}))["op"] == "ping"


async def test_history_reply_is_cut_to_the_frame_limit(short_dir: Path) -> None:
    cfg = make_config(
        short_dir, max_frame=64 * 1024, max_meta=16 * 1024, max_content=40 * 1024, max_messages=0
    )
    async with running_server(cfg) as server:
        c = await Raw.connect(server.config.socket)
        ids = []
        for i in range(6):
            r = await c.call({"op": "append", "id": i, "role": "u", "content": f"{i}" * 30_000})
            ids.append(r["message_id"])
        h = await c.call({"op": "history", "id": 10, "limit": 10})
        assert h["truncated"] is True
        got = [m["id"] for m in h["messages"]]
        assert got == ids[-len(got) :] and 0 < len(got) < 6  # the newest, oldest-first
        fwd = await c.call({"op": "history", "id": 11, "limit": 10, "after_id": 0})
        assert fwd["truncated"] is True
        assert [m["id"] for m in fwd["messages"]] == ids[: len(fwd["messages"])]
        small = await c.call({"op": "history", "id": 12, "limit": 1})
        assert small["truncated"] is False and [m["id"] for m in small["messages"]] == ids[-1:]


async def test_history_cursors(short_dir: Path) -> None:
    async with running_server(make_config(short_dir, max_messages=0)) as server:
        c = await Raw.connect(server.config.socket)
        r = await c.call(
            {
                "op": "append_many",
                "id": 1,
                "messages": [{"role": "u", "content": str(i)} for i in range(20)],
            }
        )
        ids = r["message_ids"]

        async def hist(**kw: Any) -> list[int]:
            rep = await c.call({"op": "history", "id": 2, **kw})
            return [m["id"] for m in rep["messages"]]

        assert await hist(limit=5) == ids[-5:]
        assert await hist(limit=5, before_id=ids[10]) == ids[5:10]
        assert await hist(limit=5, after_id=ids[10]) == ids[11:16]
        assert await hist(limit=100, after_id=ids[3], before_id=ids[8]) == ids[4:8]
        assert await hist(limit=2, after_id=ids[3], before_id=ids[8]) == ids[4:6]
        assert await hist(limit=5, before_id=ids[0]) == []
        assert await hist(limit=5, session_tag="nobody") == []


async def test_sessions_page_on(short_dir: Path) -> None:
    async with running_server(make_config(short_dir)) as server:
        c = await Raw.connect(server.config.socket)
        for i in range(7):
            await c.call(
                {"op": "append", "id": i, "role": "u", "content": "x", "session_tag": f"tag{i}"}
            )
        page = await c.call({"op": "sessions", "id": 9, "limit": 3})
        assert [s["session_tag"] for s in page["sessions"]] == ["tag0", "tag1", "tag2"] and page[
            "truncated"
        ]
        page = await c.call({"op": "sessions", "id": 9, "limit": 3, "after": "tag5"})
        assert [s["session_tag"] for s in page["sessions"]] == ["tag6"] and not page["truncated"]


async def test_read_your_acked_writes_from_another_connection(short_dir: Path) -> None:
    async with running_server(make_config(short_dir, max_messages=0)) as server:
        w = await Raw.connect(server.config.socket)
        r = await Raw.connect(server.config.socket)
        for i in range(50):
            ack = await w.call({"op": "append", "id": i, "role": "u", "content": str(i)})
            h = await r.call({"op": "history", "id": i, "limit": 1})
            assert h["messages"][0]["id"] == ack["message_id"]


async def test_v1_database_is_served_in_place(short_dir: Path) -> None:
    make_v1_db(
        short_dir / "nexus.db",
        [("user", "old", "09:00:00", "nexus"), ("assistant", "older", "09:00:01", "nexus")],
    )
    async with running_server(make_config(short_dir)) as server:
        c = await Raw.connect(server.config.socket)
        h = await c.call({"op": "history", "id": 1})
        assert [(m["id"], m["content"], m["timestamp"], m["meta"]) for m in h["messages"]] == [
            (1, "old", "09:00:00", None),
            (2, "older", "09:00:01", None),
        ]
        a = await c.call({"op": "append", "id": 2, "role": "u", "content": "new"})
        assert a["message_id"] == 3


async def test_shutdown_answers_queued_writes_and_removes_the_socket(
    short_dir: Path, slow_writer: Callable[[float], None]
) -> None:
    slow_writer(0.02)
    cfg = make_config(short_dir, max_messages=0)
    async with running_server(cfg) as server:
        c = await Raw.connect(cfg.socket)
        await c.stream.send(
            b"".join(
                encode_frame(
                    msgspec.msgpack.encode(
                        {"op": "append", "id": i, "role": "u", "content": str(i)}
                    )
                )
                for i in range(200)
            )
        )
        first = await c.recv()  # at least one committed, the rest in flight
        server.request_shutdown()
        replies = [first] + [await c.recv() for _ in range(199)]
        ok = [r for r in replies if r["op"] == "append"]
        errors = [r for r in replies if r["op"] == "error"]
        assert all(e["code"] == "unavailable" for e in errors)
        assert len(ok) + len(errors) == 200
    assert not cfg.socket.exists()
    conn = sqlite3.connect(cfg.db)
    stored = {r[0] for r in conn.execute("SELECT id FROM nexus_messages")}
    conn.close()
    assert {r["message_id"] for r in ok} <= stored
    assert not Path(f"{cfg.db}-wal").exists() or Path(f"{cfg.db}-wal").stat().st_size == 0


async def test_live_socket_is_not_stolen_and_stale_one_is_replaced(short_dir: Path) -> None:
    cfg = make_config(short_dir)
    async with running_server(cfg):
        other = make_config(short_dir, db=short_dir / "other.db")
        with pytest.raises(StartupError, match="already listening"):
            await Server(other).serve()
        assert not other.db.exists()  # refused before any file of its own was made
    # Leave a stale socket file behind, as a killed daemon would.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(cfg.socket))
    s.close()
    assert cfg.socket.exists()
    async with running_server(cfg) as server:
        c = await Raw.connect(server.config.socket)
        assert (await c.call({"op": "ping", "id": 1}))["op"] == "ping"


async def test_second_daemon_on_the_same_database_is_refused(short_dir: Path) -> None:
    cfg = make_config(short_dir)
    async with running_server(cfg):
        twin = make_config(short_dir, socket=short_dir / "twin.sock")
        with pytest.raises(StartupError, match=f"pid {os.getpid()}"):
            await Server(twin).serve()
        assert not twin.socket.exists()


async def test_socket_is_private_by_default(short_dir: Path) -> None:
    cfg = make_config(short_dir)
    async with running_server(cfg):
        assert (cfg.socket.stat().st_mode & 0o777) == 0o600


async def test_history_of_float_heavy_meta_still_fits_the_frame(short_dir: Path) -> None:
    # 0.5 is 4 bytes of JSON ("0.5,") but 9 of msgpack: the size bound must hold.
    cfg = make_config(
        short_dir, max_frame=64 * 1024, max_meta=16 * 1024, max_content=1024, max_messages=0
    )
    async with running_server(cfg) as server:
        c = await Raw.connect(server.config.socket)
        for i in range(10):
            r = await c.call(
                {"op": "append", "id": i, "role": "u", "content": "x", "meta": {"f": [0.5] * 2000}}
            )
            assert r["op"] == "append", r
        h = await c.call({"op": "history", "id": 99, "limit": 10})
        assert h["op"] == "history", h
        assert h["truncated"] is True and 1 <= len(h["messages"]) < 10
        assert h["messages"][-1]["meta"] == {"f": [0.5] * 2000}


async def test_sessions_pages_fit_a_small_frame(short_dir: Path) -> None:
    cfg = make_config(short_dir, max_frame=64 * 1024, max_meta=16 * 1024, max_content=1024)
    async with running_server(cfg) as server:
        c = await Raw.connect(server.config.socket)
        tags = [f"{i:03d}" + "é" * 250 for i in range(120)]  # ~500 bytes of UTF-8 each
        for i, t in enumerate(tags):
            await c.call({"op": "append", "id": i, "role": "u", "content": "x", "session_tag": t})
        seen: list[str] = []
        after = None
        while True:
            page = await c.call({"op": "sessions", "id": 1, "after": after})
            assert page["op"] == "sessions", page  # never too_large
            seen += [s["session_tag"] for s in page["sessions"]]
            if not page["truncated"]:
                break
            after = seen[-1]
        assert seen == sorted(tags)


def test_at_exit_only_our_own_socket_is_removed(short_dir: Path) -> None:
    from tests.conftest import _new_daemon

    d = _new_daemon(short_dir).start()
    other = short_dir / "backup.db"
    other.write_bytes(b"someone's file")
    os.replace(other, d.socket)  # e.g. a backup written over the socket's name
    assert d.stop() == 0
    assert d.socket.read_bytes() == b"someone's file"
    assert "no longer our socket" in d.log


async def test_append_many_with_a_repeated_key_is_refused_and_stores_nothing(
    short_dir: Path,
) -> None:
    async with running_server(make_config(short_dir)) as server:
        c = await Raw.connect(server.config.socket)
        msgs = [
            {"role": "u", "content": "one", "idem_key": "K"},
            {"role": "u", "content": "mine", "idem_key": "L"},
            {"role": "u", "content": "two", "idem_key": "K"},
        ]
        await c.send({"op": "append_many", "id": 1, "messages": msgs, "session_tag": "k"})
        err = await c.recv()
        assert (err["op"], err["code"], err["field"]) == (
            "error",
            "bad_request",
            "messages[2].idem_key",
        )
        await c.send({"op": "count", "id": 2, "session_tag": "k"})
        assert (await c.recv())["count"] == 0
