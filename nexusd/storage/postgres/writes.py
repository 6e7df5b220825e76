"""One batch of writes as one PostgreSQL transaction, in as few round trips as it takes.

:class:`~.backend.PostgresStorage` decides *when* (one batch at a time, on
its writer connection); this module is *what* the transaction does, with the
SQLite backend's semantics (:mod:`nexusd.storage.writes`, ``inserts``,
``editing``, ``floors``, ``counts``, ``marks``):

1. ``pg_advisory_xact_lock(WRITE_LOCK)``: one writer at a time across every
   daemon sharing the database, so ids (``nextval`` inside the lock) grow in
   commit order and counts and key lookups see no concurrent writer.
2. The commit time from the server's clock (``clock_timestamp()``, never
   before the newest commit mark): every daemon reads one clock.  It is kept
   in two transaction-local settings (``nexusd.now``, ``nexusd.clock``) so the
   statements after it use it without waiting for it.
3. Each run of consecutive appends as ONE ``INSERT ... SELECT nextval(...)
   FROM unnest(arrays) WITH ORDINALITY ORDER BY ord``: ids are consecutive in
   op order; other ops (:mod:`.editing`) in op order between runs.
4. ``nexus_sessions`` raised per session, then every session the batch grew
   pruned exactly to its retention (its own in ``nexus_retention``, else the
   daemon's default) in one statement, so an acknowledged row is never one
   pruned by the commit that acknowledges it; the commit mark; the log
   (:func:`.log.record`, which also NOTIFYs); COMMIT.

The statements run in pipeline mode: a batch of appends is sent as three
round trips (everything up to the pruning, whose ids the log needs; the log
row; COMMIT), whatever its size.

Idempotency keys as the SQLite backend: the fast path inserts without looking
keys up; a key already stored makes the unique index refuse the batch
(``UniqueViolation``), and the backend runs it again with ``lookup``: every
key looked up first (one statement per run), a visible holder's id answered,
a hidden holder (cleared, not yet swept) deleted so the key can be stored anew.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import psycopg

from ...wire.errors import BadRequest, NexusError
from ..ops import (
    Change,
    ClearAll,
    ClearSession,
    DeleteIds,
    Fork,
    Forked,
    Insert,
    Op,
    PopNewest,
    Removed,
    Retention,
    SetRetention,
)
from . import editing, log
from .errors import NO_NUL
from .inserts import Batch
from .schema import TAKE_WRITE_LOCK

__all__ = ["Attempt", "Outcome", "nul_refusal", "run"]

Conn = psycopg.AsyncConnection[Any]

#: The commit time: the server's clock, never before the newest commit mark (a
#: clock stepped back, or another daemon's) nor ``%s`` (this daemon's last).
_CLOCK: Final = (
    "SELECT c, set_config('nexusd.now', to_char(to_timestamp(c) AT TIME ZONE 'UTC',"
    " 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), true), set_config('nexusd.clock', c::text, true)"
    " FROM (SELECT greatest(extract(epoch FROM clock_timestamp())::float8, %s::float8,"
    " coalesce((SELECT at FROM nexus_marks ORDER BY second DESC LIMIT 1), 0)) AS c) AS x"
)
_EARLIER: Final = "SELECT seq, origin, changes FROM nexus_log WHERE seq > %s ORDER BY seq LIMIT %s"
_EARLIER_PAGE: Final = 1000


@dataclass(slots=True)
class Attempt:
    """How far one transaction got: ``committing`` once COMMIT is on its way (a lost
    connection then may or may not have stored the batch)."""

    committing: bool = False


@dataclass(slots=True)
class Outcome:
    """What a committed batch did (as the SQLite backend's :class:`~nexusd.storage.writes.Outcome`),
    and its commit time (Unix seconds)."""

    results: list[Any]
    rows_added: int = 0
    pruned: int = 0
    changes: list[Change] = field(default_factory=list)
    retention: list[tuple[str, Retention]] = field(default_factory=list)
    hid: bool = False
    clock: float = 0.0
    #: The batch's row in the commit log (0: it changed nothing).
    seq: int = 0
    #: The log rows committed before it that the caller had not read (``since``).
    earlier: list[log.Entry] = field(default_factory=list)

    def delivery(self) -> tuple[list[log.Entry], tuple[int, list[Change]] | None]:
        """What :meth:`.follow.Follow.deliver` takes: the others' rows, then this batch's."""
        return self.earlier, ((self.seq, self.changes) if self.seq else None)


def nul_refusal(op: Op) -> NexusError | None:
    """PostgreSQL's text cannot hold U+0000 (SQLite's can): such an op is refused alone,
    as a bad request, instead of failing its batch."""
    texts: list[str | None]
    if isinstance(op, Insert):
        texts = [op.session_tag]
        for row in op.rows:
            texts += row
    elif isinstance(op, Fork):
        texts = [op.source_tag, op.new_tag, op.link_tag]
    elif isinstance(op, ClearAll):
        texts = [op.scope]
    else:
        texts = [op.session_tag]
    if any(t is not None and "\x00" in t for t in texts):
        # An append's field may be any of its messages' (no one name fits both
        # append and append_many): none is named.
        return BadRequest(NO_NUL, field=None if isinstance(op, Insert) else "session_tag")
    return None


async def run(
    conn: Conn,
    ops: Sequence[Op],
    *,
    default_messages: int,
    origin: str,
    lookup: bool,
    last_clock: float,
    attempt: Attempt,
    since: int | None = None,
) -> Outcome:
    """Run ``ops`` as one transaction and commit; roll back and raise on any error.

    ``default_messages``: what a session without a retention of its own keeps
    (0: unbounded).  ``lookup``: look every idempotency key up first (after
    a ``UniqueViolation`` said one is stored).  ``last_clock``: this daemon's
    previous commit time (the new one is never earlier).  ``since``: the last
    log row the caller delivered; the rows after it, up to this batch's, are
    read inside the transaction (after the lock: every earlier commit is
    there) into :attr:`Outcome.earlier`.
    """
    out = Outcome([])
    async with conn.pipeline(), conn.transaction():
        await conn.execute(TAKE_WRITE_LOCK)
        clock = await conn.execute(_CLOCK, (last_clock,))
        earlier = None
        if since is not None:
            earlier = await conn.execute(_EARLIER, (since, _EARLIER_PAGE))
        batch = Batch(
            conn, out.changes, lookup=lookup, clock=clock, default_messages=default_messages
        )
        for op in ops:
            refused = nul_refusal(op)
            if refused is not None:
                out.results.append(refused)
            elif isinstance(op, Insert):
                out.results.append(batch.add(op))
            else:
                await batch.flush()
                out.results.append(await _edit(conn, op, batch, out, default_messages))
        pruning = await batch.flush(last=True)
        await batch.resolve()
        out.rows_added, out.clock = batch.rows_added, batch.clock
        if pruning is not None:
            for tag, last, n in await pruning.fetchall():
                out.pruned += int(n)
                out.changes.append(Removed(str(tag), before_id=int(last) + 1))
        if earlier is not None:
            await _read_earlier(conn, earlier, out.earlier)
        if out.changes:
            out.seq = await log.record(conn, out.changes, origin=origin, clock=out.clock)
        attempt.committing = True
    return out


async def _read_earlier(conn: Conn, cur: Any, into: list[log.Entry]) -> None:
    while True:
        rows = await cur.fetchall()
        into += [(int(s), str(o), log.decode(bytes(c))) for s, o, c in rows]
        if len(rows) < _EARLIER_PAGE:
            return
        cur = await conn.execute(_EARLIER, (into[-1][0], _EARLIER_PAGE))


async def _edit(conn: Conn, op: Op, batch: Batch, out: Outcome, default_messages: int) -> Any:
    """Run one op other than an append; its result."""
    changes = out.changes
    if isinstance(op, PopNewest):
        return await editing.pop(conn, op, changes)
    if isinstance(op, ClearSession):
        n, hid = await editing.clear_session(conn, op, changes)
        out.hid |= hid
        return n
    if isinstance(op, ClearAll):
        n, hid = await editing.clear_scope(conn, op, changes)
        out.hid |= hid
        return n
    if isinstance(op, DeleteIds):
        return await editing.delete_ids(conn, op, changes)
    if isinstance(op, Fork):
        rows = await editing.fork_rows(conn, op)
        if isinstance(rows, NexusError):
            return rows
        ids = batch.add(Insert(op.new_tag, rows))
        await batch.flush()
        await batch.resolve()
        return Forked(len(ids), ids[0], ids[-1])
    if isinstance(op, SetRetention):
        done = await editing.set_retention(conn, op, default_messages, changes)
        if not isinstance(done, NexusError):
            out.retention.append((op.session_tag, done))
            out.hid = True
        return done
    raise TypeError(f"not a write op: {op!r}")
