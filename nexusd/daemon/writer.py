"""The writer actor: the only code that mutates the database.

Every mutation goes through one bounded queue to one task.  The task takes the
first job, drains whatever else is already waiting (up to ``batch_max``), runs
the whole batch in one transaction on its own SQLite connection, prunes the
sessions the batch grew, commits, and only then answers every caller.  While a
batch commits the next one fills up: group commit.

The batch runs as one call on the writer's own thread
(:mod:`nexusd.sqlthread`: one hop per batch, not one per statement), on a
plain :mod:`sqlite3` connection used only from that thread; what the
transaction does is :mod:`nexusd.batch`.
Jobs are answered through a callback, run in the event loop as soon as the
thread hands the results back, so the server can route replies without a task
per request.

After every commit, before anyone is answered, the writer checks that the
database, its ``-wal`` and ``-shm`` are still the files it opened
(:class:`~nexusd.dbfiles.FileWatch`).  If one was deleted, replaced or moved,
the commit went into a file nobody will open again: that batch and every
later write are answered ``unavailable``, once logged at error level, and
``stats`` says ``storage_ok: false``.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeAlias

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..storage import writes as batch_sql
from ..storage.files import FileWatch
from ..storage.schema import open_writer
from ..storage.thread import SQLiteThread
from ..storage.writes import CountCache, Insert, Op
from ..wire.errors import STORAGE_LOST, BadRequest, Internal, NexusError, Overloaded, Unavailable

__all__ = ["Done", "Writer", "utc_now"]

logger = logging.getLogger(__name__)

#: Called once, in the event loop, with the job's result or its NexusError.
Done: TypeAlias = Callable[[Any], None]

_COUNT_CACHE_MAX: Final = 65_536
_LATENCY_SAMPLES: Final = 2_048


@dataclass(slots=True)
class _Job:
    op: Op
    done: Done


@dataclass(slots=True)
class _Waiter:
    """A job waiting for room in the full queue, and how its producer learns the outcome."""

    job: _Job
    queued: anyio.Event = field(default_factory=anyio.Event)
    error: NexusError | None = None


@dataclass(slots=True)
class WriterStats:
    batches: int = 0
    ops: int = 0
    rows: int = 0
    failed_batches: int = 0
    pruned: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=_LATENCY_SAMPLES))


def utc_now() -> str:
    """The timestamp format nexusd writes: ISO 8601 UTC, microseconds, ``Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    idx = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[idx]


