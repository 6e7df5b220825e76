"""The PostgreSQL backend of :class:`~nexusd.storage.base.Storage`: many daemons, one database.

:class:`PostgresStorage` puts the parts together (:mod:`.writes` for a batch,
:mod:`.readers` for reads, :mod:`.sweep`, :mod:`.search`, :mod:`.follow`) and
owns what happens *around* a transaction.  The writer is one dedicated
connection, used by one batch or sweep step at a time.  A batch whose key
holder must give way (a ``UniqueViolation``) runs again with every key looked
up; one that fails otherwise is retried op by op, so only the culprit fails.
When the connection is lost, the batch's callers are answered
``unavailable`` ("nothing was written", or "may not have been stored" when it
went during COMMIT), and the next batch reconnects; while that fails,
attempts are spaced 0.1 s doubling to 5 s and batches in between are answered
``unavailable`` at once.  Nothing acknowledged is lost: answers come only
after COMMIT returned.  Each batch reads the other daemons' log rows
committed before it, inside its transaction, and hands them to ``on_commit``
before its own changes (:class:`~.follow.Follow`).  psycopg's errors are
mapped in :mod:`.errors`; every line naming the database shows it redacted.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import anyio
import psycopg
from psycopg_pool import PoolTimeout

from ...wire.errors import NexusError, Unavailable
from ...wire.protocol import Message, SearchHit, SessionInfo
from ..base import Answer, Change, Op, Page, SearchQuery, Swept, WriteStats
from ..editing import Retentions
from ..schema import StorageError
from . import editing, errors, schema, sweep, writes
from .errors import Redactor, one_line, params, write_error
from .follow import Follow
from .log import Entry, entries_after
from .readers import Readers
from .search import PgSearch

__all__ = ["PostgresStorage"]

logger = logging.getLogger(__name__)

Conn = psycopg.AsyncConnection[Any]

#: Seconds a connection attempt may take (unless the URL sets connect_timeout).
_CONNECT_TIMEOUT: Final = 5
#: Reconnection backoff of the writer: first wait, longest wait (seconds).
_BACKOFF_FIRST: Final = 0.1
_BACKOFF_MAX: Final = 5.0
#: Seconds between two refreshes of the size estimate and the retention copy.
_REFRESH_EVERY: Final = 10.0
#: Seconds before a sweep that could not run is tried again.
_SWEEP_RETRY: Final = 5.0


def _origin() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class PostgresStorage:
    """Messages in a PostgreSQL database shared by any number of daemons (see
    :class:`~nexusd.storage.base.Storage` for the contract, :mod:`.schema` for the
    write lock that keeps them one writer)."""

    def __init__(
        self,
        url: str,
        *,
        max_messages: int,
        max_age: float,
        readers: int,
        search: bool,
        snapshot_dir: Path,
        origin: str | None = None,
    ) -> None:
        if max_messages < 0 or max_age < 0:
            raise ValueError("max_messages and max_age must be >= 0")
        self._url = url
        self._redactor = Redactor(url)
        #: The URL as every log line and error shows it (no password).
        self.shown = self._redactor.shown
        self._snapshot_dir = snapshot_dir
        #: This daemon among those sharing the database (in the commit log).
        self.origin = origin or _origin()
        self._retentions = Retentions(max_messages, max_age)
        self.on_sweep: Callable[[], None] | None = None
        self.on_commit: Callable[[list[Change]], None] | None = None
        self.on_gap: Callable[[], None] | None = None
        self.storage_error: str | None = None
        self.write_stats = WriteStats()
        self._follow = Follow(self.origin, self._publish, self._gap)
        self._search = PgSearch(search)
        self._pace = sweep.Pace()
        self._writer: Conn | None = None
        self._readers = Readers(url, readers, self._connect_kwargs(), self._redactor)
        #: One user of the writer connection at a time: a batch or a sweep step.
        self._writing = anyio.Lock()
        self._last_clock = 0.0
        self._hid = False
        self._attempt = writes.Attempt()
        self._size = 0
        self._refreshed = 0.0
        #: Why the writer is not connected (None: it is), and when to try again.
        self._down: str | None = None
        self._retry_at = 0.0
        self._backoff = _BACKOFF_FIRST
        self._opened = False

    # ── lifecycle ─────────────────────────────────────────────────────────
    async def open(self) -> None:
        """Connect, migrate (one daemon at a time), load retentions, check the search
        index, open the readers.  A refusal is one line naming the redacted URL."""
        try:
            conn = self._writer = await self._connect()
            await schema.migrate(conn)
            await self._refresh(conn)
            await self._search.prepare(conn)
            await self._follow.start(conn)
            await self._readers.open(timeout=_CONNECT_TIMEOUT * 2)
            self._opened = True
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self.close()
            if isinstance(exc, NexusError):
                raise StorageError(self._redactor.scrub(f"{self.shown}: {exc.message}")) from None
            if isinstance(exc, psycopg.Error | PoolTimeout | OSError):
                raise StorageError(
                    self._redactor.scrub(f"cannot use PostgreSQL at {self.shown}: {one_line(exc)}")
                ) from None
            raise

    async def close(self) -> None:
        """Close the readers and the writer.  Safe to call again, and after a failed open."""
        with anyio.CancelScope(shield=True):
            await self._readers.close()
            async with self._writing:
                await self._drop_writer()

    def _connect_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in params(self._url):
            kwargs["connect_timeout"] = _CONNECT_TIMEOUT
        return kwargs

    async def _connect(self) -> Conn:
        return await psycopg.AsyncConnection.connect(self._url, **self._connect_kwargs())

    async def _drop_writer(self) -> None:
        conn, self._writer = self._writer, None
        if conn is not None:
            try:
                await conn.close()
            except Exception as exc:  # a connection already gone: nothing to close
                logger.debug("closing the writer connection: %s", one_line(exc))

    async def _writer_conn(self) -> Conn | None:
        """The writer connection, reconnecting when it is due (holding ``_writing``)."""
        if self._writer is not None or not self._opened:
            return self._writer
        if time.monotonic() < self._retry_at:
            return None
        try:
            conn = await self._connect()
            await self._refresh(conn)
        except psycopg.Error as exc:
            self._down = self._redactor.line(exc)
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX)
            logger.warning("PostgreSQL at %s still unreachable: %s", self.shown, self._down)
            return None
        logger.warning("reconnected to PostgreSQL at %s", self.shown)
        self._writer, self._down, self._backoff = conn, None, _BACKOFF_FIRST
        return conn

    async def _lost(self, conn: Conn, exc: psycopg.Error) -> bool:
        """Whether ``exc`` cost us the connection; if so, drop it (the next batch reconnects)."""
        if not (conn.closed or conn.broken):
            return False
        self._down = self._redactor.line(exc)
        self._retry_at = 0.0  # the next batch tries at once; failures back off from there
        logger.error("lost the PostgreSQL connection to %s: %s", self.shown, self._down)
        await self._drop_writer()
        return True

    async def _refresh(self, conn: Conn) -> None:
        """Reload every session's own retention (another daemon may set one) and the size."""
        self._retentions, self._size = await editing.retentions_and_size(
            conn, self._retentions.default_messages, self._retentions.default_age
        )
        self._refreshed = time.monotonic()

    # ── writes ────────────────────────────────────────────────────────────
    async def write(self, ops: Sequence[Op], answer: Answer) -> None:
        # Shielded: a batch sent to the server is always finished (and answered).
        with anyio.CancelScope(shield=True):
            async with self._writing, self._follow.lock:
                results, delivered = await self._apply(ops)
                answer(results)
                for earlier, own in delivered:
                    self._follow.deliver(earlier, own)
        if self._hid and self.on_sweep is not None:
            self.on_sweep()

    def _publish(self, changes: list[Change]) -> None:
        if self.on_commit is not None:
            self.on_commit(changes)

    def _gap(self) -> None:
        if self.on_gap is not None:
            self.on_gap()

    async def _apply(
        self, ops: Sequence[Op]
    ) -> tuple[list[Any], list[tuple[list[Entry], tuple[int, list[Change]] | None]]]:
        """Run a batch (op by op if it fails); its results and what to deliver, in order."""
        self._hid = False
        conn = await self._writer_conn()
        if conn is None:
            return [self._unreachable()] * len(ops), []
        try:
            try:
                out = await self._transaction(conn, ops, lookup=False)
            except psycopg.errors.UniqueViolation:
                # A key already stored: a resend whose original committed (maybe
                # through another daemon).  Run it again looking every key up.
                out = await self._transaction(conn, ops, lookup=True)
            return out.results, [out.delivery()]
        except psycopg.Error as exc:
            self.write_stats.failed_batches += 1
            if await self._lost(conn, exc):
                return [self._lost_answer()] * len(ops), []
            if len(ops) == 1:
                logger.error("write failed, nothing was written: %s", self._redactor.line(exc))
                return [write_error(exc, self._redactor)], []
            logger.warning(
                "batch of %d failed (%s); retrying jobs one by one",
                len(ops),
                self._redactor.line(exc),
            )
        results: list[Any] = []
        delivered = []
        for op in ops:
            if self._writer is None:
                results.append(self._unreachable())
                continue
            try:
                one = await self._transaction(conn, [op], lookup=True)
            except psycopg.Error as exc:
                lost = await self._lost(conn, exc)
                results.append(self._lost_answer() if lost else write_error(exc, self._redactor))
                continue
            results += one.results
            delivered.append(one.delivery())
        return results, delivered

    async def _transaction(self, conn: Conn, ops: Sequence[Op], *, lookup: bool) -> writes.Outcome:
        self._attempt = attempt = writes.Attempt()
        out = await writes.run(
            conn,
            ops,
            default_messages=self._retentions.default_messages,
            origin=self.origin,
            lookup=lookup,
            last_clock=self._last_clock,
            attempt=attempt,
            since=self._follow.seq,
        )
        self._last_clock = max(self._last_clock, out.clock)
        for tag, retention in out.retention:
            self._retentions.update(tag, retention)
        self._hid |= out.hid
        st = self.write_stats
        st.batches += 1
        st.ops += len(ops)
        st.rows += out.rows_added
        st.pruned += out.pruned
        return out

    def _unreachable(self) -> Unavailable:
        return errors.unreachable(self._down, max(0.0, self._retry_at - time.monotonic()))

    def _lost_answer(self) -> Unavailable:
        return errors.lost(self._attempt.committing)

    # ── retention and the sweep ───────────────────────────────────────────
    @property
    def max_messages(self) -> int:
        return self._retentions.default_messages

    @property
    def max_age(self) -> float:
        return self._retentions.default_age

    def max_messages_of(self, tag: str) -> int:
        return self._retentions.max_messages(tag)

    async def sweep(self) -> Swept:
        """One step of :mod:`.sweep` on the writer connection, between batches."""
        with anyio.CancelScope(shield=True):
            async with self._writing, self._follow.lock:
                conn = await self._writer_conn()
                if conn is None:
                    return Swept(0, False, _SWEEP_RETRY)
                try:
                    out = await sweep.step(
                        conn,
                        default_messages=self._retentions.default_messages,
                        default_age=self._retentions.default_age,
                        clock=None,  # the server's, which wrote the marks
                        pace=self._pace,
                        origin=self.origin,
                    )
                    if time.monotonic() - self._refreshed >= _REFRESH_EVERY:
                        await self._refresh(conn)
                except psycopg.Error as exc:  # the next sweep tries again
                    if not await self._lost(conn, exc):
                        logger.error("sweeping old and cleared messages failed: %s", one_line(exc))
                    return Swept(0, False, _SWEEP_RETRY)
                st = self.write_stats
                st.swept += out.swept
                st.expired += out.expired
                if out.seq:
                    await self._deliver_sweep(conn, out.seq, out.changes)
        return Swept(out.swept + out.expired, out.more, out.next_in)

    async def _deliver_sweep(self, conn: Conn, seq: int, changes: list[Change]) -> None:
        """Watchers hear a step's removals at their place in the commit order: after
        what other daemons committed before it, which the step did not read (steps
        are rare, unlike batches: one read after the commit)."""
        try:
            earlier = await entries_after(conn, self._follow.seq)
        except psycopg.Error as exc:
            # Not knowing what came before, the watches cannot be told in order.
            await self._lost(conn, exc)
            earlier = []
            self._gap()
        self._follow.deliver(earlier, (seq, changes))

    async def follow_commits(self) -> None:
        """Run until cancelled: deliver other daemons' commits to ``on_commit`` (LISTEN)."""
        await self._follow.listen(self._connect)

    # ── reads ─────────────────────────────────────────────────────────────
    async def history(
        self, tag: str, limit: int, *, before_id: int | None, after_id: int | None, budget: int
    ) -> Page[Message]:
        return await self._readers.history(
            tag, limit, before_id=before_id, after_id=after_id, budget=budget
        )

    async def count(self, tag: str) -> int:
        return await self._readers.count(tag)

    async def feed(
        self, after_id: int, *, scope: str | None, limit: int, budget: int
    ) -> Page[Message]:
        return await self._readers.feed(after_id, scope=scope, limit=limit, budget=budget)

    async def sessions(
        self, *, after: str | None, limit: int, budget: int, scope: str | None = None
    ) -> Page[SessionInfo]:
        return await self._readers.sessions(after=after, limit=limit, budget=budget, scope=scope)

    async def search(self, query: SearchQuery) -> Page[SearchHit]:
        return await self._readers.search(lambda c: self._search.search(c, query))

    @property
    def search_status(self) -> str:
        return self._search.status

    async def build_search_index(self) -> None:
        await self._readers.build(self._search)

    # ── backups and files ─────────────────────────────────────────────────
    backup_refused: str | None = (
        "nexusd backup is not available with PostgreSQL storage; use pg_dump"
    )

    async def backup(self, dest: Path) -> int:
        raise Unavailable(str(self.backup_refused))

    def size_bytes(self) -> int:
        return self._size

    @property
    def snapshot_dir(self) -> Path:
        return self._snapshot_dir

    def live_files(self) -> list[Path]:
        return []
