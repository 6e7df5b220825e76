"""Drop-in replacement for the v1 ``NexusStore``: see :mod:`nexusd.client.compat`.

Kept at this path so v1 callers switch by changing one import::

    from nexusd.compat import NexusStore, nexus_store

``nexus_store`` is the same object as :data:`nexusd.client.compat.nexus_store`,
made when first named rather than when this module is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .client import compat as _compat
from .client.compat import (
    DEFAULT_SESSION_TAG,
    MAX_MESSAGES,
    NexusMessage,
    NexusStore,
)

__all__ = ["DEFAULT_SESSION_TAG", "MAX_MESSAGES", "NexusMessage", "NexusStore", "nexus_store"]

if TYPE_CHECKING:
    from .client.compat import nexus_store


def __getattr__(name: str) -> Any:
    if name == "nexus_store":
        return _compat.nexus_store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
