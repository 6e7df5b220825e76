"""Python clients: :class:`Client` (blocking) and :class:`AsyncClient` (anyio).

Both speak the protocol of :mod:`nexusd.protocol` over the framing of
:mod:`nexusd.framing` and depend on nothing else of nexusd.  They are twins in
the manner of httpcore: the same methods, the same arguments, the same
results; the request building and reply reading they share lives in the
module-level helpers below, only the I/O differs.

``AsyncClient`` runs under asyncio and trio.  Many tasks may share one: their
calls are pipelined over its single connection and their frames written
together when they are ready in the same turn of the event loop.  ``Client``
is safe to share between threads (one call at a time on its connection).
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import threading
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import anyio
import msgspec
from anyio.abc import SocketStream, TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import protocol as p
from .errors import ConnectionLost, DaemonNotRunning, NexusError, Timeout
from .framing import FrameDecoder, encode_frame
from .paths import resolve_socket_path
from .protocol import DEFAULT_SESSION, Message, SessionInfo

__all__ = ["AsyncClient", "Client", "MessageInput"]

#: An ``append_many`` item: ``(role, content)`` or a mapping with role/content
#: and optional timestamp/meta.
MessageInput = tuple[str, str] | Mapping[str, Any]
R = TypeVar("R")

_CLIENT_NAME = "nexusd-python"
_RECV = 256 * 1024
#: Replies may be as large as the server allows; we accept any sane frame.
_CLIENT_MAX_FRAME = 64 * 1024 * 1024


def _hint(path: os.PathLike[str] | str, why: str) -> str:
    return (
        f"cannot reach nexusd at {path} ({why}). Start the daemon with `nexusd serve`"
        " (or `systemctl --user start nexusd`), or point NEXUSD_SOCKET / socket_path at it."
    )


def _new_messages(messages: Iterable[MessageInput]) -> list[p.NewMessage]:
    out = []
    for item in messages:
        if isinstance(item, Mapping):
            out.append(
                p.NewMessage(
                    role=item["role"],
                    content=item["content"],
                    timestamp=item.get("timestamp"),
                    meta=item.get("meta"),
                )
            )
        else:
            role, content = item
            out.append(p.NewMessage(role=role, content=content))
    return out


def _expect(reply: Any, kind: type[R]) -> R:
    if type(reply) is kind:
        return reply
    if isinstance(reply, p.ErrorReply):
        p.raise_for_error(reply)
    raise NexusError(f"unexpected reply {type(reply).__name__} to a {kind.__name__[:-5]} request")


def _page_on(req: p.History, got: list[Message], page: p.HistoryReply) -> p.History | None:
    """The next history request when the server cut a page short, else None."""
    if not page.truncated or not page.messages or len(got) >= req.limit:
        return None
    rest = req.limit - len(got)
    if req.after_id is None:  # paging back from the newest: continue below the oldest seen
        return p.History(
            id=0,
            session_tag=req.session_tag,
            limit=rest,
            before_id=page.messages[0].id,
            after_id=None,
        )
    return p.History(
        id=0,
        session_tag=req.session_tag,
        limit=rest,
        before_id=req.before_id,
        after_id=page.messages[-1].id,
    )


def _merge(req: p.History, got: list[Message], page: list[Message]) -> list[Message]:
    return page + got if req.after_id is None else got + page


# ── async ────────────────────────────────────────────────────────────────────
class AsyncClient:
    """Asynchronous client for asyncio or trio; use ``async with AsyncClient() as c``."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float | None = 30.0,
    ) -> None:
        self.socket_path = resolve_socket_path(socket_path)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, _Slot] = {}
        self._stream: SocketStream | None = None
        self._tg: TaskGroup | None = None
        self._out_send: MemoryObjectSendStream[bytes] | None = None
        self._broken: NexusError | None = None

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def connect(self) -> None:
        try:
            self._stream = await anyio.connect_unix(self.socket_path)
        except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
            raise DaemonNotRunning(_hint(self.socket_path, exc.strerror or str(exc))) from None
        out_send, out_recv = anyio.create_memory_object_stream[bytes](math.inf)
        self._out_send = out_send
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._receiver, self._stream)
        self._tg.start_soon(self._sender, self._stream, out_recv)

    async def aclose(self) -> None:
        tg, self._tg = self._tg, None
        if tg is None:
            return
        tg.cancel_scope.cancel()
        await tg.__aexit__(None, None, None)
        if self._stream is not None:
            await self._stream.aclose()
        self._fail_all(ConnectionLost("client closed"))

    # ── plumbing ──────────────────────────────────────────────────────────
    async def _sender(self, stream: SocketStream, recv: MemoryObjectReceiveStream[bytes]) -> None:
        try:
            async for first in recv:
                frames = [first]
                while True:
                    try:
                        frames.append(recv.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                await stream.send(b"".join(frames))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self._fail_all(ConnectionLost("connection to nexusd lost while sending"))

    async def _receiver(self, stream: SocketStream) -> None:
        decoder = FrameDecoder(_CLIENT_MAX_FRAME)
        try:
            while True:
                chunk = await stream.receive(_RECV)
                for body in decoder.feed(chunk):
                    reply = p.reply_decoder.decode(body)
                    if reply.id is None:
                        # Not tied to a request: the server is dropping us.
                        assert isinstance(reply, p.ErrorReply)
                        try:
                            p.raise_for_error(reply)
                        except NexusError as err:
                            self._fail_all(err)
                        continue
                    slot = self._pending.pop(reply.id, None)
                    if slot is not None:
                        slot.set(reply)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        except NexusError as err:
            self._fail_all(err)
            return
        self._fail_all(ConnectionLost("nexusd closed the connection"))

    def _fail_all(self, err: NexusError) -> None:
        if self._broken is None:
            self._broken = err
        pending, self._pending = self._pending, {}
        for slot in pending.values():
            slot.set(err)

    async def _call(self, req: Any) -> Any:
        if self._broken is not None:
            raise ConnectionLost(f"connection unusable: {self._broken.message}")
        if self._out_send is None:
            raise ConnectionLost("client is not connected; use `async with AsyncClient()`")
        rid = next(self._ids)
        req = _with_id(req, rid)
        slot = _Slot()
        self._pending[rid] = slot
        self._out_send.send_nowait(encode_frame(p.encoder.encode(req)))
        try:
            with anyio.fail_after(self.timeout):
                await slot.event.wait()
        except TimeoutError:
            self._pending.pop(rid, None)
            raise Timeout(f"no reply from nexusd within {self.timeout}s") from None
        result = slot.value
        if isinstance(result, NexusError):
            raise result
        return result

    # ── API ───────────────────────────────────────────────────────────────
    async def ping(self) -> None:
        """Round-trip to the daemon."""
        _expect(await self._call(p.Ping(id=0)), p.PingReply)

    async def hello(self) -> p.HelloReply:
        """Protocol version and the server's limits."""
        return _expect(await self._call(p.Hello(id=0, client=_CLIENT_NAME)), p.HelloReply)

    async def append(
        self,
        role: str,
        content: str,
        *,
        timestamp: str | None = None,
        session_tag: str = DEFAULT_SESSION,
        meta: Mapping[str, Any] | None = None,
    ) -> int:
        """Store one message; return its id once it is committed."""
        req = p.Append(
            id=0,
            role=role,
            content=content,
            session_tag=session_tag,
            timestamp=timestamp,
            meta=dict(meta) if meta is not None else None,
        )
        return _expect(await self._call(req), p.AppendReply).message_id

    async def append_many(
        self, messages: Iterable[MessageInput], *, session_tag: str = DEFAULT_SESSION
    ) -> list[int]:
        """Store several messages atomically (all or none); return their ids in order."""
        req = p.AppendMany(id=0, messages=_new_messages(messages), session_tag=session_tag)
        return _expect(await self._call(req), p.AppendManyReply).message_ids

    async def get_history(
        self,
        session_tag: str = DEFAULT_SESSION,
        limit: int = 200,
        *,
        before_id: int | None = None,
        after_id: int | None = None,
    ) -> list[Message]:
        """Messages oldest-first; see :class:`Client.get_history` for the cursors."""
        first = p.History(
            id=0, session_tag=session_tag, limit=limit, before_id=before_id, after_id=after_id
        )
        got: list[Message] = []
        req: p.History | None = first
        while req is not None:
            page = _expect(await self._call(req), p.HistoryReply)
            got = _merge(first, got, page.messages)
            req = _page_on(first, got, page)
        return got

    async def message_count(self, session_tag: str = DEFAULT_SESSION) -> int:
        """Number of messages stored for ``session_tag``."""
        return _expect(await self._call(p.Count(id=0, session_tag=session_tag)), p.CountReply).count

    async def sessions(self) -> list[SessionInfo]:
        """Every session tag with its count, first/last id and last timestamp."""
        out: list[SessionInfo] = []
        after: str | None = None
        while True:
            page = _expect(await self._call(p.Sessions(id=0, after=after)), p.SessionsReply)
            out += page.sessions
            if not page.truncated or not page.sessions:
                return out
            after = page.sessions[-1].session_tag

    async def pop(self, session_tag: str = DEFAULT_SESSION) -> Message | None:
        """Remove and return the newest message of ``session_tag`` (None if empty)."""
        return _expect(await self._call(p.Pop(id=0, session_tag=session_tag)), p.PopReply).message

    async def clear(self, session_tag: str = DEFAULT_SESSION) -> int:
        """Delete every message of ``session_tag``; return how many."""
        return _expect(
            await self._call(p.Clear(id=0, session_tag=session_tag)), p.ClearReply
        ).deleted

    async def clear_all(self) -> int:
        """Delete every message of every session; return how many."""
        return _expect(await self._call(p.ClearAll(id=0)), p.ClearAllReply).deleted

    async def stats(self) -> dict[str, Any]:
        """The daemon's counters (queue depth, batches, latencies, ...)."""
        return _expect(await self._call(p.Stats(id=0)), p.StatsReply).stats


class _Slot:
    __slots__ = ("event", "value")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.value: Any = None

    def set(self, value: Any) -> None:
        self.value = value
        self.event.set()


def _with_id(req: Any, rid: int) -> Any:
    return msgspec.structs.replace(req, id=rid)


# ── sync ─────────────────────────────────────────────────────────────────────
class Client:
    """Blocking client.  A context manager; safe to share between threads.

    ``timeout`` (seconds, None for none) bounds connecting and each call.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float | None = 30.0,
    ) -> None:
        self.socket_path = resolve_socket_path(socket_path)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._decoder = FrameDecoder(_CLIENT_MAX_FRAME)
        self._ready: list[bytes] = []

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        with self._lock:
            self._connect()

    def _connect(self) -> None:
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.socket_path))
        except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
            sock.close()
            raise DaemonNotRunning(_hint(self.socket_path, exc.strerror or str(exc))) from None
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._decoder = FrameDecoder(_CLIENT_MAX_FRAME)
        self._ready = []

    def close(self) -> None:
        """Close the connection (idempotent); the next call reconnects."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _call(self, req: Any) -> Any:
        with self._lock:
            self._connect()
            sock = self._sock
            assert sock is not None
            rid = next(self._ids)
            try:
                sock.sendall(encode_frame(p.encoder.encode(_with_id(req, rid))))
                while True:
                    reply = self._next_reply(sock)
                    if reply.id == rid:
                        return reply
                    if reply.id is None:
                        self._drop()
                        return reply
                    # A stale reply to a call that timed out earlier: skip it.
            except TimeoutError:
                self._drop()
                raise Timeout(f"no reply from nexusd within {self.timeout}s") from None
            except OSError as exc:
                self._drop()
                raise ConnectionLost(f"connection to nexusd lost: {exc}") from None
            except NexusError:
                self._drop()
                raise

    def _next_reply(self, sock: socket.socket) -> Any:
        while not self._ready:
            chunk = sock.recv(_RECV)
            if not chunk:
                raise ConnectionLost("nexusd closed the connection")
            self._ready = self._decoder.feed(chunk)
        return p.reply_decoder.decode(self._ready.pop(0))

    # ── API (the twin of AsyncClient) ─────────────────────────────────────
    def ping(self) -> None:
        """Round-trip to the daemon."""
        _expect(self._call(p.Ping(id=0)), p.PingReply)

    def hello(self) -> p.HelloReply:
        """Protocol version and the server's limits."""
        return _expect(self._call(p.Hello(id=0, client=_CLIENT_NAME)), p.HelloReply)

    def append(
        self,
        role: str,
        content: str,
        *,
        timestamp: str | None = None,
        session_tag: str = DEFAULT_SESSION,
        meta: Mapping[str, Any] | None = None,
    ) -> int:
        """Store one message; return its id once it is committed (durable)."""
        req = p.Append(
            id=0,
            role=role,
            content=content,
            session_tag=session_tag,
            timestamp=timestamp,
            meta=dict(meta) if meta is not None else None,
        )
        return _expect(self._call(req), p.AppendReply).message_id

    def append_many(
        self, messages: Iterable[MessageInput], *, session_tag: str = DEFAULT_SESSION
    ) -> list[int]:
        """Store several messages atomically (all or none); return their ids in order."""
        req = p.AppendMany(id=0, messages=_new_messages(messages), session_tag=session_tag)
        return _expect(self._call(req), p.AppendManyReply).message_ids

    def get_history(
        self,
        session_tag: str = DEFAULT_SESSION,
        limit: int = 200,
        *,
        before_id: int | None = None,
        after_id: int | None = None,
    ) -> list[Message]:
        """Messages of ``session_tag``, always oldest-first.

        Without a cursor: the newest ``limit``.  ``before_id``: the newest
        ``limit`` older than it (page back).  ``after_id``: the oldest
        ``limit`` newer than it (page forward).  Both: those strictly between,
        from the ``after_id`` side.  Pages the server cut to fit its frame
        limit are continued transparently.
        """
        first = p.History(
            id=0, session_tag=session_tag, limit=limit, before_id=before_id, after_id=after_id
        )
        got: list[Message] = []
        req: p.History | None = first
        while req is not None:
            page = _expect(self._call(req), p.HistoryReply)
            got = _merge(first, got, page.messages)
            req = _page_on(first, got, page)
        return got

    def message_count(self, session_tag: str = DEFAULT_SESSION) -> int:
        """Number of messages stored for ``session_tag``."""
        return _expect(self._call(p.Count(id=0, session_tag=session_tag)), p.CountReply).count

    def sessions(self) -> list[SessionInfo]:
        """Every session tag with its count, first/last id and last timestamp."""
        out: list[SessionInfo] = []
        after: str | None = None
        while True:
            page = _expect(self._call(p.Sessions(id=0, after=after)), p.SessionsReply)
            out += page.sessions
            if not page.truncated or not page.sessions:
                return out
            after = page.sessions[-1].session_tag

    def pop(self, session_tag: str = DEFAULT_SESSION) -> Message | None:
        """Remove and return the newest message of ``session_tag`` (None if empty)."""
        return _expect(self._call(p.Pop(id=0, session_tag=session_tag)), p.PopReply).message

    def clear(self, session_tag: str = DEFAULT_SESSION) -> int:
        """Delete every message of ``session_tag``; return how many."""
        return _expect(self._call(p.Clear(id=0, session_tag=session_tag)), p.ClearReply).deleted

    def clear_all(self) -> int:
        """Delete every message of every session; return how many."""
        return _expect(self._call(p.ClearAll(id=0)), p.ClearAllReply).deleted

    def stats(self) -> dict[str, Any]:
        """The daemon's counters (queue depth, batches, latencies, ...)."""
        return _expect(self._call(p.Stats(id=0)), p.StatsReply).stats
