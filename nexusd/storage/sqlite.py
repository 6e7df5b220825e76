"""The SQLite backend of :class:`~nexusd.storage.base.Storage`: one file in WAL mode.

Its parts: :mod:`.schema` (table, migrations, connection set-up), :mod:`.writes`
(what one write transaction does), :mod:`.reads` (the reader pool and its
queries), :mod:`.files` (the files on disk, the single-instance lock, and
noticing when the files change under us), :mod:`.thread` (the writer's
thread).  This module puts them together and owns what happens *around* a
transaction: the retry with idempotency keys looked up, the retry op by op,
the check of the files after each commit, the monotonic commit timestamp and
the write figures; and around the whole run: the lock is taken first in
:meth:`SQLiteStorage.open` and released last in :meth:`SQLiteStorage.close`.

Threads, and why each exists.  This is the one place that says so: the
daemon's own code runs on one event loop, and the only threads besides it are
these three kinds.

- **The writer thread** (:class:`~nexusd.storage.thread.SQLiteThread`, one):
  the read-write connection lives there and every batch is one call to it,
  one hop there and one back; ``anyio.to_thread`` measured ~70 us slower per
  hop (see :mod:`.thread`), which shows at 25k appends/s.  One thread, not a
  pool, because there is one writer.
- **One thread per reader connection** (aiosqlite's, ``readers`` of them):
  reads run concurrently with the writer and with each other, and one query
  is one ``execute_fetchall``, one hop.  aiosqlite is a declared dependency;
  putting the readers on threads of our own measured no better under load.
- **anyio's worker threads** (``anyio.to_thread``) for backups: a snapshot
  copies the whole database and takes as long as that takes; on the writer's
  thread it would stop every write, on a reader's it would take that reader
  out of the pool.  :mod:`nexusd.daemon.backups` reads the snapshot file's
  chunks on the same workers (plain file reads, kept off the event loop).
  Backups are rare, so the slower hop costs nothing that shows.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import anyio

from ..wire.errors import STORAGE_LOST, Internal, NexusError, Unavailable
from ..wire.protocol import Message, SearchHit, SessionInfo
from . import index as fts
from . import sweep, writes
from .base import Answer, Change, Op, Page, SearchQuery, Swept, WriteStats, utc_now
from .editing import Retentions
from .files import DbFiles, FileWatch, InstanceLock
from .fulltext import FullText
from .reads import ReaderPool
from .schema import SnapshotJob, open_writer
from .thread import SQLiteThread

__all__ = ["SQLiteStorage"]

logger = logging.getLogger(__name__)

#: Sessions whose row count is cached between batches, at most (then it starts over).
_COUNT_CACHE_MAX: Final = 65_536
#: Seconds before a sweep that could not run is tried again.
_SWEEP_RETRY: Final = 60.0


class SQLiteStorage:
    """Messages in one SQLite file (see :class:`~nexusd.storage.base.Storage` for the contract);
    every setting from the caller (``synchronous`` ``"full"``/``"normal"``, pages, readers)."""

    backup_refused: str | None = None  # a backup is a copy of the file

    def __init__(
        self,
        path: Path,
        *,
        max_messages: int,
        synchronous: str,
        wal_autocheckpoint: int,
        readers: int,
        search: bool = False,
        max_age: float = 0.0,
    ) -> None:
        if max_messages < 0 or max_age < 0:
            raise ValueError("max_messages and max_age must be >= 0")
        self.path = path
        self.files = DbFiles.of(path)
        #: The defaults, and every session's own retention (its table's copy).
        self._retentions = Retentions(max_messages, max_age)
        #: Called in the event loop when a commit left the sweep work (rows hidden,
        #: a retention changed); None: nobody asks.
        self.on_sweep: Callable[[], None] | None = None
        self._hid = False
        self._sweep_pace = sweep.Pace()
        self.synchronous = synchronous
        self.wal_autocheckpoint = wal_autocheckpoint
        self.write_stats = WriteStats()
        self.on_commit: Callable[[list[Change]], None] | None = None
        self.on_gap: Callable[[], None] | None = None  # never called: one daemon per file
        #: What the batch on the writer thread changed so far (its retries' included).
        self._changes: list[Change] = []
        #: Why writes are refused for good (the files changed under us), or None.
        self.storage_error: str | None = None
        self._readers = ReaderPool(path, size=readers)
        self._conn: sqlite3.Connection | None = None
        self._thread = SQLiteThread("nexusd-writer")
        #: The full-text index (kept only with ``search``); its state changes on the
        #: writer's thread, where each batch keeps the index by it.
        self._fulltext = FullText(search, self._thread, self._readers)
        self._counts = writes.CountCache()
        self._watch = FileWatch(path)
        #: One daemon per database file, held from the start of open() to the end of close().
        self._instance = InstanceLock(path)
        self._told_external = False
        self._last_ts = ""
        self._last_clock = 0.0

    # ── lifecycle ─────────────────────────────────────────────────────────
    async def open(self) -> None:
        """Take the single-instance lock, open and migrate the database (on the
        writer's thread: it may take a while), then the readers.

        The lock comes first: a second daemon on the same file (by any name) is
        refused with a :class:`~.files.LockError` before it touches the
        database.  A failure part-way closes what was opened, the lock last.
        """
        self._take_lock()
        try:
            self._thread.start()
            self._conn = await self._thread.call(
                lambda: open_writer(
                    self.path,
                    synchronous=self.synchronous,
                    wal_autocheckpoint=self.wal_autocheckpoint,
                )
            )
            await self._thread.call(self._fulltext.prepare, self._conn)
            await self._thread.call(self._retentions.load, self._conn)
            self._watch.arm()  # the files as SQLite has them open now
            await self._readers.open()
        except BaseException:
            await self.close()
            raise

    async def follow_commits(self) -> None:  # one daemon per file: none to follow
        return

    @property
    def index_state(self) -> fts.IndexState | None:
        """How far the full-text index is built (None: search is off)."""
        return self._fulltext.state

    async def build_search_index(self) -> None:
        await self._fulltext.build(lambda: self._conn)

    @property
    def max_messages(self) -> int:
        return self._retentions.default_messages

    @property
    def max_age(self) -> float:
        return self._retentions.default_age

    def max_messages_of(self, tag: str) -> int:
        return self._retentions.max_messages(tag)

    async def sweep(self) -> Swept:
        """One step of :mod:`.sweep`, on the writer's thread between batches."""
        conn = self._conn
        if conn is None or self.storage_error is not None:
            return Swept(0, False, _SWEEP_RETRY)
        try:
            out = await self._thread.call(
                lambda: sweep.step(
                    conn,
                    counts_cache=self._counts,
                    retentions=self._retentions,
                    clock=time.time(),
                    index=self.index_state,
                    pace=self._sweep_pace,
                )
            )
        except sqlite3.Error as exc:  # a storage fault: the next sweep tries again
            logger.error("sweeping old and cleared messages failed: %s", exc)
            return Swept(0, False, _SWEEP_RETRY)
        st = self.write_stats
        st.swept += out.swept
        st.expired += out.expired
        if out.changes and self.on_commit is not None:
            self.on_commit(out.changes)
        return Swept(out.swept + out.expired, out.more, out.next_in)

    async def search(self, query: SearchQuery) -> Page[SearchHit]:
        return await self._fulltext.search(query)

    @property
    def search_status(self) -> str:
        return self._fulltext.status

    async def close(self) -> None:
        """Close the readers; checkpoint the WAL into the database; close; end the thread;
        release the lock.  Safe to call again, and after a failed :meth:`open`."""
        with anyio.CancelScope(shield=True):
            try:
                await self._close_database()
            finally:
                # Last: closing the lock's descriptor of the database would drop
                # SQLite's POSIX locks if a connection were still open.
                self._instance.release()

    async def _close_database(self) -> None:
        await self._readers.aclose()
        conn, self._conn = self._conn, None
        if conn is None:
            self._thread.stop()
            return

        def finish() -> None:
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                logger.warning("final WAL checkpoint failed: %s", exc)
            finally:
                conn.close()

        try:
            await self._thread.call(finish)
        finally:
            self._thread.stop()

    def _take_lock(self) -> None:
        # Keyed on the database file itself (resolved path and inode): a second
        # daemon reaching it through a symlink or a hard link is refused, and
        # every OS error becomes one clear line (a LockError).
        lock = self._instance
        lock.acquire()
        if lock.unclean_pid is not None:
            logger.warning(
                "the previous nexusd (pid %s) on %s did not stop cleanly (killed or crashed);"
                " SQLite recovers every committed write from the WAL",
                lock.unclean_pid,
                lock.files.db,
            )

    # ── writes ────────────────────────────────────────────────────────────
    async def write(self, ops: Sequence[Op], answer: Answer) -> None:
        # Shielded: a batch handed to SQLite always finishes.  ``answer`` runs
        # straight from the thread's hand-back, before this task is resumed.
        with anyio.CancelScope(shield=True):
            await self._thread.call(
                self._apply, ops, then=lambda _ops, done: self._done(done, answer)
            )

    def _done(self, done: tuple[list[Any], list[Change]], answer: Answer) -> None:
        """In the loop: answer the batch, then tell whoever follows the commits."""
        results, changes = done
        answer(results)
        if changes and self.on_commit is not None:
            self.on_commit(changes)
        if self._hid and self.on_sweep is not None:
            self.on_sweep()

    def _apply(self, ops: Sequence[Op]) -> tuple[list[Any], list[Change]]:
        """Writer thread: run a batch as one transaction (op by op if it fails); its
        results and what it changed."""
        changes = self._changes = []
        self._hid = False
        conn = self._conn
        if conn is None:
            return [Unavailable("database is closed")] * len(ops), []
        if self.storage_error is not None:
            return [Unavailable(self.storage_error, field=STORAGE_LOST)] * len(ops), []
        try:
            try:
                results = self._transaction(conn, ops, lookup=False)
            except sqlite3.IntegrityError:
                # A key already stored: a resend whose original committed.  Redo
                # the batch looking every key up (rare: only after lost answers).
                results = self._transaction(conn, ops, lookup=True)
        except sqlite3.Error as exc:
            self.write_stats.failed_batches += 1
            if len(ops) == 1:
                logger.error("write failed, nothing was written: %s", exc)
                return [_storage_error(exc)], []
            # One op may be the culprit: retry each alone so only it fails.
            logger.warning("batch of %d failed (%s); retrying jobs one by one", len(ops), exc)
            results = []
            for op in ops:
                try:
                    results.extend(self._transaction(conn, [op], lookup=True))
                except sqlite3.Error as one:
                    results.append(_storage_error(one))
        # Committed, not yet answered: into the files the database lives in?
        changed = self._watch.check()
        if changed is not None:
            return [self._files_changed(conn, changed)] * len(ops), []
        return results, changes

    def _transaction(
        self, conn: sqlite3.Connection, ops: Sequence[Op], *, lookup: bool
    ) -> list[Any]:
        now = utc_now()
        if now < self._last_ts:  # the clock stepped back: keep timestamps monotonic
            now = self._last_ts
        clock = max(time.time(), self._last_clock)
        done = writes.run(
            conn,
            ops,
            now=now,
            counts_cache=self._counts,
            clock=clock,
            retentions=self._retentions,
            lookup=lookup,
            index=self.index_state,
        )
        counts = self._counts
        if len(counts.counts) > _COUNT_CACHE_MAX:
            counts.counts.clear()
        st = self.write_stats
        st.external_writes = counts.external_changes
        if counts.external_changes == 1 and not self._told_external:
            self._told_external = True  # once: stats counts the rest
            logger.warning(
                "another program committed to %s; pruning recounts the sessions it"
                " writes after every such commit (stats: external_writes_seen)",
                self.path,
            )
        self._last_ts = now
        self._last_clock = clock
        for tag, retention in done.retention:
            self._retentions.update(tag, retention)
        self._hid |= done.hid
        self._changes += done.changes
        st.batches += 1
        st.ops += len(ops)
        st.rows += done.rows_added
        st.pruned += done.pruned
        return done.results

    def _files_changed(self, conn: sqlite3.Connection, what: str) -> Unavailable:
        """Writer thread: the database's files changed under us; refuse writes from now on."""
        self.storage_error = (
            f"{what} while nexusd ran; writes are refused until nexusd is restarted"
        )
        logger.error("%s (%s)", self.storage_error, self._watch.rescue(conn))
        return Unavailable(
            f"{self.storage_error} (this write may not have been stored)", field=STORAGE_LOST
        )

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

    # ── backups and files ─────────────────────────────────────────────────
    async def backup(self, dest: Path) -> int:
        job = SnapshotJob(self.files.db, dest)
        try:
            return await anyio.to_thread.run_sync(job.run)
        except BaseException:
            job.abandon()  # also when cancelled: the thread removes what it made
            raise

    def size_bytes(self) -> int:
        return self.files.bytes_on_disk()

    @property
    def snapshot_dir(self) -> Path:
        # The resolved database's directory: a symlinked database keeps its
        # snapshots next to the file it points to (checked private when the
        # lock was taken), not next to the link.
        return self.files.db.parent

    def live_files(self) -> list[Path]:
        return list(self.files.live())


def _storage_error(exc: sqlite3.Error) -> NexusError:
    if isinstance(exc, sqlite3.OperationalError):
        return Unavailable(f"storage failure, nothing was written: {exc}")
    return Internal(f"write failed, nothing was written: {exc}")