class Writer:
    """The single-writer actor.  Use as ``async with Writer(...) as w`` or ``start``/``close``."""

    def __init__(
        self,
        db_path: Path,
        *,
        max_messages: int = 500,
        synchronous: str = "full",
        queue_size: int = 10_000,
        batch_max: int = 1_000,
        wal_autocheckpoint: int = 1000,
    ) -> None:
        if max_messages < 0:
            raise ValueError("max_messages must be >= 0")
        self.db_path = db_path
        self.max_messages = max_messages
        self.synchronous = synchronous
        self.wal_autocheckpoint = wal_autocheckpoint
        self.batch_max = batch_max
        self.stats = WriterStats()
        self._send: MemoryObjectSendStream[_Job]
        self._recv: MemoryObjectReceiveStream[_Job]
        self._send, self._recv = anyio.create_memory_object_stream[_Job](queue_size)
        #: Producers waiting for room, first come first queued.  Kept here rather
        #: than in anyio's ``send``: a ``send`` cancelled by its deadline just as
        #: the writer took the job reports failure for a job that then commits.
        self._waiting: deque[_Waiter] = deque()
        self._conn: sqlite3.Connection | None = None
        self._thread = SQLiteThread("nexusd-writer")
        self._counts = CountCache()
        self._watch = FileWatch(db_path)
        self._told_external = False
        #: Why writes are refused for good (the files changed under us), or None.
        self.storage_error: str | None = None
        self._last_ts = ""
        self._closing = False
        self._stopped = anyio.Event()

    # ── lifecycle ─────────────────────────────────────────────────────────
    async def open(self) -> None:
        """Open and migrate the database (in the writer's thread: it may take a while)."""
        self._thread.start()
        self._conn = await self._thread.call(
            lambda: open_writer(
                self.db_path,
                synchronous=self.synchronous,
                wal_autocheckpoint=self.wal_autocheckpoint,
            )
        )
        self._watch.arm()  # the files as SQLite has them open now

    async def run(self) -> None:
        """Process batches until :meth:`close` was called and the queue is empty."""
        recv = self._recv
        try:
            while True:
                try:
                    first = await recv.receive()
                except anyio.EndOfStream:
                    break
                batch = [first]
                while len(batch) < self.batch_max:
                    try:
                        batch.append(recv.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                self._admit_waiting()  # the batch made room
                await self._commit(batch)
        finally:
            self._stopped.set()

    def close(self) -> None:
        """Refuse new jobs; :meth:`run` finishes what is queued, then returns."""
        self._closing = True
        self._send.close()
        while self._waiting:
            waiter = self._waiting.popleft()
            waiter.error = Unavailable("nexusd is shutting down")
            waiter.queued.set()

    def _admit_waiting(self) -> None:
        """Move waiting jobs into the queue, in order, while it has room."""
        waiting = self._waiting
        while waiting:
            try:
                self._send.send_nowait(waiting[0].job)
            except anyio.WouldBlock:
                return
            except anyio.ClosedResourceError:
                return  # close() answers them
            waiting.popleft().queued.set()

    async def aclose(self) -> None:
        """Checkpoint the WAL into the database, close the connection, end the thread."""
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

        with anyio.CancelScope(shield=True):
            try:
                await self._thread.call(finish)
            finally:
                self._thread.stop()

    # ── submitting ────────────────────────────────────────────────────────
    @property
    def queue_depth(self) -> int:
        return self._send.statistics().current_buffer_used

    def submit_nowait(self, op: Op, done: Done) -> bool:
        """Queue ``op`` if there is room now; False when the queue is full."""
        if self._closing:
            raise Unavailable("nexusd is shutting down")
        if self.storage_error is not None:
            raise Unavailable(self.storage_error, field=STORAGE_LOST)
        if type(op) is Insert and 0 < self.max_messages < len(op.rows):
            # Its oldest rows would be pruned in the very commit that
            # acknowledges them: refuse rather than answer ids already gone.
            raise BadRequest(
                f"{len(op.rows)} messages in one append_many exceed max_messages"
                f" ({self.max_messages}), the rows a session keeps; send at most"
                f" {self.max_messages}",
                field="messages",
            )
        if self._waiting:
            return False  # earlier producers wait for room: none may overtake them
        try:
            self._send.send_nowait(_Job(op, done))
        except anyio.WouldBlock:
            return False
        except anyio.ClosedResourceError:
            raise Unavailable("nexusd is shutting down") from None
        return True

    async def submit(self, op: Op, done: Done, *, timeout: float = 5.0) -> None:
        """Queue ``op``; ``done`` is called after its commit.

        Waits while the queue is full (that is the backpressure); raises
        :class:`Overloaded` after ``timeout`` seconds and :class:`Unavailable`
        once the writer is closing.  Jobs submitted by one task are committed
        in submission order.
        """
        if self.submit_nowait(op, done):
            return
        waiter = _Waiter(_Job(op, done))
        self._waiting.append(waiter)
        self._admit_waiting()
        try:
            with anyio.move_on_after(timeout):
                await waiter.queued.wait()
        except BaseException:  # the producer itself was cancelled (its connection went)
            if not waiter.queued.is_set():
                self._waiting.remove(waiter)
            raise
        # Decided by state, not by who woke first: a job queued just as the
        # deadline passed is queued, and its caller must not hear otherwise.
        if waiter.queued.is_set():
            if waiter.error is not None:
                raise waiter.error
            return
        self._waiting.remove(waiter)
        raise Overloaded(
            f"write queue full for {timeout:g}s", retry_after=min(1.0, max(0.05, timeout / 10))
        )

    async def call(self, op: Op, *, timeout: float = 5.0) -> Any:
        """Submit ``op`` and wait for its committed result (raises its error)."""
        event = anyio.Event()
        box: list[Any] = []

        def done(result: Any) -> None:
            box.append(result)
            event.set()

        await self.submit(op, done, timeout=timeout)
        await event.wait()
        if isinstance(box[0], NexusError):
            raise box[0]
        return box[0]

    # ── the batch ─────────────────────────────────────────────────────────
    async def _commit(self, batch: list[_Job]) -> None:
        started = time.perf_counter()
        with anyio.CancelScope(shield=True):
            # Shielded: a batch handed to SQLite always finishes and is answered.
            # The callers are answered by _answer, straight from the thread's
            # hand-back, before this task is even resumed.
            try:
                await self._thread.call(self._apply, batch, then=self._answer)
            except Exception as exc:  # a bug, not a storage error: _apply maps those
                logger.exception("writer batch crashed")
                self._answer(batch, [Internal(f"write failed: {type(exc).__name__}")] * len(batch))
        self.stats.latencies.append(time.perf_counter() - started)

    def _answer(self, batch: list[_Job], results: list[Any]) -> None:
        for job, result in zip(batch, results, strict=True):
            try:
                job.done(result)
            except Exception:  # a broken callback must not kill the writer
                logger.exception("reply callback failed")

    def _apply(self, batch: list[_Job]) -> list[Any]:
        """Thread side: run a batch as one transaction; per-job fallback on failure."""
        conn = self._conn
        if conn is None:
            return [Unavailable("database is closed")] * len(batch)
        if self.storage_error is not None:
            return [Unavailable(self.storage_error, field=STORAGE_LOST)] * len(batch)
        try:
            try:
                results = self._transaction(conn, batch, lookup=False)
            except sqlite3.IntegrityError:
                # A key already stored: a resend whose original committed.  Redo
                # the batch looking every key up (rare: only after lost answers).
                results = self._transaction(conn, batch, lookup=True)
        except sqlite3.Error as exc:
            self.stats.failed_batches += 1
            if len(batch) == 1:
                logger.error("write failed, nothing was written: %s", exc)
                return [_storage_error(exc)]
            # One job may be the culprit: retry each alone so only it fails.
            logger.warning("batch of %d failed (%s); retrying jobs one by one", len(batch), exc)
            results = []
            for job in batch:
                try:
                    results.extend(self._transaction(conn, [job], lookup=True))
                except sqlite3.Error as one:
                    results.append(_storage_error(one))
        # Committed, not yet answered: into the files the database lives in?
        changed = self._watch.check()
        if changed is not None:
            return [self._files_changed(conn, changed)] * len(batch)
        return results

    def _files_changed(self, conn: sqlite3.Connection, what: str) -> Unavailable:
        """Thread side: the database's files changed under us; refuse writes from now on.

        A checkpoint copies every committed frame of the WAL we have open into
        the database file we have open, and empties that WAL: a deleted
        ``-wal`` loses nothing acknowledged, and a ``-wal`` left next to a
        replaced or deleted database holds no frames to replay into the wrong
        file at the next start.
        """
        self.storage_error = (
            f"{what} while nexusd ran; writes are refused until nexusd is restarted"
        )
        try:
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            rescue = "WAL checkpointed" if not busy else "WAL checkpoint incomplete (busy)"
        except sqlite3.Error as exc:
            rescue = f"WAL checkpoint failed: {exc}"
        where = self._watch.lost_database()
        if where is not None:
            rescue += f"; until nexusd stops, the database it had open can be copied from {where}"
        logger.error("%s (%s)", self.storage_error, rescue)
        return Unavailable(
            f"{self.storage_error} (this write may not have been stored)", field=STORAGE_LOST
        )

    def _transaction(
        self, conn: sqlite3.Connection, batch: list[_Job], *, lookup: bool
    ) -> list[Any]:
        now = utc_now()
        if now < self._last_ts:  # the clock stepped back: keep timestamps monotonic
            now = self._last_ts
        done = batch_sql.run(
            conn,
            [job.op for job in batch],
            now=now,
            counts_cache=self._counts,
            max_messages=self.max_messages,
            lookup=lookup,
        )
        if len(self._counts.counts) > _COUNT_CACHE_MAX:
            self._counts.counts.clear()
        if self._counts.external_changes == 1 and not self._told_external:
            self._told_external = True  # once: stats counts the rest
            logger.warning(
                "another program committed to %s; pruning recounts the sessions it"
                " writes after every such commit (stats: external_writes_seen)",
                self.db_path,
            )
        self._last_ts = now
        st = self.stats
        st.batches += 1
        st.ops += len(batch)
        st.rows += done.rows_added
        st.pruned += done.pruned
        return done.results

    def snapshot(self, *, queue_depth: bool = True) -> dict[str, Any]:
        """Writer figures for the ``stats`` operation."""
        st = self.stats
        lat = sorted(st.latencies)
        return {
            "queue_depth": self.queue_depth if queue_depth else 0,
            "batches_committed": st.batches,
            "ops_committed": st.ops,
            "rows_committed": st.rows,
            "rows_pruned": st.pruned,
            "failed_batches": st.failed_batches,
            "mean_batch_size": round(st.ops / st.batches, 3) if st.batches else 0.0,
            "commit_latency_p50_ms": round(_percentile(lat, 0.50) * 1000, 3),
            "commit_latency_p99_ms": round(_percentile(lat, 0.99) * 1000, 3),
            "external_writes_seen": self._counts.external_changes,
            "storage_ok": self.storage_error is None,
            "storage_error": self.storage_error,
        }


def _storage_error(exc: sqlite3.Error) -> NexusError:
    if isinstance(exc, sqlite3.OperationalError):
        return Unavailable(f"storage failure, nothing was written: {exc}")
    return Internal(f"write failed, nothing was written: {exc}")
