"""The write ops the daemon hands to storage, and the changes a commit reports.

Part of the storage seam (:mod:`.base`): each op is a backend-neutral
dataclass whose committed result has the type its :class:`WriteOp` names;
a commit reports what it changed as :class:`Added` and :class:`Removed`
(for watchers and the full-text index).  No SQL here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeAlias, TypeVar

from ..wire.errors import BadRequest, Conflict, NexusError, NotFound, TooLarge
from ..wire.protocol import Message

R = TypeVar("R", covariant=True)

#: One row to insert: (role, content, timestamp or None, meta as JSON text or None,
#: idempotency key or None).  A plain tuple: appends build one per message on the
#: hot path, and a tuple is the cheapest thing to build.
NewRow: TypeAlias = tuple[str, str, "str | None", "str | None", "str | None"]


class WriteOp(Generic[R]):
    """A write op whose committed result is an ``R`` (or a :class:`NexusError`)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Insert(WriteOp[list[int]]):
    """Append rows to one session; result: their ids, all stored or none.

    A row whose idempotency key the session already holds is not stored again;
    its id in the result is the original one.  A row without a timestamp gets
    the batch's commit time (:func:`utc_now`, never earlier than the previous
    batch's).
    """

    session_tag: str
    rows: list[NewRow]


@dataclass(frozen=True, slots=True)
class PopNewest(WriteOp[Message | None]):
    """Remove and return the newest message of a session (None: the session is empty).

    ``refuse(message)`` runs before anything is deleted and may return an error
    to answer instead: a message too big for any reply must stay stored rather
    than be removed and never shown.  It runs wherever the backend runs its
    transaction (the SQLite backend: its writer thread), so it must be quick
    and touch nothing shared.
    """

    session_tag: str
    refuse: Callable[[Message], NexusError | None] | None = None


@dataclass(frozen=True, slots=True)
class ClearSession(WriteOp[int]):
    """Delete one session; result: messages deleted."""

    session_tag: str


@dataclass(frozen=True, slots=True)
class ClearAll(WriteOp[int]):
    """Delete every message in ``scope``; result: messages deleted.

    ``scope`` None: every message.  ``""``: those whose tag is not namespaced.
    Otherwise: those whose tag starts with ``scope`` (see :mod:`nexusd.storage.scope`).
    """

    scope: str | None = None


@dataclass(frozen=True, slots=True)
class Deleted:
    """What :class:`DeleteIds` did: the ids deleted and those the session did not hold."""

    deleted: list[int]
    missing: list[int]


@dataclass(frozen=True, slots=True)
class DeleteIds(WriteOp[Deleted]):
    """Delete exactly these messages of one session (an id it does not hold is
    reported missing, not an error: deleting twice is harmless)."""

    session_tag: str
    ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Forked:
    """What :class:`Fork` stored: ``count`` new messages with ids ``first_id..last_id``."""

    count: int
    first_id: int
    last_id: int


@dataclass(frozen=True, slots=True)
class Fork(WriteOp[Forked]):
    """Copy the messages of ``source_tag`` (up to and including ``up_to_id``, None:
    all) into ``new_tag``, in one transaction: new ids, same role, content,
    timestamp and meta, and in meta ``forked_from = {session_tag: link_tag,
    id: <the original's id>}`` (``link_tag``: the source's tag as its client
    names it).  Answered ``conflict`` (field ``new_tag``) when ``new_tag``
    already holds messages and not ``append``; ``not_found`` when there is
    nothing to copy; ``too_large`` past :data:`MAX_FORK_MESSAGES` or
    :data:`MAX_FORK_BYTES`, or when a copy's meta would pass ``max_meta``.
    """

    source_tag: str
    new_tag: str
    link_tag: str
    up_to_id: int | None = None
    append: bool = False
    #: Bytes of JSON a copy's meta may have with its link (0: unchecked): a copy
    #: must be a message its daemon would accept, e.g. from an import.
    max_meta: int = 0


#: The most messages, and bytes of them, one fork copies.  A fork is one transaction
#: and holds the writer (every session's appends) for its length: measured, 10,000
#: messages of 200 bytes took 118-193 ms, of 1.5 KB (15 MB) 471 ms, and 100,000
#: took 1.5-1.7 s; at the bound (10,000 of 250 bytes, 3.8 MB) 108-144 ms, median of 5
#: in each of 3 runs.  The writer runs each fork in a transaction of its own.  Bigger
#: copies go through ``nexusd export | nexusd import --session-map``, in batches.
MAX_FORK_MESSAGES: Final = 10_000
MAX_FORK_BYTES: Final = 4 * 1024 * 1024


