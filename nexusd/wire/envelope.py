"""What every request and reply has: the tagged base Structs (``op``, ``id``) and shared bounds.

The request and reply Structs of :mod:`nexusd.wire.protocol` and
:mod:`nexusd.wire.lifecycle` derive from :class:`Req` and :class:`Rep`, and
share the bounded scalars declared here (a request id, a row id, a session
tag).  :mod:`nexusd.wire.protocol` re-exports them: import them from there.
"""

from __future__ import annotations

from typing import Annotated, Final

from msgspec import Meta, Struct

__all__ = [
    "DEFAULT_SESSION",
    "MAX_REQUEST_ID",
    "MAX_SESSION_CHARS",
    "Rep",
    "Req",
    "RequestId",
    "RowId",
    "SessionTag",
]

DEFAULT_SESSION: Final = "nexus"
MAX_SESSION_CHARS: Final = 256
#: Request ids are unsigned 63-bit so every language's integer fits them.
MAX_REQUEST_ID: Final = 2**63 - 1

SessionTag = Annotated[str, Meta(min_length=1, max_length=MAX_SESSION_CHARS)]
RequestId = Annotated[int, Meta(ge=0, le=MAX_REQUEST_ID)]
RowId = Annotated[int, Meta(ge=0, le=MAX_REQUEST_ID)]


class Req(Struct, frozen=True, kw_only=True, tag_field="op"):
    """A request: tagged by ``op``, carrying the client's ``id``."""

    id: RequestId


class Rep(Struct, frozen=True, kw_only=True, tag_field="op"):
    """A reply: the request's ``op`` (or ``error``) and its ``id`` (nil when unreadable)."""

    id: int | None
