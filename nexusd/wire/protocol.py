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
from datetime import datetime
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
#: Longest caller-supplied ``timestamp``, in characters (Unicode code points).
MAX_TIMESTAMP_CHARS: Final = 64


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
    #: ``[st_dev, st_ino]`` of the live database files (database, WAL, shared
    #: memory, lock): a client must not write its copy over any of them.
    files: list[list[int]] = []


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
    """Decode one request body; raise :class:`BadRequest` carrying the request id if known.

    A key sent as nil means the key is absent (its default applies), for every
    optional key.  The typed decoder refuses nil where a key has a non-nil
    default, so only a body that fails validation is looked at again: its nil
    keys are dropped and it is decoded once more.  Valid requests pay nothing.
    """
    try:
        req: Request = request_decoder.decode(body)
    except msgspec.ValidationError as exc:
        retried = _without_nils(body)
        if retried is not None:
            try:
                req = request_decoder.decode(retried)
            except msgspec.ValidationError as again:
                raise _bad_request(str(again), _salvage_id(body)) from None
            return req
        raise _bad_request(str(exc), _salvage_id(body)) from None
    except (msgspec.DecodeError, ValueError, RecursionError, MemoryError) as exc:
        # Malformed or truncated MessagePack, invalid UTF-8 in a string, absurd nesting.
        err = _bad_request(f"body does not decode: {exc}", _salvage_id(body))
        if err.field is None:
            err.field = _undecodable_field(body)
        raise err from None
    return req


_raw_map: Final = msgspec.msgpack.Decoder(dict[str, msgspec.Raw])
_raw_list: Final = msgspec.msgpack.Decoder(list[msgspec.Raw])


def _undecodable_field(body: bytes) -> str | None:
    """Which key of a map holds the value that does not decode (invalid UTF-8...).

    Only on the error path: each value is kept raw and decoded alone, and
    ``messages`` items one by one, so the error can name ``content`` or
    ``messages[2].role`` the way validation errors do.
    """
    try:
        values = _raw_map.decode(body)
    except (msgspec.DecodeError, ValueError, RecursionError, MemoryError):
        return None
    for key, raw in values.items():
        try:
            _loose_decoder.decode(raw)
        except (msgspec.DecodeError, ValueError, RecursionError, MemoryError):
            pass
        else:
            continue
        if key != "messages":
            return key
        try:
            items = _raw_list.decode(raw)
        except (msgspec.DecodeError, ValueError, RecursionError, MemoryError):
            return key
        for i, item in enumerate(items):
            try:
                _loose_decoder.decode(item)
            except (msgspec.DecodeError, ValueError, RecursionError, MemoryError):
                inner = _undecodable_field(bytes(item))
                return f"messages[{i}]" + (f".{inner}" if inner else "")
        return key
    return None


def _without_nils(body: bytes) -> bytes | None:
    """``body`` re-encoded without its nil keys (top level and ``messages`` items), or None.

    None when there is nothing to drop (or the body is not a plain map).
    """
    try:
        raw = _loose_decoder.decode(body)
    except (msgspec.DecodeError, ValueError, RecursionError, MemoryError):
        return None
    if type(raw) is not dict:
        return None
    changed = False
    out: dict[Any, Any] = {}
    for key, value in raw.items():
        if value is None:
            changed = True
        elif key == "messages" and type(value) is list:
            items = []
            for item in value:
                if type(item) is dict and None in item.values():
                    changed = True
                    item = {k: v for k, v in item.items() if v is not None}
                items.append(item)
            out[key] = items
        else:
            out[key] = value
    return encoder.encode(out) if changed else None


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


class _IdOnly(Struct):
    """The ``id`` of a request map; every other key is skipped without being decoded."""

    id: Any = None


_id_decoder: Final = msgspec.msgpack.Decoder(_IdOnly)


def _salvage_id(body: bytes) -> int | None:
    """The ``id`` of a body that failed to decode, whenever it can be read.

    Works when the body is one well-formed MessagePack map whose ``id`` is an
    integer 0 … 2^63-1, whatever is wrong elsewhere (unknown ``op``, wrong types,
    invalid UTF-8 in another value).  None when the body is not such a map
    (malformed, truncated, trailing bytes, nested too deep, not a map) or its
    ``id`` is missing, nil, or not such an integer.
    """
    try:
        rid = _id_decoder.decode(body).id
    except msgspec.ValidationError:
        # A key that is not a string (msgpack allows any): read the map loosely.
        try:
            raw = _loose_decoder.decode(body)
        except (msgspec.DecodeError, ValueError, RecursionError, MemoryError, TypeError):
            return None
        rid = raw.get("id") if type(raw) is dict else None
    except (msgspec.DecodeError, ValueError, RecursionError, MemoryError):
        return None
    if type(rid) is int and 0 <= rid <= MAX_REQUEST_ID:
        return rid
    return None


# ── Timestamps ────────────────────────────────────────────────────────────────
#: RFC 3339 ``date-time``: date, ``T`` (or ``t`` or a space), time, an optional
#: fraction of 1-9 digits, then ``Z`` (``z``) or a ``±HH:MM`` offset.  ASCII digits only.
_TIMESTAMP: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?"
    r"(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)
_fromisoformat: Final = datetime.fromisoformat


def parse_timestamp(value: str, field: str = "timestamp") -> str:
    """A caller's timestamp as the server stores it, or :class:`BadRequest` naming ``field``.

    Accepted: an RFC 3339 instant (see ``docs/protocol.md``) of at most
    :data:`MAX_TIMESTAMP_CHARS` characters.  Returned: the same instant in UTC
    in the server's own format, ``2026-11-26T07:41:50.406180Z`` (a fraction
    beyond microseconds is truncated), so stored timestamps all sort and read
    alike.  A time without an offset is refused: it names no instant.
    """
    if len(value) > MAX_TIMESTAMP_CHARS:
        raise BadRequest(
            f"{field} is {len(value)} characters; the limit is {MAX_TIMESTAMP_CHARS}",
            field=field,
        )
    if _TIMESTAMP.fullmatch(value) is None:
        raise BadRequest(
            f"{field} must be an RFC 3339 date and time with Z or a ±HH:MM offset,"
            f" like 2026-11-26T07:41:50.406180Z or 2026-11-26T08:41:50+01:00; got {value!r}",
            field=field,
        )
    # The pattern fixed the shape; fromisoformat (C, and it truncates a long
    # fraction) checks the ranges: month 13, February 30, hour 24, second 60.
    try:
        if len(value) == 27 and value[10] == "T" and value[26] == "Z":
            _fromisoformat(value[:26])  # already the stored form
            return value
        when = _fromisoformat(value[:-1] + "Z" if value[-1] == "z" else value)
        offset = when.utcoffset()
        when = when.replace(tzinfo=None)
        if offset:
            when -= offset
    except (ValueError, OverflowError):
        raise BadRequest(
            f"{field} {value!r} is not a valid date and time in years 0001-9999 UTC",
            field=field,
        ) from None
    return when.isoformat(timespec="microseconds") + "Z"


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
