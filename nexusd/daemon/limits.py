"""Limits shared by every connection: the numbers, the memory budget, requests in
flight, quiet warnings, malloc.

* :class:`Limits` is the part of the configuration the connections and the
  request handlers read (frame, content and meta sizes, in-flight cap,
  deadlines), as one frozen value, so they never see the whole config.
* :class:`InFlight` counts the requests taken and not yet answered over all
  connections (each connection adds and subtracts in the same object), and
  holds the "draining" switch shutdown throws: from then on new requests are
  refused and shutdown waits until the count reaches zero.
* :class:`Budget` counts the bytes the daemon holds for large frames (from
  their first byte until their request is answered), for the replies of large
  reads while they are built, and for replies sitting unsent in transports.  A
  taker either gets room now, waits in line for it (first come, first served),
  or charges bytes that already exist.  A place in line is an asyncio future,
  the one kind of wait here that is not an anyio event: a grant carries a
  value (the bytes granted), leaving the line is cancelling it (with no race:
  a grant that lands as its taker gives up is seen and given back), and a
  connection waits on one from protocol callbacks, where there is no task to
  await an event in.  No task ever awaits one directly (see
  :mod:`.queries`).
* :class:`Share` is one connection's part of the budget.  Everything it takes
  is counted in it the moment it is taken (a grant in line included), its
  releases never give back more than it holds, and :meth:`Share.close` gives
  back all of it at once: when the connection is gone nothing it held stays
  spent, whatever its tasks were doing.  A :class:`Hold` carries bytes out of a
  share (a write job waiting in the writer's queue outlives its connection) and
  is given back exactly once.
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
from dataclasses import dataclass
from typing import Final

import anyio

__all__ = ["Budget", "Hold", "InFlight", "Limits", "QuietLog", "Share", "tune_malloc"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Limits:
    """The configured numbers a connection and its handlers obey."""

    #: Largest frame body, either way.
    max_frame: int
    #: Largest ``content`` of one message, in bytes of UTF-8.
    max_content: int
    #: Largest ``meta`` of one message, in bytes of JSON.
    max_meta: int
    #: Requests one connection may have unanswered before it is not read.
    max_inflight: int
    #: How long a request waits for room (writer's queue, memory) before ``overloaded``.
    enqueue_timeout: float
    #: How long a frame may take from its first byte to its last.
    frame_timeout: float
    #: How long a connection with nothing in flight may stay silent.
    idle_timeout: float


class InFlight:
    """Requests taken and not yet answered, over all connections; and the drain switch.

    Called only on the event loop's thread.
    """

    __slots__ = ("_idle", "count", "draining")

    def __init__(self) -> None:
        self.count = 0
        #: Shutting down: new requests get ``unavailable``.
        self.draining = False
        self._idle = anyio.Event()

    def take(self) -> None:
        """One more request will be answered."""
        self.count += 1

    def answered(self, n: int) -> None:
        """``n`` requests were answered (or can no longer be: their connection is gone)."""
        self.count -= n
        if self.draining and self.count <= 0:
            self._idle.set()

    def drain(self) -> None:
        """Refuse new requests from now on."""
        self.draining = True
        if self.count <= 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once draining and every request taken has been answered."""
        await self._idle.wait()


class Budget:
    """Bytes the daemon may hold at once for big frames and unsent replies."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self.peak = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[int], Share | None]] = (
            collections.deque()
        )
        self._on_room: list[Callable[[], None]] = []

    @property
    def full(self) -> bool:
        return self.used >= self.total

    @property
    def waiting(self) -> int:
        return sum(1 for _, f, _ in self._waiters if not f.done())

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

    def wait(self, n: int, share: Share | None = None) -> asyncio.Future[int]:
        """A future that completes with ``n`` (clamped) once those bytes are taken for us.

        Cancelling it gives up the place in line; a caller that cancels after
        it completed must :meth:`release` the result itself.  With ``share``,
        the granted bytes are counted in it as they are granted.
        """
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append((self.clamp(n), fut, share))
        self._grant()
        return fut

    def release(self, n: int) -> None:
        if n <= 0:
            return
        self.used -= n
        if self.used < 0:  # a bug somewhere: say so, and do not hide later leaks
            logger.error("max_buffered released %d bytes more than were taken", -self.used)
            self.used = 0
        self._grant()
        if self._on_room and not self.full:
            callbacks, self._on_room = self._on_room, []
            for cb in callbacks:
                cb()

    def when_room(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, the next time the budget is no longer full."""
        self._on_room.append(callback)

    def forget_room(self, callback: Callable[[], None]) -> None:
        """Undo :meth:`when_room` (its caller is gone)."""
        try:
            self._on_room.remove(callback)
        except ValueError:
            pass

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
            n, fut, share = self._waiters[0]
            if self.used + n > self.total:
                return
            self._waiters.popleft()
            self._add(n)
            if share is not None:
                share.held += n  # (a closed share's waits are all cancelled: not here)
            fut.set_result(n)


class Share:
    """One connection's part of a :class:`Budget`; :meth:`close` gives all of it back."""

    __slots__ = ("_waits", "budget", "closed", "held")

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.held = 0
        self.closed = False
        self._waits: set[asyncio.Future[int]] = set()

    def try_take(self, n: int) -> int:
        """``n`` (clamped) if it is free now and nobody waits before us, else 0."""
        if self.closed or not self.budget.try_take(n):
            return 0
        n = self.budget.clamp(n)
        self.held += n
        return n

    def take_up_to(self, want: int, floor: int) -> int:
        if self.closed:
            return 0
        n = self.budget.take_up_to(want, floor)
        self.held += n
        return n

    def charge(self, n: int) -> None:
        if n > 0 and not self.closed:
            self.budget.charge(n)
            self.held += n

    def wait(self, n: int) -> asyncio.Future[int]:
        """Like :meth:`Budget.wait`; the grant is ours (and given back by close) at once."""
        if self.closed:
            fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            fut.cancel()
            return fut
        fut = self.budget.wait(n, self)
        if not fut.done():
            self._waits.add(fut)
            fut.add_done_callback(self._waits.discard)
        return fut

    def release(self, n: int) -> None:
        """Give back ``n`` bytes, never more than the share holds (none once closed)."""
        n = min(n, self.held)
        if n > 0:
            self.held -= n
            self.budget.release(n)

    def detach(self, n: int) -> Hold:
        """Move ``n`` held bytes into a :class:`Hold` that outlives this share."""
        n = max(0, min(n, self.held))
        self.held -= n
        return Hold(self.budget, n)

    def adopt(self, hold: Hold) -> int:
        """Take a hold's bytes back (given straight back if closed); how many came."""
        n, hold.n = hold.n, 0
        if self.closed:
            self.budget.release(n)
            return 0
        self.held += n
        return n

    def close(self) -> None:
        """The holder is gone: leave every line, give back everything held.  Idempotent."""
        self.closed = True
        waits, self._waits = self._waits, set()
        for fut in waits:
            fut.cancel()  # not granted yet: leaves the line (a grant is in held already)
        n, self.held = self.held, 0
        self.budget.release(n)


class Hold:
    """Budget bytes carried by one job; :meth:`release` gives them back once."""

    __slots__ = ("budget", "n")

    def __init__(self, budget: Budget, n: int) -> None:
        self.budget = budget
        self.n = n

    def release(self) -> None:
        n, self.n = self.n, 0
        self.budget.release(n)


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
