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

An operation of several calls is written once, as a *plan*: a generator that
yields the client calls it needs (:func:`call`) and gets their results back,
with no I/O of its own (:func:`history` is one).  :meth:`Link.run` drives a
plan on the blocking client; :meth:`Link.drive` awaits each call instead,
settled as a whole when it writes.

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
from collections.abc import Awaitable, Callable, Generator
from contextlib import closing
from typing import Any, Final, TypeVar

import msgspec

from ..client import AsyncClient, Client
from ..wire.protocol import MAX_HISTORY_LIMIT, Message

__all__ = [
    "PAGE",
    "Call",
    "Link",
    "Plan",
    "call",
    "dumps",
    "history",
    "loads_object",
    "role_of",
    "settle",
]

_T = TypeVar("_T")
#: Messages per ``history`` request when reading a whole session (the protocol's most).
PAGE: Final = MAX_HISTORY_LIMIT
#: One client call a plan asks for: the blocking client's method, its arguments.
Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]
#: An operation as the calls it makes (see the module's doc); returns ``_T``.
Plan = Generator[Call, Any, _T]


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Call:
    """What a plan yields to have ``fn`` (e.g. ``Client.get_history``) called."""
    return fn, args, kwargs


def history(tag: str, limit: int | None = None) -> Plan[list[Message]]:
    """The newest ``limit`` messages of ``tag`` (all when None), oldest first.

    Paged back with ``before_id``, :data:`PAGE` at a time, so no request asks
    for more than the protocol allows, however long the session.
    """
    pages: list[list[Message]] = []
    got, before = 0, None
    while limit is None or got < limit:
        size = PAGE if limit is None else min(PAGE, limit - got)
        page: list[Message] = yield call(Client.get_history, tag, size, before_id=before)
        pages.append(page)
        got += len(page)
        if len(page) < size:
            break
        before = page[0].id
    return [m for page in reversed(pages) for m in page]


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

    def run(self, plan: Plan[_T]) -> _T:
        """``plan``'s result, its calls made on the blocking client."""
        client, result = self.blocking, None
        with closing(plan):
            while True:
                try:
                    fn, args, kwargs = plan.send(result)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
                result = fn(client, *args, **kwargs)

    async def drive(self, plan: Plan[_T], *, writes: bool = False) -> _T:
        """``plan``'s result, each call awaited; settled as a whole when it ``writes``."""
        if writes:
            return await settle(self.drive(plan))
        result = None
        with closing(plan):
            while True:
                try:
                    fn, args, kwargs = plan.send(result)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
                result = await self.call(fn, *args, **kwargs)

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
