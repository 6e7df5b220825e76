"""The Python clients of nexusd: :class:`AsyncClient`, :class:`Client`, and the v1 compat store.

Imports only :mod:`nexusd.wire` (a test holds it).  The modules, by role:

* ``client_async.py``: the client, written once (async); ``client_sync.py``:
  the blocking client generated from it by ``scripts/unasync.py``.
* ``watch_async.py``: ``client.watch()``, the iterator following a
  conversation as it is written (resuming by itself), written once;
  ``watch_sync.py``: its blocking twin, generated the same way.
* ``transport_async.py`` / ``transport_sync.py``: how each moves frames (the
  only hand-written difference between them); ``stream_async.py`` /
  ``stream_sync.py``: the same for a watch's own connection.
* ``lifecycle_async.py``: ``delete()``, ``fork()``, ``set_retention()``, written
  once; ``lifecycle_sync.py``: their blocking twin, generated the same way.
* ``requests.py``: building and checking requests; ``replies.py``: reading
  replies (bad bytes become ``ConnectionLost``), paging, result types; ``retry.py``: which
  calls are resent, and when; ``connect.py``: socket path checks, connect
  errors, who serves the socket; ``backup.py``: the file a backup is written to.
* ``compat.py``: the v1 ``NexusStore`` API over :class:`Client`.
"""

from __future__ import annotations

from .client_async import AsyncClient
from .client_sync import Client

__all__ = ["AsyncClient", "Client"]
