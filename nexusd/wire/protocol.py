"""Wire types of the nexusd protocol: every request, every reply, and their encoder.

A frame body is one MessagePack map.  Requests are tagged by ``op``; the reply to
a request carries the same ``op`` and echoes the request's ``id``, or carries
``op = "error"``.  All types are frozen msgspec Structs in two tagged unions
(:data:`Request` and :data:`Reply`); the encoder and the reply decoder are
built once and reused, as are the error replies' conversions both ways.  New
fields always get defaults so older peers keep working.

The base Structs and the bounds every request shares are
:mod:`nexusd.wire.envelope`'s; the requests of a conversation's life
(``delete``, ``fork``, ``set_retention``) are :mod:`nexusd.wire.lifecycle`'s;
both are re-exported here.  Around it: :mod:`nexusd.wire.ops` (the table of
operations: which request gets which reply, how the daemon runs it, whether a
client may retry it), :mod:`nexusd.wire.codec` (the daemon's request decoding
and what it says about a body that does not decode),
:mod:`nexusd.wire.timestamps` (the one accepted timestamp syntax).  This
module imports nothing else of nexusd but those and the error hierarchy.
``docs/protocol.md`` is the prose version of this file.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal, Union

import msgspec
from msgspec import Meta

from .envelope import DEFAULT_SESSION as DEFAULT_SESSION
from .envelope import MAX_REQUEST_ID as MAX_REQUEST_ID
from .envelope import MAX_SESSION_CHARS as MAX_SESSION_CHARS
from .envelope import Rep as _Rep
from .envelope import Req as _Req
from .envelope import RequestId as RequestId
from .envelope import RowId as RowId
from .envelope import SessionTag as SessionTag
from .errors import NexusError, error_for_code
from .lifecycle import MAX_DELETE_IDS as MAX_DELETE_IDS
from .lifecycle import MAX_RETAINED as MAX_RETAINED
from .lifecycle import Delete as Delete
from .lifecycle import DeleteReply as DeleteReply
from .lifecycle import Fork as Fork
from .lifecycle import ForkReply as ForkReply
from .lifecycle import SetRetention as SetRetention
from .lifecycle import SetRetentionReply as SetRetentionReply

# The values, re-exported: the wire's types are all reachable from here.
from .values import MAX_IDEM_KEY_CHARS as MAX_IDEM_KEY_CHARS
from .values import MAX_ROLE_CHARS as MAX_ROLE_CHARS
from .values import IdemKey as IdemKey
from .values import Message as Message
from .values import MetaMap as MetaMap
from .values import NewMessage as NewMessage
from .values import Removal as Removal
from .values import Role as Role
from .values import SearchHit as SearchHit
from .values import SessionInfo as SessionInfo

PROTOCOL_VERSION: Final = 1
MAX_HISTORY_LIMIT: Final = 10_000
MAX_SESSIONS_PAGE: Final = 1_000

Limit = Annotated[int, Meta(ge=1, le=MAX_HISTORY_LIMIT)]
#: Largest backup chunk a client may ask for (well under any frame limit).
MAX_BACKUP_CHUNK: Final = 1024 * 1024
#: Longest caller-supplied ``timestamp``, in characters (Unicode code points).
MAX_TIMESTAMP_CHARS: Final = 64
#: Longest search query, in characters.
MAX_QUERY_CHARS: Final = 1_000
#: Most hits in one page of a search.
MAX_SEARCH_LIMIT: Final = 1_000
#: Most session tags one search may be narrowed to.
MAX_SEARCH_SESSIONS: Final = 100
#: Most watches open at once on one connection.
MAX_WATCHES: Final = 64


# ── Requests ──────────────────────────────────────────────────────────────────
class Hello(_Req, frozen=True, tag="hello"):
    version: int = PROTOCOL_VERSION
    client: str = ""


class Ping(_Req, frozen=True, tag="ping"):
    pass


class Append(_Req, frozen=True, tag="append"):
    role: Role
    content: str
    session_tag: SessionTag = DEFAULT_SESSION
    timestamp: str | None = None
    meta: MetaMap | None = None
    #: A retry with the same key in the same session returns the original id.
    idem_key: IdemKey | None = None


class AppendMany(_Req, frozen=True, tag="append_many"):
    messages: Annotated[list[NewMessage], Meta(min_length=1, max_length=MAX_HISTORY_LIMIT)]
    session_tag: SessionTag = DEFAULT_SESSION


class History(_Req, frozen=True, tag="history"):
    session_tag: SessionTag = DEFAULT_SESSION
    limit: Limit = 200
    before_id: RowId | None = None
    after_id: RowId | None = None


class Count(_Req, frozen=True, tag="count"):
    session_tag: SessionTag = DEFAULT_SESSION


class Sessions(_Req, frozen=True, tag="sessions"):
    #: Page on: only tags sorting strictly after this one.
    after: str | None = None
    limit: Annotated[int, Meta(ge=1, le=MAX_SESSIONS_PAGE)] = MAX_SESSIONS_PAGE


class Search(_Req, frozen=True, tag="search"):
    #: Plain words (every one must occur), or with ``syntax`` an FTS5 query.
    query: Annotated[str, Meta(min_length=1, max_length=MAX_QUERY_CHARS)]
    syntax: bool = False
    session_tags: (
        Annotated[list[SessionTag], Meta(min_length=1, max_length=MAX_SEARCH_SESSIONS)] | None
    ) = None
    role: Role | None = None
    #: Timestamps (RFC 3339): messages at or after ``since``, before ``until``.
    since: str | None = None
    until: str | None = None
    order: Literal["rank", "newest"] = "rank"
    limit: Annotated[int, Meta(ge=1, le=MAX_SEARCH_LIMIT)] = 20
    #: The previous page's ``cursor``, with the same query and filters.
    cursor: Annotated[str, Meta(max_length=64)] | None = None


class Watch(_Req, frozen=True, tag="watch"):
    session_tag: SessionTag = DEFAULT_SESSION
    #: Every session the peer may see instead of ``session_tag``.
    all: bool = False
    #: Send the stored messages after this id first; nil: only what is committed from now on.
    after_id: RowId | None = None


class Unwatch(_Req, frozen=True, tag="unwatch"):
    #: The request id of the watch to end.
    watch: RequestId


class Pop(_Req, frozen=True, tag="pop"):
    session_tag: SessionTag = DEFAULT_SESSION


class Clear(_Req, frozen=True, tag="clear"):
    session_tag: SessionTag = DEFAULT_SESSION


class ClearAll(_Req, frozen=True, tag="clear_all"):
    pass


class Stats(_Req, frozen=True, tag="stats"):
    pass


class BackupBegin(_Req, frozen=True, tag="backup_begin"):
    pass


class BackupRead(_Req, frozen=True, tag="backup_read"):
    backup: str
    offset: Annotated[int, Meta(ge=0)]
    length: Annotated[int, Meta(ge=1, le=MAX_BACKUP_CHUNK)] = MAX_BACKUP_CHUNK


class BackupEnd(_Req, frozen=True, tag="backup_end"):
    backup: str


Request = Union[
    Hello,
    Ping,
    Append,
    AppendMany,
    History,
    Count,
    Sessions,
    Search,
    Watch,
    Unwatch,
    Pop,
    Clear,
    ClearAll,
    Delete,
    Fork,
    SetRetention,
    Stats,
    BackupBegin,
    BackupRead,
    BackupEnd,
]


# ── Replies ───────────────────────────────────────────────────────────────────
class HelloReply(_Rep, frozen=True, tag="hello"):
    version: int
    server: str
    limits: dict[str, int]


class PingReply(_Rep, frozen=True, tag="ping"):
    pass


class AppendReply(_Rep, frozen=True, tag="append"):
    message_id: int


class AppendManyReply(_Rep, frozen=True, tag="append_many"):
    message_ids: list[int]


class HistoryReply(_Rep, frozen=True, tag="history"):
    messages: list[Message]
    #: True when the frame limit cut the page short: page on from its edge.
    truncated: bool = False


class CountReply(_Rep, frozen=True, tag="count"):
    count: int


class SessionsReply(_Rep, frozen=True, tag="sessions"):
    sessions: list[SessionInfo]
    #: True when more tags follow: ask again with ``after`` = the last tag.
    truncated: bool = False


class SearchReply(_Rep, frozen=True, tag="search"):
    hits: list[SearchHit]
    #: Present when more hits follow: send it back as the next page's ``cursor``.
    cursor: str | None = None


class WatchReply(_Rep, frozen=True, tag="watch"):
    #: New messages (or, before ``live``, stored ones), in id order.
    messages: list[Message] = msgspec.field(default_factory=list)
    removed: list[Removal] = msgspec.field(default_factory=list)
    #: True from the frame on that ends the stored messages: what follows is live.
    live: bool = False


class UnwatchReply(_Rep, frozen=True, tag="unwatch"):
    pass


class PopReply(_Rep, frozen=True, tag="pop"):
    message: Message | None = None


class ClearReply(_Rep, frozen=True, tag="clear"):
    deleted: int


class ClearAllReply(_Rep, frozen=True, tag="clear_all"):
    deleted: int


class StatsReply(_Rep, frozen=True, tag="stats"):
    stats: dict[str, Any]


class BackupBeginReply(_Rep, frozen=True, tag="backup_begin"):
    #: Handle for ``backup_read``/``backup_end``; valid on this connection only.
    backup: str
    size: int
    #: ``[st_dev, st_ino]`` of the live database files (database, WAL, shared
    #: memory, lock): a client must not write its copy over any of them.
    files: list[list[int]] = msgspec.field(default_factory=list)


class BackupReadReply(_Rep, frozen=True, tag="backup_read"):
    #: Empty, with ``eof`` true, when ``offset`` is at or past the end.
    data: bytes
    eof: bool


class BackupEndReply(_Rep, frozen=True, tag="backup_end"):
    pass


class ErrorReply(_Rep, frozen=True, tag="error"):
    code: str
    message: str
    field: str | None = None
    retry_after: float | None = None
    #: An error ending a watch (``lagged``, ``too_large``): the id to watch again from.
    last_id: int | None = None
    #: ``too_large`` for a search hit no reply can carry: the cursor past it.
    cursor: str | None = None


Reply = Union[
    HelloReply,
    PingReply,
    AppendReply,
    AppendManyReply,
    HistoryReply,
    CountReply,
    SessionsReply,
    SearchReply,
    WatchReply,
    UnwatchReply,
    PopReply,
    ClearReply,
    ClearAllReply,
    DeleteReply,
    ForkReply,
    SetRetentionReply,
    StatsReply,
    BackupBeginReply,
    BackupReadReply,
    BackupEndReply,
    ErrorReply,
]

# ── Codec (built once) ────────────────────────────────────────────────────────
#: Encodes any request or reply (both sides share it).
encoder: Final = msgspec.msgpack.Encoder()
#: Decodes a reply (the clients' side; the daemon's request decoding, with its
#: error reporting, is :mod:`nexusd.wire.codec`).
reply_decoder: Final = msgspec.msgpack.Decoder(Reply)


def error_reply(request_id: int | None, err: NexusError) -> ErrorReply:
    """The wire form of an error."""
    return ErrorReply(
        id=request_id,
        code=err.code,
        message=err.message,
        field=err.field,
        retry_after=getattr(err, "retry_after", None),
        last_id=err.last_id,
        cursor=err.cursor,
    )


def error_for_reply(reply: ErrorReply) -> NexusError:
    """The exception matching an error reply."""
    return error_for_code(
        reply.code,
        reply.message,
        field=reply.field,
        retry_after=reply.retry_after,
        last_id=reply.last_id,
        cursor=reply.cursor,
    )


def raise_for_error(reply: ErrorReply) -> None:
    """Turn an error reply back into the matching exception and raise it."""
    raise error_for_reply(reply)
