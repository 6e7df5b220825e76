"""What each request means: validation, writer jobs, reader queries, replies.

No I/O here.  :class:`Dispatcher` holds one connection's view of the daemon
(its tag namespace, its backups, the limits) and turns a decoded request into
either an immediate reply, a writer job with the function that builds its
reply, or a query to await.  :mod:`nexusd.connection` moves the bytes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import msgspec

from ..storage.writes import ClearAll, ClearSession, Insert, NewRow, Op, PopNewest
from ..wire import protocol as p
from ..wire.errors import BadRequest, Forbidden, NotFound, TooLarge
from .peers import Namespace

if TYPE_CHECKING:
    from .server import Server

logger = logging.getLogger(__name__)

_ENVELOPE: Final = 1024
_MAX_META_DEPTH: Final = 32
_json_encode = msgspec.json.encode
_json_decode = msgspec.json.decode

#: Builds the reply to a write from its request id and the writer's result.
Build = Callable[[int, Any], Any]
READS: Final = (p.History, p.Count, p.Sessions, p.BackupBegin, p.BackupRead, p.BackupEnd)


class Dispatcher:
    """One connection's request handling."""

    def __init__(self, server: Server, ns: Namespace | None) -> None:
        self.server = server
        #: The peer's namespace of session tags (None: tags pass through).
        self.ns = ns
        self.max_frame = server.config.max_frame
        self.max_content = server.config.max_content
        self.max_meta = server.config.max_meta

    # ── requests answered on the spot ─────────────────────────────────────
    def immediate(self, req: Any) -> Any | None:
        kind = type(req)
        if kind is p.Ping:
            return p.PingReply(id=req.id)
        if kind is p.Hello:
            if req.version != p.PROTOCOL_VERSION:
                # No silent downgrade: a client must know what it is talking to.
                err = BadRequest(
                    f"protocol version {req.version} is not supported; this server speaks"
                    f" version {p.PROTOCOL_VERSION} only",
                    field="version",
                )
                return p.error_reply(req.id, err)
            return self.server.hello(req.id)
        if kind is p.Stats:
            return p.StatsReply(id=req.id, stats=self.server.stats())
        return None

    # ── writes ────────────────────────────────────────────────────────────
    def write_job(self, req: Any) -> tuple[Op, Build] | None:
        """The writer job for a mutating request (raises BadRequest), else None."""
        kind = type(req)
        if kind is p.Append:
            self._check_content(req.content, "content")
            ts = req.timestamp
            row: NewRow = (
                req.role,
                req.content,
                None if ts is None else p.parse_timestamp(ts),
                None if req.meta is None else self._meta_json(req.meta, "meta"),
                req.idem_key,
            )
            return Insert(self._inner(req.session_tag), [row]), _append_reply
        if kind is p.AppendMany:
            msgs = req.messages
            _check_distinct_keys(msgs)
            limit = self.max_content // 4  # below this many characters, no need to measure
            rows: list[NewRow]
            if all(
                m.meta is None and m.timestamp is None and len(m.content) <= limit for m in msgs
            ):
                # The common case, without per-item checks.
                rows = [(m.role, m.content, None, None, m.idem_key) for m in msgs]
            else:
                rows = []
                for i, m in enumerate(msgs):
                    if len(m.content) > limit:
                        self._check_content(m.content, f"messages[{i}].content")
                    ts = m.timestamp
                    if ts is not None:
                        ts = p.parse_timestamp(ts, f"messages[{i}].timestamp")
                    meta = (
                        None if m.meta is None else self._meta_json(m.meta, f"messages[{i}].meta")
                    )
                    rows.append((m.role, m.content, ts, meta, m.idem_key))
            return Insert(self._inner(req.session_tag), rows), _append_many_reply
        if kind is p.Pop:
            return PopNewest(self._inner(req.session_tag), self._unsendable), self._pop_reply
        if kind is p.Clear:
            return ClearSession(self._inner(req.session_tag)), _clear_reply
        if kind is p.ClearAll:
            return ClearAll(None if self.ns is None else self.ns.scope), _clear_all_reply
        return None

    def _check_content(self, content: str, field: str) -> None:
        # A code point is at most 4 bytes of UTF-8: skip the encode when it cannot matter.
        if len(content) * 4 > self.max_content:
            try:
                size = len(content.encode("utf-8"))
            except UnicodeEncodeError:
                raise BadRequest(f"{field} is not valid UTF-8", field=field) from None
            if size > self.max_content:
                raise BadRequest(
                    f"{field} is {size} bytes of UTF-8; the limit is {self.max_content}",
                    field=field,
                )

    def _meta_json(self, meta: dict[str, Any], field: str) -> str:
        """``meta`` as the JSON text to store; BadRequest if JSON cannot hold it or too big."""
        _check_json(meta, field, 1)
        text = _json_encode(meta)
        if len(text) > self.max_meta:
            raise BadRequest(
                f"{field} is {len(text)} bytes as JSON; the limit is {self.max_meta}",
                field=field,
            )
        return text.decode()

    # ── namespaces (isolate_peers) ─────────────────────────────────────────
    def _inner(self, tag: str) -> str:
        return tag if self.ns is None else self.ns.inner(tag)

    def _outer(self, stored: str) -> str:
        return stored if self.ns is None else self.ns.outer(stored)

    def _message(self, msg: p.Message) -> p.Message:
        """``msg`` as this peer sees it: its session tag without the namespace prefix."""
        if self.ns is None or not self.ns.prefix:
            return msg
        return msgspec.structs.replace(msg, session_tag=self.ns.outer(msg.session_tag))

    def _unsendable(self, msg: p.Message) -> TooLarge | None:
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
        return None

    def _pop_reply(self, rid: int, msg: p.Message | None) -> p.PopReply:
        return p.PopReply(id=rid, message=self._message(msg) if msg is not None else None)

    # ── reads ─────────────────────────────────────────────────────────────
    async def query(self, req: Any, *, page_bytes: int | None = None) -> Any:
        """``page_bytes``: a smaller frame to fit a history page in (memory is short)."""
        readers = self.server.readers
        if type(req) is p.History:
            budget = min(page_bytes or self.max_frame, self.max_frame) - _ENVELOPE
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
        if type(req) is p.Count:
            return p.CountReply(id=req.id, count=await readers.count(self._inner(req.session_tag)))
        if type(req) is p.Sessions:
            ns = self.ns
            after = req.after if ns is None or req.after is None else ns.inner(req.after)
            scope = None if ns is None else ns.scope
            # The page is bounded by the real lengths of its tags and timestamps
            # (rows stored before timestamps were validated may hold long ones).
            found = await readers.sessions(
                after=after, limit=req.limit, budget=self.max_frame - _ENVELOPE, scope=scope
            )
            infos = found.items
            if ns is not None and ns.prefix:
                outer = ns.outer
                infos = [
                    msgspec.structs.replace(i, session_tag=outer(i.session_tag)) for i in infos
                ]
            sessions = p.SessionsReply(id=req.id, sessions=infos, truncated=found.truncated)
            if found.over:
                self._must_fit(sessions, f"the entry of session {infos[0].session_tag[:80]!r}")
            return sessions
        return await self._backup(req)

    def _must_fit(self, reply: Any, what: str) -> None:
        """Refuse, naming ``what``, a one-item page that cannot fit in a frame."""
        size = len(p.encoder.encode(reply))
        if size > self.max_frame:
            raise TooLarge(
                f"{what} alone makes a reply of {size} bytes, over the frame limit of"
                f" {self.max_frame}; it cannot be read unless max_frame is raised"
            )

    async def _backup(self, req: Any) -> Any:
        snapshots = self.server.snapshots
        if type(req) is p.BackupBegin:
            if self.ns is not None and self.ns.scope != "":
                # A copy holds every namespace: only those who may see them all.
                raise Forbidden("backups need an admin uid when isolate_peers is on")
            # One per connection, max_snapshots in total, enough free space.
            token, size = await snapshots.begin(self)
            return p.BackupBeginReply(
                id=req.id, backup=token, size=size, files=snapshots.live_files()
            )
        if isinstance(req, (p.BackupRead, p.BackupEnd)) and not snapshots.owns(self, req.backup):
            raise NotFound("no such backup on this connection", field="backup")
        if isinstance(req, p.BackupRead):
            # The reply always fits the frame: a smaller frame limit gets shorter chunks.
            length = min(req.length, self.max_frame - _ENVELOPE)
            data, eof = await snapshots.read(req.backup, req.offset, length)
            return p.BackupReadReply(id=req.id, data=data, eof=eof)
        if isinstance(req, p.BackupEnd):
            snapshots.end(self, req.backup)
            return p.BackupEndReply(id=req.id)
        raise BadRequest(f"unsupported operation {type(req).__name__}", field="op")

    def release(self) -> None:
        """The connection is gone: drop its snapshots (also one still being taken)."""
        self.server.snapshots.release(self)


