"""What a request's values must be beyond their wire types: sizes, JSON, distinct keys.

The msgspec types of :mod:`nexusd.wire.protocol` check shapes and the fixed
bounds; what depends on the daemon's configuration (``max_content``,
``max_meta``) or needs a walk (``meta`` must be JSON, the keys of one
``append_many`` must differ) is checked here, by the write handlers, before a
job reaches the writer.  Every check raises :class:`BadRequest` naming the
field, as validation errors do.
"""

from __future__ import annotations

import math
from typing import Any, Final

import msgspec

from ..wire import protocol as p
from ..wire.errors import BadRequest

__all__ = ["check_content", "check_distinct_keys", "meta_json"]

_MAX_META_DEPTH: Final = 32
_json_encode = msgspec.json.encode


def check_content(content: str, field: str, max_content: int) -> None:
    """Refuse ``content`` over ``max_content`` bytes of UTF-8 (or not UTF-8 at all)."""
    # A code point is at most 4 bytes of UTF-8: skip the encode when it cannot matter.
    if len(content) * 4 > max_content:
        try:
            size = len(content.encode("utf-8"))
        except UnicodeEncodeError:
            raise BadRequest(f"{field} is not valid UTF-8", field=field) from None
        if size > max_content:
            raise BadRequest(
                f"{field} is {size} bytes of UTF-8; the limit is {max_content}",
                field=field,
            )


def meta_json(meta: dict[str, Any], field: str, max_meta: int) -> str:
    """``meta`` as the JSON text to store; BadRequest if JSON cannot hold it or too big."""
    _check_json(meta, field, 1)
    text = _json_encode(meta)
    if len(text) > max_meta:
        raise BadRequest(
            f"{field} is {len(text)} bytes as JSON; the limit is {max_meta}",
            field=field,
        )
    return text.decode()


def check_distinct_keys(msgs: list[p.NewMessage]) -> None:
    """Two messages of one ``append_many`` may not share an idempotency key.

    The second would be taken for a resend of the first and acknowledged with
    its id, so a message the caller meant to store would silently not be.
    """
    keys = [m.idem_key for m in msgs if m.idem_key is not None]
    if len(set(keys)) == len(keys):
        return
    seen: set[str] = set()
    for i, m in enumerate(msgs):
        if m.idem_key is not None:
            if m.idem_key in seen:
                field = f"messages[{i}].idem_key"
                raise BadRequest(
                    f"{field} repeats an earlier message's key; each message needs its own",
                    field=field,
                )
            seen.add(m.idem_key)


def _check_json(value: Any, field: str, depth: int) -> None:
    """Accept only what JSON can hold: no bytes, extensions, or non-finite floats.

    ``depth`` is the level of ``value`` if it is a map or an array (``meta``
    itself is level 1); scalars add no level.
    """
    t = type(value)
    if depth > _MAX_META_DEPTH and (t is dict or t is list):
        raise BadRequest(f"{field} nests deeper than {_MAX_META_DEPTH} levels", field=field)
    if t is str or t is bool or t is int or value is None:
        return
    if t is float:
        if not math.isfinite(value):
            raise BadRequest(f"{field} holds a non-finite number", field=field)
        return
    if t is dict:
        for k, v in value.items():
            if type(k) is not str:
                raise BadRequest(f"{field} has a non-string key", field=field)
            _check_json(v, f"{field}.{k}", depth + 1)
        return
    if t is list:
        for i, v in enumerate(value):
            _check_json(v, f"{field}[{i}]", depth + 1)
        return
    raise BadRequest(f"{field} holds a {t.__name__}, which JSON cannot represent", field=field)
