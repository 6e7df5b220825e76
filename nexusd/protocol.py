"""Wire types of the nexusd protocol: every request, every reply, one codec.

A frame body is one MessagePack map.  Requests are tagged by ``op``; the reply to
a request carries the same ``op`` and echoes the request's ``id``, or carries
``op = "error"``.  All types are frozen msgspec Structs in two tagged unions
(:data:`Request` and :data:`Reply`); the encoder and decoders are built once and
reused.  New fields always get defaults so older peers keep working.

This module is shared by the server and every client and imports nothing else
of nexusd except the error hierarchy.  ``docs/protocol.md`` is the prose
version of this file.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Union

import msgspec
from msgspec import Meta, Struct

from .errors import BadRequest, NexusError, error_for_code

PROTOCOL_VERSION: Final = 1
DEFAULT_SESSION: Final = "nexus"
MAX_ROLE_CHARS: Final = 64
MAX_SESSION_CHARS: Final = 256
MAX_HISTORY_LIMIT: Final = 10_000
MAX_SESSIONS_PAGE: Final = 1_000
#: Request ids are unsigned 63-bit so every language's integer fits them.
MAX_REQUEST_ID: Final = 2**63 - 1

Role = Annotated[str, Meta(min_length=1, max_length=MAX_ROLE_CHARS)]
SessionTag = Annotated[str, Meta(min_length=1, max_length=MAX_SESSION_CHARS)]
RequestId = Annotated[int, Meta(ge=0, le=MAX_REQUEST_ID)]
RowId = Annotated[int, Meta(ge=0, le=MAX_REQUEST_ID)]
Limit = Annotated[int, Meta(ge=1, le=MAX_HISTORY_LIMIT)]
MAX_IDEM_KEY_CHARS: Final = 128
#: Largest backup chunk a client may ask for (well under any frame limit).
MAX_BACKUP_CHUNK: Final = 1024 * 1024
IdemKey = Annotated[str, Meta(min_length=1, max_length=MAX_IDEM_KEY_CHARS)]
#: ``meta`` is any JSON-compatible mapping; the server checks the values.
MetaMap = dict[str, Any]


# ── Shared value types ────────────────────────────────────────────────────────
class Message(Struct, frozen=True, kw_only=True):
    """One stored message."""

    id: int
    role: str
    content: str
    timestamp: str
    session_tag: str
    meta: MetaMap | None = None


class SessionInfo(Struct, frozen=True, kw_only=True):
    """Summary of one session tag."""

    session_tag: str
    count: int
    first_id: int
    last_id: int
    last_timestamp: str


class NewMessage(Struct, frozen=True, kw_only=True):
    """One item of an ``append_many`` request."""

    role: Role
    content: str
    timestamp: str | None = None
    meta: MetaMap | None = None
    #: A retry with the same key in the same session stores nothing new.
    idem_key: IdemKey | None = None


# ── Requests ──────────────────────────────────────────────────────────────────
class _Req(Struct, frozen=True, kw_only=True, tag_field="op"):
    id: RequestId


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
    Pop,
    Clear,
    ClearAll,
    Stats,
    BackupBegin,
    BackupRead,
    BackupEnd,
]


# ── Replies ───────────────────────────────────────────────────────────────────
class _Rep(Struct, frozen=True, kw_only=True, tag_field="op"):
    id: int | None


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


class BackupReadReply(_Rep, frozen=True, tag="backup_read"):
    data: bytes
    eof: bool


class BackupEndReply(_Rep, frozen=True, tag="backup_end"):
    pass


class ErrorReply(_Rep, frozen=True, tag="error"):
    code: str
    message: str
    field: str | None = None
    retry_after: float | None = None


Reply = Union[
    HelloReply,
    PingReply,
    AppendReply,
    AppendManyReply,
    HistoryReply,
    CountReply,
    SessionsReply,
    PopReply,
    ClearReply,
    ClearAllReply,
    StatsReply,
    BackupBeginReply,
    BackupReadReply,
    BackupEndReply,
    ErrorReply,
]

# ── Codec (built once) ────────────────────────────────────────────────────────
encoder: Final = msgspec.msgpack.Encoder()
request_decoder: Final = msgspec.msgpack.Decoder(Request)
reply_decoder: Final = msgspec.msgpack.Decoder(Reply)
_loose_decoder: Final = msgspec.msgpack.Decoder()


def decode_request(body: bytes) -> Request:
    """Decode one request body; raise :class:`BadRequest` carrying the request id if known."""
    try:
        req: Request = request_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise _bad_request(str(exc), _salvage_id(body)) from None
    except msgspec.DecodeError as exc:
        raise _bad_request(f"body does not decode: {exc}", None) from None
    except (ValueError, RecursionError, MemoryError) as exc:
        # e.g. invalid UTF-8 (lone surrogates) in a string, absurd nesting.
        raise _bad_request(f"body does not decode: {exc}", _salvage_id(body)) from None
    return req


class RequestError(BadRequest):
    """A :class:`BadRequest` raised while decoding; ``request_id`` may be None."""

    def __init__(self, message: str, request_id: int | None, field: str | None) -> None:
        super().__init__(message, field=field)
        self.request_id = request_id


_PATH: Final = re.compile(r"`\$\.([^`]*)`")


def _bad_request(message: str, request_id: int | None) -> RequestError:
    # msgspec says "... - at `$.role`": lift the path out so clients can use it.
    paths = _PATH.findall(message)
    field = paths[-1] if paths else None
    if "missing required field `" in message:
        name = message.split("missing required field `", 1)[1].split("`", 1)[0]
        field = f"{field}.{name}" if field else name
    return RequestError(message, request_id, field)


def _salvage_id(body: bytes) -> int | None:
    """Best effort: the ``id`` of a body that decodes but fails validation."""
    try:
        raw = _loose_decoder.decode(body)
    except (msgspec.DecodeError, ValueError, RecursionError, MemoryError):
        return None
    if isinstance(raw, dict):
        rid = raw.get("id")
        if type(rid) is int and 0 <= rid <= MAX_REQUEST_ID:
            return rid
    return None


def error_reply(request_id: int | None, err: NexusError) -> ErrorReply:
    """The wire form of an error."""
    return ErrorReply(
        id=request_id,
        code=err.code,
        message=err.message,
        field=err.field,
        retry_after=getattr(err, "retry_after", None),
    )


def error_for_reply(reply: ErrorReply) -> NexusError:
    """The exception matching an error reply."""
    return error_for_code(
        reply.code, reply.message, field=reply.field, retry_after=reply.retry_after
    )


def raise_for_error(reply: ErrorReply) -> None:
    """Turn an error reply back into the matching exception and raise it."""
    raise error_for_reply(reply)
