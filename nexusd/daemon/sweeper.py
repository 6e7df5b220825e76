"""The sweeper task: storage's background removal, run as long as the daemon serves.

Storage hides what ``clear`` and a lowered retention remove at once, and
deletes it later, a step at a time (:meth:`~nexusd.storage.base.Storage.sweep`);
rows past their age go the same way.  This task decides *when*: at start
(rows may have aged while the daemon was down), whenever a commit left work
(storage's ``on_sweep``), and every ``next_in`` seconds (a tenth of the
shortest age limit; an hour without one, for storage's own upkeep).  After
each step it pauses for as long as the step took, so the sweep has at most
half of the writer's thread and the writer's batches go between steps: a
step is a few milliseconds, and an append waits for at most one.
"""

from __future__ import annotations

import logging

import anyio
import anyio.lowlevel

from ..storage.base import Storage

logger = logging.getLogger(__name__)

__all__ = ["Sweeper"]


class Sweeper:
    """Runs :meth:`Storage.sweep` until :meth:`stop`; :meth:`wake` asks for a step soon."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._scope = anyio.CancelScope()
        self._wake: anyio.Event | None = None
        self._woken = False
        storage.on_sweep = self.wake

    def wake(self) -> None:
        """Called in the event loop (also outside any task): a commit left work."""
        self._woken = True
        if self._wake is not None:
            self._wake.set()

    def stop(self) -> None:
        self._scope.cancel()

    async def run(self) -> None:
        removed = 0
        with self._scope:
            while True:
                # A new event before the step: a wake during it is not lost.
                self._wake = anyio.Event()
                self._woken = False
                began = anyio.current_time()
                swept = await self._storage.sweep()
                removed += swept.removed
                if swept.more:
                    # The writer's batches first: the sweep takes at most half
                    # of the writer's time, however long its steps turn out.
                    await anyio.sleep(anyio.current_time() - began)
                    continue
                if removed:
                    logger.info("swept %d old or cleared messages", removed)
                    removed = 0
                if self._woken:
                    continue
                with anyio.move_on_after(swept.next_in):
                    await self._wake.wait()
