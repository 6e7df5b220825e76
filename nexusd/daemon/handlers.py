"""What each request means: one handler per row of the table of operations.

No I/O here.  A :class:`Dispatcher` is one connection's view of the daemon
(its tag namespace, its backups, the limits) and has one handler for each
:data:`~nexusd.wire.ops.OPERATIONS` row, of the row's kind, bound with the
decorators of :mod:`nexusd.daemon.binding` (which also says what each kind
returns); the binding is checked against the table when this module is
imported.  :mod:`nexusd.daemon.connection` routes each request by its row's
``runs`` and moves the bytes.  What a search request means (its filters,
its cursor) is :mod:`nexusd.daemon.searching`'s; what ``delete``, ``fork``
and ``set_retention`` mean is :mod:`nexusd.daemon.lifecycle`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any, Final

import msgspec

from ..storage.base import ClearAll, ClearSession, Insert, NewRow, PopNewest
from ..wire import protocol as p
from ..wire.codec import encode_reply
from ..wire.errors import BadRequest, Forbidden, NexusError, NotFound, TooLarge
from ..wire.timestamps import parse_timestamp
from . import lifecycle
from .backups import Snapshots
from .binding import (
    LOCAL_HANDLERS,
    READ_HANDLERS,
    WATCH_HANDLERS,
    WRITE_HANDLERS,
    Job,
    Services,
    check_bound,
    job,
    on_local,
    on_read,
    on_watch,
    on_write,
)
from .peers import Namespace
from .searching import Cursors, search_query
from .validate import check_content, check_distinct_keys, meta_json
from .watch import Watches

__all__ = ["Dispatcher", "Job", "Services"]

logger = logging.getLogger(__name__)

_ENVELOPE: Final = 1024


class Dispatcher:
    """One connection's request handling."""

    def __init__(
        self, services: Services, ns: Namespace | None, watches: Watches | None = None
    ) -> None:
        self.services = services
        #: The peer's namespace of session tags (None: tags pass through).
        self.ns = ns
        #: The connection's watches (None: this one cannot watch, e.g. in tests).
        self.watches = watches
        limits = services.limits
        self.max_frame = limits.max_frame
        self.max_content = limits.max_content
        self.max_meta = limits.max_meta

    # ── routing (the connection knows the row; these find the handler) ────
    def local(self, req: Any) -> p.Reply:
        return LOCAL_HANDLERS[type(req)](self, req)

    def write(self, req: Any) -> Job[Any]:
        """The writer job for a mutating request (raises BadRequest)."""
        return WRITE_HANDLERS[type(req)](self, req)

    def read(self, req: Any, room: int = 0) -> Awaitable[p.Reply]:
        """The query for ``req``; ``room``: bytes of memory held for its reply (0: none)."""
        return READ_HANDLERS[type(req)](self, req, room)

    def watch(self, req: Any) -> None:
        """Open or close a watch (raises NexusError; frames go out as pushes)."""
        WATCH_HANDLERS[type(req)](self, req)

    def release(self) -> None:
        """The connection is gone: drop its snapshots (also one still being taken)."""
        self.services.snapshots.release(self)

    # ── answered on the spot ──────────────────────────────────────────────
    @on_local(p.Ping)
    def _ping(self, req: p.Ping) -> p.PingReply:
        return p.PingReply(id=req.id)

    @on_local(p.Hello)
    def _hello(self, req: p.Hello) -> p.Reply:
        if req.version != p.PROTOCOL_VERSION:
            # No silent downgrade: a client must know what it is talking to.
            err = BadRequest(
                f"protocol version {req.version} is not supported; this server speaks"
                f" version {p.PROTOCOL_VERSION} only",
                field="version",
            )
            return p.error_reply(req.id, err)
        return self.services.hello(req.id)

    @on_local(p.Stats)
    def _stats(self, req: p.Stats) -> p.StatsReply:
        return p.StatsReply(id=req.id, stats=self.services.stats())

    # ── writes ────────────────────────────────────────────────────────────
    @on_write(p.Append)
    def _append(self, req: p.Append) -> Job[list[int]]:
        check_content(req.content, "content", self.max_content)
        ts = req.timestamp
        row: NewRow = (
            req.role,
            req.content,
            None if ts is None else parse_timestamp(ts),
            None if req.meta is None else meta_json(req.meta, "meta", self.max_meta),
            req.idem_key,
        )
        return job(Insert(self._inner(req.session_tag), [row]), _append_reply)

    @on_write(p.AppendMany)
    def _append_many(self, req: p.AppendMany) -> Job[list[int]]:
        msgs = req.messages
        check_distinct_keys(msgs)
        limit = self.max_content // 4  # below this many characters, no need to measure
        rows: list[NewRow]
        if all(m.meta is None and m.timestamp is None and len(m.content) <= limit for m in msgs):
            # The common case, without per-item checks.
            rows = [(m.role, m.content, None, None, m.idem_key) for m in msgs]
        else:
            rows = []
            for i, m in enumerate(msgs):
                if len(m.content) > limit:
                    check_content(m.content, f"messages[{i}].content", self.max_content)
                ts = m.timestamp
                if ts is not None:
                    ts = parse_timestamp(ts, f"messages[{i}].timestamp")
                meta = (
                    None
                    if m.meta is None
                    else meta_json(m.meta, f"messages[{i}].meta", self.max_meta)
                )
                rows.append((m.role, m.content, ts, meta, m.idem_key))
        return job(Insert(self._inner(req.session_tag), rows), _append_many_reply)

    @on_write(p.Pop)
    def _pop(self, req: p.Pop) -> Job[p.Message | None]:
        return job(PopNewest(self._inner(req.session_tag), self._unsendable), self._pop_reply)

    @on_write(p.Clear)
    def _clear(self, req: p.Clear) -> Job[int]:
        return job(ClearSession(self._inner(req.session_tag)), _clear_reply)

    @on_write(p.ClearAll)
    def _clear_all(self, req: p.ClearAll) -> Job[int]:
        return job(ClearAll(None if self.ns is None else self.ns.scope), _clear_all_reply)

    # delete, fork, set_retention: :mod:`nexusd.daemon.lifecycle`'s.
    _delete = on_write(p.Delete)(lifecycle.delete)
    _fork = on_write(p.Fork)(lifecycle.fork)
    _set_retention = on_write(p.SetRetention)(lifecycle.set_retention)

    # ── watches ───────────────────────────────────────────────────────────
    @on_watch(p.Watch)
    def _watch(self, req: p.Watch) -> None:
        self._watches().start(req, tag=None if req.all else self._inner(req.session_tag))

    @on_watch(p.Unwatch)
    def _unwatch(self, req: p.Unwatch) -> None:
        self._watches().stop(req)

    def _watches(self) -> Watches:
        if self.watches is None:
            raise BadRequest("watches are not served here")
        return self.watches

    # ── namespaces (isolate_peers) ─────────────────────────────────────────
    def _inner(self, tag: str) -> str:
        return tag if self.ns is None else self.ns.inner(tag)

    def _message(self, msg: p.Message) -> p.Message:
        """``msg`` as this peer sees it: its session tag without the namespace prefix."""
        if self.ns is None or not self.ns.prefix:
            return msg
        return msgspec.structs.replace(msg, session_tag=self.ns.outer(msg.session_tag))

    def _unsendable(self, msg: p.Message) -> NexusError | None:
        """Run by the writer before a pop deletes ``msg``: None if its reply fits a frame."""
        # An upper bound first (a code point is at most 4 bytes of UTF-8): nearly
        # every message without meta plainly fits, and only a doubtful one (or
        # one with meta) is encoded.
        chars = len(msg.role) + len(msg.content) + len(msg.timestamp) + len(msg.session_tag)
        if msg.meta is None and 4 * chars + _ENVELOPE <= self.max_frame:
            return None
        reply = p.PopReply(id=p.MAX_REQUEST_ID, message=self._message(msg))
        try:
            self._must_fit(reply, f"message {msg.id}")
        except TooLarge as exc:
            return TooLarge(f"{exc.message}; it was not removed", field="session_tag")
        except NexusError as exc:  # it cannot be encoded at all: keep it
            return type(exc)(f"message {msg.id}: {exc.message}; it was not removed")
        return None

    def _pop_reply(self, rid: int, msg: p.Message | None) -> p.PopReply:
        return p.PopReply(id=rid, message=self._message(msg) if msg is not None else None)

    # ── reads ─────────────────────────────────────────────────────────────
    @on_read(p.History)
    async def _history(self, req: p.History, room: int) -> p.HistoryReply:
        # ``room``: a smaller frame to fit the page in (memory is short).
        readers = self.services.readers
        budget = min(room or self.max_frame, self.max_frame) - _ENVELOPE
        page = await readers.history(
            self._inner(req.session_tag),
            req.limit,
            before_id=req.before_id,
            after_id=req.after_id,
            budget=budget,
        )
        # The size estimate is an upper bound: the reply fits the frame,
        # except maybe a lone row over the estimate, which is measured.
        msgs = [self._message(m) for m in page.items]
        reply = p.HistoryReply(id=req.id, messages=msgs, truncated=page.truncated)
        if page.over:
            self._must_fit(reply, f"message {msgs[0].id}")
        return reply

    @on_read(p.Count)
    async def _count(self, req: p.Count, room: int) -> p.CountReply:
        readers = self.services.readers
        return p.CountReply(id=req.id, count=await readers.count(self._inner(req.session_tag)))

    @on_read(p.Sessions)
    async def _sessions(self, req: p.Sessions, room: int) -> p.SessionsReply:
        readers = self.services.readers
        ns = self.ns
        after = req.after if ns is None or req.after is None else ns.inner(req.after, "after")
        scope = None if ns is None else ns.scope
        # The page is bounded by the real lengths of its tags and timestamps
        # (rows stored before timestamps were validated may hold long ones).
        found = await readers.sessions(
            after=after, limit=req.limit, budget=self.max_frame - _ENVELOPE, scope=scope
        )
        infos = found.items
        if ns is not None and ns.prefix:
            outer = ns.outer
            infos = [msgspec.structs.replace(i, session_tag=outer(i.session_tag)) for i in infos]
        sessions = p.SessionsReply(id=req.id, sessions=infos, truncated=found.truncated)
        if found.over:
            self._must_fit(sessions, f"the entry of session {infos[0].session_tag[:80]!r}")
        return sessions

    @on_read(p.Search)
    async def _search(self, req: p.Search, room: int) -> p.SearchReply:
        ns = self.ns
        tags = req.session_tags
        cursors = Cursors(req)
        query = search_query(
            req,
            cursors,
            sessions=None if tags is None else [self._inner(t) for t in tags],
            scope=None if ns is None else ns.scope,
            budget=min(room or self.max_frame, self.max_frame) - _ENVELOPE,
        )
        page = await self.services.readers.search(query)
        hits = page.items
        if ns is not None and ns.prefix:
            hits = [msgspec.structs.replace(h, message=self._message(h.message)) for h in hits]
        reply = p.SearchReply(id=req.id, hits=hits, cursor=cursors.after(page))
        if page.over:
            try:
                self._must_fit(reply, f"message {hits[0].message.id}")
            except TooLarge as exc:
                exc.cursor = cursors.past(hits[0])  # pages on without it
                raise
        return reply

    def _must_fit(self, reply: Any, what: str) -> None:
        """Refuse, naming ``what``, a one-item page that cannot fit in a frame."""
        size = len(encode_reply(reply))
        if size > self.max_frame:
            raise TooLarge(
                f"{what} alone makes a reply of {size} bytes, over the frame limit of"
                f" {self.max_frame}; it cannot be read unless max_frame is raised"
            )

    # ── backups ───────────────────────────────────────────────────────────
    @on_read(p.BackupBegin)
    async def _backup_begin(self, req: p.BackupBegin, room: int) -> p.BackupBeginReply:
        snapshots = self.services.snapshots
        if self.ns is not None and self.ns.scope != "":
            # A copy holds every namespace: only those who may see them all.
            raise Forbidden("backups need an admin uid when isolate_peers is on")
        # One per connection, max_snapshots in total, enough free space.
        token, size = await snapshots.begin(self)
        return p.BackupBeginReply(id=req.id, backup=token, size=size, files=snapshots.live_files())

    @on_read(p.BackupRead)
    async def _backup_read(self, req: p.BackupRead, room: int) -> p.BackupReadReply:
        snapshots = self._owner_of(req.backup)
        # The reply always fits the frame: a smaller frame limit gets shorter chunks.
        length = min(req.length, self.max_frame - _ENVELOPE)
        data, eof = await snapshots.read(req.backup, req.offset, length)
        return p.BackupReadReply(id=req.id, data=data, eof=eof)

    @on_read(p.BackupEnd)
    async def _backup_end(self, req: p.BackupEnd, room: int) -> p.BackupEndReply:
        self._owner_of(req.backup).end(self, req.backup)
        return p.BackupEndReply(id=req.id)

    def _owner_of(self, token: str) -> Snapshots:
        """The backup store, once it says ``token`` is one of this connection's."""
        snapshots = self.services.snapshots
        if not snapshots.owns(self, token):
            raise NotFound("no such backup on this connection", field="backup")
        return snapshots


def _append_reply(rid: int, ids: list[int]) -> p.AppendReply:
    return p.AppendReply(id=rid, message_id=ids[0])


def _append_many_reply(rid: int, ids: list[int]) -> p.AppendManyReply:
    return p.AppendManyReply(id=rid, message_ids=ids)


def _clear_reply(rid: int, n: int) -> p.ClearReply:
    return p.ClearReply(id=rid, deleted=n)


def _clear_all_reply(rid: int, n: int) -> p.ClearAllReply:
    return p.ClearAllReply(id=rid, deleted=n)


check_bound()
