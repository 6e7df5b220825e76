"""How handlers are bound to the table of operations, and what they may use of the daemon.

A handler is bound to one :data:`~nexusd.wire.ops.OPERATIONS` row with
:func:`on_local`, :func:`on_write` or :func:`on_read`, by the row's kind:

* ``LOCAL``: ``handler(dispatcher, req) -> reply``, on the spot;
* ``WRITE``: ``handler(dispatcher, req) -> Job``, a storage write for the
  writer paired with the function that builds the reply from its result
  (validation errors are raised here, before anything is queued);
* ``READ``: ``await handler(dispatcher, req, room) -> reply``, a query;
* ``WATCH``: ``handler(dispatcher, req) -> None``, a stream opened or closed
  (its frames are pushed by :mod:`nexusd.daemon.watch`; errors raised here).

:func:`check_bound` (run once every handler module is imported, by
:mod:`nexusd.daemon.handlers`) refuses a row without a handler, a handler
without a row, or one of the wrong kind.  What the handlers use of the
daemon comes in one :class:`Services` value: the limits, the storage's read
side, the backup store, and the daemon's hello and stats; they never see
the server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Generic, NamedTuple, TypeVar, cast

import anyio

from ..storage.base import Op, Storage, WriteOp
from ..wire import protocol as p
from ..wire.ops import OPERATIONS, Runs
from .backups import Snapshots
from .hub import Hub
from .limits import Limits

__all__ = [
    "LOCAL_HANDLERS",
    "READ_HANDLERS",
    "WATCH_HANDLERS",
    "WRITE_HANDLERS",
    "Job",
    "Services",
    "check_bound",
    "job",
    "on_local",
    "on_read",
    "on_watch",
    "on_write",
]

T = TypeVar("T")
R = TypeVar("R")


class Job(NamedTuple, Generic[T]):
    """A storage write whose result is a ``T``, and how its reply is built from it."""

    op: Op
    build: Callable[[int, T], p.Reply]


def job(op: WriteOp[T], build: Callable[[int, T], p.Reply]) -> Job[T]:
    """Pair a storage write with the builder of its reply: the types say their
    result types agree (each write op declares its own, :class:`WriteOp`)."""
    return Job(cast(Op, op), build)


@dataclass(frozen=True, slots=True)
class Services:
    """What the handlers use of the daemon, and nothing else."""

    limits: Limits
    #: The read queries of the storage seam.
    readers: Storage
    snapshots: Snapshots
    #: The daemon's answer to a hello (its version and limits), for a request id.
    hello: Callable[[int], p.HelloReply]
    #: The daemon's counters, as the ``stats`` reply carries them.
    stats: Callable[[], dict[str, Any]]
    #: Every open watch, fed by storage's commits.
    hub: Hub
    #: Searches running at once, daemon-wide (one reader is left for other reads).
    #: Taken before a search reserves its reply's memory: searches waiting their
    #: turn hold none of the budget every other read needs.
    searches: anyio.Semaphore = field(default_factory=lambda: anyio.Semaphore(1))


# The first argument is the connection's Dispatcher (nexusd.daemon.handlers),
# which imports this module: typed loosely here so the imports point one way.
LocalHandler = Callable[[Any, R], p.Reply]
WriteHandler = Callable[[Any, R], Job[Any]]
ReadHandler = Callable[[Any, R, int], Awaitable[p.Reply]]
WatchHandler = Callable[[Any, R], None]

LOCAL_HANDLERS: Final[dict[type[Any], LocalHandler[Any]]] = {}
WRITE_HANDLERS: Final[dict[type[Any], WriteHandler[Any]]] = {}
READ_HANDLERS: Final[dict[type[Any], ReadHandler[Any]]] = {}
WATCH_HANDLERS: Final[dict[type[Any], WatchHandler[Any]]] = {}
_BOUND: Final[dict[type[Any], Runs]] = {}


H = TypeVar("H")


def _binder(request: type[Any], runs: Runs, table: dict[type[Any], Any]) -> Callable[[H], H]:
    """A decorator putting its handler in ``table`` as the one handler of ``request``."""

    def bind(fn: H) -> H:
        if request in _BOUND:
            raise RuntimeError(f"two handlers for {request.__name__}")
        _BOUND[request] = runs
        table[request] = fn
        return fn

    return bind


def on_local(request: type[R]) -> Callable[[LocalHandler[R]], LocalHandler[R]]:
    """Bind a handler answered on the spot."""
    return _binder(request, Runs.LOCAL, LOCAL_HANDLERS)


def on_write(request: type[R]) -> Callable[[WriteHandler[R]], WriteHandler[R]]:
    """Bind a handler that makes a job for the writer."""
    return _binder(request, Runs.WRITE, WRITE_HANDLERS)


def on_read(request: type[R]) -> Callable[[ReadHandler[R]], ReadHandler[R]]:
    """Bind a query."""
    return _binder(request, Runs.READ, READ_HANDLERS)


def on_watch(request: type[R]) -> Callable[[WatchHandler[R]], WatchHandler[R]]:
    """Bind a handler that opens or closes a stream."""
    return _binder(request, Runs.WATCH, WATCH_HANDLERS)


def check_bound() -> None:
    """Exactly one handler, of the row's kind, for every row of the table."""
    rows = {op.request: op.runs for op in OPERATIONS}
    if rows != _BOUND:
        unbound = sorted(t.__name__ for t in rows.keys() - _BOUND.keys())
        stray = sorted(t.__name__ for t in _BOUND.keys() - rows.keys())
        wrong = sorted(t.__name__ for t in rows.keys() & _BOUND.keys() if rows[t] != _BOUND[t])
        raise RuntimeError(
            "the handlers of nexusd.daemon and nexusd.wire.ops.OPERATIONS disagree:"
            f" no handler for {unbound}, no row for {stray}, wrong kind for {wrong}"
        )
