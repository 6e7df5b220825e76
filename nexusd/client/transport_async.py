"""How :class:`~nexusd.client.AsyncClient` moves frames: links, and what opens them.

The client (``nexusd/client/client_async.py``) is written once over this
module; its blocking twin is generated from it and runs over
:mod:`nexusd.client.transport_sync`, which offers the same names.  The
interface a link offers the client (:class:`AsyncLink`):

* ``roundtrip(rid, frame, timeout)``: send one frame, return the reply with
  that id (an error reply raised as its exception).  ``timeout`` None waits
  without bound; a number is the call's deadline in seconds, so 0 expires at
  once on every transport (the clients refuse 0 when made).
* ``usable()``: whether a call may be sent now; False once the connection
  broke or the daemon closed it.  ``broken`` then says why, and ``reported``
  whether a caller has already been told.
* ``max_frame``: the daemon's frame limit once learnt; ``aclose()``.

Two links implement it here, both pipelining (many tasks await their replies
at once; frames queued in the same turn of the loop are written together):

* :class:`AnyioLink` works on every backend anyio supports (trio included): a
  receiver task and a sender task around an anyio Unix stream.
* :class:`AsyncioLink` is used when the caller runs on asyncio: the event
  loop's own transport and protocol, with futures resolved straight from
  ``data_received``.  It avoids a ``receive()`` per reply (a failed ``recv``
  plus an epoll registration each time) and an Event and a cancel scope per
  call, which roughly halves the client's cost per request.

:class:`AsyncConnector` opens them (checking who serves the socket before
anything is sent) and owns the task group their tasks run in; the small
helpers at the end are what the client needs of the event loop.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
from collections.abc import Callable
from typing import Any, Final, Protocol, TypeVar, cast

import anyio
from anyio.abc import SocketStream, TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..wire import protocol as p
from ..wire.errors import ConnectionLost, NexusError, Timeout
from .connect import check_server, connect_error
from .replies import RECV_BYTES, ReplyReader
from .stream_async import connect_checked

__all__ = [
    "LINK_SURVIVES_INTERRUPTS",
    "AnyioLink",
    "AsyncCallGate",
    "AsyncConnector",
    "AsyncLink",
    "AsyncLock",
    "AsyncioLink",
    "offload",
    "on_asyncio",
    "shielded",
    "sleep",
]

T = TypeVar("T")


class AsyncLink(Protocol):
    """One connection to the daemon, as the client uses it (see the module doc)."""

    broken: NexusError | None
    reported: bool
    max_frame: int | None

    def usable(self) -> bool: ...

    async def roundtrip(self, rid: int, frame: bytes, timeout: float | None) -> Any: ...

    async def aclose(self) -> None: ...


def on_asyncio() -> bool:
    """Whether the running event loop is asyncio's (under trio there is none)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _reply_or_error(reply: Any) -> Any:
    if isinstance(reply, p.ErrorReply):
        raise p.error_for_reply(reply)
    return reply


# ── any backend ──────────────────────────────────────────────────────────────
class _Slot:
    __slots__ = ("event", "value")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.value: Any = None

    def set(self, value: Any) -> None:
        self.value = value
        self.event.set()


