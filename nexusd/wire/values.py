"""The values the protocol carries inside its requests and replies: messages, sessions, hits.

Frozen msgspec Structs, shared by :mod:`nexusd.wire.protocol` (which
re-exports them) and by storage, which builds them from rows.  New fields
always get defaults.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

from msgspec import Meta, Struct

__all__ = [
    "MAX_IDEM_KEY_CHARS",
    "MAX_ROLE_CHARS",
    "IdemKey",
    "Message",
    "MetaMap",
    "NewMessage",
    "Removal",
    "Role",
    "SearchHit",
    "SessionInfo",
]

MAX_ROLE_CHARS: Final = 64
MAX_IDEM_KEY_CHARS: Final = 128
Role = Annotated[str, Meta(min_length=1, max_length=MAX_ROLE_CHARS)]
IdemKey = Annotated[str, Meta(min_length=1, max_length=MAX_IDEM_KEY_CHARS)]
#: ``meta`` is any JSON-compatible mapping; the server checks the values.
MetaMap = dict[str, Any]


class Message(Struct, frozen=True, kw_only=True):
    """One stored message."""

    id: int
    role: str
    content: str
    timestamp: str
    session_tag: str
    meta: MetaMap | None = None


class SessionInfo(Struct, frozen=True, kw_only=True):
    """Summary of one session tag.

    ``max_messages`` and ``max_age`` (seconds) are the session's own
    retention (``set_retention``): nil where the daemon's default applies,
    0 for unbounded.
    """

    session_tag: str
    count: int
    first_id: int
    last_id: int
    last_timestamp: str
    max_messages: int | None = None
    max_age: float | None = None


class SearchHit(Struct, frozen=True, kw_only=True):
    """One message a search found: the message, a snippet of it, and its rank.

    ``highlights`` are the [start, end) offsets, in code points of
    ``snippet``, of each matched term.  ``rank`` is bm25's (lower is a better
    match); in newest-first order it is still given.
    """

    message: Message
    snippet: str
    highlights: list[tuple[int, int]] = []
    rank: float = 0.0


class Removal(Struct, frozen=True, kw_only=True):
    """Messages a watch covered that went away (``pop``, ``clear``, retention).

    Gone: the ids in ``ids``, and with ``before_id`` every message of the
    session with a smaller id.  ``session_tag`` nil: of every session the
    watch covers (``clear_all``).
    """

    session_tag: str | None = None
    ids: list[int] = []
    before_id: int | None = None


class NewMessage(Struct, frozen=True, kw_only=True):
    """One item of an ``append_many`` request."""

    role: Role
    content: str
    timestamp: str | None = None
    meta: MetaMap | None = None
    #: A retry with the same key in the same session stores nothing new.
    idem_key: IdemKey | None = None
