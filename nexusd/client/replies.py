"""How the clients read what the daemon sends, without any I/O.

Every transport turns bytes into replies through :class:`ReplyReader`, the one
place where bytes that are not a reply become
:class:`~nexusd.wire.errors.ConnectionLost` (the connection is unusable after
them, whichever client reads it).  :func:`expect` checks a reply's type, and
:func:`next_page` / :func:`merge` continue a history page the daemon cut to
fit its frame limit.  The small result types of the calls that are not
plain values (:class:`SearchResults`, :class:`Deleted`, :class:`Forked`,
:class:`Retention`) are here too, shared by both clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, TypeVar

import msgspec

from ..wire import protocol as p
from ..wire.errors import ConnectionLost, NexusError
from ..wire.framing import FrameDecoder
from ..wire.protocol import Message, SearchHit
from .requests import history_request

__all__ = [
    "CLIENT_MAX_FRAME",
    "RECV_BYTES",
    "Deleted",
    "Forked",
    "ReplyReader",
    "Retention",
    "SearchResults",
    "expect",
    "merge",
    "next_page",
]

R = TypeVar("R")

RECV_BYTES: Final = 256 * 1024
#: Replies are bounded by the server's frame limit; accept anything sane.
CLIENT_MAX_FRAME: Final = 64 * 1024 * 1024


class ReplyReader:
    """Bytes in, decoded replies out, for one connection.

    Raises :class:`ConnectionLost` for a frame that is not a reply, and the
    decoder's :class:`~nexusd.wire.errors.TooLarge` for one over
    :data:`CLIENT_MAX_FRAME`; either way the stream is out of step and the
    connection must be dropped.
    """

    __slots__ = ("_frames",)

    def __init__(self) -> None:
        self._frames = FrameDecoder(CLIENT_MAX_FRAME)

    def feed(self, data: bytes | memoryview) -> list[Any]:
        """The replies completed by ``data``, in the order they arrived."""
        decode = p.reply_decoder.decode
        try:
            return [decode(body) for body in self._frames.feed(data)]
        except msgspec.DecodeError as exc:
            raise ConnectionLost(f"bad reply from nexusd: {exc}") from None


def expect(reply: Any, kind: type[R]) -> R:
    """``reply`` as ``kind``, or raise the error it carries."""
    if type(reply) is kind:
        return reply
    if isinstance(reply, p.ErrorReply):
        p.raise_for_error(reply)
    raise NexusError(f"unexpected reply {type(reply).__name__} to a {kind.__name__[:-5]} request")


def next_page(first: p.History, got: list[Message], page: p.HistoryReply) -> p.History | None:
    """The request continuing a history page the server cut short, else None."""
    if not page.truncated or not page.messages or len(got) >= first.limit:
        return None
    rest = first.limit - len(got)
    if first.after_id is None:  # paging back from the newest: continue below the oldest seen
        return history_request(first.session_tag, rest, page.messages[0].id, None)
    return history_request(first.session_tag, rest, first.before_id, page.messages[-1].id)


def merge(first: p.History, got: list[Message], page: list[Message]) -> list[Message]:
    """Join a continued page to what came before, keeping oldest-first order."""
    return page + got if first.after_id is None else got + page


class SearchResults(list[SearchHit]):
    """The hits of one search call, best (or newest) first: a list, plus ``cursor``.

    ``cursor`` is None when these are all the hits there are; otherwise pass
    it back with the same query and filters for the next ones.
    """

    __slots__ = ("cursor",)

    def __init__(self, hits: list[SearchHit], cursor: str | None) -> None:
        super().__init__(hits)
        self.cursor = cursor


@dataclass(frozen=True, slots=True)
class Deleted:
    """What ``delete`` did: the ids it deleted, and those the session did not hold.

    Both ascending, each id once (however often it was asked for).
    """

    deleted: list[int]
    missing: list[int]


@dataclass(frozen=True, slots=True)
class Forked:
    """What ``fork`` stored: ``count`` messages with ids ``first_id`` … ``last_id``."""

    count: int
    first_id: int
    last_id: int


@dataclass(frozen=True, slots=True)
class Retention:
    """A session's own retention, as ``set_retention`` left it.

    ``max_messages`` (messages kept) and ``max_age`` (seconds): None where
    the daemon's default applies, 0 for unbounded.
    """

    session_tag: str
    max_messages: int | None
    max_age: float | None