class AnyioLink:
    """A connection driven by two anyio tasks (receiver, sender)."""

    def __init__(self, stream: SocketStream, tg: TaskGroup) -> None:
        self.stream = stream
        self.pending: dict[int, _Slot] = {}
        self.broken: NexusError | None = None
        #: Whether some caller has been told that this connection broke.
        self.reported = False
        #: The server's frame limit once learnt.
        self.max_frame: int | None = None
        self.out_send: MemoryObjectSendStream[bytes]
        self.out_recv: MemoryObjectReceiveStream[bytes]
        # Unbounded: a call puts exactly one frame and then waits for its reply.
        self.out_send, self.out_recv = anyio.create_memory_object_stream[bytes](math.inf)
        tg.start_soon(self._receiver)
        tg.start_soon(self._sender)

    def usable(self) -> bool:
        return self.broken is None

    def fail(self, err: NexusError) -> None:
        if self.broken is None:
            self.broken = err
        self.out_send.close()
        pending, self.pending = self.pending, {}
        self.reported = self.reported or bool(pending)
        for slot in pending.values():
            slot.set(err)

    async def roundtrip(self, rid: int, frame: bytes, timeout: float | None) -> Any:
        slot = _Slot()
        self.pending[rid] = slot
        try:
            self.out_send.send_nowait(frame)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.pending.pop(rid, None)
            raise ConnectionLost("connection to nexusd lost") from None
        try:
            with anyio.fail_after(timeout):
                await slot.event.wait()
        except TimeoutError:
            self.pending.pop(rid, None)
            raise Timeout(f"no reply from nexusd within {timeout}s") from None
        if isinstance(slot.value, NexusError):
            raise slot.value
        return _reply_or_error(slot.value)

    async def aclose(self) -> None:
        self.fail(ConnectionLost("client closed"))
        # Close rather than cancel: on asyncio, cancelling a receive() on a Unix
        # stream can race its reader callback (anyio issue 1267).
        with anyio.CancelScope(shield=True):
            await self.stream.aclose()

    async def _sender(self) -> None:
        recv = self.out_recv
        try:
            async for first in recv:
                frames = [first]
                while True:
                    try:
                        frames.append(recv.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                await self.stream.send(b"".join(frames))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self.fail(ConnectionLost("connection to nexusd lost while sending"))

    async def _receiver(self) -> None:
        reader = ReplyReader()
        err: NexusError = ConnectionLost("nexusd closed the connection")
        try:
            while True:
                chunk = await self.stream.receive(RECV_BYTES)
                for reply in reader.feed(chunk):
                    if reply.id is None:  # not tied to a request: we are being dropped
                        err = p.error_for_reply(reply)
                        continue
                    slot = self.pending.pop(reply.id, None)
                    if slot is not None:
                        slot.set(reply)
        except NexusError as exc:  # not a reply, or too large: the stream is out of step
            err = exc  # (first: ConnectionLost is an OSError too)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        self.fail(err)
        with anyio.CancelScope(shield=True):
            await self.stream.aclose()


# ── asyncio fast path ────────────────────────────────────────────────────────
class AsyncioLink(asyncio.Protocol):
    """A connection as an asyncio protocol; replies resolve futures directly."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.get_running_loop()
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.broken: NexusError | None = None
        #: Whether some caller has been told that this connection broke.
        self.reported = False
        #: The server's frame limit once learnt.
        self.max_frame: int | None = None
        self.transport: asyncio.Transport | None = None
        self._reader = ReplyReader()
        self._out: list[bytes] = []
        self._flush: asyncio.Handle | None = None
        self._error: NexusError = ConnectionLost("nexusd closed the connection")
        self._can_write: asyncio.Future[None] | None = None

    @classmethod
    async def open(cls, path: str) -> AsyncioLink:
        _, link = await asyncio.get_running_loop().create_unix_connection(cls, path)
        return link

    def raw_socket(self) -> socket.socket:
        """The connected socket (for ``SO_PEERCRED``)."""
        assert self.transport is not None
        return cast(socket.socket, self.transport.get_extra_info("socket"))

    def usable(self) -> bool:
        return self.broken is None

    # protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            replies = self._reader.feed(data)
        except NexusError as exc:  # not a reply, or too large: the stream is out of step
            self._fail(exc)
            if self.transport is not None:
                self.transport.abort()
            return
        for reply in replies:
            if reply.id is None:  # not tied to a request: we are being dropped
                self._error = p.error_for_reply(reply)
                continue
            fut = self.pending.pop(reply.id, None)
            if fut is not None and not fut.done():
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(self._error)

    def pause_writing(self) -> None:
        self._can_write = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)
        self._can_write = None

    def _fail(self, err: NexusError) -> None:
        if self.broken is None:
            self.broken = err
        pending, self.pending = self.pending, {}
        self.reported = self.reported or bool(pending)
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(err)
        self.resume_writing()  # wake callers waiting for write room: they will see `broken`

    def _write_out(self) -> None:
        self._flush = None
        out, self._out = self._out, []
        if self.transport is not None and self.broken is None and out:
            self.transport.write(b"".join(out))

    async def roundtrip(self, rid: int, frame: bytes, timeout: float | None) -> Any:
        if self.broken is not None:
            raise ConnectionLost(f"connection unusable: {self.broken.message}")
        if self._can_write is not None:  # the daemon is not reading: do not pile up
            await self._can_write
            if self.broken is not None:
                raise ConnectionLost(f"connection unusable: {self.broken.message}")
        fut = self.loop.create_future()
        self.pending[rid] = fut
        self._out.append(frame)
        if self._flush is None:  # frames of this turn of the loop go out together
            self._flush = self.loop.call_soon(self._write_out)
        # None is no bound; any number is a deadline, 0 included (as anyio's fail_after).
        timer = None if timeout is None else self.loop.call_later(timeout, _expire, fut, timeout)
        try:
            reply = await fut
        finally:
            if timer is not None:
                timer.cancel()
            self.pending.pop(rid, None)
        return _reply_or_error(reply)

    async def aclose(self) -> None:
        self._fail(ConnectionLost("client closed"))
        if self.transport is not None:
            self.transport.close()


def _expire(fut: asyncio.Future[Any], timeout: float) -> None:
    if not fut.done():
        fut.set_exception(Timeout(f"no reply from nexusd within {timeout}s"))


# ── opening links ────────────────────────────────────────────────────────────
class AsyncConnector:
    """Opens an :class:`~nexusd.client.AsyncClient`'s links and owns their task group.

    Like any anyio task group it is entered and left by the same task, so an
    ``AsyncClient`` is entered (``async with``) before its first call, and
    several clients opened in one task close in reverse order (``async with``,
    or :class:`contextlib.AsyncExitStack`).
    """

    __slots__ = ("_tg",)

    def __init__(self) -> None:
        self._tg: TaskGroup | None = None

    async def start(self) -> None:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg

    async def aclose(self) -> None:
        """Cancel the links' tasks and leave the task group (idempotent)."""
        tg, self._tg = self._tg, None
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)

    async def open(self, path: os.PathLike[str] | str, trusted: frozenset[int]) -> AsyncLink:
        """A new link to ``path``, once its server's uid is known to be ``trusted``."""
        if self._tg is None:
            raise ConnectionLost("client is not open; use `async with AsyncClient()`")
        try:
            if on_asyncio():
                link = await AsyncioLink.open(str(path))
                try:
                    check_server(link.raw_socket(), path, trusted)
                except BaseException:
                    await link.aclose()
                    raise
                return link
        except OSError as exc:
            raise connect_error(path, exc) from None
        # Checked before the link exists: its sender cannot have sent anything.
        return AnyioLink(await connect_checked(path, trusted), self._tg)


# ── what the client needs of the event loop ──────────────────────────────────
class AsyncCallGate:
    """Admits every call at once: a link pipelines, so tasks need not wait for each other."""

    __slots__ = ()

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


#: Serialises reconnecting: one reconnect for all the tasks that found the link broken.
AsyncLock = anyio.Lock

#: A cancellation lands at an ``await``, between frames: the link stays usable
#: (and other tasks keep using it), so a cancelled backup still says goodbye.
LINK_SURVIVES_INTERRUPTS: Final = True

sleep = anyio.sleep


async def offload(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking file work (backup writes) on a worker thread."""
    return await anyio.to_thread.run_sync(fn, *args)


def shielded() -> anyio.CancelScope:
    """A scope cancellation cannot interrupt: for the goodbye of a cancelled call."""
    return anyio.CancelScope(shield=True)
