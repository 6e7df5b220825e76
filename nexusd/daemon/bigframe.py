"""The budget one connection holds for the big frame it is receiving.

A frame announced bigger than ``LARGE_FRAME`` is buffered only once its size
is reserved from the daemon's budget (through the connection's
:class:`~nexusd.daemon.limits.Share`); until then the connection is not read
and waits in line for room.  Once the frame is complete its reservation is
handed to its request, which keeps it until answered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .limits import Share

__all__ = ["BigFrame"]


class BigFrame:
    """The reservation for the frame in progress, or the wait in line for it."""

    __slots__ = ("_granted", "reserved", "share", "wait")

    def __init__(self, share: Share, granted: Callable[[], None]) -> None:
        self.share = share
        #: Called when a wait ends with the room reserved (the connection may read).
        self._granted = granted
        #: Budget held for the big frame in progress.
        self.reserved = 0
        #: In line for that budget.
        self.wait: asyncio.Future[int] | None = None

    def reserve(self, size: int) -> None:
        """Hold ``size`` bytes for the frame in progress, or wait in line for them."""
        taken = self.share.try_take(size)
        if taken:
            self.reserved = taken
            return
        wait = self.wait = self.share.wait(size)
        wait.add_done_callback(self._done)

    def take(self) -> int:
        """The frame is complete: its reservation, for its request to keep."""
        reserved, self.reserved = self.reserved, 0
        return reserved

    def forget(self) -> None:
        """The connection is gone (its share gives back what was held or granted)."""
        self.wait = None
        self.reserved = 0

    def _done(self, wait: asyncio.Future[int]) -> None:
        # (Granted bytes are in the share already: a closed one gave them back.)
        if wait.cancelled() or wait is not self.wait or self.share.closed:
            return
        self.wait = None
        self.reserved = wait.result()
        self._granted()