def _check_distinct_keys(msgs: list[p.NewMessage]) -> None:
    """Two messages of one ``append_many`` may not share an idempotency key.

    The second would be taken for a resend of the first and acknowledged with
    its id, so a message the caller meant to store would silently not be.
    """
    keys = [m.idem_key for m in msgs if m.idem_key is not None]
    if len(set(keys)) == len(keys):
        return
    seen: set[str] = set()
    for i, m in enumerate(msgs):
        if m.idem_key is not None:
            if m.idem_key in seen:
                field = f"messages[{i}].idem_key"
                raise BadRequest(
                    f"{field} repeats an earlier message's key; each message needs its own",
                    field=field,
                )
            seen.add(m.idem_key)


def _check_json(value: Any, field: str, depth: int) -> None:
    """Accept only what JSON can hold: no bytes, extensions, or non-finite floats.

    ``depth`` is the level of ``value`` if it is a map or an array (``meta``
    itself is level 1); scalars add no level.
    """
    t = type(value)
    if depth > _MAX_META_DEPTH and (t is dict or t is list):
        raise BadRequest(f"{field} nests deeper than {_MAX_META_DEPTH} levels", field=field)
    if t is str or t is bool or t is int or value is None:
        return
    if t is float:
        if not math.isfinite(value):
            raise BadRequest(f"{field} holds a non-finite number", field=field)
        return
    if t is dict:
        for k, v in value.items():
            if type(k) is not str:
                raise BadRequest(f"{field} has a non-string key", field=field)
            _check_json(v, f"{field}.{k}", depth + 1)
        return
    if t is list:
        for i, v in enumerate(value):
            _check_json(v, f"{field}[{i}]", depth + 1)
        return
    raise BadRequest(f"{field} holds a {t.__name__}, which JSON cannot represent", field=field)


def _append_reply(rid: int, ids: list[int]) -> p.AppendReply:
    return p.AppendReply(id=rid, message_id=ids[0])


def _append_many_reply(rid: int, ids: list[int]) -> p.AppendManyReply:
    return p.AppendManyReply(id=rid, message_ids=ids)


def _clear_reply(rid: int, n: int) -> p.ClearReply:
    return p.ClearReply(id=rid, deleted=n)


def _clear_all_reply(rid: int, n: int) -> p.ClearAllReply:
    return p.ClearAllReply(id=rid, deleted=n)
