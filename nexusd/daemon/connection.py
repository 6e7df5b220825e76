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
* Memory in total (the server's :class:`~nexusd.limits.Budget`): a frame
  announced bigger than ``LARGE_FRAME`` is buffered only once its size is
  reserved (else the connection stops being read until there is room), and
  that reservation is kept until its request is answered: while the frame (or
  the rows it decoded to) waits in the backlog or the writer's queue, and
  until its reply is written.  A history page is cut to the room there is (a
  backup chunk waits for it); unsent replies count until the transport has
  written them.  While the budget is spent, a connection with unsent replies
  is not read.  Frames up to ``LARGE_FRAME`` are not counted: one connection
  holds at most one read's worth (``READ_CHUNK``) of them in its backlog and
  ``MAX_READS`` reads, and the writer's queue at most ``queue_size`` of them
  (with their decoded rows, about twice queue_size x 64 KiB in the worst case).
* Everything a connection takes from the budget is counted in its
  :class:`~nexusd.limits.Share` the moment it is taken, and given back in one
  go when the connection is lost, whatever its tasks were doing (a read whose
  cancellation was swallowed, a grant not yet seen, replies the transport
  dropped).  A write in the writer's queue carries its frame's reservation in
  a :class:`~nexusd.limits.Hold`, given back when the writer answers it.
* Deadlines, one loop timer per connection: a frame must be complete within
  ``frame_timeout`` of its first byte (a trickle does not extend it), and a
  connection that sends nothing for ``idle_timeout`` while none of its
  requests is in flight is closed.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math
from typing import TYPE_CHECKING, Any, Final, cast

from ..storage.writes import Op
from ..wire import protocol as p
from ..wire.errors import Internal, NexusError, Overloaded, TooLarge, Unavailable
from ..wire.framing import FrameDecoder, encode_frame
from .handlers import READS, Build, Dispatcher
from .limits import Hold, QuietLog, Share

if TYPE_CHECKING:
    from .server import Server

logger = logging.getLogger(__name__)
_quiet = QuietLog(logger)

#: The transport's buffer size above which we stop reading the peer.
WRITE_HIGH_WATER: Final = 1024 * 1024
#: Frames announced bigger than this reserve their size from the budget first.
LARGE_FRAME: Final = 64 * 1024
#: One read from a socket.  Every connection reads into the same buffer (reads
#: are synchronous), so a connection that may not buffer more holds at most
#: this much of a frame it has no reservation for.
READ_CHUNK: Final = 64 * 1024
_read_buffer = bytearray(READ_CHUNK)
_read_view = memoryview(_read_buffer)
#: Room for a reply's envelope around the data it carries.
_ENVELOPE: Final = 16 * 1024
#: Queries one connection may have running at once.  A reply can be a whole
#: frame, so this (not max_inflight) bounds what a peer that does not read
#: can make the daemon hold: about this many frames, plus the write buffer.
MAX_READS: Final = 16

# What _handle did with a frame.
_DONE, _QUEUE_FULL, _READS_BUSY = 0, 1, 2


class Connection(asyncio.BufferedProtocol):
    """Serves one accepted connection until the peer leaves or the server stops."""

    def __init__(self, server: Server) -> None:
        super().__init__()
        self.server = server
        self.budget = server.budget
        #: Everything this connection holds of the budget; closed with the connection.
        self.share = Share(server.budget)
        cfg = server.config
        self.max_inflight = cfg.max_inflight
        self.decoder = FrameDecoder(cfg.max_frame)
        #: The smallest history page we cut to when memory is short: one message that fits.
        self.min_page = min(cfg.max_frame, cfg.max_content + cfg.max_meta + _ENVELOPE)
        self.dispatcher: Dispatcher | None = None
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.outstanding = 0  # frames taken, replies not yet handed to the transport
        self.closed = False
        self._out: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None
        #: Frames that must wait, each with the budget reserved for it (big frames).
        self._backlog: collections.deque[tuple[bytes, int]] = collections.deque()
        self._backlog_task: asyncio.Task[None] | None = None
        #: The write job of the frame _handle last found the queue full for.
        self._full: tuple[int, Op, Build] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._reading = True
        self._write_paused = False
        self._close_when_flushed = False
        self._timer: asyncio.TimerHandle | None = None
        self._idle_since = self.loop.time()
        self._frame_start: float | None = None  # first byte of the frame in progress
        self._frame_reserved = 0  # budget held for the big frame in progress
        self._frame_wait: asyncio.Future[int] | None = None  # in line for that budget
        self._charged = 0  # budget held for bytes in the transport's buffer
        self._credit = 0  # reservations of replies built, not yet written: they pay for them
        self._starved = False  # waiting for the budget to have room again
        self._room: asyncio.Future[None] | None = None  # set when in-flight room frees up
        self.finished = asyncio.Event()

    # ── lifecycle ─────────────────────────────────────────────────────────
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        # high=0, low=0: pause_writing means "bytes wait in the buffer" and
        # resume_writing means "all written", which is when their budget is given back.
        transport.set_write_buffer_limits(high=0, low=0)
        refusal, ns = self.server.admit(transport.get_extra_info("socket"), self)
        if refusal is not None:
            self._refuse(refusal)
            return
        self.dispatcher = Dispatcher(self.server, ns)
        cfg = self.server.config
        self._arm(self._idle_since + cfg.idle_timeout)

    def _refuse(self, err: NexusError) -> None:
        """Say why (no request id applies) and hang up."""
        self.closed = True
        assert self.transport is not None
        self.transport.write(encode_frame(p.encoder.encode(p.error_reply(None, err))))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        # Whatever this connection held or was granted, in any state: all back.
        self._frame_wait = None
        self.share.close()
        self._frame_reserved = self._charged = self._credit = 0
        if self._starved:
            self.budget.forget_room(self._room_again)
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
    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_read_view[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.closed or self._close_when_flushed:
            return
        decoder = self.decoder
        now = self._idle_since = self.loop.time()
        in_frame = decoder.pending > 0
        try:
            frames = decoder.feed(data)
        except TooLarge as exc:
            self._take()
            self._reply(p.error_reply(None, exc))
            self._close_when_flushed = True
            self._set_reading()
            self._maybe_close()
            return
        reserved = 0
        if frames and self._frame_reserved:
            # That big frame is complete (it is frames[0]): its reservation now
            # follows the request until it is answered.
            reserved, self._frame_reserved = self._frame_reserved, 0
        if not decoder.pending:
            self._frame_start = None
        elif frames or not in_frame:  # a new frame began in this chunk
            self._frame_start = now
            self._arm(now + self.server.config.frame_timeout)
        expected = decoder.expected
        if expected > LARGE_FRAME and not self._frame_reserved and self._frame_wait is None:
            self._reserve_frame(expected)
        backlog = self._backlog
        for i, body in enumerate(frames):
            if backlog or self.outstanding >= self.max_inflight or self._handle(body, reserved):
                backlog.append((body, reserved))
                backlog.extend((f, 0) for f in frames[i + 1 :])
                break
            reserved = 0
        if self._backlog and self._backlog_task is None:
            self._backlog_task = self.loop.create_task(self._work_backlog())
        self._set_reading()

    def _handle(self, body: bytes, reserved: int) -> int:
        """Handle one frame now, or say why it must wait (then nothing was done).

        ``reserved``: the budget held for this frame (0 for a small one); it is
        kept until the request's reply is handed to the transport.
        """
        try:
            req = p.decode_request(body)
        except p.RequestError as exc:
            self._take()
            self._credit += reserved
            self._reply(p.error_reply(exc.request_id, exc))
            return _DONE
        if self.server.draining:
            self._take()
            self._credit += reserved
            self._error(req.id, Unavailable("nexusd is shutting down"))
            return _DONE
        assert self.dispatcher is not None
        try:
            job = self.dispatcher.write_job(req)
            if job is not None:
                op, build = job
                if not reserved:  # the hot path: a small frame
                    if not self.server.writer.submit_nowait(op, self._done(req.id, build)):
                        self._full = (req.id, op, build)
                        return _QUEUE_FULL
                    self._take()
                    return _DONE
                # The job (its decoded rows) keeps the frame's reservation until answered.
                hold = self.share.detach(reserved)
                queued = False
                try:
                    queued = self.server.writer.submit_nowait(op, self._done(req.id, build, hold))
                finally:
                    if not queued:
                        self.share.adopt(hold)
                if not queued:
                    self._full = (req.id, op, build)
                    return _QUEUE_FULL
                self._take()
                return _DONE
        except NexusError as exc:
            self._take()
            self._credit += reserved
            self._error(req.id, exc)
            return _DONE
        reply = self.dispatcher.immediate(req)
        if reply is not None:
            self._take()
            self._credit += reserved
            self._reply(reply)
        elif isinstance(req, READS):
            if self._write_paused or len(self._tasks) >= MAX_READS:
                return _READS_BUSY
            self._take()
            task = self.loop.create_task(self._read(req, reserved))
            self._tasks.add(task)
            task.add_done_callback(self._read_done)
        else:  # every request type is one of the above; never leave a frame unanswered
            self._take()
            self._credit += reserved
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
                body, reserved = self._backlog[0]
                status = self._handle(body, reserved)
                if status == _DONE:
                    self._backlog.popleft()
                    continue
                if status == _READS_BUSY:
                    await self._wait()
                    continue
                # The writer's queue is full: wait for room, in order, up to the
                # deadline, with the job _handle just built (not decoded again).
                self._backlog.popleft()
                assert self._full is not None
                (rid, op, build), self._full = self._full, None
                self._take()
                hold = self.share.detach(reserved)
                try:
                    await self.server.writer.submit(
                        op, self._done(rid, build, hold), timeout=cfg.enqueue_timeout
                    )
                except BaseException as exc:
                    # Not queued: the reservation is the connection's again
                    # (given straight back if it is gone).
                    self._credit += self.share.adopt(hold)
                    if not isinstance(exc, NexusError):
                        raise
                    self._error(rid, exc)
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
        if self._charged and self.budget.full and not self._starved:
            # Memory is spent and this peer has replies it has not read yet.
            self._starved = True
            self.budget.when_room(self._room_again)
        want = not (
            self._backlog
            or self._write_paused
            or self.outstanding >= self.max_inflight
            or self._close_when_flushed
            or self._frame_wait is not None
            or self._starved
        )
        if want != self._reading:
            self._reading = want
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def _room_again(self) -> None:
        self._starved = False
        self._set_reading()

    def _reserve_frame(self, size: int) -> None:
        """Hold ``size`` bytes of the budget for the frame in progress, or wait in line."""
        taken = self.share.try_take(size)
        if taken:
            self._frame_reserved = taken
            return
        wait = self._frame_wait = self.share.wait(size)
        wait.add_done_callback(self._frame_granted)

    def _frame_granted(self, wait: asyncio.Future[int]) -> None:
        # (Granted bytes are in the share already: a closed one gave them back.)
        if wait.cancelled() or wait is not self._frame_wait or self.closed:
            return
        self._frame_wait = None
        self._frame_reserved = wait.result()
        self._set_reading()

    # ── deadlines ─────────────────────────────────────────────────────────
    def _arm(self, when: float) -> None:
        """Make sure the timer fires by ``when`` (it re-checks everything then)."""
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self._timer = self.loop.call_at(when, self._check_deadlines)

    def _check_deadlines(self) -> None:
        self._timer = None
        if self.closed:
            return
        cfg = self.server.config
        now = self.loop.time()
        due = math.inf
        if self._frame_start is not None:
            due = self._frame_start + cfg.frame_timeout
            if now >= due:
                self._frame_expired(cfg.frame_timeout)
                return
        if self.outstanding or self._backlog or self._tasks:
            idle_due = now + cfg.idle_timeout  # busy: look again later
        else:
            idle_due = self._idle_since + cfg.idle_timeout
            if now >= idle_due:
                _quiet.info("idle", "closing a connection idle for %gs", cfg.idle_timeout)
                self.close()
                return
        self._arm(min(due, idle_due))

    def _frame_expired(self, timeout: float) -> None:
        if self._frame_wait is not None:
            _quiet.warning(
                "budget",
                "refusing a %d-byte frame: max_buffered stayed spent for %gs",
                self.decoder.expected,
                timeout,
            )
            err = Overloaded("max_buffered is spent; send that frame later", retry_after=1.0)
            self._refuse(err)
            return
        _quiet.info("frame", "closing a connection whose frame took over %gs", timeout)
        self.close()

    # ── output ────────────────────────────────────────────────────────────
    def _done(self, request_id: int, build: Build, hold: Hold | None = None) -> Any:
        if hold is None:
            return functools.partial(self._write_done, request_id, build)
        return functools.partial(self._big_write_done, request_id, build, hold)

    def _big_write_done(self, request_id: int, build: Build, hold: Hold, result: Any) -> None:
        # The frame's reservation pays for the reply; back to the budget if we are gone.
        self._credit += self.share.adopt(hold)
        self._write_done(request_id, build, result)

    def _write_done(self, request_id: int, build: Build, result: Any) -> None:
        if isinstance(result, NexusError):
            self._error(request_id, result)
        else:
            self._reply(build(request_id, result))

    async def _read(self, req: Any, reserved: int) -> None:
        """Run one query; ``reserved`` (the request frame's) and the reply's
        reservation are held until the reply is handed to the transport.

        A connection lost meanwhile took them back already (its share is
        closed), even if this task's cancellation was swallowed on the way
        (``wait_for`` and channel receives may return a result instead): then
        nothing here gives or keeps anything.
        """
        assert self.dispatcher is not None
        held = 0
        try:
            held = await self._reserve_reply(req)
            if type(req) is p.History:
                reply = await self.dispatcher.query(req, page_bytes=held)
            else:
                reply = await self.dispatcher.query(req)
        except NexusError as exc:
            self._credit += reserved + held
            self._error(req.id, exc)
            return
        except BaseException as exc:
            self.share.release(reserved + held)
            if not isinstance(exc, Exception):
                raise
            logger.exception("read %s failed", type(req).__name__)
            self._error(req.id, Internal("read failed; see the daemon's log"))
            return
        if self.closed:
            return
        # The reservations pay for the reply's bytes when _flush hands them over.
        self._credit += reserved + held
        self._reply(reply)

    async def _reserve_reply(self, req: Any) -> int:
        """Room in the budget for a big reply before it is built (0: not a big one).

        A history page is cut to the room there is, down to one message's
        worth; a backup chunk needs all of its length.  With less free, the
        read waits in line, up to ``enqueue_timeout``, then gets ``overloaded``.
        """
        if type(req) is p.History:
            want, floor = self.decoder.max_frame, self.min_page
        elif type(req) is p.BackupRead:
            want = floor = min(self.decoder.max_frame, req.length + _ENVELOPE)
        else:
            return 0
        held = self.share.take_up_to(want, floor)
        if held:
            return held
        wait = self.share.wait(floor)
        try:
            return await asyncio.wait_for(asyncio.shield(wait), self.server.config.enqueue_timeout)
        except BaseException as exc:  # timed out, or the connection went away
            if not wait.cancel() and not wait.cancelled():
                self.share.release(wait.result())  # granted just as we gave up
            if isinstance(exc, TimeoutError):
                raise Overloaded(
                    "max_buffered is spent by unread replies; retry later", retry_after=1.0
                ) from None
            raise

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
            return  # (a lost connection's share gave its credit back)
        transport = self.transport
        transport.write(b"".join(out) if len(out) > 1 else out[0])
        # What the peer has not taken yet counts against the budget until written.
        buffered = transport.get_write_buffer_size()
        grown = buffered - self._charged
        credit, self._credit = self._credit, 0
        if grown > credit:
            self.share.charge(grown - credit)
        elif grown < credit:
            self.share.release(credit - grown)
        self._charged = buffered
        if buffered > WRITE_HIGH_WATER:
            self._write_paused = True
        n = len(out)
        self.outstanding -= n
        if not self.outstanding:
            self._idle_since = self.loop.time()
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
        pass  # with high=0 this only means "not all written yet": _flush measures it

    def resume_writing(self) -> None:
        # Everything is written (low=0): give its budget back.
        charged, self._charged = self._charged, 0
        self.share.release(charged)
        self._write_paused = False
        self._wake()
        self._set_reading()
