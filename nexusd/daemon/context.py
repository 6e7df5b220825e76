"""What a connection receives from the daemon: one narrow :class:`Context` value.

The server builds one :class:`Context` and every connection shares it.  It
holds only what a connection uses: the limits, the memory budget, the one
in-flight count, the admission gate, the handlers' services, the writer's two
submit functions and the task group the connection's tasks run in.  Nothing
here names the server, so :mod:`nexusd.daemon.connection` and
:mod:`nexusd.daemon.handlers` never import it (the arrows go one way: the
server imports them).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio
import anyio.abc

from ..storage.base import Op
from ..wire.errors import NexusError
from .binding import Services
from .limits import Budget, InFlight, Limits
from .peers import Namespace
from .tasks import Spawner
from .writer import Done

__all__ = ["Closable", "Context", "Done", "Gate", "Submit"]


class Closable(Protocol):
    """A live connection, as shutdown sees it."""

    finished: anyio.Event

    def close(self) -> None:
        """End it now; :attr:`finished` is set once it is gone."""
        ...


class Gate(Protocol):
    """Who may connect: the daemon's admission of connections."""

    def admit(
        self, sock: socket.socket, conn: Closable
    ) -> tuple[NexusError | None, Namespace | None]:
        """A refusal to send, or the new connection's tag namespace."""
        ...

    def forget(self, conn: Closable) -> None:
        """An admitted connection ended."""
        ...


class Submit(Protocol):
    """The writer's queue, waiting for room up to ``timeout`` (then ``overloaded``)."""

    async def __call__(self, op: Op, done: Done, *, timeout: float) -> None: ...


@dataclass(frozen=True, slots=True)
class Context:
    """What every connection uses of the daemon (one value, shared by all)."""

    limits: Limits
    budget: Budget
    inflight: InFlight
    gate: Gate
    services: Services
    #: The writer's queue if it has room now (False: full; nothing was queued).
    submit_nowait: Callable[[Op, Done], bool]
    #: The writer's queue, waiting for room.
    submit: Submit
    #: Where the connections' tasks (queries, backlogs) run.
    tasks: Spawner
