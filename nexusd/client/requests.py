"""What the clients send, built and checked without any I/O.

Both clients build every request here: the arguments checked (``timeout``,
``retry_for``, ``meta``, ``append_many`` items), idempotency keys added,
anything MessagePack cannot carry turned into the caller's
:class:`~nexusd.wire.errors.BadRequest` naming the argument, and a frame over
the daemon's limit refused before it is sent.
"""

from __future__ import annotations

import itertools
import re
import secrets
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final

from ..wire import protocol as p
from ..wire.durations import parse_duration
from ..wire.errors import BadRequest, TooLarge

__all__ = [
    "CLIENT_NAME",
    "MAX_TIMEOUT",
    "SMALL_FRAME",
    "KeyMaker",
    "MessageInput",
    "append_many_request",
    "append_request",
    "check_frame",
    "check_retry_for",
    "check_timeout",
    "delete_request",
    "encode",
    "fork_request",
    "frame_limit",
    "history_request",
    "retention_request",
    "search_request",
]

#: An ``append_many`` item: ``(role, content)`` or a mapping with ``role``,
#: ``content`` and optionally ``timestamp``, ``meta``, ``idempotency_key``.
MessageInput = tuple[str, str] | Mapping[str, Any]

CLIENT_NAME: Final = "nexusd-python"
#: Frames up to this size are sent without checking the server's max_frame
#: (every server accepts at least this much), so small calls cost nothing extra.
SMALL_FRAME: Final = 64 * 1024
#: The longest per-call timeout a client takes (one day); None means no bound.
#: Far beyond any answer, and far below what the OS timers overflow at (~1e10 s).
MAX_TIMEOUT: Final = 86_400


def check_timeout(timeout: object) -> float | None:
    """``timeout`` if None or seconds in (0, :data:`MAX_TIMEOUT`]; else :class:`BadRequest`."""
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout <= MAX_TIMEOUT
    ):
        raise BadRequest(
            f"timeout must be None (no bound) or a number of seconds > 0 and at most "
            f"{MAX_TIMEOUT} (one day), not {timeout!r}",
            field="timeout",
        )
    return timeout


def check_retry_for(retry_for: object) -> float:
    """``retry_for``: seconds in [0, :data:`MAX_TIMEOUT`] (0: never retry); else BadRequest."""
    if (
        isinstance(retry_for, bool)
        or not isinstance(retry_for, int | float)
        or not 0 <= retry_for <= MAX_TIMEOUT
    ):
        raise BadRequest(
            f"retry_for must be a number of seconds from 0 (no retries) to {MAX_TIMEOUT},"
            f" not {retry_for!r}",
            field="retry_for",
        )
    return float(retry_for)


def frame_limit(hello: p.HelloReply) -> int:
    """The daemon's frame limit (no limit when it states none)."""
    return hello.limits.get("max_frame", sys.maxsize)


def check_frame(size: int, max_frame: int) -> None:
    """Refuse locally a request the daemon would reject by closing the connection."""
    if size > max_frame:
        raise TooLarge(
            f"the request is {size} bytes, over the daemon's frame limit of {max_frame} "
            "bytes (max_frame); send less at once"
        )


#: Request fields whose argument has another name in the Python API.
_ARGUMENT: Final = {"idem_key": "idempotency_key"}
_UNSUPPORTED = re.compile(r"Encoding objects of type (\S+) is unsupported")


def encode(req: Any) -> bytes:
    """``req`` as a MessagePack body; what cannot be encoded is the caller's :class:`BadRequest`.

    Both clients encode through here, so an int out of range or a value JSON
    cannot hold (in ``meta``) never surfaces as msgspec's own exception.
    """
    try:
        return p.encoder.encode(req)
    except (OverflowError, TypeError, ValueError) as exc:
        field = _culprit(req)
        what = _why_unencodable(exc)
        if field is None:
            raise BadRequest(f"the request cannot be sent: {what}") from None
        raise BadRequest(f"{field} cannot be sent: {what}", field=field) from None


def _culprit(req: Any) -> str | None:
    """The argument (``before_id``, ``messages[3].meta``) whose value cannot be encoded."""
    for name in req.__struct_fields__:
        value = getattr(req, name)
        try:
            p.encoder.encode(value)
        except (OverflowError, TypeError, ValueError):
            if name == "messages" and isinstance(value, list):
                for i, item in enumerate(value):
                    inner = _culprit(item)
                    if inner is not None:
                        return f"messages[{i}].{inner}"
            return _ARGUMENT.get(str(name), str(name))
    return None


def _why_unencodable(exc: Exception) -> str:
    if isinstance(exc, UnicodeEncodeError) and isinstance(exc.object, str):
        # json.loads turns "\\ud800" into one; so does surrogateescape on bytes.
        bad = ord(exc.object[exc.start])
        return f"it holds a lone surrogate (U+{bad:04X}), which is not Unicode text"
    if isinstance(exc, OverflowError):
        return "an integer is out of range (at most 64 bits)"
    m = _UNSUPPORTED.match(str(exc))
    if m is not None:
        return (
            f"it holds a value of type {m.group(1)}; only str, int, float, bool, None, "
            "lists and dicts with str keys can be sent"
        )
    return str(exc)


