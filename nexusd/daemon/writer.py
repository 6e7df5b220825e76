"""The writer actor: the only code that mutates the database.

Every mutation goes through one bounded queue to one task.  The task takes the
first job, drains whatever else is already waiting (up to ``batch_max``) and
hands the whole batch to storage's one write call
(:meth:`~nexusd.storage.base.Storage.write`: one transaction, retention
included, see its contract), which answers every caller once it committed.
While a batch commits the next one fills up: group commit.

Jobs are answered through a callback, run in the event loop as soon as
storage hands the results back, so the server can route replies without a
task per request.  Once storage says it was lost (its files changed under the
daemon), every later write is refused here, before it is queued.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..storage.base import Fork, Insert, Op, Storage, WriteStats
from ..wire.errors import STORAGE_LOST, BadRequest, Internal, NexusError, Overloaded, Unavailable

__all__ = ["Done", "Writer"]

logger = logging.getLogger(__name__)

#: Called once, in the event loop, with the job's result or its NexusError.
Done: TypeAlias = Callable[[Any], None]

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


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    idx = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[idx]


class Writer:
    """The single-writer actor over an opened :class:`~nexusd.storage.base.Storage`.

    Run :meth:`run` in a task group; :meth:`close` makes it finish what is
    queued and return.  The storage is opened before and closed after, by
    whoever owns it.
    """

    def __init__(self, storage: Storage, *, queue_size: int, batch_max: int) -> None:
        self.storage = storage
        self.batch_max = batch_max
        self.latencies: deque[float] = deque(maxlen=_LATENCY_SAMPLES)
        self._send: MemoryObjectSendStream[_Job]
        self._recv: MemoryObjectReceiveStream[_Job]
        self._send, self._recv = anyio.create_memory_object_stream[_Job](queue_size)
        #: Producers waiting for room, first come first queued.  Kept here rather
        #: than in anyio's ``send``: a ``send`` cancelled by its deadline just as
        #: the writer took the job reports failure for a job that then commits.
        self._waiting: deque[_Waiter] = deque()
        self._closing = False
        self._stopped = anyio.Event()

    @property
    def stats(self) -> WriteStats:
        """What storage committed (batches, ops, rows, pruned, failures)."""
        return self.storage.write_stats

    # ── lifecycle ─────────────────────────────────────────────────────────

    async def run(self) -> None:
        """Process batches until :meth:`close` was called and the queue is empty."""
        recv = self._recv
        held: _Job | None = None  # a fork taken while a batch was being filled
        try:
            while True:
                if held is not None:
                    first, held = held, None
                else:
                    try:
                        first = await recv.receive()
                    except anyio.EndOfStream:
                        break
                batch = [first]
                # A fork copies up to MAX_FORK_BYTES in its transaction: it goes
                # alone, so the appends around it wait for one fork at most (32
                # pipelined forks in one batch held every writer for 25 s).
                while type(first.op) is not Fork and len(batch) < self.batch_max:
                    try:
                        job = recv.receive_nowait()
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                    if type(job.op) is Fork:
                        held = job
                        break
                    batch.append(job)
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

    # ── submitting ────────────────────────────────────────────────────────
    @property
    def queue_depth(self) -> int:
        return self._send.statistics().current_buffer_used

    def submit_nowait(self, op: Op, done: Done) -> bool:
        """Queue ``op`` if there is room now; False when the queue is full."""
        if self._closing:
            raise Unavailable("nexusd is shutting down")
        lost = self.storage.storage_error
        if lost is not None:
            raise Unavailable(lost, field=STORAGE_LOST)
        if type(op) is Insert and 0 < (keep := self.storage.max_messages_of(op.session_tag)) < len(
            op.rows
        ):
            # Its oldest rows would be pruned in the very commit that
            # acknowledges them: refuse rather than answer ids already gone.
            raise BadRequest(
                f"{len(op.rows)} messages in one append_many exceed max_messages"
                f" ({keep}), the rows a session keeps; send at most {keep}",
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

    # ── the batch ─────────────────────────────────────────────────────────
    async def _commit(self, batch: list[_Job]) -> None:
        started = time.perf_counter()
        # The callers are answered by _answer, straight from storage's hand-back,
        # before this task is even resumed; storage finishes a batch it was given.
        try:
            await self.storage.write([job.op for job in batch], lambda r: _answer(batch, r))
        except Exception as exc:  # a bug, not a storage error: storage maps those
            logger.exception("writer batch crashed")
            _answer(batch, [Internal(f"write failed: {type(exc).__name__}")] * len(batch))
        self.latencies.append(time.perf_counter() - started)

    def snapshot(self, *, queue_depth: bool = True) -> dict[str, Any]:
        """Writer figures for the ``stats`` operation."""
        st = self.storage.write_stats
        lat = sorted(self.latencies)
        return {
            "queue_depth": self.queue_depth if queue_depth else 0,
            "batches_committed": st.batches,
            "ops_committed": st.ops,
            "rows_committed": st.rows,
            "rows_pruned": st.pruned,
            "rows_expired": st.expired,
            "rows_swept": st.swept,
            "failed_batches": st.failed_batches,
            "mean_batch_size": round(st.ops / st.batches, 3) if st.batches else 0.0,
            "commit_latency_p50_ms": round(_percentile(lat, 0.50) * 1000, 3),
            "commit_latency_p99_ms": round(_percentile(lat, 0.99) * 1000, 3),
            "external_writes_seen": st.external_writes,
            "storage_ok": self.storage.storage_error is None,
            "storage_error": self.storage.storage_error,
        }


def _answer(batch: list[_Job], results: list[Any]) -> None:
    for job, result in zip(batch, results, strict=True):
        try:
            job.done(result)
        except Exception:  # a broken callback must not kill the writer
            logger.exception("reply callback failed")
