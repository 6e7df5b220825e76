"""Limits shared by every connection: the global memory budget, quiet warnings, malloc.

* :class:`Budget` counts the bytes the daemon holds for large partial frames,
  for the replies of large reads while they are built, and for replies sitting
  unsent in transports.  A taker either gets room now, waits in line for it
  (first come, first served), or charges bytes that already exist.
* :class:`QuietLog` keeps a flood (refused connects, dropped notifications)
  from writing one log line per event: at most one line per reason and period,
  with the number of events it stood for.
* :func:`tune_malloc` makes glibc hand large freed blocks back to the kernel,
  so a burst of big frames does not leave the daemon's RSS high forever.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable
from typing import Final

__all__ = ["Budget", "QuietLog", "tune_malloc"]

logger = logging.getLogger(__name__)


class Budget:
    """Bytes the daemon may hold at once for big frames and unsent replies."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self.peak = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[int]]] = collections.deque()
        self._on_room: list[Callable[[], None]] = []

    @property
    def full(self) -> bool:
        return self.used >= self.total

    @property
    def waiting(self) -> int:
        return sum(1 for _, f in self._waiters if not f.done())

    def clamp(self, n: int) -> int:
        """What a request of ``n`` bytes can ever get (the budget is its ceiling)."""
        return min(n, self.total)

    def try_take(self, n: int) -> bool:
        """Take ``n`` bytes if they are free and nobody is waiting before us."""
        n = self.clamp(n)
        if self.used + n > self.total or self._has_waiters():
            return False
        self._add(n)
        return True

    def take_up_to(self, want: int, floor: int) -> int:
        """Take ``want`` bytes, or what is free if that is at least ``floor``; else 0."""
        if self._has_waiters():
            return 0
        n = min(self.clamp(want), self.total - self.used)
        if n < min(floor, want):
            return 0
        self._add(n)
        return n

    def charge(self, n: int) -> None:
        """Count bytes that already exist (an unsent reply), even past the budget."""
        self._add(n)

    def wait(self, n: int) -> asyncio.Future[int]:
        """A future that completes with ``n`` (clamped) once those bytes are taken for us.

        Cancelling it gives up the place in line; a caller that cancels after
        it completed must :meth:`release` the result itself.
        """
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append((self.clamp(n), fut))
        self._grant()
        return fut

    def release(self, n: int) -> None:
        if n <= 0:
            return
        self.used -= n
        self._grant()
        if self._on_room and not self.full:
            callbacks, self._on_room = self._on_room, []
            for cb in callbacks:
                cb()

    def when_room(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, the next time the budget is no longer full."""
        self._on_room.append(callback)

    def _add(self, n: int) -> None:
        self.used += n
        if self.used > self.peak:
            self.peak = self.used

    def _has_waiters(self) -> bool:
        while self._waiters and self._waiters[0][1].done():
            self._waiters.popleft()  # cancelled: gave up its place
        return bool(self._waiters)

    def _grant(self) -> None:
        while self._has_waiters():
            n, fut = self._waiters[0]
            if self.used + n > self.total:
                return
            self._waiters.popleft()
            self._add(n)
            fut.set_result(n)


class QuietLog:
    """At most one log line per reason and ``period`` seconds, counting the rest."""

    def __init__(self, log: logging.Logger, period: float = 10.0) -> None:
        self.log = log
        self.period = period
        self._last: dict[str, float] = {}
        self._muted: collections.Counter[str] = collections.Counter()

    def warning(self, reason: str, msg: str, *args: object) -> None:
        self._emit(logging.WARNING, reason, msg, args)

    def info(self, reason: str, msg: str, *args: object) -> None:
        self._emit(logging.INFO, reason, msg, args)

    def _emit(self, level: int, reason: str, msg: str, args: tuple[object, ...]) -> None:
        now = time.monotonic()
        last = self._last.get(reason)
        if last is not None and now - last < self.period:
            self._muted[reason] += 1
            return
        self._last[reason] = now
        muted = self._muted.pop(reason, 0)
        if muted:
            msg += " (and %d more like it in the last %gs)"
            args = (*args, muted, round(now - last, 1) if last is not None else self.period)
        self.log.log(level, msg, *args)


_M_MMAP_THRESHOLD: Final = -3
#: Blocks at least this big are mmap'ed, so freeing them returns them to the kernel.
MMAP_THRESHOLD: Final = 128 * 1024


def tune_malloc() -> bool:
    """Fix glibc's mmap threshold (else it grows after each big free and keeps RSS).

    glibc raises the threshold every time an mmap'ed block is freed, up to
    32 MiB: after one burst of 4 MiB frames every later big buffer comes from
    the heap, whose fragments are never returned.  Setting it explicitly turns
    that off.  Not glibc (musl, macOS): nothing to do.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
