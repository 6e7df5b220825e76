"""Python clients: :class:`Client` (blocking) and :class:`AsyncClient` (anyio).

Both speak :mod:`nexusd.protocol` over :mod:`nexusd.framing`.  They are twins
in the manner of httpcore: the same methods, arguments and results; what they
share (requests, replies, paging, retry policy) lives in :mod:`nexusd.calls`
and only the I/O differs here.

``AsyncClient`` runs under asyncio and trio.  Many tasks may share one: their
calls are pipelined over one connection and frames ready in the same turn of
the event loop go out in one write.  ``Client`` is safe to share between
threads (one call at a time on its connection).

Before sending anything on a new connection, both check who serves the socket
(``SO_PEERCRED``): their own uid, root (socket activation), the ``nexusd``
service user, or a uid given in ``trusted_uids=`` / ``$NEXUSD_TRUSTED_UIDS``;
anyone else gets :class:`~nexusd.errors.Forbidden` and not one byte.  A
request over 64 KiB is checked against the server's ``max_frame`` (learnt from
``hello`` once per connection) and refused locally with
:class:`~nexusd.errors.TooLarge` rather than sent to be cut off.

Both survive a daemon restart: appends carry idempotency keys (unless
``idempotent_appends=False``), so when the connection drops before the answer
arrives the call reconnects and resends, and the daemon returns the original
id instead of storing a copy.  Reads are retried the same way; ``pop``,
``clear`` and ``clear_all`` never are.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import anyio
import msgspec
from anyio.abc import SocketAttribute, TaskGroup

from ..wire import protocol as p
from ..wire.errors import ConnectionLost, DaemonNotRunning, NexusError, Timeout
from ..wire.framing import FrameDecoder, encode_frame
from ..wire.paths import resolve_socket_path
from ..wire.protocol import DEFAULT_SESSION, Message, SessionInfo
from . import requests as calls
from .requests import MessageInput, Progress
from .transport import AnyioLink, AsyncioLink, on_asyncio

__all__ = ["AsyncClient", "Client", "MessageInput"]

logger = logging.getLogger(__name__)

_with_id = msgspec.structs.replace


# ── async ────────────────────────────────────────────────────────────────────
class AsyncClient:
    """Asynchronous client for asyncio or trio: ``async with AsyncClient() as c``.

    ``timeout`` bounds each call: seconds > 0 and at most a day
    (:data:`~nexusd.calls.MAX_TIMEOUT`), or None for no bound; anything else
    (1e12 would overflow the OS timers) is :class:`~nexusd.errors.BadRequest`
    with ``field="timeout"`` when the client is made.  ``retry_for`` is how long a
    call may keep reconnecting and resending after the connection dropped or
    the daemon said ``unavailable``/``overloaded`` (0 disables retries).
    ``trusted_uids`` adds uids accepted as the daemon's (see the module doc).

    Like any anyio task group, a client is entered and left by the same task;
    several clients opened in one task close in reverse order (``async with``,
    or :class:`contextlib.AsyncExitStack`).
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float | None = 30.0,
        retry_for: float = 30.0,
        idempotent_appends: bool = True,
        trusted_uids: Iterable[int] | None = None,
    ) -> None:
        calls.check_socket_path(socket_path)
        self.socket_path = resolve_socket_path(socket_path)
        self.timeout = calls.check_timeout(timeout)
        self.retry_for = calls.check_retry_for(retry_for)
        self._trusted = calls.trusted_uids(trusted_uids)
        self._keys = calls.KeyMaker() if idempotent_appends else None
        self._ids = itertools.count(1)
        self._tg: TaskGroup | None = None
        self._link: AnyioLink | AsyncioLink | None = None
        self._connect_lock = anyio.Lock()

    async def __aenter__(self) -> AsyncClient:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            self._link = await self._open()
        except BaseException:
            tg, self._tg = self._tg, None
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection; pending calls fail with :class:`ConnectionLost`."""
        tg, self._tg = self._tg, None
        if tg is None:
            return
        link, self._link = self._link, None
        if link is not None:
            await link.aclose()
        tg.cancel_scope.cancel()
        await tg.__aexit__(None, None, None)

    # ── plumbing ──────────────────────────────────────────────────────────
    async def _open(self) -> AnyioLink | AsyncioLink:
        if self._tg is None:
            raise ConnectionLost("client is not open; use `async with AsyncClient()`")
        path = self.socket_path
        try:
            if on_asyncio():
                link = await AsyncioLink.open(str(path))
                try:
                    calls.check_server(link.raw_socket(), path, self._trusted)
                except BaseException:
                    await link.aclose()
                    raise
                return link
            stream = await anyio.connect_unix(path)
        except OSError as exc:
            raise calls.connect_error(path, exc) from None
        try:
            # Before the link exists: its sender cannot have sent anything.
            calls.check_server(stream.extra(SocketAttribute.raw_socket), path, self._trusted)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            raise
        return AnyioLink(stream, self._tg)

    async def _current_link(self) -> AnyioLink | AsyncioLink:
        link = self._link
        if link is not None and link.broken is None:
            return link
        if (
            link is not None
            and link.broken is not None
            and not link.reported
            and self.retry_for <= 0
        ):
            # As the blocking client: with retries off, a connection that broke
            # while idle fails one call (nothing sent); the next one reconnects.
            link.reported = True
            raise ConnectionLost(
                f"connection to nexusd lost ({link.broken.message}); the next call reconnects"
            )
        async with self._connect_lock:  # one reconnect for all waiting callers
            link = self._link
            if link is not None and link.broken is None:
                return link
            self._link = await self._open()
            return self._link

    async def _call_once(self, req: Any) -> Any:
        rid = next(self._ids)
        body = calls.encode(_with_id(req, id=rid))  # the caller's mistakes before any I/O
        link = await self._current_link()
        if len(body) > calls.SMALL_FRAME:
            if link.max_frame is None:
                hello = p.Hello(id=next(self._ids), client=calls.CLIENT_NAME)
                frame = encode_frame(p.encoder.encode(hello))
                reply = await link.roundtrip(hello.id, frame, self.timeout)
                link.max_frame = calls.frame_limit(calls.expect(reply, p.HelloReply))
            calls.check_frame(len(body), link.max_frame)
        return await link.roundtrip(rid, encode_frame(body), self.timeout)

    async def _call(self, req: Any) -> Any:
        deadline = time.monotonic() + self.retry_for
        delay = 0.0
        while True:
            try:
                return await self._call_once(req)
            except calls.RETRY_ON as exc:
                delay = calls.backoff(exc, delay)
                if not calls.worth_retrying(req, exc) or time.monotonic() + delay > deadline:
                    raise
            await anyio.sleep(delay)

    # ── API ───────────────────────────────────────────────────────────────
    async def ping(self) -> None:
        """Round-trip to the daemon."""
        calls.expect(await self._call(p.Ping(id=0)), p.PingReply)

    async def hello(self) -> p.HelloReply:
        """Protocol version and the server's limits."""
        return calls.expect(await self._call(p.Hello(id=0, client=calls.CLIENT_NAME)), p.HelloReply)

    async def append(
        self,
        role: str,
        content: str,
        *,
        timestamp: str | None = None,
        session_tag: str = DEFAULT_SESSION,
        meta: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> int:
        """Store one message; return its id once it is committed."""
        req = calls.append_request(
            self._keys, role, content, timestamp, session_tag, meta, idempotency_key
        )
        return calls.expect(await self._call(req), p.AppendReply).message_id

    async def append_many(
        self, messages: Iterable[MessageInput], *, session_tag: str = DEFAULT_SESSION
    ) -> list[int]:
        """Store several messages atomically (all or none); return their ids in order."""
        req = calls.append_many_request(self._keys, messages, session_tag)
        return calls.expect(await self._call(req), p.AppendManyReply).message_ids

    async def get_history(
        self,
        session_tag: str = DEFAULT_SESSION,
        limit: int = 200,
        *,
        before_id: int | None = None,
        after_id: int | None = None,
    ) -> list[Message]:
        """Messages oldest-first; the cursors are those of :meth:`Client.get_history`."""
        first = calls.history_request(session_tag, limit, before_id, after_id)
        got: list[Message] = []
        req: p.History | None = first
        while req is not None:
            page = calls.expect(await self._call(req), p.HistoryReply)
            got = calls.merge(first, got, page.messages)
            req = calls.next_page(first, got, page)
        return got

    async def message_count(self, session_tag: str = DEFAULT_SESSION) -> int:
        """Number of messages stored for ``session_tag``."""
        reply = await self._call(p.Count(id=0, session_tag=session_tag))
        return calls.expect(reply, p.CountReply).count

    async def sessions(self) -> list[SessionInfo]:
        """Every session tag with its count, first/last id and last timestamp."""
        out: list[SessionInfo] = []
        after: str | None = None
        while True:
            page = calls.expect(await self._call(p.Sessions(id=0, after=after)), p.SessionsReply)
            out += page.sessions
            if not page.truncated or not page.sessions:
                return out
            after = page.sessions[-1].session_tag

    async def pop(self, session_tag: str = DEFAULT_SESSION) -> Message | None:
        """Remove and return the newest message of ``session_tag`` (None if empty)."""
        return calls.expect(
            await self._call(p.Pop(id=0, session_tag=session_tag)), p.PopReply
        ).message

    async def clear(self, session_tag: str = DEFAULT_SESSION) -> int:
        """Delete every message of ``session_tag``; return how many."""
        reply = await self._call(p.Clear(id=0, session_tag=session_tag))
        return calls.expect(reply, p.ClearReply).deleted

    async def clear_all(self) -> int:
        """Delete every message of every session; return how many."""
        return calls.expect(await self._call(p.ClearAll(id=0)), p.ClearAllReply).deleted

    async def stats(self) -> dict[str, Any]:
        """The daemon's counters (queue depth, batches, latencies, ...)."""
        return calls.expect(await self._call(p.Stats(id=0)), p.StatsReply).stats

    async def backup(
        self, dest: str | os.PathLike[str], *, progress: Progress | None = None
    ) -> int:
        """Write a consistent copy of the database to ``dest``; return its size in bytes.

        As :meth:`Client.backup`.
        """
        target = calls.BackupTarget(dest)  # the caller's mistakes first, before any I/O
        try:
            chunk = calls.backup_chunk(await self.hello())
            begin = calls.expect(await self._call(p.BackupBegin(id=0)), p.BackupBeginReply)
            try:
                target.refuse_live(begin.files)
                offset = 0
                while True:
                    req = p.BackupRead(id=0, backup=begin.backup, offset=offset, length=chunk)
                    part = calls.expect(await self._call(req), p.BackupReadReply)
                    await anyio.to_thread.run_sync(target.write, part.data)
                    offset += len(part.data)
                    if progress is not None:
                        progress(offset, begin.size)
                    if part.eof or not part.data:
                        break
                await anyio.to_thread.run_sync(target.commit)
            finally:
                with anyio.CancelScope(shield=True):
                    try:
                        await self._call(p.BackupEnd(id=0, backup=begin.backup))
                    except NexusError as exc:  # closing the connection releases it too
                        logger.debug("backup_end failed: %s", exc)
        finally:
            target.discard()
        return offset


# ── sync ─────────────────────────────────────────────────────────────────────
class Client:
    """Blocking client; a context manager, safe to share between threads.

    ``timeout`` (seconds > 0, at most a day; None for none) bounds each call;
    it, ``retry_for``, ``idempotent_appends`` and ``trusted_uids`` are as for
    :class:`AsyncClient`.  The connection is opened on first use and reopened
    after a failure, or when the daemon closed it meanwhile (idle timeout,
    restart): that is noticed before a call is sent, so even a ``pop`` that is
    never resent does not fail for it.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float | None = 30.0,
        retry_for: float = 30.0,
        idempotent_appends: bool = True,
        trusted_uids: Iterable[int] | None = None,
    ) -> None:
        calls.check_socket_path(socket_path)
        self.socket_path = resolve_socket_path(socket_path)
        self.timeout = calls.check_timeout(timeout)
        self.retry_for = calls.check_retry_for(retry_for)
        self._trusted = calls.trusted_uids(trusted_uids)
        self._keys = calls.KeyMaker() if idempotent_appends else None
        self._ids = itertools.count(1)
        self._max_frame: int | None = None  # the server's, learnt when first needed
        self._poller: select.poll | None = None
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._decoder = FrameDecoder(calls.CLIENT_MAX_FRAME)
        self._ready: list[bytes] = []
        self._was_connected = False

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        """Open the connection now rather than on first use."""
        with self._lock:
            self._connect()

    def close(self) -> None:
        """Close the connection (idempotent); the next call reconnects."""
        with self._lock:
            self._drop()

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            if self._still_open(self._sock):
                return self._sock
            self._drop()
            if self.retry_for <= 0:
                # Nothing was sent; reopening is up to the retry policy, which is off.
                raise ConnectionLost("nexusd closed the connection; the next call reconnects")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Connect blocking: a full accept backlog then waits instead of failing
        # with EAGAIN (which a socket with a timeout reports at once).
        try:
            sock.connect(str(self.socket_path))
            calls.check_server(sock, self.socket_path, self._trusted)
        except OSError as exc:
            sock.close()
            raise calls.connect_error(self.socket_path, exc) from None
        except BaseException:
            sock.close()
            raise
        sock.settimeout(self.timeout)
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self._sock = sock
        self._decoder = FrameDecoder(calls.CLIENT_MAX_FRAME)
        self._ready = []
        self._max_frame = None
        self._was_connected = True
        return sock

    def _still_open(self, sock: socket.socket) -> bool:
        """Whether the daemon has not closed (or begun closing) this connection.

        One zero-timeout ``poll``: usually nothing to read.  Bytes waiting
        between calls are late replies to calls that timed out (skipped as
        usual) or the daemon's parting error (id nil); EOF means it closed.
        """
        poller = self._poller
        try:
            while poller is not None and poller.poll(0):
                chunk = sock.recv(calls.RECV_BYTES)  # readable: returns at once
                if not chunk:
                    return False
                self._ready += self._decoder.feed(chunk)
                for body in self._ready:
                    if p.reply_decoder.decode(body).id is None:
                        return False
        except (OSError, NexusError, msgspec.DecodeError):
            return False
        return True

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _call_once(self, req: Any) -> Any:
        rid = next(self._ids)
        body = calls.encode(_with_id(req, id=rid))  # the caller's mistakes before any I/O
        sock = self._connect()
        if len(body) > calls.SMALL_FRAME:
            if self._max_frame is None:
                hello = p.Hello(id=next(self._ids), client=calls.CLIENT_NAME)
                reply = self._roundtrip(sock, hello.id, encode_frame(p.encoder.encode(hello)))
                self._max_frame = calls.frame_limit(calls.expect(reply, p.HelloReply))
            # Refused here, before sending: the connection stays usable.
            calls.check_frame(len(body), self._max_frame)
        return self._roundtrip(sock, rid, encode_frame(body))

    def _roundtrip(self, sock: socket.socket, rid: int, frame: bytes) -> Any:
        """Send one frame and return its reply; errors raised, the socket dropped if unusable."""
        try:
            sock.sendall(frame)
            while True:
                reply = self._next_reply(sock)
                if reply.id == rid or reply.id is None:
                    break
                # else: a late reply to an earlier call that timed out; skip it.
        except TimeoutError:
            self._drop()
            raise Timeout(f"no reply from nexusd within {self.timeout}s") from None
        except OSError as exc:
            self._drop()
            raise ConnectionLost(f"connection to nexusd lost: {exc}") from None
        except (NexusError, msgspec.DecodeError):
            self._drop()
            raise
        if isinstance(reply, p.ErrorReply):
            if reply.id is None:
                self._drop()
            raise p.error_for_reply(reply)
        return reply

    def _next_reply(self, sock: socket.socket) -> Any:
        while not self._ready:
            chunk = sock.recv(calls.RECV_BYTES)
            if not chunk:
                raise ConnectionLost("nexusd closed the connection")
            self._ready = self._decoder.feed(chunk)
        return p.reply_decoder.decode(self._ready.pop(0))

    def _call(self, req: Any) -> Any:
        deadline = time.monotonic() + self.retry_for
        delay = 0.0
        with self._lock:
            while True:
                try:
                    return self._call_once(req)
                except calls.RETRY_ON as exc:
                    delay = calls.backoff(exc, delay)
                    # Never wait for a daemon that was not running to begin with.
                    first_contact = isinstance(exc, DaemonNotRunning) and not self._was_connected
                    late = time.monotonic() + delay > deadline
                    if first_contact or late or not calls.worth_retrying(req, exc):
                        raise
                time.sleep(delay)

    # ── API (the twin of AsyncClient) ─────────────────────────────────────
    def ping(self) -> None:
        """Round-trip to the daemon."""
        calls.expect(self._call(p.Ping(id=0)), p.PingReply)

    def hello(self) -> p.HelloReply:
        """Protocol version and the server's limits."""
        return calls.expect(self._call(p.Hello(id=0, client=calls.CLIENT_NAME)), p.HelloReply)

    def append(
        self,
        role: str,
        content: str,
        *,
        timestamp: str | None = None,
        session_tag: str = DEFAULT_SESSION,
        meta: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> int:
        """Store one message; return its id once it is committed (durable)."""
        req = calls.append_request(
            self._keys, role, content, timestamp, session_tag, meta, idempotency_key
        )
        return calls.expect(self._call(req), p.AppendReply).message_id

    def append_many(
        self, messages: Iterable[MessageInput], *, session_tag: str = DEFAULT_SESSION
    ) -> list[int]:
        """Store several messages atomically (all or none); return their ids in order."""
        req = calls.append_many_request(self._keys, messages, session_tag)
        return calls.expect(self._call(req), p.AppendManyReply).message_ids

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
        first = calls.history_request(session_tag, limit, before_id, after_id)
        got: list[Message] = []
        req: p.History | None = first
        while req is not None:
            page = calls.expect(self._call(req), p.HistoryReply)
            got = calls.merge(first, got, page.messages)
            req = calls.next_page(first, got, page)
        return got

    def message_count(self, session_tag: str = DEFAULT_SESSION) -> int:
        """Number of messages stored for ``session_tag``."""
        return calls.expect(self._call(p.Count(id=0, session_tag=session_tag)), p.CountReply).count

    def sessions(self) -> list[SessionInfo]:
        """Every session tag with its count, first/last id and last timestamp."""
        out: list[SessionInfo] = []
        after: str | None = None
        while True:
            page = calls.expect(self._call(p.Sessions(id=0, after=after)), p.SessionsReply)
            out += page.sessions
            if not page.truncated or not page.sessions:
                return out
            after = page.sessions[-1].session_tag

    def pop(self, session_tag: str = DEFAULT_SESSION) -> Message | None:
        """Remove and return the newest message of ``session_tag`` (None if empty)."""
        return calls.expect(self._call(p.Pop(id=0, session_tag=session_tag)), p.PopReply).message

    def clear(self, session_tag: str = DEFAULT_SESSION) -> int:
        """Delete every message of ``session_tag``; return how many."""
        return calls.expect(
            self._call(p.Clear(id=0, session_tag=session_tag)), p.ClearReply
        ).deleted

    def clear_all(self) -> int:
        """Delete every message of every session; return how many."""
        return calls.expect(self._call(p.ClearAll(id=0)), p.ClearAllReply).deleted

    def stats(self) -> dict[str, Any]:
        """The daemon's counters (queue depth, batches, latencies, ...)."""
        return calls.expect(self._call(p.Stats(id=0)), p.StatsReply).stats

    def backup(self, dest: str | os.PathLike[str], *, progress: Progress | None = None) -> int:
        """Write a consistent copy of the database to ``dest``; return its size in bytes.

        The daemon snapshots without blocking writers and streams the copy; this
        process writes ``dest``: into a new private (0600) temporary file in the
        same directory, renamed over ``dest`` when complete, so ``dest`` is
        never half written and a planted symlink is never followed.
        ``progress(done, total)`` is called after every chunk.

        Raises :class:`~nexusd.errors.BadRequest` (``field="dest"``) before
        asking the daemon for anything when ``dest`` exists and is not a
        regular file (a directory, the daemon's socket, a fifo, a device), when
        its directory is missing or not writable or is reached through a
        symbolic link owned by another user than the caller or root, and
        before writing anything when
        ``dest`` is (any name of) the daemon's live database, WAL, shared
        memory or lock file.  The temporary file is removed on any failure.
        """
        target = calls.BackupTarget(dest)  # the caller's mistakes first, before any I/O
        try:
            chunk = calls.backup_chunk(self.hello())
            begin = calls.expect(self._call(p.BackupBegin(id=0)), p.BackupBeginReply)
            try:
                target.refuse_live(begin.files)
                offset = 0
                while True:
                    req = p.BackupRead(id=0, backup=begin.backup, offset=offset, length=chunk)
                    part = calls.expect(self._call(req), p.BackupReadReply)
                    target.write(part.data)
                    offset += len(part.data)
                    if progress is not None:
                        progress(offset, begin.size)
                    if part.eof or not part.data:
                        break
                target.commit()
            except Exception:
                self._end_backup(begin.backup)
                raise
            except BaseException:
                # Ctrl-C and the like: no round trip now; dropping the
                # connection makes the daemon delete the snapshot at once.
                self.close()
                raise
            self._end_backup(begin.backup)
        finally:
            target.discard()
        return offset

    def _end_backup(self, token: str) -> None:
        try:
            self._call(p.BackupEnd(id=0, backup=token))
        except NexusError as exc:  # closing the connection releases it too
            logger.debug("backup_end failed: %s", exc)
