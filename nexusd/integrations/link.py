"""What the framework adapters share: one way to call nexusd, and each record's JSON text.

:class:`Link` makes the adapters' calls over either client:

* a blocking :class:`~nexusd.client.Client` (the default: made from
  ``socket``, or passed in), called in a worker thread from async code, as
  the frameworks' own SQLite backends do.  It is safe to share between
  threads and reconnects by itself, so it works from any event loop (the
  Agents SDK's ``Runner.run_sync`` starts one per call);
* an :class:`~nexusd.client.AsyncClient` the caller opened (``async with``),
  called on the event loop itself.  Blocking calls then use a ``Client`` of
  the same socket, made on first use.

Writes are *settled*: once sent, a write is waited for even when the caller
is cancelled, and the cancellation is raised after it (as the Agents SDK's own
sessions do), so a cancelled ``add_items`` is either wholly stored or not
sent, and the connection is never left mid-call.

Records: the adapters store each framework object as the JSON text of its own
serialised form, in ``content``; :func:`dumps` and :func:`loads_object` are
the one place that text is written and read.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from ..client import AsyncClient, Client

__all__ = ["Link", "dumps", "loads_object", "role_of", "settle"]

_T = TypeVar("_T")
_decode = msgspec.json.Decoder().decode


async def settle(awaitable: Awaitable[_T]) -> _T:
    """``awaitable``'s result, waited for to the end even if the caller is cancelled meanwhile.

    A cancellation that arrived while waiting is raised afterwards, so the
    caller still stops, but only once the write it sent has its answer.
    """
    task = asyncio.ensure_future(awaitable)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError as exc:
            cancelled = cancelled or exc
    if cancelled is not None:
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what the caller hears of
        raise cancelled
    return task.result()


class Link:
    """An adapter's way to nexusd: a blocking ``Client`` or an open ``AsyncClient``."""

    def __init__(
        self,
        socket: str | os.PathLike[str] | None,
        client: Client | AsyncClient | None,
        *,
        adapter: str,
    ) -> None:
        self._lock = threading.Lock()
        self._async: AsyncClient | None = None
        self._sync: Client | None = None
        self._owned = False
        if client is None:
            self._sync = Client(socket)
            self._owned = True
        elif socket is not None:
            raise TypeError(f"{adapter}: pass socket= or client=, not both")
        elif isinstance(client, AsyncClient):
            self._async = client
        elif isinstance(client, Client):
            self._sync = client
        else:
            raise TypeError(
                f"{adapter}: client= takes a nexusd Client or AsyncClient, "
                f"not {type(client).__name__}"
            )

    @property
    def blocking(self) -> Client:
        """The blocking client: the one given, or one of the async client's socket."""
        with self._lock:
            if self._sync is None:
                assert self._async is not None
                self._sync = Client(self._async.socket_path)
                self._owned = True
            return self._sync

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn`` (a method name's blocking twin, e.g. ``Client.get_history``), awaited.

        On the async client when there is one; else the blocking client's, in a thread.
        """
        if self._async is not None:
            return await getattr(self._async, fn.__name__)(*args, **kwargs)
        sync = self.blocking
        return await asyncio.to_thread(functools.partial(fn, sync, *args, **kwargs))

    async def write(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """As :meth:`call`, settled: see the module's doc."""
        return await settle(self.call(fn, *args, **kwargs))

    def close(self) -> None:
        """Close the blocking client this link made (a client passed in stays the caller's)."""
        with self._lock:
            sync, owned = self._sync, self._owned
            if owned:
                self._sync, self._owned = None, False
        if owned and sync is not None:
            sync.close()


def dumps(obj: Any) -> str:
    """The JSON text stored for ``obj``: compact, non-ASCII kept as it is.

    A string with a lone surrogate cannot be UTF-8; such an object is stored
    with ``\\u`` escapes instead, which decode to the same value.
    """
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False)
    return text


def loads_object(content: str) -> dict[str, Any] | None:
    """The JSON object ``content`` holds, or None if it holds no object (a foreign message)."""
    if not content.startswith("{"):
        return None
    try:
        value = _decode(content)  # two to three times json.loads' speed
    except msgspec.MsgspecError:
        try:  # what msgspec refuses but json reads: \ud800 escapes, 1e400
            value = json.loads(content)
        except ValueError:
            return None
    return value if isinstance(value, dict) else None


def role_of(*candidates: object, default: str = "item") -> str:
    """The first candidate that is a valid nexusd role (1 to 64 characters), else ``default``."""
    for c in candidates:
        if isinstance(c, str) and 0 < len(c) <= 64:
            return c
    return default
