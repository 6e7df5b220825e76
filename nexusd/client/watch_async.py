"""Following a conversation as it is written: the watch iterator, written once (async).

``client.watch(...)`` (:meth:`AsyncWatching.watch`, a method of every client)
returns one :class:`AsyncWatcher`: ``async for m in w`` yields each message in
id order as it is committed, after the stored ones past ``after_id`` when
given.  ``scripts/unasync.py`` writes the blocking twin, ``watch_sync.py``,
from ``watch_async.py``; the only hand-written difference is the connection
(the ``stream_*.py`` pair).

Each watch has a connection of its own, opened like the client's (socket
path, trusted uids, timeout), so it never holds up the client's calls and a
blocking client stays one socket per call.  ``timeout`` bounds connecting,
sending and each frame until the stored messages are sent; after that the
watch waits for new ones without bound.

**Resuming.**  The watch ends when it fell too far behind (``lagged``), when
the daemon shuts down (``unavailable``) or the connection drops (restart):
the iterator then opens a new one with ``after_id`` = the id of the last
message it received, at once after ``lagged``, otherwise with the client's
backoff within ``retry_for`` (the first-contact rule included), and never
yields a message whose id is not above the last one received.  Nothing is lost
that is still stored; removals that happened while it was disconnected are not
reported (they cannot be asked for afterwards).

**From now on.**  A watch without ``after_id`` does not send ``after_id`` nil:
it first asks the daemon for the newest id it covers (the session's newest
message, or the newest of every session with ``all``) and watches after that.
A watch from nil would give a resume nothing to start from until the first
message arrived, and what was committed while it was disconnected would be
lost; this one is lossless from its first frame.  What is committed once
:meth:`AsyncWatcher.start` returned (or the ``with`` block was entered) is
yielded.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar, cast, overload

import msgspec

from ..wire import protocol as p
from ..wire.errors import ConnectionLost, Lagged, NexusError
from ..wire.framing import encode_frame
from ..wire.protocol import DEFAULT_SESSION, Message, Removal
from .replies import expect
from .requests import encode, history_request
from .retry import RETRY_ON, backoff, give_up
from .stream_async import AsyncFrameStream, sleep

__all__ = ["AsyncWatcher", "AsyncWatching"]

T = TypeVar("T", covariant=True)


class AsyncWatcher(Generic[T]):
    """One watch: iterate it (``async for``) for what is written; close it when done.

    Used as a context manager (``async with client.watch() as w:``) the watch is
    open when the block starts and closed when it ends.  Otherwise the first
    iteration opens it and :meth:`aclose` closes it; an interrupted iteration
    (a cancellation, Ctrl-C) closes the connection, and iterating again
    watches again from the last id.
    """

    def __init__(
        self,
        socket_path: Path,
        trusted: frozenset[int],
        *,
        timeout: float | None,
        retry_for: float,
        ever_connected: bool,
        session_tag: str,
        all: bool,
        after_id: int | None,
        removals: bool,
    ) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.retry_for = retry_for
        self.session_tag = session_tag
        self.all = all
        self.removals = removals
        #: The id of the last message yielded (None: none yet).
        self.last_id: int | None = None
        #: How many times the watch was opened again after it ended.
        self.resumes = 0
        self._trusted = trusted
        self._cursor = after_id  # the next watch starts after it: the last id received
        self._ids = itertools.count(1)
        self._rid = 0
        self._stream: AsyncFrameStream | None = None
        self._watching = False  # a watch request went out once (a later one is a resume)
        self._answered = False  # the current connection's watch has sent a frame
        self._live = False  # ... and the one saying the stored messages are all sent
        self._queue: deque[Message | Removal] = deque()
        self._closed = False
        self._ever_connected = ever_connected
        self._deadline: float | None = None  # when the current run of failures gives up
        self._delay = 0.0
        encode(self._request())  # the caller's mistakes before any I/O

    @property
    def buffered(self) -> int:
        """How many items have been received and not yielded yet (the next comes at once)."""
        return len(self._queue)

    async def __aenter__(self) -> AsyncWatcher[T]:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncWatcher[T]:
        return self

    async def __anext__(self) -> T:
        while not self._queue:
            if self._closed:
                await self._drop()  # closed from elsewhere while it was connecting
                raise StopAsyncIteration
            await self._step()
        item = self._queue.popleft()
        if type(item) is Message:
            self.last_id = item.id
        return cast(T, item)

    async def start(self) -> None:
        """Open the watch now rather than on the first iteration (idempotent).

        Returns once the daemon sent the watch's first frame: what is committed
        from then on is yielded, and a request it refused is raised here.
        """
        while not self._closed and not self._answered:
            await self._step()
        if self._closed:
            await self._drop()

    async def aclose(self) -> None:
        """Stop watching and close the connection (idempotent; from another thread too)."""
        self._closed = True
        self._queue.clear()
        await self._drop()

    # ── plumbing ──────────────────────────────────────────────────────────
    def _request(self) -> p.Watch:
        return p.Watch(
            id=self._rid, session_tag=self.session_tag, all=self.all, after_id=self._cursor
        )

    async def _step(self) -> None:
        """Receive one frame and queue what it brings; after a failure, watch again."""
        try:
            if self._stream is None:
                await self._open()
                return
            reply = await self._stream.receive(None if self._live else self.timeout)
            self._take(reply)
        except Lagged:
            # The daemon ended it for falling behind: what was sent has been
            # received, so a new watch from the last id loses nothing.  At once:
            # the daemon is up.
            await self._drop()
        except RETRY_ON as exc:
            await self._drop()
            if self._closed:  # closed by its owner meanwhile: not a failure
                return
            now = time.monotonic()
            if self._deadline is None:
                self._deadline = now + self.retry_for
            self._delay = backoff(exc, self._delay)
            late = now + self._delay > self._deadline
            if give_up(self._request(), exc, ever_connected=self._ever_connected, late=late):
                self._closed = True
                raise
            await sleep(self._delay)
        except NexusError:
            await self._drop()
            self._closed = True  # refused, or not to be retried: the watch is over
            raise
        except BaseException:
            # Interrupted (cancelled, Ctrl-C), maybe mid-frame: this connection is
            # not trusted again; iterating again opens a new one.
            await self._drop()
            raise

    async def _open(self) -> None:
        stream = await AsyncFrameStream.open(self.socket_path, self._trusted)
        self._stream = stream
        self._ever_connected = True
        if self._closed:  # closed by its owner while connecting
            await self._drop()
            return
        if self._cursor is None:
            self._cursor = await self._newest(stream)
        self._rid = next(self._ids)
        await stream.send(encode_frame(encode(self._request())), self.timeout)
        if self._watching:
            self.resumes += 1
        self._watching = True

    async def _newest(self, stream: AsyncFrameStream) -> int:
        """The newest id the watch covers now (0: none): where "from now on" starts."""
        if not self.all:
            req = history_request(self.session_tag, 1, None, None)
            page = expect(await self._ask(stream, req), p.HistoryReply)
            return page.messages[-1].id if page.messages else 0
        newest = 0
        after: str | None = None
        while True:
            reply = await self._ask(stream, p.Sessions(id=0, after=after))
            found = expect(reply, p.SessionsReply)
            newest = max([newest, *(s.last_id for s in found.sessions)])
            if not found.truncated or not found.sessions:
                return newest
            after = found.sessions[-1].session_tag

    async def _ask(self, stream: AsyncFrameStream, req: Any) -> Any:
        rid = next(self._ids)
        await stream.send(encode_frame(encode(msgspec.structs.replace(req, id=rid))), self.timeout)
        while True:
            reply = await stream.receive(self.timeout)
            if reply.id == rid or reply.id is None:
                return reply

    def _take(self, reply: Any) -> None:
        """Queue what one frame of the watch brings, without what was received already."""
        if reply.id is not None and reply.id != self._rid:
            return  # not this watch's (nothing else is asked on this connection)
        if type(reply) is p.WatchReply:
            # The watch works again: a later failure gets a retry_for of its own.
            self._answered = True
            self._deadline, self._delay = None, 0.0
            self._live = self._live or reply.live
            cursor = self._cursor
            for m in reply.messages:
                if cursor is None or m.id > cursor:
                    self._queue.append(m)
                    cursor = m.id
            self._cursor = cursor
            if self.removals:
                self._queue.extend(reply.removed)
            return
        if type(reply) is p.ErrorReply:
            raise p.error_for_reply(reply)
        raise ConnectionLost(f"unexpected {type(reply).__name__} reply on a watch")

    async def _drop(self) -> None:
        stream, self._stream = self._stream, None
        self._answered = self._live = False
        if stream is not None:
            await stream.aclose()


class AsyncWatching:
    """What a client offers for watching: :meth:`watch` (the client supplies its settings)."""

    socket_path: Path
    timeout: float | None
    retry_for: float
    _trusted: frozenset[int]
    _was_connected: bool

    @overload
    def watch(
        self,
        session_tag: str = ...,
        *,
        all: bool = ...,
        after_id: int | None = ...,
        removals: Literal[False] = ...,
    ) -> AsyncWatcher[Message]: ...

    @overload
    def watch(
        self,
        session_tag: str = ...,
        *,
        all: bool = ...,
        after_id: int | None = ...,
        removals: bool,
    ) -> AsyncWatcher[Message | Removal]: ...

    def watch(
        self,
        session_tag: str = DEFAULT_SESSION,
        *,
        all: bool = False,
        after_id: int | None = None,
        removals: bool = False,
    ) -> AsyncWatcher[Any]:
        """Follow ``session_tag`` (or with ``all=True`` every session you may see).

        Yields each :class:`~nexusd.wire.protocol.Message` in id order as it is
        committed: from now on, or first the stored ones with an id above
        ``after_id``.  ``removals=True`` also yields a
        :class:`~nexusd.wire.protocol.Removal` for what ``pop``, ``clear``,
        ``clear_all`` and retention delete, in stream order.  It resumes by
        itself after ``lagged``, a restart or a dropped connection, losing
        nothing still stored (see :mod:`nexusd.client.watch_async`).  Its
        ``last_id`` is the last message's id yielded.  Use it as a context
        manager, or close it (``aclose()``), to end it promptly.
        """
        return AsyncWatcher(
            self.socket_path,
            self._trusted,
            timeout=self.timeout,
            retry_for=self.retry_for,
            ever_connected=self._was_connected,
            session_tag=session_tag,
            all=all,
            after_id=after_id,
            removals=removals,
        )
