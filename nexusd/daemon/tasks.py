"""Starting the connections' tasks in the daemon's task group from protocol callbacks.

A connection is an asyncio protocol: its frames arrive in callbacks, outside
any task.  The queries and backlogs those frames start must still live in the
daemon's root task group (nothing outlives the server), so they are started
there with ``start_soon`` — from a callback.

anyio finds the running event loop through sniffio when sniffio is installed
(it comes with trio, so with the ``test`` extra and with any program that
uses trio), and sniffio can only tell asyncio is running from inside a task:
a plain callback gets ``NoEventLoopError`` (uvloop happens to be spared).
sniffio's own answer for code that runs callbacks outside tasks is its
``current_async_library_cvar``; :class:`Spawner` sets it around each start.
Without sniffio, anyio asks asyncio directly and nothing needs doing.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from typing import Any

import anyio
import anyio.abc

__all__ = ["Spawner"]

_library: ContextVar[str | None] | None
try:
    from sniffio import current_async_library_cvar as _library
except ImportError:  # anyio then recognises asyncio without help
    _library = None


class Spawner:
    """Starts tasks in one task group, also from asyncio callbacks."""

    __slots__ = ("_group",)

    def __init__(self, group: anyio.abc.TaskGroup) -> None:
        self._group = group

    def start_soon(
        self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any
    ) -> anyio.TaskHandle[Any]:
        if _library is None:
            return self._group.start_soon(func, *args)
        token = _library.set("asyncio")
        try:
            return self._group.start_soon(func, *args)
        finally:
            _library.reset(token)
