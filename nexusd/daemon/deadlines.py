"""One connection's two deadlines, on one loop timer.

* ``frame_timeout``: a frame must be complete within this long of its first
  byte; a trickle of bytes does not extend it.
* ``idle_timeout``: a connection that sends nothing for this long while none
  of its requests is in flight is closed.

One ``call_at`` timer per connection, re-armed only when a deadline moves
earlier: when it fires it re-checks both and arms itself for the next one.
What to do when one passes is the connection's business (``expired``).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Literal

__all__ = ["Deadlines"]

Expired = Literal["frame", "idle"]


class Deadlines:
    """The frame and idle deadlines of one connection."""

    __slots__ = (
        "_busy",
        "_expired",
        "_loop",
        "_timer",
        "frame_start",
        "frame_timeout",
        "idle_since",
        "idle_timeout",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        frame_timeout: float,
        idle_timeout: float,
        busy: Callable[[], bool],
        expired: Callable[[Expired], None],
    ) -> None:
        self._loop = loop
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        #: Whether the connection has work in flight (then it is not idle).
        self._busy = busy
        self._expired = expired
        self._timer: asyncio.TimerHandle | None = None
        #: When the peer last sent something, or the connection last went quiet.
        self.idle_since = loop.time()
        #: The first byte of the frame in progress (None: no partial frame).
        self.frame_start: float | None = None

    def timeout(self, what: Expired) -> float:
        return self.frame_timeout if what == "frame" else self.idle_timeout

    def start(self) -> None:
        self.arm(self.idle_since + self.idle_timeout)

    def frame_begun(self, now: float) -> None:
        self.frame_start = now
        self.arm(now + self.frame_timeout)

    def arm(self, when: float) -> None:
        """Make sure the timer fires by ``when`` (it re-checks everything then)."""
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self._timer = self._loop.call_at(when, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        now = self._loop.time()
        due = math.inf
        if self.frame_start is not None:
            due = self.frame_start + self.frame_timeout
            if now >= due:
                self._expired("frame")
                return
        if self._busy():
            idle_due = now + self.idle_timeout  # busy: look again later
        else:
            idle_due = self.idle_since + self.idle_timeout
            if now >= idle_due:
                self._expired("idle")
                return
        self.arm(min(due, idle_due))
