"""Per-session row counts for exact pruning: committed between batches, per transaction within one.

The writer knows every session's count, so retention deletes exactly the
overflow.  The counts cached after a commit stay true until another program
commits to the file: :class:`CountCache` notices that through
``PRAGMA data_version`` (read inside the write transaction) and drops them.
:class:`Counts` is one transaction's view over the cache: a session not
cached is counted once, and nothing reaches the cache unless the
transaction commits.
"""

from __future__ import annotations

import sqlite3

from .schema import VISIBLE_ONE

__all__ = ["CountCache", "Counts"]


class CountCache:
    """Committed per-session row counts, and the ``data_version`` they are true for.

    ``data_version`` of a connection changes when *another* connection commits
    to the database (our own commits leave it alone).  Read after ``BEGIN
    IMMEDIATE`` nobody else can commit until our COMMIT, so a value equal to
    the one seen in our previous transaction proves the counts are still
    exact; a different one drops them all and sessions are counted afresh.
    """

    __slots__ = ("counts", "data_version", "external_changes")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.data_version: int | None = None
        #: Transactions that found another writer's commit before them.
        self.external_changes = 0

    def sync(self, conn: sqlite3.Connection) -> bool:
        """Inside the write transaction: drop the counts if someone else wrote; True if so."""
        version: int = conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self.data_version:
            return False
        changed = self.data_version is not None
        self.data_version = version
        self.counts.clear()
        if changed:
            self.external_changes += 1
        return changed


class Counts:
    """Per-session row counts for one transaction, over the committed cache.

    Counts cached after a commit stay true until the next commit by anyone
    (:class:`CountCache` checks); a session not cached is counted once (index scan).
    Nothing reaches the cache unless the transaction commits.
    """

    __slots__ = ("_cache", "_cleared", "_conn", "_work", "grown")

    def __init__(self, conn: sqlite3.Connection, cache: dict[str, int]) -> None:
        self._conn = conn
        self._cache = cache
        self._work: dict[str, int] = {}
        self._cleared = False
        self.grown: set[str] = set()

    def get(self, tag: str) -> int:
        n = self._work.get(tag)
        if n is None:
            n = None if self._cleared else self._cache.get(tag)
            if n is None:
                n = self._conn.execute(
                    f"SELECT COUNT(*) FROM nexus_messages WHERE session_tag = ? AND {VISIBLE_ONE}",
                    (tag, tag),
                ).fetchone()[0]
            self._work[tag] = n
        return n

    def add(self, tag: str, n: int) -> None:
        self._work[tag] = self.get(tag) + n
        if n > 0:
            self.grown.add(tag)

    def deleted(self, tag: str, n: int) -> None:
        """``n`` rows of ``tag`` were just deleted.

        Only a count known from before the delete is lowered: one taken now
        would already be without them (and lowering it again made retention
        keep too many).
        """
        if tag in self._work:
            self._work[tag] -= n
        elif not self._cleared and tag in self._cache:
            self._work[tag] = self._cache[tag] - n

    def set(self, tag: str, n: int) -> None:
        self._work[tag] = n

    def clear_all(self) -> None:
        self._cleared = True
        self._work.clear()

    def commit(self) -> None:
        if self._cleared:
            self._cache.clear()
        self._cache.update(self._work)
