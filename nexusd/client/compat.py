"""Drop-in replacement for the v1 in-process ``NexusStore``, backed by the daemon.

Existing code switches by changing one import::

    from nexusd.compat import NexusStore, nexus_store

Method names, arguments and return shapes (``NexusMessage`` dicts) are those
of v1.  Differences, all deliberate: the daemon owns the database, so
``db_path`` is accepted but cannot choose the file; timestamps the store makes
are full ISO 8601 UTC instants instead of v1's bare ``HH:MM:SS``, and a
``timestamp`` passed in must be an RFC 3339 instant (a bare ``HH:MM:SS`` is
refused with :class:`~nexusd.wire.errors.BadRequest`); and retention
(``MAX_MESSAGES``) is the daemon's ``max_messages`` setting.  One instance is
safe to share between threads, which v1 was not.

Importing this module does nothing else: the module singleton ``nexus_store``
is made when first named (PEP 562), and connects on its first call.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from ..wire.protocol import DEFAULT_SESSION, Message
from .client_sync import Client

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_SESSION_TAG", "MAX_MESSAGES", "NexusMessage", "NexusStore", "nexus_store"]

MAX_MESSAGES = 500  # the daemon's default; its --max-messages decides
DEFAULT_SESSION_TAG = DEFAULT_SESSION


class NexusMessage(TypedDict):
    id: int
    role: str
    content: str
    timestamp: str
    session_tag: str


def _as_dict(m: Message) -> NexusMessage:
    return NexusMessage(
        id=m.id, role=m.role, content=m.content, timestamp=m.timestamp, session_tag=m.session_tag
    )


class NexusStore:
    """The v1 API over a connection to nexusd (connected lazily, on first use)."""

    def __init__(
        self,
        db_path: Path | None = None,
        *,
        socket_path: str | os.PathLike[str] | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        if db_path is not None:
            logger.warning(
                "NexusStore(db_path=%s): the daemon owns its database; the path is ignored",
                db_path,
            )
        self._client = Client(socket_path, timeout=timeout)

    def close(self) -> None:
        """Close the connection (idempotent); the next call reconnects."""
        self._client.close()

    def append(
        self,
        role: str,
        content: str,
        *,
        timestamp: str | None = None,
        session_tag: str = DEFAULT_SESSION_TAG,
    ) -> int:
        """Insert a message and return its row id (after it is durably committed)."""
        return self._client.append(role, content, timestamp=timestamp, session_tag=session_tag)

    def get_history(
        self, session_tag: str = DEFAULT_SESSION_TAG, limit: int = 200
    ) -> list[NexusMessage]:
        """The most recent ``limit`` messages of ``session_tag``, oldest first."""
        return [_as_dict(m) for m in self._client.get_history(session_tag, limit)]

    def message_count(self, session_tag: str = DEFAULT_SESSION_TAG) -> int:
        """Total message count for ``session_tag``."""
        return self._client.message_count(session_tag)

    def clear(self, session_tag: str = DEFAULT_SESSION_TAG) -> int:
        """Delete all messages of ``session_tag``; return the count deleted."""
        return self._client.clear(session_tag)

    def clear_all(self) -> int:
        """Delete every message across all session tags; return the count deleted."""
        return self._client.clear_all()


_singleton_lock = threading.Lock()

if TYPE_CHECKING:
    #: Module singleton, as in v1: made when first named, connected on first use.
    nexus_store: NexusStore


def __getattr__(name: str) -> Any:
    if name != "nexus_store":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _singleton_lock:  # two threads naming it first still share one store
        store = globals().get("nexus_store")
        if store is None:
            store = globals()["nexus_store"] = NexusStore()
    return store
