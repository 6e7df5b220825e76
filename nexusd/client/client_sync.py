# Generated from nexusd/client/client_async.py by scripts/unasync.py: do not edit.
# Change the async original, then run `python scripts/unasync.py`.
"""The client of nexusd, written once: its calls, retries, paging and backups over a transport.

``client_async.py`` is the source of both Python clients: ``scripts/unasync.py`` writes the
blocking one, ``client_sync.py``, from it by removing ``async``/``await`` and naming the blocking
transport's parts instead of the async one's (its table of substitutions says exactly which).
So the two cannot drift: edit the async source, then run ``python scripts/unasync.py``; a test
fails while they differ.  What is not shared is the I/O, in the transports.  ``watch()`` comes
from ``watch_sync.py``; ``delete()``, ``fork()``, ``set_retention()`` from ``lifecycle_sync.py``.

Before sending anything on a new connection the client checks who serves the
socket (``SO_PEERCRED``): its own uid, root (socket activation), the
``nexusd`` service user, or a uid given in ``trusted_uids=`` /
``$NEXUSD_TRUSTED_UIDS``; anyone else gets :class:`~nexusd.wire.errors.Forbidden`
and not one byte.  A request over 64 KiB is checked against the server's
``max_frame`` (learnt from ``hello`` once per connection) and refused locally
with :class:`~nexusd.wire.errors.TooLarge` rather than sent to be cut off.

It survives a daemon restart: appends carry idempotency keys (unless
``idempotent_appends=False``), so when the connection drops before the answer
arrives the call reconnects and resends, and the daemon returns the original
id instead of storing a copy.  Other calls are resent only where that is harmless
(reads, ``delete``; never ``pop``, ``clear``, ``fork``): :mod:`nexusd.client.retry`.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import msgspec

from ..wire import protocol as p
from ..wire.errors import ConnectionLost, NexusError
from ..wire.framing import encode_frame
from ..wire.paths import resolve_socket_path
from ..wire.protocol import DEFAULT_SESSION, Message, SearchHit, SessionInfo
from .backup import BackupTarget, Progress, backup_chunk
from .connect import check_socket_path
from .connect import trusted_uids as _trusted_uids
from .lifecycle_sync import Lifecycle
from .replies import SearchResults, expect, merge, next_page
from .requests import (
    CLIENT_NAME,
    SMALL_FRAME,
    KeyMaker,
    MessageInput,
    append_many_request,
    append_request,
    check_frame,
    check_retry_for,
    check_timeout,
    encode,
    frame_limit,
    history_request,
    search_request,
)
from .retry import RETRY_ON, backoff, give_up
from .transport_sync import (
    LINK_SURVIVES_INTERRUPTS,
    CallGate,
    Connector,
    Link,
    Lock,
    offload,
    shielded,
    sleep,
)
from .watch_sync import Watching

__all__ = ["Client"]

logger = logging.getLogger(__name__)

_with_id = msgspec.structs.replace


class Client(Watching, Lifecycle):
    """A client of nexusd: ``with Client() as c: c.ping()``.

    ``timeout`` bounds each call: seconds > 0 and at most a day
    (:data:`~nexusd.client.requests.MAX_TIMEOUT`), or None for no bound;
    anything else (0, or 1e12, which would overflow the OS timers) is
    :class:`~nexusd.wire.errors.BadRequest` with ``field="timeout"`` when the
    client is made.  ``retry_for`` is how long a call may keep reconnecting
    and resending after the connection dropped or the daemon said
    ``unavailable``/``overloaded`` (0 disables retries: a connection the daemon
    closed meanwhile then fails one call, with nothing sent, and the next call
    reconnects).  ``trusted_uids`` adds uids accepted as the daemon's (see the
    module doc).

    How calls share the connection is the transport's
    (:class:`~nexusd.client.transport_sync.Connector`): the async client
    is entered by the task that leaves it and pipelines the calls of many
    tasks over one connection, on asyncio and trio; the blocking client is
    safe to share between threads (one call at a time), connects on first use
    and reconnects after a failure, or when the daemon closed the connection
    while it sat unused (idle timeout, restart): that is noticed before a
    call is sent, so even a ``pop`` that is never resent does not fail for it.
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
        check_socket_path(socket_path)
        self.socket_path = resolve_socket_path(socket_path)
        self.timeout = check_timeout(timeout)
        self.retry_for = check_retry_for(retry_for)
        self._trusted = _trusted_uids(trusted_uids)
        self._keys = KeyMaker() if idempotent_appends else None
        self._ids = itertools.count(1)
        self._connector = Connector()
        self._link: Link | None = None
        self._was_connected = False
        self._gate = CallGate()  # admits the calls that may share the connection
        self._connect_lock = Lock()  # one reconnect for all waiting callers

    def __enter__(self) -> Client:
        self._connector.start()
        try:
            self.connect()
        except BaseException:
            self._connector.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        """Open the connection now rather than on first use (or check it is still open)."""
        with self._gate:
            self._current_link()

    def close(self) -> None:
        """Close the connection (idempotent); pending calls fail with ConnectionLost.

        The blocking client's next call reconnects; the async one must be entered again.
        """
        with self._gate:
            link, self._link = self._link, None
            if link is not None:
                link.close()
        self._connector.close()

    # ── plumbing ──────────────────────────────────────────────────────────
    def _current_link(self) -> Link:
        link = self._link
        if link is not None and link.usable():
            return link
        with self._connect_lock:
            link = self._link
            if link is not None:
                if link.usable():  # another caller reconnected meanwhile
                    return link
                self._link = None
                link.close()
                if not link.reported and self.retry_for <= 0:
                    # It broke while idle.  Nothing was sent; reconnecting is up
                    # to the retry policy, which is off: this call fails, the next
                    # one reconnects (a stopped daemon may be meant to stay stopped).
                    link.reported = True
                    why = link.broken.message if link.broken is not None else "closed"
                    raise ConnectionLost(
                        f"connection to nexusd lost ({why}); the next call reconnects"
                    )
            link = self._connector.open(self.socket_path, self._trusted)
            self._link = link
            self._was_connected = True
            return link

    def _call_once(self, req: Any) -> Any:
        rid = next(self._ids)
        body = encode(_with_id(req, id=rid))  # the caller's mistakes before any I/O
        link = self._current_link()
        if len(body) > SMALL_FRAME:
            if link.max_frame is None:
                hello = p.Hello(id=next(self._ids), client=CLIENT_NAME)
                frame = encode_frame(p.encoder.encode(hello))
                reply = link.roundtrip(hello.id, frame, self.timeout)
                link.max_frame = frame_limit(expect(reply, p.HelloReply))
            # Refused here, before sending: the connection stays usable.
            check_frame(len(body), link.max_frame)
        return link.roundtrip(rid, encode_frame(body), self.timeout)

    def _call(self, req: Any) -> Any:
        deadline = time.monotonic() + self.retry_for
        delay = 0.0
        with self._gate:
            while True:
                try:
                    return self._call_once(req)
                except RETRY_ON as exc:
                    delay = backoff(exc, delay)
                    late = time.monotonic() + delay > deadline
                    if give_up(req, exc, ever_connected=self._was_connected, late=late):
                        raise
                sleep(delay)

    # ── API ───────────────────────────────────────────────────────────────
    def ping(self) -> None:
        """Round-trip to the daemon."""
        expect(self._call(p.Ping(id=0)), p.PingReply)

    def hello(self) -> p.HelloReply:
        """Protocol version and the server's limits."""
        return expect(self._call(p.Hello(id=0, client=CLIENT_NAME)), p.HelloReply)

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
        req = append_request(
            self._keys, role, content, timestamp, session_tag, meta, idempotency_key
        )
        return expect(self._call(req), p.AppendReply).message_id

    def append_many(
        self, messages: Iterable[MessageInput], *, session_tag: str = DEFAULT_SESSION
    ) -> list[int]:
        """Store several messages atomically (all or none); return their ids in order."""
        req = append_many_request(self._keys, messages, session_tag)
        return expect(self._call(req), p.AppendManyReply).message_ids

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
        first = history_request(session_tag, limit, before_id, after_id)
        got: list[Message] = []
        req: p.History | None = first
        while req is not None:
            page = expect(self._call(req), p.HistoryReply)
            got = merge(first, got, page.messages)
            req = next_page(first, got, page)
        return got

    def message_count(self, session_tag: str = DEFAULT_SESSION) -> int:
        """Number of messages stored for ``session_tag``."""
        reply = self._call(p.Count(id=0, session_tag=session_tag))
        return expect(reply, p.CountReply).count

    def sessions(self) -> list[SessionInfo]:
        """Every session tag with its count, first/last id and last timestamp."""
        out: list[SessionInfo] = []
        after: str | None = None
        while True:
            reply = self._call(p.Sessions(id=0, after=after))
            page = expect(reply, p.SessionsReply)
            out += page.sessions
            if not page.truncated or not page.sessions:
                return out
            after = page.sessions[-1].session_tag

    def search(
        self,
        query: str,
        session_tag: str | Sequence[str] | None = None,
        role: str | None = None,
        since: str | datetime | None = None,
        until: str | datetime | None = None,
        limit: int = 20,
        *,
        syntax: bool = False,
        order: Literal["rank", "newest"] = "rank",
        cursor: str | None = None,
    ) -> SearchResults:
        """Messages matching ``query``, best match first (or ``order="newest"``).

        ``query`` is plain words (each must occur, in any order; case and
        accents do not matter) unless ``syntax=True``: then it is an SQLite
        FTS5 query (``"a phrase"``, ``prefix*``, ``NEAR(a b)``, ``AND``/``OR``/
        ``NOT``).  Narrowed to ``session_tag`` (one tag or several), ``role``,
        and ``since`` <= timestamp < ``until``.  Each hit has ``.message``,
        ``.snippet`` (matched terms at ``.highlights``) and ``.rank``.  At most
        ``limit`` hits; the result's ``.cursor``, passed back with the same
        arguments, gets the next ones (None: there are no more).
        """
        req = search_request(query, session_tag, role, since, until, limit, syntax, order, cursor)
        hits: list[SearchHit] = []
        while True:
            page = expect(self._call(req), p.SearchReply)
            hits += page.hits
            if page.cursor is None or len(hits) >= limit:
                return SearchResults(hits, page.cursor)
            # The daemon cut the page to fit its frame limit: go on from its edge.
            req = msgspec.structs.replace(req, cursor=page.cursor, limit=limit - len(hits))

    def pop(self, session_tag: str = DEFAULT_SESSION) -> Message | None:
        """Remove and return the newest message of ``session_tag`` (None if empty)."""
        reply = self._call(p.Pop(id=0, session_tag=session_tag))
        return expect(reply, p.PopReply).message

    def clear(self, session_tag: str = DEFAULT_SESSION) -> int:
        """Delete every message of ``session_tag``; return how many."""
        reply = self._call(p.Clear(id=0, session_tag=session_tag))
        return expect(reply, p.ClearReply).deleted

    def clear_all(self) -> int:
        """Delete every message of every session; return how many."""
        return expect(self._call(p.ClearAll(id=0)), p.ClearAllReply).deleted

    def stats(self) -> dict[str, Any]:
        """The daemon's counters (queue depth, batches, latencies, ...)."""
        return expect(self._call(p.Stats(id=0)), p.StatsReply).stats

    def backup(
        self,
        dest: str | os.PathLike[str],
        *,
        progress: Progress | None = None,
    ) -> int:
        """Write a consistent copy of the database to ``dest``; return its size in bytes.

        The daemon snapshots without blocking writers and streams the copy; this
        process writes ``dest``: into a new private (0600) temporary file in the
        same directory, renamed over ``dest`` when complete, so ``dest`` is
        never half written and a planted symlink is never followed.
        ``progress(done, total)`` is called after every chunk.

        Raises :class:`~nexusd.wire.errors.BadRequest` (``field="dest"``) before
        asking the daemon for anything when ``dest`` exists and is not a
        regular file (a directory, the daemon's socket, a fifo, a device), when
        its directory is missing or not writable or is reached through a
        symbolic link owned by another user than the caller or root, and
        before writing anything when ``dest`` is (any name of) the daemon's
        live database, WAL, shared memory or lock file.  The temporary file is
        removed on any failure.
        """
        target = BackupTarget(dest)  # the caller's mistakes first, before any I/O
        try:
            chunk = backup_chunk(self.hello())
            begin = expect(self._call(p.BackupBegin(id=0)), p.BackupBeginReply)
            try:
                target.refuse_live(begin.files)
                offset = 0
                while True:
                    req = p.BackupRead(id=0, backup=begin.backup, offset=offset, length=chunk)
                    part = expect(self._call(req), p.BackupReadReply)
                    offload(target.write, part.data)
                    offset += len(part.data)
                    if progress is not None:
                        progress(offset, begin.size)
                    if part.eof or not part.data:
                        break
                offload(target.commit)
            except Exception:
                self._end_backup(begin.backup)
                raise
            except BaseException:
                if LINK_SURVIVES_INTERRUPTS:
                    self._end_backup(begin.backup)
                else:
                    # No round trip now: dropping the connection makes the
                    # daemon delete the snapshot at once.
                    self.close()
                raise
            self._end_backup(begin.backup)
        finally:
            target.discard()
        return offset

    def _end_backup(self, token: str) -> None:
        with shielded():  # a cancelled backup still releases its snapshot
            try:
                self._call(p.BackupEnd(id=0, backup=token))
            except NexusError as exc:  # closing the connection releases it too
                logger.debug("backup_end failed: %s", exc)
