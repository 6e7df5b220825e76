"""One client connection: frames in, requests dispatched, replies coalesced out.

The reader loop decodes frames in order.  Writes are queued to the writer
*from the reader loop itself*, so one connection's appends reach the queue,
and therefore commit, in the order they were sent; their replies come back
through a callback.  Reads run as tasks, concurrently.  Every frame takes one
slot of the connection's in-flight budget and its reply gives it back once
written, so a peer that never reads its answers stops being read: memory stays
bounded.  Replies ready in the same loop turn go out in one ``send``.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import TYPE_CHECKING, Any, Final

import anyio
import msgspec
from anyio.abc import SocketStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import protocol as p
from .errors import BadRequest, Forbidden, Internal, NexusError, NotFound, TooLarge, Unavailable
from .framing import FrameDecoder, encode_frame
from .peers import Namespace
from .writer import ClearAll, ClearSession, Insert, NewRow, PopNewest

if TYPE_CHECKING:
    from .server import Server

logger = logging.getLogger(__name__)

RECV_BYTES: Final = 256 * 1024
_ENVELOPE: Final = 1024
_MAX_META_DEPTH: Final = 32
_json_encode = msgspec.json.encode
_json_decode = msgspec.json.decode


class Connection:
    """Serves one accepted stream until the peer leaves or the server stops."""

    def __init__(self, server: Server, stream: SocketStream, ns: Namespace | None = None) -> None:
        self.server = server
        self.stream = stream
        #: The peer's namespace of session tags (None: tags pass through).
        self.ns = ns
        cfg = server.config
        self.max_frame = cfg.max_frame
        self.max_content = cfg.max_content
        self._slots = anyio.Semaphore(cfg.max_inflight)
        self.outstanding = 0
        self.closed = False
        self._out_send: MemoryObjectSendStream[bytes]
        self._out_recv: MemoryObjectReceiveStream[bytes]
        # Unbounded on purpose: the in-flight slots bound what can be in it.
        self._out_send, self._out_recv = anyio.create_memory_object_stream[bytes](math.inf)
        self._tg: anyio.abc.TaskGroup | None = None
        self._progress = 0  # receives so far, for the stall watch
        self._watch_scope = anyio.CancelScope()
        self._backups: set[str] = set()  # snapshot tokens this connection owns

    # ── lifecycle ─────────────────────────────────────────────────────────
    # Nothing here cancels a pending receive() on the socket: on asyncio that
    # can race the stream's reader callback (anyio issue 1267).  A connection
    # is ended by closing its stream, which wakes the receive cleanly.
    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._sender)
            try:
                await self._read_loop()
                if not self.closed:
                    # The peer finished sending (or must be cut off): flush what is owed.
                    with anyio.move_on_after(self.server.config.shutdown_timeout):
                        await self._wait_all_replied()
            finally:
                self.closed = True
                self._watch_scope.cancel()
                self._out_send.close()
                await self.close_stream()
                self.server.snapshots.end_all(self._backups)
        self.server.forget_outstanding(self.outstanding)
        self.outstanding = 0

    async def close_stream(self) -> None:
        """End the connection: wakes the reader and the sender (idempotent)."""
        self.closed = True
        with anyio.CancelScope(shield=True):
            await self.stream.aclose()

    async def _wait_all_replied(self) -> None:
        for _ in range(self.server.config.max_inflight):
            try:
                self._slots.acquire_nowait()
            except anyio.WouldBlock:
                await self._slots.acquire()

    async def _read_loop(self) -> None:
        decoder = FrameDecoder(self.max_frame)
        stream = self.stream
        watching = False
        while True:
            try:
                chunk = await stream.receive(RECV_BYTES)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return
            self._progress += 1
            try:
                frames = decoder.feed(chunk)
            except TooLarge as exc:
                if await self._take_slot():
                    self._send_reply(p.error_reply(None, exc))
                return
            if decoder.pending and not watching and self._tg is not None:
                # Half a frame is buffered: from now on the peer must finish
                # every frame it starts within idle_timeout.
                watching = True
                self._tg.start_soon(self._watch_stall, decoder)
            for body in frames:
                if not await self._take_slot():
                    return  # the peer is gone
                await self._dispatch(body)

    async def _watch_stall(self, decoder: FrameDecoder) -> None:
        idle = self.server.config.idle_timeout
        seen = -1
        with self._watch_scope:  # cancelled when the connection ends (it only sleeps)
            while not self.closed:
                if decoder.pending and seen == self._progress:
                    logger.info("closing a connection stalled mid-frame for %gs", idle)
                    await self.close_stream()
                    return
                seen = self._progress
                await anyio.sleep(idle)

    async def _take_slot(self) -> bool:
        """Wait for in-flight room; False when the connection ended meanwhile."""
        try:
            self._slots.acquire_nowait()
        except anyio.WouldBlock:
            await self._slots.acquire()
        if self.closed:
            return False
        self.outstanding += 1
        self.server.inflight += 1
        return True

    async def _sender(self) -> None:
        recv = self._out_recv
        stream = self.stream
        try:
            async for first in recv:
                frames = [first]
                while True:
                    try:
                        frames.append(recv.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                await stream.send(b"".join(frames) if len(frames) > 1 else first)
                n = len(frames)
                self.outstanding -= n
                self.server.replied(n)
                for _ in range(n):
                    self._slots.release()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            # The peer is gone: nobody is left to answer.  Wake a reader that
            # waits for in-flight room, so it sees the connection is over.
            await self.close_stream()
            for _ in range(self.server.config.max_inflight):
                self._slots.release()

    # ── replies ───────────────────────────────────────────────────────────
    def _send_reply(self, reply: Any) -> None:
        if self.closed:
            return
        body = p.encoder.encode(reply)
        if len(body) > self.max_frame:
            err = TooLarge(f"reply of {len(body)} bytes exceeds the frame limit")
            body = p.encoder.encode(p.error_reply(reply.id, err))
        try:
            self._out_send.send_nowait(encode_frame(body))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    def _send_error(self, request_id: int | None, err: NexusError) -> None:
        self._send_reply(p.error_reply(request_id, err))

    # ── dispatch ──────────────────────────────────────────────────────────
    async def _dispatch(self, body: bytes) -> None:
        try:
            req = p.decode_request(body)
        except p.RequestError as exc:
            self._send_error(exc.request_id, exc)
            return
        server = self.server
        if server.draining:
            self._send_error(req.id, Unavailable("nexusd is shutting down"))
            return
        kind = type(req)
        try:
            if kind is p.Append:
                await self._append(req)  # type: ignore[arg-type]
            elif kind is p.AppendMany:
                await self._append_many(req)  # type: ignore[arg-type]
            elif kind is p.Pop:
                tag = self._inner(req.session_tag)  # type: ignore[union-attr]
                await self._submit(PopNewest(tag), req.id, self._pop_reply)
            elif kind is p.Clear:
                tag = self._inner(req.session_tag)  # type: ignore[union-attr]
                await self._submit(ClearSession(tag), req.id, _clear_reply)
            elif kind is p.ClearAll:
                scope = None if self.ns is None else self.ns.scope
                await self._submit(ClearAll(scope), req.id, _clear_all_reply)
            elif kind is p.Ping:
                self._send_reply(p.PingReply(id=req.id))
            elif kind is p.Hello:
                self._send_reply(server.hello(req.id))
            elif kind is p.Stats:
                self._send_reply(p.StatsReply(id=req.id, stats=server.stats()))
            else:
                assert self._tg is not None
                self._tg.start_soon(self._read, req)
        except NexusError as exc:
            self._send_error(req.id, exc)

    async def _submit(self, op: Any, request_id: int, build: Any) -> None:
        done = functools.partial(self._write_done, request_id, build)
        await self.server.writer.submit(op, done, timeout=self.server.config.enqueue_timeout)

    # ── namespaces (isolate_peers) ─────────────────────────────────────────
    def _inner(self, tag: str) -> str:
        return tag if self.ns is None else self.ns.inner(tag)

    def _outer(self, stored: str) -> str:
        return stored if self.ns is None else self.ns.outer(stored)

    def _message(self, row: tuple[Any, ...]) -> p.Message:
        msg = row_to_message(row)
        if self.ns is None or not self.ns.prefix:
            return msg
        return msgspec.structs.replace(msg, session_tag=self.ns.outer(msg.session_tag))

    def _pop_reply(self, rid: int, row: tuple[Any, ...] | None) -> p.PopReply:
        return p.PopReply(id=rid, message=self._message(row) if row is not None else None)

    def _write_done(self, request_id: int, build: Any, result: Any) -> None:
        if isinstance(result, NexusError):
            self._send_error(request_id, result)
        else:
            self._send_reply(build(request_id, result))

    async def _append(self, req: p.Append) -> None:
        self._check_content(req.content, "content")
        meta = self._meta_json(req.meta, "meta")
        row: NewRow = (req.role, req.content, req.timestamp, meta, req.idem_key)
        await self._submit(Insert(self._inner(req.session_tag), [row]), req.id, _append_reply)

    async def _append_many(self, req: p.AppendMany) -> None:
        rows: list[NewRow] = []
        for i, m in enumerate(req.messages):
            self._check_content(m.content, f"messages[{i}].content")
            meta = self._meta_json(m.meta, f"messages[{i}].meta")
            rows.append((m.role, m.content, m.timestamp, meta, m.idem_key))
        tag = self._inner(req.session_tag)
        await self._submit(Insert(tag, rows), req.id, _append_many_reply)

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

    @staticmethod
    def _meta_json(meta: dict[str, Any] | None, field: str) -> str | None:
        if meta is None:
            return None
        _check_json(meta, field, 0)
        return _json_encode(meta).decode()

    async def _read(self, req: Any) -> None:
        try:
            reply = await self._query(req)
        except NexusError as exc:
            self._send_error(req.id, exc)
            return
        except Exception:
            logger.exception("read %s failed", type(req).__name__)
            self._send_error(req.id, Internal("read failed; see the daemon's log"))
            return
        self._send_reply(reply)

    async def _query(self, req: Any) -> Any:
        readers = self.server.readers
        if type(req) is p.History:
            rows, cut = await readers.history(
                self._inner(req.session_tag),
                req.limit,
                before_id=req.before_id,
                after_id=req.after_id,
                budget=self.max_frame - _ENVELOPE,
            )
            msgs = [self._message(r) for r in rows]
            return _fit_history(req, msgs, cut, self.max_frame - _ENVELOPE)
        if type(req) is p.Count:
            return p.CountReply(id=req.id, count=await readers.count(self._inner(req.session_tag)))
        if type(req) is p.Sessions:
            ns = self.ns
            after = req.after if ns is None or req.after is None else ns.inner(req.after)
            scope = None if ns is None else ns.scope
            tags, more = await readers.sessions(after=after, limit=req.limit, scope=scope)
            outer = self._outer
            infos = [
                p.SessionInfo(
                    session_tag=outer(t), count=n, first_id=f, last_id=la, last_timestamp=ts
                )
                for t, n, f, la, ts in tags
            ]
            return p.SessionsReply(id=req.id, sessions=infos, truncated=more)
        if type(req) is p.BackupBegin:
            if self.ns is not None and self.ns.scope != "":
                # A copy holds every namespace: only those who may see them all.
                raise Forbidden("backups need an admin uid when isolate_peers is on")
            token, size = await self.server.snapshots.begin()
            self._backups.add(token)
            return p.BackupBeginReply(id=req.id, backup=token, size=size)
        if isinstance(req, (p.BackupRead, p.BackupEnd)) and req.backup not in self._backups:
            raise NotFound("no such backup on this connection", field="backup")
        if isinstance(req, p.BackupRead):
            data, eof = await self.server.snapshots.read(req.backup, req.offset, req.length)
            return p.BackupReadReply(id=req.id, data=data, eof=eof)
        if isinstance(req, p.BackupEnd):
            self._backups.discard(req.backup)
            self.server.snapshots.end(req.backup)
            return p.BackupEndReply(id=req.id)
        raise BadRequest(f"unsupported operation {type(req).__name__}", field="op")


def _fit_history(req: p.History, msgs: list[p.Message], cut: bool, budget: int) -> p.HistoryReply:
    """Guard the SQL size estimate: drop rows from the far edge until the reply fits."""
    reply = p.HistoryReply(id=req.id, messages=msgs, truncated=cut)
    if len(p.encoder.encode(reply)) <= budget:
        return reply
    # Keep the side the page starts from: the newest for back-paging, else the oldest.
    keep_newest = req.after_id is None
    ordered = list(reversed(msgs)) if keep_newest else list(msgs)
    total, kept = 64, []
    for m in ordered:
        total += len(p.encoder.encode(m))
        if total > budget:
            break
        kept.append(m)
    if keep_newest:
        kept.reverse()
    return p.HistoryReply(id=req.id, messages=kept, truncated=True)


def row_to_message(row: tuple[Any, ...]) -> p.Message:
    meta = row[5]
    return p.Message(
        id=row[0],
        role=row[1],
        content=row[2],
        timestamp=row[3],
        session_tag=row[4],
        meta=_json_decode(meta) if meta is not None else None,
    )


def _check_json(value: Any, field: str, depth: int) -> None:
    """Accept only what JSON can hold: no bytes, extensions, or non-finite floats."""
    if depth > _MAX_META_DEPTH:
        raise BadRequest(f"{field} nests deeper than {_MAX_META_DEPTH}", field=field)
    t = type(value)
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
