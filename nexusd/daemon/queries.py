"""One connection's queries: at most ``MAX_READS`` at once, each a task of the daemon's group.

A query's reply may be a whole frame, so a big one reserves its memory before
it is built: a history page is cut to the room there is in the budget, down
to one message's worth; a backup chunk needs all of its length.  With less
free, the query waits in line, up to ``enqueue_timeout``, then gets
``overloaded``.  The request frame's own reservation and the reply's are held
until the reply is handed to the transport (the outbox's credit pays for it).

Each query runs in the task group the daemon gave the connection; the handles
are kept so a lost connection cancels its queries.  A query never lets an
exception out (that would stop the daemon): a failure is answered
``internal`` and logged.  A connection lost meanwhile took its reservations
back already (its share is closed), even if the task's cancellation was
swallowed on the way: then nothing here gives or keeps anything.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final

import anyio
import anyio.abc

from ..wire import protocol as p
from ..wire.errors import Internal, NexusError, Overloaded, Unavailable
from .handlers import Dispatcher
from .limits import Share
from .outbox import Outbox
from .tasks import Spawner

__all__ = ["MAX_READS", "Queries"]

logger = logging.getLogger(__name__)

#: Queries one connection may have running at once.  A reply can be a whole
#: frame, so this (not max_inflight) bounds what a peer that does not read
#: can make the daemon hold: about this many frames, plus the write buffer.
MAX_READS: Final = 16
#: Room for a reply's envelope around the data it carries.
_ENVELOPE: Final = 16 * 1024


class Queries:
    """The queries one connection has running."""

    __slots__ = (
        "_ended",
        "_key",
        "_running",
        "_tasks",
        "dispatcher",
        "enqueue_timeout",
        "max_frame",
        "min_page",
        "out",
        "share",
    )

    def __init__(
        self,
        tasks: Spawner,
        dispatcher: Dispatcher,
        share: Share,
        out: Outbox,
        *,
        max_frame: int,
        min_page: int,
        enqueue_timeout: float,
        ended: Callable[[], None],
    ) -> None:
        self._tasks = tasks
        self.dispatcher = dispatcher
        self.share = share
        self.out = out
        self.max_frame = max_frame
        #: The smallest history page we cut to when memory is short.
        self.min_page = min_page
        self.enqueue_timeout = enqueue_timeout
        #: Called when a query ends (its connection may read again).
        self._ended = ended
        #: The queries running, by a key of their own (to forget them when they end).
        self._running: dict[int, anyio.TaskHandle[None]] = {}
        self._key = 0

    def __len__(self) -> int:
        return len(self._running)

    @property
    def full(self) -> bool:
        return len(self._running) >= MAX_READS

    def start(self, req: p.Request, reserved: int) -> None:
        """Run the query for ``req``; ``reserved``: what its frame holds of the budget."""
        key = self._key = self._key + 1
        self._running[key] = self._tasks.start_soon(self._run, req, reserved, key)

    def cancel(self) -> None:
        """The connection is gone: stop every query."""
        for task in self._running.values():
            task.cancel()
        self._running.clear()

    async def _run(self, req: p.Request, reserved: int, key: int) -> None:
        out = self.out
        held = 0
        try:
            try:
                async with self._turn(req):
                    held = await self._reserve_reply(req)
                    reply = await self.dispatcher.read(req, held)
            except NexusError as exc:
                out.credit += reserved + held
                out.error(req.id, exc)
                return
            except BaseException as exc:
                self.share.release(reserved + held)
                if not isinstance(exc, Exception):
                    raise
                logger.exception("read %s failed", type(req).__name__)
                out.error(req.id, Internal("read failed; see the daemon's log"))
                return
            if out.closed:
                return
            # The reservations pay for the reply's bytes when the outbox hands them over.
            out.credit += reserved + held
            out.reply(reply)
        finally:
            self._running.pop(key, None)
            self._ended()

    @asynccontextmanager
    async def _turn(self, req: p.Request) -> AsyncIterator[None]:
        """A search waits for a search slot (daemon-wide) before it reserves memory:
        a flood of slow searches queued for readers held the whole budget, and every
        other client's history was ``overloaded``."""
        if type(req) is not p.Search:
            yield
            return
        searches = self.dispatcher.services.searches
        try:
            with anyio.fail_after(self.enqueue_timeout):
                await searches.acquire()
        except TimeoutError:
            raise Overloaded("every search slot is busy; retry later", retry_after=1.0) from None
        try:
            yield
        finally:
            searches.release()

    async def _reserve_reply(self, req: p.Request) -> int:
        """Room in the budget for a big reply before it is built (0: not a big one)."""
        if type(req) is p.History or type(req) is p.Search:
            want, floor = self.max_frame, self.min_page
        elif type(req) is p.BackupRead:
            want = floor = min(self.max_frame, req.length + _ENVELOPE)
        else:
            return 0
        held = self.share.take_up_to(want, floor)
        if held:
            return held
        wait = self.share.wait(floor)
        # Not awaited directly: the share cancels its waits when the connection
        # is lost, and a task ending on a cancellation that is not its task
        # group's would cancel the whole group (the daemon).
        settled = anyio.Event()
        wait.add_done_callback(lambda _: settled.set())
        try:
            with anyio.fail_after(self.enqueue_timeout):
                await settled.wait()
        except BaseException as exc:  # timed out, or this task was cancelled
            if not wait.cancel() and not wait.cancelled():
                self.share.release(wait.result())  # granted just as we gave up
            if isinstance(exc, TimeoutError):
                raise Overloaded(
                    "max_buffered is spent by unread replies; retry later", retry_after=1.0
                ) from None
            raise
        if wait.cancelled():  # the connection is gone (its share gave everything back)
            raise Unavailable("the connection is closed")
        return wait.result()
