"""The readers of the PostgreSQL backend: a pool of connections, one statement per read.

Reads never take the write lock and run concurrently with each other and
with the writer; each gets a pooled connection (psycopg_pool, at most
``readers`` of them, checked before use) for one of :mod:`.reads`' queries.
A read the server cannot answer is ``unavailable`` (:mod:`.errors`); reads
go on whenever the server answers, whatever the writer's state.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ...wire.errors import Unavailable
from ...wire.protocol import Message, SessionInfo
from ..base import Page
from . import reads
from .errors import Redactor, read_error
from .search import PgSearch

__all__ = ["Readers"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]

#: Seconds a read waits for a pooled connection before it is ``unavailable``.
_READ_WAIT: Final = 5.0


class Readers:
    """The reader pool and the reads."""

    def __init__(self, url: str, size: int, kwargs: dict[str, Any], redactor: Redactor) -> None:
        self._url = url
        self._size = max(1, size)
        self._kwargs = kwargs
        self._redactor = redactor
        self._pool: AsyncConnectionPool[Any] | None = None
        #: Searches at once: one connection is always left for everything else
        #: (as the SQLite backend's pool does), so history never waits behind them.
        self._searches = anyio.Semaphore(max(1, self._size - 1))
        self._reviving = anyio.Lock()

    async def search(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """:meth:`run` for a search: at most ``size - 1`` at once."""
        async with self._searches:
            return await self.run("search", fn)

    async def open(self, timeout: float) -> None:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            self._url,
            min_size=1,
            max_size=self._size,
            kwargs=self._kwargs,
            open=False,
            check=AsyncConnectionPool.check_connection,
            name="nexusd-readers",
        )
        self._pool = pool
        await pool.open(wait=True, timeout=timeout)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await pool.close()
            except Exception as exc:  # closing: nothing is left to protect
                logger.warning("closing the reader pool: %s", self._redactor.line(exc))

    async def run(self, what: str, fn: Callable[[Conn], Awaitable[T]]) -> T:
        pool = self._pool
        if pool is None:
            raise Unavailable("the database is closed")
        try:
            try:
                async with pool.connection(timeout=_READ_WAIT) as conn:
                    return await fn(conn)
            except PoolTimeout:
                if not await self._revive(pool):
                    raise
            async with self._live().connection(timeout=_READ_WAIT) as conn:
                return await fn(conn)
        except PoolTimeout:
            raise Unavailable(
                f"no connection to PostgreSQL for {what} within {_READ_WAIT:g} s"
            ) from None
        except psycopg.Error as exc:
            error = read_error(what, exc, self._redactor)
            if error.code == "internal":
                logger.error("%s", error.message)
            raise error from None

    def _live(self) -> AsyncConnectionPool[Any]:
        if self._pool is None:
            raise Unavailable("the database is closed")
        return self._pool

    async def _revive(self, failed: AsyncConnectionPool[Any]) -> bool:
        """After an outage: whether a new pool replaced ``failed``, the server answering.

        psycopg_pool's own reconnecting backs off the longer the outage lasted (a
        20 s outage left reads failing 30 s after the server was back), so when a
        read finds no connection while a direct one succeeds, the pool is made anew.
        """
        async with self._reviving:
            if self._pool is not failed:  # another read made a new one meanwhile
                return self._pool is not None
            try:
                probe = await psycopg.AsyncConnection.connect(self._url, **self._kwargs)
            except psycopg.Error:
                return False  # the server is still away: the read fails as it is
            await probe.close()
            logger.warning("reads reconnected to PostgreSQL (a new reader pool)")
            await self.open(_READ_WAIT)
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                await failed.close(timeout=0.5)
            return True

    async def history(
        self, tag: str, limit: int, *, before_id: int | None, after_id: int | None, budget: int
    ) -> Page[Message]:
        if "\x00" in tag:  # nothing can be stored under it
            return Page([], False)
        return await self.run(
            "history",
            lambda c: reads.history(
                c, tag, limit, before_id=before_id, after_id=after_id, budget=budget
            ),
        )

    async def count(self, tag: str) -> int:
        if "\x00" in tag:
            return 0
        return await self.run("count", lambda c: reads.count(c, tag))

    async def feed(
        self, after_id: int, *, scope: str | None, limit: int, budget: int
    ) -> Page[Message]:
        return await self.run(
            "feed", lambda c: reads.feed(c, after_id, scope=scope, limit=limit, budget=budget)
        )

    async def sessions(
        self, *, after: str | None, limit: int, budget: int, scope: str | None = None
    ) -> Page[SessionInfo]:
        return await self.run(
            "sessions",
            lambda c: reads.sessions(c, after=after, limit=limit, budget=budget, scope=scope),
        )

    async def build(self, search: PgSearch) -> None:
        """The search index, on a connection of its own: CREATE INDEX CONCURRENTLY
        may take minutes, and neither a reader nor the writer is held that long."""
        try:
            conn = await psycopg.AsyncConnection.connect(self._url, **self._kwargs)
        except psycopg.Error as exc:
            logger.error("building the search index: %s", self._redactor.line(exc))
            return
        try:
            await search.build(conn)
        except psycopg.Error as exc:
            logger.error("building the search index failed: %s", self._redactor.line(exc))
        finally:
            with anyio.CancelScope(shield=True):
                await conn.close()
