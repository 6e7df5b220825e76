"""The writer actor: the only code that mutates the database.

Every mutation goes through one bounded queue to one task.  The task takes the
first job, drains whatever else is already waiting (up to ``batch_max``), runs
the whole batch in one transaction on its own SQLite connection, prunes the
sessions the batch grew, commits, and only then answers every caller.  While a
batch commits the next one fills up: group commit.

The batch runs as one call in a worker thread (one thread hop per batch, not
one per statement), which is why the writer uses a plain :mod:`sqlite3`
connection rather than aiosqlite.  Jobs are answered through a callback so the
server can route replies without a task per request.
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

from .errors import Internal, NexusError, Overloaded, Unavailable
from .peers import NS_MARK, scope_bounds
from .schema import open_writer

logger = logging.getLogger(__name__)

#: One row to insert: (role, content, timestamp or None, meta as JSON text or None,
#: idempotency key or None).
NewRow: TypeAlias = tuple[str, str, "str | None", "str | None", "str | None"]
#: A stored row as the writer returns it (id, role, content, timestamp, tag, meta).
Row: TypeAlias = tuple[int, str, str, str, str, "str | None"]

_COUNT_CACHE_MAX: Final = 65_536
#: Sessions pruned per DELETE (SQLite allows 500 terms in a compound SELECT).
_PRUNE_CHUNK: Final = 200
_PRUNE_ONE: Final = (
    "SELECT id FROM (SELECT id FROM nexus_messages WHERE session_tag = ? ORDER BY id LIMIT ?)"
)
_LATENCY_SAMPLES: Final = 2_048


@dataclass(frozen=True, slots=True)
class Insert:
    """Append rows to one session; result: their ids (``list[int]``), all or none.

    A row whose idempotency key the session already holds is not stored again;
    its id in the result is the original one.
    """

    session_tag: str
    rows: list[NewRow]


@dataclass(frozen=True, slots=True)
class PopNewest:
    """Remove and return the newest row of a session; result: ``Row | None``."""

    session_tag: str


@dataclass(frozen=True, slots=True)
class ClearSession:
    """Delete one session; result: rows deleted."""

    session_tag: str


@dataclass(frozen=True, slots=True)
class ClearAll:
    """Delete every row in ``scope``; result: rows deleted.

    ``scope`` None: every row.  ``""``: rows whose tag is not namespaced.
    Otherwise: rows whose tag starts with ``scope`` (see :mod:`nexusd.peers`).
    """

    scope: str | None = None


Op: TypeAlias = Insert | PopNewest | ClearSession | ClearAll
#: Called once, in the event loop, with the job's result or its NexusError.
Done: TypeAlias = Callable[[Any], None]


@dataclass(slots=True)
class _Job:
    op: Op
    done: Done


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
        commit_delay: float = 0.0,
        wal_autocheckpoint: int = 1000,
    ) -> None:
        if max_messages < 0:
            raise ValueError("max_messages must be >= 0")
        self.db_path = db_path
        self.max_messages = max_messages
        self.synchronous = synchronous
        self.wal_autocheckpoint = wal_autocheckpoint
        self.batch_max = batch_max
        #: Test hook: seconds to sleep inside every batch, to make the writer slow.
        self.commit_delay = commit_delay
        self.stats = WriterStats()
        self._send: MemoryObjectSendStream[_Job]
        self._recv: MemoryObjectReceiveStream[_Job]
        self._send, self._recv = anyio.create_memory_object_stream[_Job](queue_size)
        self._conn: sqlite3.Connection | None = None
        self._limiter = anyio.CapacityLimiter(1)
        self._counts: dict[str, int] = {}
        self._last_ts = ""
        self._closing = False
        self._stopped = anyio.Event()

    # ── lifecycle ─────────────────────────────────────────────────────────
    async def open(self) -> None:
        """Open and migrate the database (in a thread: it may take a while)."""
        self._conn = await anyio.to_thread.run_sync(
            lambda: open_writer(
                self.db_path,
                synchronous=self.synchronous,
                wal_autocheckpoint=self.wal_autocheckpoint,
            )
        )

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
                await self._commit(batch)
        finally:
            self._stopped.set()

    def close(self) -> None:
        """Refuse new jobs; :meth:`run` finishes what is queued, then returns."""
        self._closing = True
        self._send.close()

    async def aclose(self) -> None:
        """Checkpoint the WAL into the database and close the connection."""
        conn, self._conn = self._conn, None
        if conn is None:
            return

        def finish() -> None:
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                logger.warning("final WAL checkpoint failed: %s", exc)
            finally:
                conn.close()

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(finish, limiter=self._limiter)

    # ── submitting ────────────────────────────────────────────────────────
    @property
    def queue_depth(self) -> int:
        return self._send.statistics().current_buffer_used

    def submit_nowait(self, op: Op, done: Done) -> bool:
        """Queue ``op`` if there is room now; False when the queue is full."""
        if self._closing:
            raise Unavailable("nexusd is shutting down")
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
        if self._closing:
            raise Unavailable("nexusd is shutting down")
        job = _Job(op, done)
        try:
            self._send.send_nowait(job)
            return
        except anyio.WouldBlock:
            pass
        except anyio.ClosedResourceError:
            raise Unavailable("nexusd is shutting down") from None
        with anyio.move_on_after(timeout):
            try:
                await self._send.send(job)
            except anyio.ClosedResourceError:
                raise Unavailable("nexusd is shutting down") from None
            return
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
            results = await anyio.to_thread.run_sync(self._apply, batch, limiter=self._limiter)
        self.stats.latencies.append(time.perf_counter() - started)
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
        if self.commit_delay:
            time.sleep(self.commit_delay)
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
        return results

    def _transaction(
        self, conn: sqlite3.Connection, batch: list[_Job], *, lookup: bool
    ) -> list[Any]:
        now = utc_now()
        if now < self._last_ts:  # the clock stepped back: keep timestamps monotonic
            now = self._last_ts
        counts = _Counts(conn, self._counts)
        results: list[Any] = []
        inserts = _CheckedInserts(conn, now) if lookup else _PendingInserts(conn, now)
        rows_added = 0

        conn.execute("BEGIN IMMEDIATE")
        try:
            for job in batch:
                op = job.op
                if isinstance(op, Insert):
                    ids, added = inserts.add(op)
                    results.append(ids)
                    counts.add(op.session_tag, added)
                    rows_added += added
                    continue
                inserts.flush()
                if isinstance(op, PopNewest):
                    results.append(self._pop(conn, op.session_tag, counts))
                elif isinstance(op, ClearSession):
                    n = conn.execute(
                        "DELETE FROM nexus_messages WHERE session_tag = ?", (op.session_tag,)
                    ).rowcount
                    counts.set(op.session_tag, 0)
                    results.append(n)
                else:
                    n = conn.execute(*_clear_all_sql(op.scope)).rowcount
                    counts.clear_all()
                    results.append(n)
            inserts.flush()
            pruned = self._prune(conn, counts)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        counts.commit()
        if len(self._counts) > _COUNT_CACHE_MAX:
            self._counts.clear()
        self._last_ts = now
        st = self.stats
        st.batches += 1
        st.ops += len(batch)
        st.rows += rows_added
        st.pruned += pruned
        return results

    def _pop(self, conn: sqlite3.Connection, tag: str, counts: _Counts) -> Row | None:
        row = conn.execute(
            "SELECT id, role, content, timestamp, session_tag, meta FROM nexus_messages "
            "WHERE session_tag = ? ORDER BY id DESC LIMIT 1",
            (tag,),
        ).fetchone()
        if row is None:
            return None
        conn.execute("DELETE FROM nexus_messages WHERE id = ?", (row[0],))
        counts.add(tag, -1)
        return tuple(row)

    def _prune(self, conn: sqlite3.Connection, counts: _Counts) -> int:
        """Delete exactly the oldest overflow of every session this batch grew.

        One statement for up to :data:`_PRUNE_CHUNK` sessions: each session's
        overflow is an index range scan of ``(session_tag, id)``, and a single
        statement saves a round of statement overhead per session.
        """
        keep = self.max_messages
        if not keep:
            return 0
        over: list[tuple[str, int]] = []
        for tag in counts.grown:
            excess = counts.get(tag) - keep
            if excess > 0:
                over.append((tag, excess))
                counts.set(tag, keep)
        for i in range(0, len(over), _PRUNE_CHUNK):
            chunk = over[i : i + _PRUNE_CHUNK]
            union = " UNION ALL ".join([_PRUNE_ONE] * len(chunk))
            params = [x for pair in chunk for x in pair]
            conn.execute(f"DELETE FROM nexus_messages WHERE id IN ({union})", params)
        return sum(n for _, n in over)

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
        }


class _PendingInserts:
    """Rows waiting to go into one ``executemany``, and who gets which id.

    This is the fast path: rows go in as they are.  A row whose idempotency key
    its session already holds makes the unique index raise IntegrityError; the
    writer then redoes the batch with :class:`_CheckedInserts`.
    """

    __slots__ = ("_conn", "_now", "_rows", "_spans")

    def __init__(self, conn: sqlite3.Connection, now: str) -> None:
        self._conn = conn
        self._now = now
        self._rows: list[tuple[str, str, str, str, str | None, str | None]] = []
        self._spans: list[tuple[list[int], int]] = []  # (ids to fill, how many)

    def add(self, op: Insert) -> tuple[list[int], int]:
        """Queue ``op``'s rows; return its id list (filled by :meth:`flush`) and its size."""
        tag, now, n = op.session_tag, self._now, len(op.rows)
        self._rows += [(r, c, ts or now, tag, m, k) for r, c, ts, m, k in op.rows]
        ids: list[int] = []
        self._spans.append((ids, n))
        return ids, n

    def _insert(self) -> int:
        """Insert the queued rows; return the first new id."""
        rows = self._rows
        conn = self._conn
        conn.executemany(
            "INSERT INTO nexus_messages (role, content, timestamp, session_tag, meta, idem_key) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        # One writer, AUTOINCREMENT, one statement: the new ids are consecutive.
        last: int = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
        return last - len(rows) + 1

    def flush(self) -> None:
        if not self._rows:
            return
        first = self._insert()
        for ids, n in self._spans:
            ids += range(first, first + n)
            first += n
        self._rows = []
        self._spans = []


class _CheckedInserts(_PendingInserts):
    """The careful path: every key is looked up, in the database and in the batch.

    A row whose key its session already holds is not inserted again; its
    caller gets the original id.
    """

    __slots__ = ("_fills", "_keys")

    def __init__(self, conn: sqlite3.Connection, now: str) -> None:
        super().__init__(conn, now)
        self._fills: list[list[tuple[list[int], int]]] = []  # per queued row: who gets its id
        self._keys: dict[tuple[str, str], int] = {}  # (tag, key) -> queued row

    def add(self, op: Insert) -> tuple[list[int], int]:
        tag = op.session_tag
        ids = [0] * len(op.rows)
        added = 0
        for i, (role, content, ts, meta, key) in enumerate(op.rows):
            if key is not None:
                j = self._keys.get((tag, key))
                if j is not None:  # the same key earlier in this batch
                    self._fills[j].append((ids, i))
                    continue
                found = self._conn.execute(
                    "SELECT id FROM nexus_messages WHERE idem_key = ? AND session_tag = ?",
                    (key, tag),
                ).fetchone()
                if found is not None:
                    ids[i] = found[0]
                    continue
                self._keys[(tag, key)] = len(self._rows)
            self._rows.append((role, content, ts or self._now, tag, meta, key))
            self._fills.append([(ids, i)])
            added += 1
        return ids, added

    def flush(self) -> None:
        if not self._rows:
            return
        first = self._insert()
        for j, fills in enumerate(self._fills):
            for ids, i in fills:
                ids[i] = first + j
        self._rows = []
        self._fills = []
        self._keys.clear()


class _Counts:
    """Per-session row counts for one transaction, over the committed cache.

    The writer is the only writer, so counts cached after a commit stay true
    until its next commit; a session not cached is counted once (index scan).
    Nothing reaches the cache unless the transaction commits.
    """

    __slots__ = ("_cache", "_cleared", "_conn", "_work", "grown")

    def __init__(self, conn: sqlite3.Connection, cache: dict[str, int]) -> None:
        self._conn = conn
        self._cache = cache
        self._work: dict[str, int] = {}
        self._cleared = False
        self.grown: set[str] = set()

    def get(self, tag: str) -> int:
        n = self._work.get(tag)
        if n is None:
            n = None if self._cleared else self._cache.get(tag)
            if n is None:
                n = self._conn.execute(
                    "SELECT COUNT(*) FROM nexus_messages WHERE session_tag = ?", (tag,)
                ).fetchone()[0]
            self._work[tag] = n
        return n

    def add(self, tag: str, n: int) -> None:
        self._work[tag] = self.get(tag) + n
        if n > 0:
            self.grown.add(tag)

    def set(self, tag: str, n: int) -> None:
        self._work[tag] = n

    def clear_all(self) -> None:
        self._cleared = True
        self._work.clear()

    def commit(self) -> None:
        if self._cleared:
            self._cache.clear()
        self._cache.update(self._work)


def _clear_all_sql(scope: str | None) -> tuple[str, tuple[str, ...]]:
    if scope is None:
        return "DELETE FROM nexus_messages", ()
    if scope == "":
        lo, hi = scope_bounds(NS_MARK)
        return "DELETE FROM nexus_messages WHERE NOT (session_tag >= ? AND session_tag < ?)", (
            lo,
            hi,
        )
    lo, hi = scope_bounds(scope)
    return "DELETE FROM nexus_messages WHERE session_tag >= ? AND session_tag < ?", (lo, hi)


def _storage_error(exc: sqlite3.Error) -> NexusError:
    if isinstance(exc, sqlite3.OperationalError):
        return Unavailable(f"storage failure, nothing was written: {exc}")
    return Internal(f"write failed, nothing was written: {exc}")