#: Sessions with a retention of their own, at most (each costs every writer's
#: memory and the sweep's passes, whether or not the session holds messages).
MAX_OWN_RETENTIONS: Final = 100_000


# The refusals of the editing ops, worded once for every backend.  They read the
# bounds above when called, so a test that lowers one lowers it for every backend.
def fork_refused(op: Fork, held: int) -> NexusError | None:
    """Before anything is read: a fork into itself, or into a session that holds
    ``held`` messages when the fork does not append."""
    if op.new_tag == op.source_tag:
        return BadRequest("a session cannot be forked into itself", field="new_tag")
    if held and not op.append:
        # (Not naming it: the stored tag may carry a peer's namespace prefix.)
        return Conflict(
            f"the new session already has {held} messages; fork into a new tag, or append to it",
            field="new_tag",
        )
    return None


def fork_missing(op: Fork, *, up_to: bool) -> NotFound:
    """The source holds no message ``op.up_to_id`` (``up_to``), or nothing to copy."""
    if up_to:
        return NotFound(f"session {op.link_tag!r} holds no message {op.up_to_id}", field="up_to_id")
    return NotFound(f"session {op.link_tag!r} has no messages to fork", field="source_tag")


def fork_too_large(n: int, size: int) -> TooLarge | None:
    """A copy of ``n`` messages and ``size`` bytes past :data:`MAX_FORK_MESSAGES` or
    :data:`MAX_FORK_BYTES`."""
    if n <= MAX_FORK_MESSAGES and size <= MAX_FORK_BYTES:
        return None
    mib = 1024 * 1024
    return TooLarge(
        f"a fork copies at most {MAX_FORK_MESSAGES} messages and {MAX_FORK_BYTES // mib} MiB"
        f" at once; this one is {n} messages, {size // mib} MiB: fork up to an earlier id,"
        " or copy it with nexusd export | nexusd import --session-map",
        field="source_tag",
    )


def fork_meta_too_big(op: Fork, row_id: int) -> TooLarge:
    """Message ``row_id``'s meta with its ``forked_from`` link would pass ``op.max_meta``."""
    return TooLarge(
        f"message {row_id}'s meta would pass {op.max_meta} bytes with the"
        " forked_from link; fork up to an earlier id",
        field="source_tag",
    )


def retentions_full(own: int, has_own: bool) -> BadRequest | None:
    """A new retention of its own when ``own`` sessions have one already."""
    if has_own or own < MAX_OWN_RETENTIONS:
        return None
    return BadRequest(
        f"at most {MAX_OWN_RETENTIONS} sessions may have a retention of their own;"
        " reset some (set_retention with neither limit) first",
        field="session_tag",
    )


@dataclass(frozen=True, slots=True)
class Retention:
    """One session's own retention, overriding the daemon's defaults.

    Each field None: the default applies; 0: unbounded; otherwise the most
    messages kept, or the age in seconds past which messages are deleted.
    """

    max_messages: int | None = None
    max_age: float | None = None


@dataclass(frozen=True, slots=True)
class SetRetention(WriteOp[Retention]):
    """Set (or with both None, remove) a session's own retention; result: what is now set.

    Kept in the database (it survives restarts).  A lower ``max_messages``
    hides the overflow at once (it is removed in the background); a
    ``max_age`` applies from the next sweep, which this wakes.
    """

    session_tag: str
    retention: Retention


Op: TypeAlias = Insert | PopNewest | ClearSession | ClearAll | DeleteIds | Fork | SetRetention
#: Called once, in the event loop, with one result per op, in op order: the op's
#: result, or the :class:`NexusError` it is answered with.
Answer: TypeAlias = Callable[[list[Any]], None]


#: A stored row as the writer inserts it: (role, content, timestamp, session_tag,
#: meta as JSON text or None, idempotency key or None).
StoredRow: TypeAlias = tuple[str, str, str, str, "str | None", "str | None"]


@dataclass(frozen=True, slots=True)
class Added:
    """Rows a committed batch stored: ``rows[i]`` got id ``first_id + i``."""

    first_id: int
    rows: list[StoredRow]


@dataclass(frozen=True, slots=True)
class Removed:
    """Rows a committed batch deleted: ``ids``, and with ``before_id`` every row of
    ``session_tag`` with a smaller id.  ``session_tag`` None: in every session of
    ``scope`` (as :class:`ClearAll`)."""

    session_tag: str | None
    ids: tuple[int, ...] = ()
    before_id: int | None = None
    scope: str | None = None


#: What a committed batch changed, in the order it happened (for watchers).
Change: TypeAlias = Added | Removed
