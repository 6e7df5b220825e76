"""The one error hierarchy of nexusd.

Every error a user can see is a :class:`NexusError`.  Subclasses that map to a
wire error code carry it in ``code``; the server turns them into error replies
and the clients turn error replies back into them, so the same exception type
surfaces on both sides of the socket.  Backend exceptions (sqlite3, OSError,
msgspec) are translated at the boundary and never leak to users.
"""

from __future__ import annotations

__all__ = [
    "SEARCH_INDEX",
    "STORAGE_LOST",
    "BadRequest",
    "Conflict",
    "ConnectionLost",
    "DaemonNotRunning",
    "Forbidden",
    "Internal",
    "Lagged",
    "NexusError",
    "NotFound",
    "Overloaded",
    "Timeout",
    "TooLarge",
    "Unavailable",
    "error_for_code",
]


class NexusError(Exception):
    """Base class of every nexusd error.  ``code`` is the stable wire code."""

    code: str = "internal"
    #: An error that ends a watch: the id to watch again from (``after_id``) to
    #: lose nothing still stored, when there is one (``lagged``, ``too_large``).
    last_id: int | None = None
    #: A search hit too big for any reply (``too_large``): the cursor past it.
    cursor: str | None = None

    def __init__(self, message: str = "", *, field: str | None = None) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        #: The request field the error is about, when there is one.
        self.field = field


class BadRequest(NexusError):
    """The request was malformed or violated a limit; the connection stays usable."""

    code = "bad_request"


class TooLarge(NexusError):
    """A frame exceeded the frame limit; the server closes the connection."""

    code = "too_large"


class Overloaded(NexusError):
    """The write queue stayed full past the deadline; retry after ``retry_after`` s."""

    code = "overloaded"

    def __init__(
        self, message: str = "", *, field: str | None = None, retry_after: float = 0.1
    ) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after


#: ``field`` of an ``unavailable`` error whose cause will not go away by
#: itself: the database files were deleted or replaced under the daemon, which
#: refuses writes until it is restarted.  Clients do not retry it.
STORAGE_LOST = "storage"
#: ``field`` of an ``unavailable`` answer to ``search`` when the daemon has no
#: index to search: switched off (``search = false``), or still being built
#: (which can take minutes).  Clients do not retry it: they say so at once.
SEARCH_INDEX = "search"


class Unavailable(NexusError):
    """The daemon is shutting down or its storage is failing; retry elsewhere/later.

    With ``field == STORAGE_LOST`` retrying is pointless until an operator acts;
    with ``field == SEARCH_INDEX`` there is no search index (yet).
    """

    code = "unavailable"


class Lagged(NexusError):
    """A watch fell too far behind (its buffer filled) and was ended.

    ``last_id`` is the id of the last message the daemon sent on it (None:
    none yet); a new watch from there loses nothing that is still stored.
    """

    code = "lagged"

    def __init__(
        self, message: str = "", *, field: str | None = None, last_id: int | None = None
    ) -> None:
        super().__init__(message, field=field)
        self.last_id = last_id


class Forbidden(NexusError):
    """The peer is not allowed to use this daemon or this operation."""

    code = "forbidden"


class NotFound(NexusError):
    """The thing asked for does not exist."""

    code = "not_found"


class Conflict(NexusError):
    """The request clashes with what is stored (a fork onto a session that has messages)."""

    code = "conflict"


class Internal(NexusError):
    """An unexpected failure inside the daemon (logged there with a traceback)."""

    code = "internal"


class DaemonNotRunning(NexusError, ConnectionError):
    """The client could not reach the daemon's socket (client side only)."""

    code = "unreachable"


class ConnectionLost(NexusError, ConnectionError):
    """The connection dropped before the reply arrived (client side only)."""

    code = "disconnected"


class Timeout(NexusError, TimeoutError):
    """No reply arrived within the client's timeout (client side only)."""

    code = "timeout"


_BY_CODE: dict[str, type[NexusError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        TooLarge,
        Overloaded,
        Unavailable,
        Lagged,
        Forbidden,
        NotFound,
        Conflict,
        Internal,
    )
}


def error_for_code(
    code: str,
    message: str,
    *,
    field: str | None = None,
    retry_after: float | None = None,
    last_id: int | None = None,
    cursor: str | None = None,
) -> NexusError:
    """Build the exception for a wire error; unknown codes become a plain NexusError."""
    cls = _BY_CODE.get(code)
    if cls is None:
        err = NexusError(message, field=field)
        err.code = code
        return err
    if cls is Overloaded:
        return Overloaded(message, field=field, retry_after=retry_after or 0.1)
    err = cls(message, field=field)
    err.last_id = last_id
    err.cursor = cursor
    return err
