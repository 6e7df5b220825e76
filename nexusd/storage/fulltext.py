"""The full-text index as the SQLite backend runs it: made or dropped at open, built
between batches, asked by ``search``.

What the index *is* (tables, triggers, the writer's upkeep) is :mod:`.index`;
the queries are :mod:`.search`.  This is the index's life in a running
backend: its :class:`~.index.IndexState`, which the writer's batches keep
the index by, changes only on the writer's thread.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable

from ..wire.errors import SEARCH_INDEX, Unavailable
from ..wire.protocol import SearchHit
from . import index as fts
from .base import Page, SearchQuery
from .reads import ReaderPool
from .thread import SQLiteThread

logger = logging.getLogger(__name__)

__all__ = ["FullText"]


class FullText:
    """The search index of one open database (``enabled`` False: none is kept)."""

    def __init__(self, enabled: bool, thread: SQLiteThread, readers: ReaderPool) -> None:
        self.enabled = enabled
        #: How far the index is built (None: search is off).
        self.state: fts.IndexState | None = None
        self._thread = thread
        self._readers = readers

    def prepare(self, conn: sqlite3.Connection) -> None:
        """Writer thread, at open: the index exists, or is removed when search is off."""
        if not self.enabled:
            fts.drop(conn)
            self.state = None
        else:
            self.state = fts.ensure(conn)

    def _build_step(self, conn: sqlite3.Connection) -> fts.IndexState:
        """Writer thread: one chunk of the build; the batches after it see how far it came."""
        state = self.state = fts.build_step(conn)
        return state

    async def build(self, connection: Callable[[], sqlite3.Connection | None]) -> None:
        """Index older rows, a chunk per writer-thread call (writes run between chunks)."""
        state = self.state
        if state is None or state.complete:
            return
        logged = state.percent() // 10
        while not state.complete:
            conn = connection()
            if conn is None:
                return  # closed meanwhile: the next start goes on from here
            try:
                state = await self._thread.call(self._build_step, conn)
            except sqlite3.Error as exc:
                # A storage fault: serving goes on, search says it is not ready,
                # and the next start resumes the build where it stopped.
                logger.error("building the search index stopped: %s", exc)
                return
            if state.percent() // 10 > logged:
                logged = state.percent() // 10
                logger.info("search index: %d%% of the stored messages indexed", state.percent())
        logger.info("search index complete")

    async def search(self, query: SearchQuery) -> Page[SearchHit]:
        state = self.state
        if state is None:
            raise Unavailable(
                "search is off in this daemon (setting search = false)", field=SEARCH_INDEX
            )
        if not state.complete:
            raise Unavailable(
                f"the search index is being built ({state.percent()}% done); try again shortly",
                field=SEARCH_INDEX,
            )
        return await self._readers.search(query)

    @property
    def status(self) -> str:
        state = self.state
        if state is None:
            return "off"
        return "ready" if state.complete else f"building {state.percent()}%"
