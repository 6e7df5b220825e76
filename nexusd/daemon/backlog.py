"""One connection's frames that must wait, in arrival order, and the task that works them off.

A frame waits when the connection has ``max_inflight`` requests unanswered,
when it is a query and the connection's queries are at their limit (or its
peer does not read), or when it is a write and the writer's queue is full.
Each waits in the form it reached: raw bytes (not decoded yet), the decoded
request, or the built write job with its request id, so no frame is decoded
or validated twice.  While anything waits the connection is not read, so the
backlog holds at most one read's worth of small frames.

The worker is a task of the daemon's task group, started when the first
frame waits and ending when none does; a lost connection cancels it.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any, Final, TypeAlias

import anyio
import anyio.abc

from ..wire import protocol as p
from .binding import Job
from .jobs import Jobs
from .tasks import Spawner

__all__ = ["DONE", "QUEUE_FULL", "READS_BUSY", "Backlog", "Parked"]

#: What the connection did with a frame: handled, or parked because...
DONE: Final = 0
#: ... the writer's queue is full (parked as its job) ...
QUEUE_FULL: Final = 1
#: ... or no query may start now (parked decoded).
READS_BUSY: Final = 2

#: A waiting frame: raw, decoded, or a write job (with its request id) that
#: found the writer's queue full.
Parked: TypeAlias = bytes | p.Request | tuple[int, Job[Any]]
#: Handles a frame now (DONE) or says why not, with the form to keep it in.
Handle: TypeAlias = Callable[["bytes | p.Request", int], tuple[int, Parked]]


class Backlog:
    """The waiting frames of one connection, each with the budget reserved for it."""

    __slots__ = (
        "_closed",
        "_handle",
        "_has_room",
        "_idle",
        "_jobs",
        "_room",
        "_task",
        "_tasks",
        "items",
    )

    def __init__(
        self,
        tasks: Spawner,
        jobs: Jobs,
        *,
        handle: Handle,
        has_room: Callable[[], bool],
        closed: Callable[[], bool],
        idle: Callable[[], None],
    ) -> None:
        self._tasks = tasks
        self._jobs = jobs
        self._handle = handle
        #: Whether the connection may take one more request in flight.
        self._has_room = has_room
        self._closed = closed
        #: Called when the worker stops (the connection may read again).
        self._idle = idle
        self.items: collections.deque[tuple[Parked, int]] = collections.deque()
        self._task: anyio.TaskHandle[None] | None = None
        self._room: anyio.Event | None = None  # set when what we wait for may have come

    def __bool__(self) -> bool:
        return bool(self.items)

    def add(self, item: Parked, reserved: int) -> None:
        self.items.append((item, reserved))

    def start(self) -> None:
        """Work the frames off, unless that is already under way."""
        if self.items and self._task is None:
            self._task = self._tasks.start_soon(self._work)

    def wake(self) -> None:
        """Something the worker may be waiting for happened (a reply left, a query ended)."""
        if self._room is not None:
            self._room.set()

    def cancel(self) -> None:
        """The connection is gone."""
        if self._task is not None:
            self._task.cancel()
        self.items.clear()

    async def _wait(self) -> None:
        room = self._room = anyio.Event()
        await room.wait()

    async def _work(self) -> None:
        items = self.items
        try:
            while items and not self._closed():
                if not self._has_room():
                    await self._wait()
                    continue
                item, reserved = items[0]
                if type(item) is tuple:
                    items.popleft()
                    rid, job = item
                    await self._jobs.submit(rid, job, reserved)
                    continue
                status, parked = self._handle(item, reserved)  # type: ignore[arg-type]
                if status == DONE:
                    items.popleft()
                    continue
                items[0] = (parked, reserved)  # decoded (a write: its job built) once
                if status == READS_BUSY:
                    await self._wait()
        finally:
            self._task = None
            self._idle()
