"""When a client sends a call again, and how long it waits first.

A call is resent after the connection dropped or the daemon said
``unavailable``/``overloaded`` only when sending it twice cannot store or
delete anything twice: the table of operations says which requests those are
(:func:`nexusd.wire.ops.retryable`: reads always, appends when every message
carries an idempotency key, ``pop``/``clear``/``clear_all`` and backups never).
Both clients run the same loop over :func:`give_up` and :func:`backoff`.
"""

from __future__ import annotations

from typing import Any, Final

from ..wire.errors import (
    SEARCH_INDEX,
    STORAGE_LOST,
    ConnectionLost,
    DaemonNotRunning,
    NexusError,
    Overloaded,
    Unavailable,
)
from ..wire.ops import retryable

__all__ = ["FIRST_BACKOFF", "MAX_BACKOFF", "RETRY_ON", "backoff", "give_up", "worth_retrying"]

#: Errors after which a retry may succeed (the request was not applied, or it
#: carries an idempotency key that makes applying it twice harmless).
RETRY_ON: Final = (ConnectionLost, DaemonNotRunning, Unavailable, Overloaded)
FIRST_BACKOFF: Final = 0.05
MAX_BACKOFF: Final = 1.0


def worth_retrying(req: Any, err: NexusError) -> bool:
    """Whether ``req`` may be sent again after ``err`` (one of :data:`RETRY_ON`)."""
    if isinstance(err, Unavailable) and err.field in (STORAGE_LOST, SEARCH_INDEX):
        # The daemon lost its database (only a restart helps), or has no search
        # index (switched off, or built for minutes yet): say so now.
        return False
    return retryable(req)


def backoff(err: NexusError, previous: float) -> float:
    """Seconds to wait before the next try."""
    if isinstance(err, Overloaded):
        return max(err.retry_after, FIRST_BACKOFF)
    return min(previous * 2, MAX_BACKOFF) if previous else FIRST_BACKOFF


def give_up(req: Any, err: NexusError, *, ever_connected: bool, late: bool) -> bool:
    """Whether a call that failed with ``err`` (one of :data:`RETRY_ON`) ends here.

    ``late``: the next try would start after the call's ``retry_for``.  A
    client that never reached the daemon does not wait for one that was not
    running to begin with (first contact): it says so at once.
    """
    first_contact = isinstance(err, DaemonNotRunning) and not ever_connected
    return first_contact or late or not worth_retrying(req, err)
