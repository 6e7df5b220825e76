"""One client connection, as an asyncio protocol: frames in, replies out.

The daemon runs on asyncio (aiosqlite needs it), so the connection layer talks
to the event loop's transports directly instead of through stream wrappers: a
``receive()`` per frame costs a failed ``recv`` and an epoll registration,
while ``data_received`` gets whatever arrived and every frame in it is handled
in one go.

* Frames are handled in arrival order.  A write goes to the writer's queue
  right away, so one connection's appends commit in the order they were sent;
  its reply comes back through a callback.  Reads run as tasks.
* Replies produced in one turn of the loop leave in one ``write``.
* Backpressure: a connection stops being read while it has ``max_inflight``
  requests unanswered, while the writer's queue is full (the frames wait, in
  order; past ``enqueue_timeout`` they get ``overloaded``), and while its own
  transport buffer is over the high-water mark (a peer that never reads).
* Half a frame followed by silence for ``idle_timeout`` ends the connection.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from typing import TYPE_CHECKING, Any, Final, cast

from . import protocol as p
from .dispatch import READS, Build, Dispatcher
from .errors import Internal, NexusError, TooLarge, Unavailable
from .framing import FrameDecoder, encode_frame

if TYPE_CHECKING:
    from .server import Server

logger = logging.getLogger(__name__)

#: The transport's buffer size above which we stop reading the peer.
WRITE_HIGH_WATER: Final = 1024 * 1024
#: Queries one connection may have running at once.  A reply can be a whole
#: frame, so this (not max_inflight) bounds what a peer that does not read
#: can make the daemon hold: about this many frames, plus the write buffer.
MAX_READS: Final = 16

# What _handle did with a frame.
_DONE, _QUEUE_FULL, _READS_BUSY = 0, 1, 2


class Connection(asyncio.Protocol):
    """Serves one accepted connection until the peer leaves or the server stops."""

    def __init__(self, server: Server) -> None:
        super().__init__()
        self.server = server
        cfg = server.config
        self.max_inflight = cfg.max_inflight
        self.decoder = FrameDecoder(cfg.max_frame)
        self.dispatcher: Dispatcher | None = None
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.outstanding = 0  # frames taken, replies not yet handed to the transport
        self.closed = False
        self._out: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None
        self._backlog: collections.deque[bytes] = collections.deque()
        self._backlog_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._reading = True
        self._write_paused = False
        self._close_when_flushed = False
        self._progress = 0
        self._stall_timer: asyncio.TimerHandle | None = None
        self._room: asyncio.Future[None] | None = None  # set when in-flight room frees up
        self.finished = asyncio.Event()

    # ── lifecycle ─────────────────────────────────────────────────────────
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        refusal, ns = self.server.admit(transport.get_extra_info("socket"), self)
        if refusal is not None:
            self.closed = True
            transport.write(encode_frame(p.encoder.encode(p.error_reply(None, refusal))))
            transport.close()
            return
        self.dispatcher = Dispatcher(self.server, ns)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._stall_timer is not None:
            self._stall_timer.cancel()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._backlog_task is not None:
            self._backlog_task.cancel()
        self._backlog.clear()
        if self.dispatcher is not None:
            self.dispatcher.release()
            self.server.forget(self)
        self.finished.set()

    def close(self) -> None:
        """End the connection now (shutdown): unflushed replies are dropped."""
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    def eof_received(self) -> bool:
        # The peer is done sending; answer what it asked, then close.
        self._close_when_flushed = True
        self._maybe_close()
        return True

    # ── input ─────────────────────────────────────────────────────────────
    def data_received(self, data: bytes) -> None:
        if self.closed or self._close_when_flushed:
            return
        self._progress += 1
        try:
            frames = self.decoder.feed(data)
        except TooLarge as exc:
            self._take()
            self._reply(p.error_reply(None, exc))
            self._close_when_flushed = True
            self._set_reading()
            self._maybe_close()
            return
        if self.decoder.pending and self._stall_timer is None:
            self._watch_stall(self._progress)
        if self._backlog:
            self._backlog.extend(frames)
        else:
            for i, body in enumerate(frames):
                if self.outstanding >= self.max_inflight or self._handle(body) != _DONE:
                    self._backlog.extend(frames[i:])
                    break
        if self._backlog and self._backlog_task is None:
            self._backlog_task = self.loop.create_task(self._work_backlog())
        self._set_reading()

    def _handle(self, body: bytes) -> int:
        """Handle one frame now, or say why it must wait (then nothing was done)."""
        try:
            req = p.decode_request(body)
        except p.RequestError as exc:
            self._take()
            self._reply(p.error_reply(exc.request_id, exc))
            return _DONE
        if self.server.draining:
            self._take()
            self._error(req.id, Unavailable("nexusd is shutting down"))
            return _DONE
        assert self.dispatcher is not None
        try:
            job = self.dispatcher.write_job(req)
            if job is not None:
                op, build = job
                if not self.server.writer.submit_nowait(op, self._done(req.id, build)):
                    return _QUEUE_FULL
                self._take()
                return _DONE
        except NexusError as exc:
            self._take()
            self._error(req.id, exc)
            return _DONE
        reply = self.dispatcher.immediate(req)
        if reply is not None:
            self._take()
            self._reply(reply)
        elif isinstance(req, READS):
            if self._write_paused or len(self._tasks) >= MAX_READS:
                return _READS_BUSY
            self._take()
            task = self.loop.create_task(self._read(req))
            self._tasks.add(task)
            task.add_done_callback(self._read_done)
        else:  # every request type is one of the above; never leave a frame unanswered
            self._take()
            self._error(req.id, Internal(f"no handler for {type(req).__name__}"))
        return _DONE

    def _read_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._wake()

    def _wake(self) -> None:
        """Something the backlog may be waiting for happened."""
        room = self._room
        if room is not None and not room.done():
            room.set_result(None)

    async def _wait(self) -> None:
        self._room = self.loop.create_future()
        await self._room

    async def _work_backlog(self) -> None:
        """Frames that had to wait (in-flight limit or full queue), in order."""
        cfg = self.server.config
        try:
            while self._backlog and not self.closed:
                if self.outstanding >= self.max_inflight:
                    await self._wait()
                    continue
                body = self._backlog[0]
                status = self._handle(body)
                if status == _DONE:
                    self._backlog.popleft()
                    continue
                if status == _READS_BUSY:
                    await self._wait()
                    continue
                # The writer's queue is full: wait for room, in order, up to the deadline.
                self._backlog.popleft()
                req = p.decode_request(body)  # it decoded a moment ago
                job = self.dispatcher.write_job(req) if self.dispatcher else None
                assert job is not None
                op, build = job
                self._take()
                try:
                    await self.server.writer.submit(
                        op, self._done(req.id, build), timeout=cfg.enqueue_timeout
                    )
                except NexusError as exc:
                    self._error(req.id, exc)
        finally:
            self._backlog_task = None
            self._set_reading()

    def _take(self) -> None:
        self.outstanding += 1
        self.server.inflight += 1

    def _set_reading(self) -> None:
        """Read the peer only while it has room in flight and reads our replies."""
        transport = self.transport
        if transport is None or self.closed:
            return
        want = not (
            self._backlog
            or self._write_paused
            or self.outstanding >= self.max_inflight
            or self._close_when_flushed
        )
        if want != self._reading:
            self._reading = want
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def _watch_stall(self, seen: int) -> None:
        def check() -> None:
            self._stall_timer = None
            if self.closed or not self.decoder.pending:
                return
            if self._progress == seen:
                logger.info("closing a connection stalled mid-frame for %gs", idle)
                self.close()
            else:
                self._watch_stall(self._progress)

        idle = self.server.config.idle_timeout
        self._stall_timer = self.loop.call_later(idle, check)

    # ── output ────────────────────────────────────────────────────────────
    def _done(self, request_id: int, build: Build) -> Any:
        return functools.partial(self._write_done, request_id, build)

    def _write_done(self, request_id: int, build: Build, result: Any) -> None:
        if isinstance(result, NexusError):
            self._error(request_id, result)
        else:
            self._reply(build(request_id, result))

    async def _read(self, req: Any) -> None:
        assert self.dispatcher is not None
        try:
            reply = await self.dispatcher.query(req)
        except NexusError as exc:
            self._error(req.id, exc)
            return
        except Exception:
            logger.exception("read %s failed", type(req).__name__)
            self._error(req.id, Internal("read failed; see the daemon's log"))
            return
        self._reply(reply)

    def _error(self, request_id: int | None, err: NexusError) -> None:
        self._reply(p.error_reply(request_id, err))

    def _reply(self, reply: Any) -> None:
        if self.closed:
            return
        body = p.encoder.encode(reply)
        if len(body) > self.decoder.max_frame:
            err = TooLarge(f"reply of {len(body)} bytes exceeds the frame limit")
            body = p.encoder.encode(p.error_reply(reply.id, err))
        self._out.append(encode_frame(body))
        if self._flush_handle is None:
            # Everything answered in this turn of the loop goes out in one write.
            self._flush_handle = self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        out, self._out = self._out, []
        if self.closed or self.transport is None or not out:
            return
        self.transport.write(b"".join(out) if len(out) > 1 else out[0])
        n = len(out)
        self.outstanding -= n
        self.server.replied(n)
        self._wake()
        self._set_reading()
        self._maybe_close()

    def _maybe_close(self) -> None:
        if (
            self._close_when_flushed
            and self.outstanding == 0
            and not self._backlog
            and self.transport is not None
            and not self.closed
        ):
            self.closed = True
            self.transport.close()  # after the buffered replies are written

    def pause_writing(self) -> None:
        self._write_paused = True
        self._set_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()
        self._set_reading()
