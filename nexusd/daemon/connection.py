"""One client connection, as an asyncio protocol: frames in, requests routed, replies out.

An asyncio protocol, not a stream: a ``receive()`` per frame costs a failed
``recv`` and an epoll registration, while ``data_received`` gets whatever
arrived and every frame in it is handled in one go.

* Each frame is decoded once and routed by its row of the table of
  operations (:data:`~nexusd.wire.ops.OPERATIONS`): ``LOCAL`` is answered at
  once, ``WRITE`` goes to the writer's queue right away (so one connection's
  appends commit in the order they were sent) and is answered by a callback,
  ``READ`` runs as a task (:mod:`~nexusd.daemon.queries`).  What each request
  means is :mod:`~nexusd.daemon.handlers`; replies leave through the
  :mod:`~nexusd.daemon.outbox`; the frame and idle deadlines are
  :mod:`~nexusd.daemon.deadlines`.
* Backpressure: a connection stops being read while it has ``max_inflight``
  requests unanswered, while the writer's queue is full (the frames wait, in
  order, in the backlog, each kept in the form it reached: raw, decoded, or
  as its built job; past ``enqueue_timeout`` a job gets ``overloaded``), and
  while its own transport buffer is over the high-water mark.
* Memory in total (the daemon's :class:`~nexusd.daemon.limits.Budget`, taken
  through the connection's :class:`~nexusd.daemon.limits.Share`, all given
  back when it is lost): a frame announced bigger than ``LARGE_FRAME`` is
  buffered only once its size is reserved (else the connection stops being
  read until there is room), and that reservation is kept until its request
  is answered.  While the budget is spent, a connection with unsent replies is
  not read.  Smaller frames are not counted: one connection holds at most one
  read's worth (``READ_CHUNK``) of them in its backlog and ``MAX_READS``
  queries, and the writer's queue at most ``queue_size`` of them.

Concurrency: the queries and the backlog run as tasks of the daemon's task
group (:attr:`Context.tasks`), and a lost connection cancels them by their
handles.  Events are anyio's, like the rest of the daemon; the budget's grants
are asyncio futures, because they carry a value and are awaited or called back
from protocol callbacks (see :mod:`nexusd.daemon.limits`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final, cast

import anyio

from ..wire import protocol as p
from ..wire.codec import RequestError, decode_request
from ..wire.errors import NexusError, Overloaded, Unavailable
from ..wire.framing import FrameDecoder, encode_frame
from ..wire.ops import BY_REQUEST, Runs
from .backlog import DONE, QUEUE_FULL, READS_BUSY, Backlog, Parked
from .bigframe import BigFrame
from .context import Context
from .deadlines import Deadlines, Expired
from .handlers import Dispatcher
from .jobs import Jobs
from .limits import QuietLog, Share
from .outbox import Outbox
from .queries import Queries
from .watch import Watches

__all__ = ["LARGE_FRAME", "READ_CHUNK", "Connection"]

logger = logging.getLogger(__name__)
_quiet = QuietLog(logger)

#: Frames announced bigger than this reserve their size from the budget first.
LARGE_FRAME: Final = 64 * 1024
#: One read from a socket.  Every connection reads into the same buffer (reads
#: are synchronous), so a connection that may not buffer more holds at most
#: this much of a frame it has no reservation for.
READ_CHUNK: Final = 64 * 1024
_read_buffer = bytearray(READ_CHUNK)
_read_view = memoryview(_read_buffer)
#: Room for a reply's envelope around one message, for the smallest history page.
_ENVELOPE: Final = 16 * 1024

_HANDLED: Final[tuple[int, Parked]] = (DONE, b"")
_CLOSING: Final[dict[Expired, str]] = {
    "idle": "closing a connection idle for %gs",
    "frame": "closing a connection whose frame took over %gs",
}


class Connection(asyncio.BufferedProtocol):
    """Serves one accepted connection until the peer leaves or the server stops."""

    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self.ctx = ctx
        self.inflight = ctx.inflight
        self.budget = ctx.budget
        #: Everything this connection holds of the budget; closed with the connection.
        self.share = Share(ctx.budget)
        limits = self.limits = ctx.limits
        self.max_inflight = limits.max_inflight
        self.decoder = FrameDecoder(limits.max_frame)
        self.loop = asyncio.get_running_loop()
        self.out = Outbox(self.loop, self.share, limits.max_frame, self._flushed)
        self.jobs = Jobs(ctx, self.share, self.out, self._take)
        self.deadlines = Deadlines(
            self.loop,
            frame_timeout=limits.frame_timeout,
            idle_timeout=limits.idle_timeout,
            busy=self._busy,
            expired=self._expired,
        )
        self.dispatcher: Dispatcher | None = None
        self.queries: Queries | None = None
        self.watches: Watches | None = None
        self.transport: asyncio.Transport | None = None
        self.outstanding = 0  # frames taken, replies not yet handed to the transport
        self.closed = False
        #: Frames that must wait, each with the budget reserved for it (big frames).
        self.backlog = Backlog(
            ctx.tasks,
            self.jobs,
            handle=self._handle,
            has_room=lambda: self.outstanding < self.max_inflight,
            closed=lambda: self.closed,
            idle=self._set_reading,
        )
        self._reading = True
        self._close_when_flushed = False
        self.big = BigFrame(self.share, self._set_reading)
        self._starved = False  # waiting for the budget to have room again
        self.finished = anyio.Event()

    # ── lifecycle ─────────────────────────────────────────────────────────
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = self.out.transport = transport
        # high=0, low=0: pause_writing means "bytes wait in the buffer" and
        # resume_writing means "all written", which is when their budget is given back.
        transport.set_write_buffer_limits(high=0, low=0)
        refusal, ns = self.ctx.gate.admit(transport.get_extra_info("socket"), self)
        if refusal is not None:
            self._refuse(refusal)
            return
        limits = self.limits
        services = self.ctx.services
        self.watches = Watches(
            services.hub,
            self.out,
            self.ctx.tasks,
            services.readers,
            ns=ns,
            max_frame=limits.max_frame,
        )
        dispatcher = self.dispatcher = Dispatcher(services, ns, self.watches)
        self.queries = Queries(
            self.ctx.tasks,
            dispatcher,
            self.share,
            self.out,
            max_frame=limits.max_frame,
            # The smallest history page we cut to when memory is short: one message that fits.
            min_page=min(limits.max_frame, limits.max_content + limits.max_meta + _ENVELOPE),
            enqueue_timeout=limits.enqueue_timeout,
            ended=self.backlog.wake,
        )
        self.deadlines.start()

    def _stop(self) -> None:
        self.closed = self.out.closed = True

    def _refuse(self, err: NexusError) -> None:
        """Say why (no request id applies) and hang up."""
        self._stop()
        assert self.transport is not None
        self.transport.write(encode_frame(p.encoder.encode(p.error_reply(None, err))))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop()
        self.deadlines.stop()
        # Whatever this connection held or was granted, in any state: all back.
        self.big.forget()
        self.share.close()
        self.out.close()
        if self._starved:
            self.budget.forget_room(self._room_again)
        if self.queries is not None:
            self.queries.cancel()
        if self.watches is not None:
            self.watches.cancel()
        self.backlog.cancel()
        if self.dispatcher is not None:
            self.dispatcher.release()
            self.ctx.gate.forget(self)
        # The replies it was owed can no longer go out.
        if self.outstanding:
            self.inflight.answered(self.outstanding)
            self.outstanding = 0
        self.finished.set()

    def close(self) -> None:
        """End the connection now (shutdown): unflushed replies are dropped."""
        if self.transport is not None and not self.closed:
            self._stop()
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
        deadlines = self.deadlines
        now = deadlines.idle_since = self.loop.time()
        in_frame = decoder.pending > 0
        try:
            frames = decoder.feed(data)
        except NexusError as exc:  # TooLarge: the stream is out of sync
            self._take()
            self.out.error(None, exc)
            self._close_when_flushed = True
            self._set_reading()
            self._maybe_close()
            return
        reserved = 0
        if frames and self.big.reserved:
            # That big frame is complete (it is frames[0]): its reservation now
            # follows the request until it is answered.
            reserved = self.big.take()
        if not decoder.pending:
            deadlines.frame_start = None
        elif frames or not in_frame:  # a new frame began in this chunk
            deadlines.frame_begun(now)
        expected = decoder.expected
        if expected > LARGE_FRAME and not self.big.reserved and self.big.wait is None:
            self.big.reserve(expected)
        backlog = self.backlog
        for i, body in enumerate(frames):
            if backlog or self.outstanding >= self.max_inflight:
                backlog.add(body, reserved)
            else:
                status, parked = self._handle(body, reserved)
                if status == DONE:
                    reserved = 0
                    continue
                backlog.add(parked, reserved)
            backlog.items.extend((f, 0) for f in frames[i + 1 :])
            backlog.start()
            break
        self._set_reading()

    def _handle(self, frame: bytes | p.Request, reserved: int) -> tuple[int, Parked]:
        """Handle one frame now (DONE), or say why it must wait and in what form.

        ``reserved``: the budget held for this frame (0 for a small one); it is
        kept until the request's reply is handed to the transport.
        """
        if type(frame) is bytes:
            try:
                req = decode_request(frame)
            except RequestError as exc:
                self._answer_now(reserved)
                self.out.error(exc.request_id, exc)
                return _HANDLED
        else:
            req = cast(p.Request, frame)
        if self.inflight.draining:
            self._answer_now(reserved)
            self.out.error(req.id, Unavailable("nexusd is shutting down"))
            return _HANDLED
        dispatcher = self.dispatcher
        assert dispatcher is not None and self.queries is not None
        runs = BY_REQUEST[type(req)].runs
        if runs is Runs.WRITE:
            try:
                job = dispatcher.write(req)
                if not self.jobs.try_submit(req.id, job, reserved):
                    return QUEUE_FULL, (req.id, job)
            except NexusError as exc:
                self._answer_now(reserved)
                self.out.error(req.id, exc)
            return _HANDLED
        if runs is Runs.LOCAL:
            self._answer_now(reserved)
            self.out.reply(dispatcher.local(req))
            return _HANDLED
        if runs is Runs.WATCH:  # its frames are pushes: nothing is left in flight
            self.out.credit += reserved
            try:
                dispatcher.watch(req)
            except NexusError as exc:
                self.out.push(p.error_reply(req.id, exc))
            return _HANDLED
        if self.out.paused or self.queries.full:
            return READS_BUSY, req
        self._take()
        self.queries.start(req, reserved)
        return _HANDLED

    def _answer_now(self, reserved: int) -> None:
        """Count a request answered at once; its frame's reservation pays for the reply."""
        self._take()
        self.out.credit += reserved

    def _take(self) -> None:
        self.outstanding += 1
        self.inflight.take()

    # ── reading the peer, or not ──────────────────────────────────────────
    def _set_reading(self) -> None:
        """Read the peer only while it has room in flight and reads our replies."""
        transport = self.transport
        if transport is None or self.closed:
            return
        if self.out.charged and self.budget.full and not self._starved:
            # Memory is spent and this peer has replies it has not read yet.
            self._starved = True
            self.budget.when_room(self._room_again)
        want = not (
            self.backlog
            or self.out.paused
            or self.outstanding >= self.max_inflight
            or self._close_when_flushed
            or self.big.wait is not None
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

    # ── deadlines ─────────────────────────────────────────────────────────
    def _busy(self) -> bool:
        return bool(self.outstanding or self.backlog or self.queries or self.watches)

    def _expired(self, what: Expired) -> None:
        if self.closed:
            return
        timeout = self.deadlines.timeout(what)
        if what == "frame" and self.big.wait is not None:
            _quiet.warning(
                "budget",
                "refusing a %d-byte frame: max_buffered stayed spent for %gs",
                self.decoder.expected,
                timeout,
            )
            self._refuse(
                Overloaded("max_buffered is spent; send that frame later", retry_after=1.0)
            )
            return
        _quiet.info(what, _CLOSING[what], timeout)
        self.close()

    # ── answers ───────────────────────────────────────────────────────────
    def _flushed(self, n: int) -> None:
        """The outbox handed ``n`` replies to the transport."""
        self.outstanding -= n
        if not self.outstanding:
            self.deadlines.idle_since = self.loop.time()
        self.inflight.answered(n)
        self.backlog.wake()
        self._set_reading()
        self._maybe_close()

    def _maybe_close(self) -> None:
        if (
            self._close_when_flushed
            and self.outstanding == 0
            and not self.backlog
            and self.transport is not None
            and not self.closed
        ):
            self._stop()
            self.transport.close()  # after the buffered replies are written

    def pause_writing(self) -> None:
        pass  # with high=0 this only means "not all written yet": the outbox measures it

    def resume_writing(self) -> None:
        # Everything is written (low=0): give its budget back.
        self.out.written()
        if self.watches is not None:
            self.watches.wake()
        self.backlog.wake()
        self._set_reading()