class KeyMaker:
    """Idempotency keys: a random per-client prefix and a counter (cheap, unique).

    22 characters: every key is stored and indexed with its row, so short keys
    are measurably faster (29-character keys cost ~7% of batched throughput).
    """

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = secrets.token_urlsafe(9)  # 72 random bits in 12 characters
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        # Fixed width, so keys sort in the order they are made: the daemon's
        # key index then grows at one end instead of everywhere.
        return f"{self._prefix}{next(self._counter):010x}"


def _meta(meta: Any, field: str) -> dict[str, Any] | None:
    if meta is None:
        return None
    # dict() would take a list of pairs, or fail with Python's wording on a string.
    if not isinstance(meta, Mapping):
        raise BadRequest(f"{field} must be a mapping (a dict)", field=field)
    return dict(meta)


def append_request(
    keys: KeyMaker | None,
    role: str,
    content: str,
    timestamp: str | None,
    session_tag: str,
    meta: Mapping[str, Any] | None,
    idempotency_key: str | None,
) -> p.Append:
    key = idempotency_key if idempotency_key is not None else (keys() if keys else None)
    return p.Append(
        id=0,
        role=role,
        content=content,
        session_tag=session_tag,
        timestamp=timestamp,
        meta=_meta(meta, "meta"),
        idem_key=key,
    )


def append_many_request(
    keys: KeyMaker | None, messages: Iterable[MessageInput], session_tag: str
) -> p.AppendMany:
    items: list[p.NewMessage] = []
    for item in messages:
        # Tuples are the common case: test for them first (isinstance(Mapping) is slow).
        if type(item) is not tuple and isinstance(item, Mapping):
            items.append(_new_message(keys, item, len(items)))
        else:
            try:
                if isinstance(item, str | bytes):
                    raise ValueError  # "ab" would unpack into role "a", content "b"
                role, content = item
            except (TypeError, ValueError):
                where = f"messages[{len(items)}]"
                raise BadRequest(
                    f"{where} must be a (role, content) pair or a mapping, not "
                    f"{type(item).__name__}",
                    field=where,
                ) from None
            items.append(
                p.NewMessage(role=role, content=content, idem_key=keys() if keys else None)
            )
    return p.AppendMany(id=0, messages=items, session_tag=session_tag)


def _new_message(keys: KeyMaker | None, item: Mapping[str, Any], index: int) -> p.NewMessage:
    where = f"messages[{index}]"
    missing = [k for k in ("role", "content") if k not in item]
    if missing:
        raise BadRequest(f"{where} has no {' and no '.join(missing)}", field=where)
    key = item.get("idempotency_key")
    return p.NewMessage(
        role=item["role"],
        content=item["content"],
        timestamp=item.get("timestamp"),
        meta=_meta(item.get("meta"), f"{where}.meta"),
        idem_key=key if key is not None else (keys() if keys else None),
    )


def history_request(
    session_tag: str, limit: int, before_id: int | None, after_id: int | None
) -> p.History:
    return p.History(
        id=0, session_tag=session_tag, limit=limit, before_id=before_id, after_id=after_id
    )


def _instant(value: str | datetime | None, field: str) -> str | None:
    """A ``since``/``until`` argument as the RFC 3339 text the daemon takes."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise BadRequest(f"{field} must be timezone-aware: a naive datetime names no instant")
        return value.isoformat()
    raise BadRequest(f"{field} must be an RFC 3339 string or a datetime", field=field)


def search_request(
    query: str,
    session_tag: str | Sequence[str] | None,
    role: str | None,
    since: str | datetime | None,
    until: str | datetime | None,
    limit: int,
    syntax: bool,
    order: str,
    cursor: str | None,
) -> p.Search:
    tags = [session_tag] if isinstance(session_tag, str) else session_tag
    return p.Search(
        id=0,
        query=query,
        syntax=syntax,
        session_tags=None if tags is None else list(tags),
        role=role,
        since=_instant(since, "since"),
        until=_instant(until, "until"),
        order=order,  # type: ignore[arg-type]  # the daemon checks it
        limit=limit,
        cursor=cursor,
    )


def delete_request(ids: Iterable[int], session_tag: str) -> p.Delete:
    if isinstance(ids, int | str | bytes):  # a lone id, or digits: not a list of ids
        raise BadRequest("ids must be a list of message ids, e.g. [12, 15]", field="ids")
    return p.Delete(id=0, ids=list(ids), session_tag=session_tag)


def fork_request(source_tag: str, new_tag: str, up_to_id: int | None, append: bool) -> p.Fork:
    return p.Fork(id=0, source_tag=source_tag, new_tag=new_tag, up_to_id=up_to_id, append=append)


def retention_request(
    session_tag: str, max_messages: int | None, max_age: str | float | None
) -> p.SetRetention:
    """``max_age`` as seconds: a number, or a duration such as ``"30d"`` (parsed here)."""
    seconds = None
    if max_age is not None:
        try:
            seconds = parse_duration(max_age)
        except ValueError as exc:
            raise BadRequest(f"max_age: {exc}", field="max_age") from None
    return p.SetRetention(id=0, session_tag=session_tag, max_messages=max_messages, max_age=seconds)
