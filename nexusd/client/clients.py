"""The two Python clients, by the names the rest of nexusd imports them from.

:class:`AsyncClient` (asyncio and trio) is written in
``nexusd/client/client_async.py``; :class:`Client` (blocking, thread-safe) is
generated from it into ``nexusd/client/client_sync.py`` by
``scripts/unasync.py``.  Same methods, arguments, defaults and results.
"""

from __future__ import annotations

from .client_async import AsyncClient
from .client_sync import Client
from .requests import MessageInput

__all__ = ["AsyncClient", "Client", "MessageInput"]
