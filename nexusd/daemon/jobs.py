"""One connection's writes on their way through the writer: queued, then answered.

A write handler turns a request into a :class:`~nexusd.daemon.handlers.Job`
(a storage write and the builder of its reply).  :class:`Jobs` hands it to the
writer's queue, now if there is room (the hot path: no task, no await) or,
from the connection's backlog, waiting for room up to ``enqueue_timeout``.
The writer answers through a callback in the event loop, which builds the
reply from the typed result and gives it to the outbox.

A big frame's reservation travels with its job in a
:class:`~nexusd.daemon.limits.Hold` (the job's decoded rows outlive the
frame, and may outlive the connection) and pays for the reply when the
answer comes; if the job is not queued after all, it is the connection's
again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ..wire import protocol as p
from ..wire.errors import NexusError
from .binding import Job
from .context import Context, Done
from .limits import Hold, Share
from .outbox import Outbox

__all__ = ["Jobs"]


class Jobs:
    """Submits one connection's write jobs and routes their answers to its outbox."""

    __slots__ = ("_submit", "_submit_nowait", "_take", "enqueue_timeout", "out", "share")

    def __init__(self, ctx: Context, share: Share, out: Outbox, take: Callable[[], None]) -> None:
        self._submit_nowait = ctx.submit_nowait
        self._submit = ctx.submit
        self.enqueue_timeout = ctx.limits.enqueue_timeout
        self.share = share
        self.out = out
        #: Counts a request as taken (in flight until its reply is written).
        self._take = take

    def try_submit(self, rid: int, job: Job[Any], reserved: int) -> bool:
        """Queue ``job`` if the writer has room now (True), else change nothing (False).

        ``reserved``: the budget its frame holds (0 for a small frame).
        Raises the writer's refusal (shutting down, storage lost, too many rows).
        """
        if not reserved:  # the hot path: a small frame
            if not self._submit_nowait(job.op, functools.partial(self._answer, rid, job.build)):
                return False
            self._take()
            return True
        # The job (its decoded rows) keeps the frame's reservation until answered.
        hold = self.share.detach(reserved)
        queued = False
        try:
            queued = self._submit_nowait(job.op, self._answer_big(rid, job, hold))
        finally:
            if not queued:
                self.share.adopt(hold)
        if queued:
            self._take()
        return queued

    async def submit(self, rid: int, job: Job[Any], reserved: int) -> None:
        """Queue ``job``, waiting for room in order; past the deadline it is answered
        ``overloaded`` (so is any refusal)."""
        self._take()
        hold = self.share.detach(reserved)
        try:
            await self._submit(
                job.op, self._answer_big(rid, job, hold), timeout=self.enqueue_timeout
            )
        except BaseException as exc:
            # Not queued: the reservation is the connection's again
            # (given straight back if it is gone).
            self.out.credit += self.share.adopt(hold)
            if not isinstance(exc, NexusError):
                raise
            self.out.error(rid, exc)

    def _answer_big(self, rid: int, job: Job[Any], hold: Hold) -> Done:
        return functools.partial(self._big_answer, rid, job.build, hold)

    def _big_answer(
        self, rid: int, build: Callable[[int, Any], p.Reply], hold: Hold, result: Any
    ) -> None:
        # The frame's reservation pays for the reply; back to the budget if we are gone.
        self.out.credit += self.share.adopt(hold)
        self._answer(rid, build, result)

    def _answer(self, rid: int, build: Callable[[int, Any], p.Reply], result: Any) -> None:
        if isinstance(result, NexusError):
            self.out.error(rid, result)
        else:
            self.out.reply(build(rid, result))
