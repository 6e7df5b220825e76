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

How a record is written and read is :mod:`nexusd.integrations.records`'s.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Awaitable, Callable, Generator
from contextlib import closing
from typing import Any, Final, TypeVar

from ..client import AsyncClient, Client
from ..wire.envelope import MAX_SESSION_CHARS
from ..wire.protocol import MAX_HISTORY_LIMIT, Message

__all__ = ["PAGE", "Call", "Link", "Plan", "call", "check_tag", "history", "settle"]

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


def check_tag(tag: object, *, what: str, adapter: str) -> str:
    """``tag`` if nexusd can hold it as a session tag; else the error, before any call."""
    if not isinstance(tag, str):
        raise TypeError(
            f"{adapter}: {what} is a nexusd session tag, a str, not {type(tag).__name__}"
        )
    if not 0 < len(tag) <= MAX_SESSION_CHARS:
        raise ValueError(
            f"{adapter}: {what} must be 1 to {MAX_SESSION_CHARS} characters (a nexusd session"
            f" tag), not {len(tag)}"
        )
    return tag


def history(
    tag: str, limit: int | None = None, *, before: int | None = None
) -> Plan[list[Message]]:
    """The newest ``limit`` messages of ``tag`` (all when None) older than ``before``, oldest first.

    Paged back with ``before_id``, :data:`PAGE` at a time, so no request asks
    for more than the protocol allows, however long the session.
    """
    pages: list[list[Message]] = []
    got = 0
    while limit is None or got < limit:
        size = PAGE if limit is None else min(PAGE, limit - got)
        page: list[Message] = yield call(Client.get_history, tag, size, before_id=before)
        pages.append(page)
        got += len(page)
        if len(page) < size:
            break
        before = page[0].id
    return [m for page in reversed(pages) for m in page]


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
        self._adapter = adapter
        self._closed = False
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
            self._check_open()
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
            self._check_open()
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

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self._adapter} is closed")

    def close(self) -> None:
        """Close the blocking client this link made (a client passed in stays the caller's).

        Idempotent; any call after it is ``RuntimeError`` ("... is closed").
        """
        with self._lock:
            self._closed = True
            sync, owned = self._sync, self._owned
            if owned:
                self._sync, self._owned = None, False
        if owned and sync is not None:
            sync.close()
