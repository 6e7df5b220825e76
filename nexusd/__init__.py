"""nexusd: durable local conversation history served over a Unix socket.

Clients import from here::

    from nexusd import Client, AsyncClient, Message, NexusError
"""

from __future__ import annotations

__version__ = "0.1.0"

from .client import AsyncClient, Client  # noqa: E402
from .errors import (  # noqa: E402
    BadRequest,
    ConnectionLost,
    DaemonNotRunning,
    Forbidden,
    Internal,
    NexusError,
    NotFound,
    Overloaded,
    TooLarge,
    Unavailable,
)
from .protocol import Message, SessionInfo  # noqa: E402

__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "ConnectionLost",
    "DaemonNotRunning",
    "Forbidden",
    "Internal",
    "Message",
    "NexusError",
    "NotFound",
    "Overloaded",
    "SessionInfo",
    "TooLarge",
    "Unavailable",
    "__version__",
]
