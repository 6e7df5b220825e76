"""The requests and replies of a conversation's life: ``delete``, ``fork``, ``set_retention``.

Part of the protocol (:mod:`nexusd.wire.protocol` puts them in its tagged
unions and re-exports them; import them from there), kept apart so that
module stays readable.  ``docs/protocol.md`` describes each.
"""

from __future__ import annotations

from typing import Annotated, Final

from msgspec import Meta

from .durations import MAX_DURATION
from .envelope import DEFAULT_SESSION, Rep, Req, RowId, SessionTag

__all__ = [
    "MAX_DELETE_IDS",
    "MAX_RETAINED",
    "Delete",
    "DeleteReply",
    "Fork",
    "ForkReply",
    "SetRetention",
    "SetRetentionReply",
]

#: Most ids one ``delete`` names.
MAX_DELETE_IDS: Final = 10_000
#: The largest ``max_messages`` a session may set (0, unbounded, is always allowed).
MAX_RETAINED: Final = 1_000_000_000

#: A session's own ``max_messages``: 0 (unbounded) … :data:`MAX_RETAINED`.
RetainedCount = Annotated[int, Meta(ge=0, le=MAX_RETAINED)]
#: A session's own ``max_age`` in seconds: 0 (never) … 100 years.
RetainedAge = Annotated[float, Meta(ge=0, le=MAX_DURATION)]


class Delete(Req, frozen=True, tag="delete"):
    #: Ids of ``session_tag`` to delete; an id it does not hold is reported missing.
    ids: Annotated[list[RowId], Meta(min_length=1, max_length=MAX_DELETE_IDS)]
    session_tag: SessionTag = DEFAULT_SESSION


class Fork(Req, frozen=True, tag="fork"):
    source_tag: SessionTag
    new_tag: SessionTag
    #: Copy up to and including this id (nil: every message).
    up_to_id: RowId | None = None
    #: Add the copies even when ``new_tag`` already holds messages.
    append: bool = False


class SetRetention(Req, frozen=True, tag="set_retention"):
    session_tag: SessionTag = DEFAULT_SESSION
    #: Each nil: the daemon's default applies; 0: unbounded.
    max_messages: RetainedCount | None = None
    max_age: RetainedAge | None = None


class DeleteReply(Rep, frozen=True, tag="delete"):
    #: The ids deleted, and those the session did not hold; both ascending, without repeats.
    deleted: list[int]
    missing: list[int]


class ForkReply(Rep, frozen=True, tag="fork"):
    #: ``count`` messages stored in the new session, with ids ``first_id`` … ``last_id``.
    count: int
    first_id: int
    last_id: int


class SetRetentionReply(Rep, frozen=True, tag="set_retention"):
    #: What is now set for the session (nil: the daemon's default).
    session_tag: str
    max_messages: int | None
    max_age: float | None
