"""The daemon's side of the codec: a request body in, a typed request or a precise error out.

:func:`decode_request` is the one way a frame body becomes a
:data:`~nexusd.wire.protocol.Request`.  A body that does not decode still gets
the best answer that can be given: the request ``id`` is salvaged whenever the
body is a map holding one (so the error reply can echo it), and the error
names the field at fault, for validation errors and for values that do not
even decode (invalid UTF-8 in ``content``, say).  That error path only runs
for bad bodies: a valid request costs one typed decode.

:func:`encode_reply` is the one way a reply becomes a frame body.  Replies
carry rows as stored, and a row another program wrote into the database may
hold what MessagePack cannot carry (an integer past 64 bits in ``meta``): such
a reply becomes an ``internal`` error for its request, never an exception in
the daemon.
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec
from msgspec import Struct

from .errors import BadRequest, Internal
from .protocol import MAX_REQUEST_ID, Request, encoder

__all__ = ["RequestError", "decode_request", "encode_reply", "request_decoder"]

request_decoder: Final = msgspec.msgpack.Decoder(Request)
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


def encode_reply(reply: Any) -> bytes:
    """``reply`` as a frame body, or :class:`Internal` if a stored value cannot be encoded."""
    try:
        return encoder.encode(reply)
    except (msgspec.EncodeError, OverflowError, TypeError, ValueError) as exc:
        raise Internal(
            f"the reply holds a stored value MessagePack cannot carry ({exc});"
            " the row was written by another program"
        ) from None
