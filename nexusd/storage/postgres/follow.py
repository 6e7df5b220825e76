"""The commits of the other daemons, delivered to this daemon's watches in commit order.

Every write transaction of every daemon logs its changes in ``nexus_log``
under the write lock (:mod:`.log`), so ``seq`` is the commit order across
daemons; ids are taken under the same lock, so that is also id order.
:class:`Follow` keeps the last ``seq`` this daemon delivered and hands its
``publish`` (the storage's ``on_commit``) every change after it, exactly
once and in order, whichever of two paths finds it first:

- **this daemon's own commits**: the write path, holding :attr:`Follow.lock`
  across its transaction, reads the log rows after :attr:`Follow.seq` inside
  the transaction (after the write lock, so every earlier commit is there),
  then, once committed and answered, calls :meth:`Follow.deliver` with those
  rows and its own (``seq``, changes): the others' first, then its own;
- **the others' commits while this daemon is idle**: :meth:`Follow.listen`
  holds a connection of its own that ``LISTEN``\\s on :data:`.schema.CHANNEL`;
  a notice (or, at the latest, a poll every :data:`POLL` seconds, for a
  notice lost with a connection) makes it read the rows after ``seq`` and
  deliver them, under the same lock.

A plain ``id > last_seen`` would skip a row whose id was taken before
another's but committed after it; here no such row exists (ids and seqs are
taken under the write lock, commits do not overlap), and delivery goes by
``seq`` all the same.  A daemon cut off from the database for longer than
:data:`.log.LOG_KEEP` may have lost log rows: it calls ``on_gap`` (the
daemon ends its watches ``lagged``; clients resume with ``after_id``) and
goes on from the newest row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
import psycopg

from ..ops import Change
from .log import LOG_KEEP, Entry, entries_after
from .schema import CHANNEL

__all__ = ["LISTENER_NAME", "POLL", "Follow"]

logger = logging.getLogger(__name__)

#: Seconds between two reads of the log while no notice comes.
POLL: Final = 2.0
#: Seconds out of touch after which log rows may have been deleted unread.
_GAP_AFTER: Final = LOG_KEEP / 2
_BACKOFF_MAX: Final = 5.0
#: What the listener's connection adds to its application_name (after the
#: daemon's own, if any), so that operators (and tests) can tell it apart.
LISTENER_NAME: Final = "nexusd listener"
#: A notice whose payload is not a seq: read the log.
_UNKNOWN: Final = 1 << 62


class Follow:
    """Where this daemon is in the commit log, and the delivery of what follows."""

    def __init__(
        self,
        origin: str,
        publish: Callable[[list[Change]], None],
        on_gap: Callable[[], None] | None = None,
    ) -> None:
        self.origin = origin
        self._publish = publish
        self._on_gap = on_gap
        #: The last log row delivered (or skipped: one of ours, or before start).
        self.seq = 0
        #: Held by whoever reads the log and delivers: the write path for its
        #: whole transaction, the listener for each catch-up.
        self.lock = anyio.Lock()
        self._touched = time.monotonic()
        #: Log rows delivered from other daemons, since start.
        self.foreign = 0

    async def start(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """At open: begin after the newest log row (what came before is history)."""
        cur = await conn.execute("SELECT coalesce(max(seq), 0) FROM nexus_log")
        row = await cur.fetchone()
        self.seq = int(row[0]) if row is not None else 0
        self._touched = time.monotonic()

    def deliver(self, entries: list[Entry], own: tuple[int, list[Change]] | None = None) -> None:
        """In the loop, holding :attr:`lock`: publish ``entries`` (rows after :attr:`seq`,
        in seq order) and this daemon's own commit ``own`` = (seq, changes) at its place."""
        pending = own
        for seq, origin, changes in entries:
            if pending is not None and pending[0] <= seq:  # (its own row may be read too)
                self._emit(*pending)
                pending = None
            if seq <= self.seq:
                continue
            if origin == self.origin:  # ours, delivered in-process already
                self.seq = seq
                continue
            self.foreign += 1
            self._emit(seq, changes)
        if pending is not None:
            self._emit(*pending)
        self._touched = time.monotonic()

    def _emit(self, seq: int, changes: list[Change]) -> None:
        if seq <= self.seq:
            return
        self.seq = seq
        if changes:
            self._publish(changes)

    async def catch_up(self, conn: psycopg.AsyncConnection[Any], noticed: int = 0) -> None:
        """Read and deliver every log row after :attr:`seq` (takes :attr:`lock`);
        not when a notice of ``noticed`` woke us and that is delivered already."""
        async with self.lock:
            # Checked under the lock: this daemon's own commit is noticed while
            # its write path still holds the lock, and delivered when it lets go.
            if 0 < noticed <= self.seq:
                return
            if time.monotonic() - self._touched > _GAP_AFTER:
                await self._gap(conn)
            while True:
                entries = await entries_after(conn, self.seq)
                self.deliver(entries)
                if len(entries) < 1000:
                    return

    async def _gap(self, conn: psycopg.AsyncConnection[Any]) -> None:
        cur = await conn.execute("SELECT coalesce(min(seq), 0) FROM nexus_log")
        row = await cur.fetchone()
        oldest = int(row[0]) if row is not None else 0
        if oldest > self.seq + 1 or oldest == 0:
            logger.warning(
                "out of touch with the database for over %.0f s: commits of other daemons"
                " may have been missed; ending watches so that they resume from history",
                _GAP_AFTER,
            )
            if self._on_gap is not None:
                self._on_gap()
            cur = await conn.execute("SELECT coalesce(max(seq), 0) FROM nexus_log")
            row = await cur.fetchone()
            self.seq = max(self.seq, int(row[0]) if row is not None else 0)

    async def listen(self, connect: Callable[[], Awaitable[psycopg.AsyncConnection[Any]]]) -> None:
        """Run until cancelled: LISTEN, and catch up on every notice; reconnect with backoff."""
        delay = 0.1
        while True:
            try:
                conn = await connect()
            except psycopg.Error as exc:
                logger.warning("listening for other daemons' commits: %s", _one_line(exc))
                await anyio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
                continue
            try:
                await self._serve(conn)
            except psycopg.Error as exc:
                logger.warning("listening for other daemons' commits: %s", _one_line(exc))
                await anyio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
            else:
                delay = 0.1
            finally:
                with anyio.CancelScope(shield=True):
                    await conn.close()

    async def _serve(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(
            "SELECT set_config('application_name', left(concat_ws(' ',"
            " nullif(current_setting('application_name'), ''), %s::text), 63), false)",
            (LISTENER_NAME,),
        )
        await conn.execute(f"LISTEN {CHANNEL}")
        # Listening first, then reading: a commit between the two is in the read.
        await self.catch_up(conn)
        while True:
            # A notice that comes while we read is kept by psycopg for the next
            # notifies() (no notify handler on this connection: with one, psycopg
            # warns that notifies() is not reliable), which then returns at once.
            newest = 0
            async for n in conn.notifies(timeout=POLL, stop_after=1):
                newest = max(newest, int(n.payload) if n.payload.isdigit() else _UNKNOWN)
            # Another daemon's commit, or the poll; not this daemon's own commits.
            await self.catch_up(conn, newest)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
