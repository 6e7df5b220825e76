# Generated from nexusd/client/lifecycle_async.py by scripts/unasync.py: do not edit.
# Change the async original, then run `python scripts/unasync.py`.
"""A conversation's life on a client: ``delete``, ``fork``, ``set_retention``, written once (async).

:class:`Lifecycle` is a part of every client (:class:`~nexusd.client.Client`
derives from it and supplies ``_call``, which sends a request with the
client's retry policy).  ``scripts/unasync.py`` writes the blocking twin,
``lifecycle_sync.py``, from this file.  The requests are built (and the
caller's mistakes refused, before any I/O) in :mod:`nexusd.client.requests`;
the results are the small frozen types of :mod:`nexusd.client.replies`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..wire import protocol as p
from ..wire.protocol import DEFAULT_SESSION
from .replies import Deleted, Forked, Retention, expect
from .requests import delete_request, fork_request, retention_request

__all__ = ["Lifecycle"]


class Lifecycle:
    """What a client offers for editing conversations (the client supplies ``_call``)."""

    if TYPE_CHECKING:  # the client's own (see the module doc)

        def _call(self, req: Any) -> Any: ...

    def delete(self, ids: Iterable[int], session_tag: str = DEFAULT_SESSION) -> Deleted:
        """Delete exactly the messages of ``session_tag`` with these ids (1 to 10,000).

        Returns a :class:`~nexusd.client.replies.Deleted`: ``.deleted``, the
        ids removed, and ``.missing``, those the session does not hold (never
        stored, already deleted, or another session's): not an error, so
        deleting twice is harmless (and a lost answer is resent).  Watchers
        see the removal.
        """
        reply = expect(self._call(delete_request(ids, session_tag)), p.DeleteReply)
        return Deleted(reply.deleted, reply.missing)

    def fork(
        self,
        source_tag: str,
        new_tag: str,
        *,
        up_to_id: int | None = None,
        append: bool = False,
    ) -> Forked:
        """Copy ``source_tag`` (up to and including ``up_to_id``) into ``new_tag``, atomically.

        The copies get new ids and the same role, content, timestamp and
        meta, plus ``meta["forked_from"] = {"session_tag": source_tag, "id":
        <the original's id>}``.  Returns a :class:`~nexusd.client.replies.Forked`
        (``count``, ``first_id``, ``last_id``).  Raises
        :class:`~nexusd.wire.errors.Conflict` when ``new_tag`` already holds
        messages (unless ``append=True``, which adds the copies after them),
        :class:`~nexusd.wire.errors.NotFound` when there is nothing to copy
        (or ``up_to_id`` is not a message of the source), and
        :class:`~nexusd.wire.errors.TooLarge` past 100,000 messages or 64 MiB.
        Never resent by itself: a second run would copy twice.
        """
        req = fork_request(source_tag, new_tag, up_to_id, append)
        reply = expect(self._call(req), p.ForkReply)
        return Forked(reply.count, reply.first_id, reply.last_id)

    def set_retention(
        self,
        session_tag: str,
        *,
        max_messages: int | None = None,
        max_age: str | float | None = None,
    ) -> Retention:
        """Give ``session_tag`` its own retention, replacing the daemon's defaults for it.

        ``max_messages``: the newest this many are kept (0: unbounded);
        ``max_age``: messages are deleted this long after their commit, in
        seconds or a duration such as ``"30d"``, ``"12h"`` (0: never).  Each
        None (the default) means the daemon's default, so every call sets
        both, and ``set_retention(tag)`` restores the defaults.  A lower
        ``max_messages`` takes effect at once; ``max_age`` within moments.
        Kept in the database (it survives restarts) and shown by
        :meth:`sessions`.  Returns a :class:`~nexusd.client.replies.Retention`:
        what is now set.
        """
        req = retention_request(session_tag, max_messages, max_age)
        reply = expect(self._call(req), p.SetRetentionReply)
        return Retention(reply.session_tag, reply.max_messages, reply.max_age)
