"""The table of operations: every request the protocol has, declared once.

Each row names an operation's request and reply types, how the daemon runs it
(answered on the spot, a query on the reader pool, or a job for the writer)
and whether a client may send it again after the connection dropped before
the answer came.  Everything else derives from this table: the tagged unions
:data:`~nexusd.wire.protocol.Request` and :data:`~nexusd.wire.protocol.Reply`
are checked against it below, the daemon binds one handler to each row (and
refuses to start with a row unbound), the clients' retry policy reads it, and
the tests that walk every operation (the documentation check, the hostile
client) iterate over it.

Adding an operation means: its request and reply Structs in
:mod:`nexusd.wire.protocol`, one row here, one handler in the daemon, one
section in ``docs/protocol.md``.  The tests fail until all four exist.
"""

from __future__ import annotations

import enum
import typing
from dataclasses import dataclass
from typing import Any, Final

from . import protocol as p


class Runs(enum.Enum):
    """Where the daemon runs an operation."""

    #: Answered on the event loop at once, touching no storage.
    LOCAL = "local"
    #: A query on the reader pool, concurrent with writes.
    READ = "read"
    #: A job for the single writer, answered after its batch commits.
    WRITE = "write"
    #: A stream: replies pushed with the request's id until it ends (watch, unwatch).
    WATCH = "watch"


class Retry(enum.Enum):
    """Whether a client may resend a request whose answer it never got."""

    #: Resending changes nothing (reads, pings, delete by id, setting a retention).
    ALWAYS = "always"
    #: Safe only when every message carries an idempotency key.
    IF_KEYED = "if_keyed"
    #: A second run could remove more than the caller meant (pop, clear),
    #: or the request names state of the lost connection (backup handles).
    NEVER = "never"


@dataclass(frozen=True, slots=True)
class Operation:
    """One row of the table."""

    name: str
    request: type[Any]
    reply: type[Any]
    runs: Runs
    retry: Retry


def _row(request: type[Any], reply: type[Any], runs: Runs, retry: Retry) -> Operation:
    return Operation(request.__struct_config__.tag, request, reply, runs, retry)


#: Every operation, in the order ``docs/protocol.md`` describes them.
OPERATIONS: Final[tuple[Operation, ...]] = (
    _row(p.Hello, p.HelloReply, Runs.LOCAL, Retry.ALWAYS),
    _row(p.Ping, p.PingReply, Runs.LOCAL, Retry.ALWAYS),
    _row(p.Append, p.AppendReply, Runs.WRITE, Retry.IF_KEYED),
    _row(p.AppendMany, p.AppendManyReply, Runs.WRITE, Retry.IF_KEYED),
    _row(p.History, p.HistoryReply, Runs.READ, Retry.ALWAYS),
    _row(p.Count, p.CountReply, Runs.READ, Retry.ALWAYS),
    _row(p.Sessions, p.SessionsReply, Runs.READ, Retry.ALWAYS),
    _row(p.Search, p.SearchReply, Runs.READ, Retry.ALWAYS),
    _row(p.Watch, p.WatchReply, Runs.WATCH, Retry.ALWAYS),
    _row(p.Unwatch, p.UnwatchReply, Runs.WATCH, Retry.NEVER),
    _row(p.Pop, p.PopReply, Runs.WRITE, Retry.NEVER),
    _row(p.Clear, p.ClearReply, Runs.WRITE, Retry.NEVER),
    _row(p.ClearAll, p.ClearAllReply, Runs.WRITE, Retry.NEVER),
    # Ids are never reused: deleting the same ids again deletes nothing more.
    _row(p.Delete, p.DeleteReply, Runs.WRITE, Retry.ALWAYS),
    # A second run would copy the session twice (with append) or fail with conflict.
    _row(p.Fork, p.ForkReply, Runs.WRITE, Retry.NEVER),
    _row(p.SetRetention, p.SetRetentionReply, Runs.WRITE, Retry.ALWAYS),
    _row(p.Stats, p.StatsReply, Runs.LOCAL, Retry.ALWAYS),
    _row(p.BackupBegin, p.BackupBeginReply, Runs.READ, Retry.NEVER),
    _row(p.BackupRead, p.BackupReadReply, Runs.READ, Retry.NEVER),
    _row(p.BackupEnd, p.BackupEndReply, Runs.READ, Retry.NEVER),
)

#: The row of each request type.
BY_REQUEST: Final[dict[type[Any], Operation]] = {op.request: op for op in OPERATIONS}


def retryable(req: Any) -> bool:
    """Whether sending ``req`` again cannot store or delete anything twice."""
    retry = BY_REQUEST[type(req)].retry
    if retry is Retry.ALWAYS:
        return True
    if retry is Retry.NEVER:
        return False
    if type(req) is p.AppendMany:
        return all(m.idem_key is not None for m in req.messages)
    return getattr(req, "idem_key", None) is not None


def _check() -> None:
    """The unions of :mod:`~nexusd.wire.protocol` hold exactly the table's types."""
    requests = set(typing.get_args(p.Request))
    replies = set(typing.get_args(p.Reply)) - {p.ErrorReply}
    declared_requests = {op.request for op in OPERATIONS}
    declared_replies = {op.reply for op in OPERATIONS}
    if requests != declared_requests or replies != declared_replies:
        raise RuntimeError(
            "nexusd.wire.ops.OPERATIONS and the Request/Reply unions disagree:"
            f" requests {sorted(t.__name__ for t in requests ^ declared_requests)},"
            f" replies {sorted(t.__name__ for t in replies ^ declared_replies)}"
        )
    for op in OPERATIONS:
        if op.reply.__struct_config__.tag != op.name:
            raise RuntimeError(f"the reply to {op.name!r} must carry the same op tag")


_check()
