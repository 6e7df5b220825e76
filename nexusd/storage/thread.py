"""A thread that owns a SQLite connection, and the cheap way async code calls it.

The writer's connection lives on one long-lived thread and is used only from
there.  Async code hands a call over with :meth:`SQLiteThread.call` and awaits
its result; calls run one at a time, in the order they were handed over.

Why not ``anyio.to_thread``: its round trip measured ~110 us per call on this
project's machine (a worker pool, a queue and an event, a wake-up each way),
against ~40 us for a dedicated thread fed through a :class:`queue.SimpleQueue`
that hands results back with ``call_soon_threadsafe``.  At 32 concurrent
appends a whole write cycle is ~1.2 ms, so the difference shows (25.5k ->
26.7k appends/s).  The daemon runs on asyncio (aiosqlite, which the readers
use, needs it), so the hand-back is an asyncio future.  The readers stay on
aiosqlite: the same thread for them measured no better under load.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..wire.errors import Unavailable

__all__ = ["SQLiteThread"]

logger = logging.getLogger(__name__)


class SQLiteThread:
    """One thread running the calls handed to it, one at a time, in order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            # daemon=True: a process that dies abnormally must not hang on it;
            # an orderly stop() lets every queued call finish first.
            self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Let the thread finish the calls queued so far, then end (no waiting)."""
        if self._thread is not None:
            self._calls.put(None)
            self._thread = None

    async def call(
        self,
        fn: Callable[..., Any],
        *args: Any,
        then: Callable[..., None] | None = None,
    ) -> Any:
        """Run ``fn(*args)`` on the thread; return its result or raise its exception.

        ``then(*args, result)`` runs in the event loop as soon as the result is
        back, before the awaiting task resumes (and even if it was cancelled).
        A cancelled caller does not stop the call: the thread finishes it.
        """
        if self._thread is None:
            raise Unavailable(f"{self.name} is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._calls.put(_Call(fn, args, then, loop, future))
        return await future

    def _main(self) -> None:
        get = self._calls.get
        while (call := get()) is not None:
            try:
                result = call.fn(*call.args)
            except BaseException as exc:  # handed to the awaiting task
                call.hand_back(_fail, exc)
            else:
                call.hand_back(_succeed, result)


@dataclass(slots=True)
class _Call:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    then: Callable[..., None] | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]

    def hand_back(self, how: Callable[[_Call, Any], None], value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(how, self, value)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            logger.warning("a SQLite call finished after its event loop closed")


def _succeed(call: _Call, result: Any) -> None:
    if call.then is not None:
        try:
            call.then(*call.args, result)
        except Exception:
            logger.exception("SQLite call hand-back failed")
    if not call.future.done():
        call.future.set_result(result)


def _fail(call: _Call, exc: BaseException) -> None:
    if not call.future.done():
        call.future.set_exception(exc)
