"""nexusd: durable local conversation history served over a Unix socket.

Clients import from here::

    from nexusd import Client, AsyncClient, Message, NexusError
"""

from __future__ import annotations

__version__ = "0.1.0"

from .client import AsyncClient, Client
from .errors import (
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
from .protocol import Message, SessionInfo

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
