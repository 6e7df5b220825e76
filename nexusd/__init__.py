"""nexusd: durable local conversation history served over a Unix socket.

Clients import from here::

    from nexusd import Client, AsyncClient, Message, NexusError

The package is laid out by role, and imports point one way::

    cli ─→ daemon ─→ storage ─→ wire
    client ─────────────────────↗

:mod:`nexusd.wire` (message types, framing, error codes) is shared by both
sides; :mod:`nexusd.storage` keeps the messages; :mod:`nexusd.daemon` serves
them; :mod:`nexusd.client` talks to it; :mod:`nexusd.cli` is the command.

The names below are loaded on first use (PEP 562), so importing the daemon
does not import the clients.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: Public name -> the module that defines it.
_EXPORTS = {
    "AsyncClient": "nexusd.client",
    "Client": "nexusd.client",
    "BadRequest": "nexusd.wire.errors",
    "Conflict": "nexusd.wire.errors",
    "ConnectionLost": "nexusd.wire.errors",
    "DaemonNotRunning": "nexusd.wire.errors",
    "Forbidden": "nexusd.wire.errors",
    "Internal": "nexusd.wire.errors",
    "Lagged": "nexusd.wire.errors",
    "NexusError": "nexusd.wire.errors",
    "NotFound": "nexusd.wire.errors",
    "Overloaded": "nexusd.wire.errors",
    "Timeout": "nexusd.wire.errors",
    "TooLarge": "nexusd.wire.errors",
    "Unavailable": "nexusd.wire.errors",
    "Message": "nexusd.wire.protocol",
    "SessionInfo": "nexusd.wire.protocol",
    "Removal": "nexusd.wire.protocol",
    "AsyncWatcher": "nexusd.client.watch_async",
    "Watcher": "nexusd.client.watch_sync",
    "SearchHit": "nexusd.wire.protocol",
    "SearchResults": "nexusd.client.replies",
    "Deleted": "nexusd.client.replies",
    "Forked": "nexusd.client.replies",
    "Retention": "nexusd.client.replies",
}

__all__ = [
    "AsyncClient",
    "AsyncWatcher",
    "BadRequest",
    "Client",
    "Conflict",
    "ConnectionLost",
    "DaemonNotRunning",
    "Deleted",
    "Forbidden",
    "Forked",
    "Internal",
    "Lagged",
    "Message",
    "NexusError",
    "NotFound",
    "Overloaded",
    "Removal",
    "Retention",
    "SearchHit",
    "SearchResults",
    "SessionInfo",
    "Timeout",
    "TooLarge",
    "Unavailable",
    "Watcher",
    "__version__",
]

if TYPE_CHECKING:
    from .client import AsyncClient, Client
    from .client.replies import Deleted, Forked, Retention, SearchResults
    from .client.watch_async import AsyncWatcher
    from .client.watch_sync import Watcher
    from .wire.errors import (
        BadRequest,
        Conflict,
        ConnectionLost,
        DaemonNotRunning,
        Forbidden,
        Internal,
        Lagged,
        NexusError,
        NotFound,
        Overloaded,
        Timeout,
        TooLarge,
        Unavailable,
    )
    from .wire.protocol import Message, Removal, SearchHit, SessionInfo


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nexusd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return __all__
