"""The write ops besides appends, on PostgreSQL: pop, clear, clear_all, delete, fork, retention.

Each runs inside the batch's transaction (:func:`~.writes.run` calls them in
op order, under the write lock), answers what the SQLite backend's
:mod:`nexusd.storage.editing` / :mod:`nexusd.storage.floors` answer for the
same call, keeps ``nexus_sessions`` (visible rows per session) exact, and
records what watchers must hear.  Big clears hide rows under a floor (the
sweep deletes them), as SQLite's do, from :data:`~nexusd.storage.floors.HIDE_FROM` rows.

Statements whose result nothing waits for are only queued (the batch runs in
pipeline mode); an op reads back only what it must decide on.
"""

from __future__ import annotations

import json
from typing import Any, Final

import psycopg

from ...wire.errors import NexusError
from ...wire.protocol import Message
from .. import ops
from ..editing import Retentions
from ..floors import HIDE_FROM
from ..ops import (
    Change,
    ClearAll,
    ClearSession,
    Deleted,
    DeleteIds,
    Fork,
    NewRow,
    PopNewest,
    Removed,
    Retention,
    SetRetention,
)
from ..schema import message_of
from .schema import MESSAGE_COLUMNS, VISIBLE_ONE, row_size, scope_clause

__all__ = [
    "clear_scope",
    "clear_session",
    "count_of",
    "delete_ids",
    "fork_rows",
    "lower_count",
    "pop",
    "retentions_and_size",
    "set_retention",
]

Conn = psycopg.AsyncConnection[Any]

#: The id the next stored row gets (the sequence never hands one out twice).
_NEXT_ID: Final = (
    "SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END FROM nexus_messages_id_seq"
)
_NEWEST: Final = (
    f"SELECT {MESSAGE_COLUMNS} FROM nexus_messages WHERE session_tag = %s AND {VISIBLE_ONE}"
    " ORDER BY id DESC LIMIT 1"
)
_HIDE: Final = (
    "INSERT INTO nexus_floors (session_tag, below_id) SELECT unnest(%s::text[]), %s"
    " ON CONFLICT (session_tag) DO UPDATE"
    " SET below_id = greatest(nexus_floors.below_id, excluded.below_id)"
)
#: A session loses ``n`` visible rows; its row goes when none is left.
_LOWER: Final = "UPDATE nexus_sessions SET messages = messages - %s WHERE session_tag = %s"
_SIZE: Final = (
    "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class AS c"
    " WHERE c.relkind = 'r' AND c.relname LIKE 'nexus\\_%%'"
    " AND c.relnamespace = current_schema()::regnamespace"
)
_DROP_EMPTY: Final = "DELETE FROM nexus_sessions WHERE session_tag = %s AND messages <= 0"


async def _one(conn: Conn, query: str, params: tuple[Any, ...] = ()) -> Any:
    cur = await conn.execute(query, params)
    return await cur.fetchone()


async def count_of(conn: Conn, tag: str) -> int:
    """Visible rows of ``tag`` (its ``nexus_sessions`` row; none: 0)."""
    row = await _one(conn, "SELECT messages FROM nexus_sessions WHERE session_tag = %s", (tag,))
    return 0 if row is None else int(row[0])


async def lower_count(conn: Conn, tag: str, n: int) -> None:
    """``n`` visible rows of ``tag`` were deleted (queued only: nothing waits for it)."""
    await conn.execute(_LOWER, (n, tag))
    await conn.execute(_DROP_EMPTY, (tag,))


async def _set_count(conn: Conn, tag: str, n: int) -> None:
    if n:
        await conn.execute(
            "UPDATE nexus_sessions SET messages = %s WHERE session_tag = %s", (n, tag)
        )
    else:
        await conn.execute("DELETE FROM nexus_sessions WHERE session_tag = %s", (tag,))


async def _next_id(conn: Conn) -> int:
    row = await _one(conn, _NEXT_ID)
    return int(row[0])


async def _hide_below(conn: Conn, tags: list[str], below_id: int) -> None:
    """Hide every row of ``tags`` under ``below_id`` (a floor only ever rises)."""
    await conn.execute(_HIDE, (tags, below_id))


async def pop(conn: Conn, op: PopNewest, changes: list[Change]) -> Message | NexusError | None:
    tag = op.session_tag
    row = await _one(conn, _NEWEST, (tag, tag))
    if row is None:
        return None
    msg = message_of(row)
    refusal = op.refuse(msg) if op.refuse is not None else None
    if refusal is not None:
        return refusal
    await conn.execute("DELETE FROM nexus_messages WHERE id = %s", (msg.id,))
    await lower_count(conn, tag, 1)
    changes.append(Removed(tag, ids=(msg.id,)))
    return msg


async def clear_session(conn: Conn, op: ClearSession, changes: list[Change]) -> tuple[int, bool]:
    """Clear a session: delete a small one at once, hide a big one (or one already
    partly hidden: its hidden rows are the sweep's).  Rows cleared, and whether
    rows were hidden (the sweep has work)."""
    tag = op.session_tag
    n, floor, next_id = await _one(
        conn,
        "SELECT (SELECT messages FROM nexus_sessions WHERE session_tag = %s),"
        f" (SELECT below_id FROM nexus_floors WHERE session_tag = %s), ({_NEXT_ID})",
        (tag, tag),
    )
    n = int(n or 0)
    hid = n >= HIDE_FROM
    if hid or floor:
        await _hide_below(conn, [tag], int(next_id))
    else:
        await conn.execute("DELETE FROM nexus_messages WHERE session_tag = %s", (tag,))
    await conn.execute("DELETE FROM nexus_sessions WHERE session_tag = %s", (tag,))
    if n:
        changes.append(Removed(tag, before_id=int(next_id)))
    return n, hid


async def clear_scope(conn: Conn, op: ClearAll, changes: list[Change]) -> tuple[int, bool]:
    """Clear every session of ``op.scope``, each as :func:`clear_session` would."""
    where, params = scope_clause(op.scope)
    cur = await conn.execute(
        f"SELECT session_tag, messages FROM nexus_sessions WHERE {where}", params
    )
    sessions = [(str(t), int(n)) for t, n in await cur.fetchall()]
    hidden, next_id = await _one(
        conn, f"SELECT EXISTS (SELECT 1 FROM nexus_floors WHERE {where}), ({_NEXT_ID})", params
    )
    total = sum(n for _, n in sessions)
    tags = [t for t, n in sessions if n]
    hid = total >= HIDE_FROM or bool(hidden)
    if hid:
        if tags:
            await _hide_below(conn, tags, int(next_id))
    elif tags:
        await conn.execute("DELETE FROM nexus_messages WHERE session_tag = ANY(%s)", (tags,))
    await conn.execute(f"DELETE FROM nexus_sessions WHERE {where}", params)
    if total:
        changes.append(Removed(None, before_id=int(next_id), scope=op.scope))
    return total, hid


async def delete_ids(conn: Conn, op: DeleteIds, changes: list[Change]) -> Deleted:
    """Delete ``op.ids`` that ``op.session_tag`` holds (visible ones)."""
    tag = op.session_tag
    wanted = sorted(set(op.ids))
    cur = await conn.execute(
        "DELETE FROM nexus_messages WHERE session_tag = %s AND id = ANY(%s)"
        f" AND {VISIBLE_ONE} RETURNING id",
        (tag, wanted, tag),
    )
    deleted = sorted(int(r[0]) for r in await cur.fetchall())
    if deleted:
        await lower_count(conn, tag, len(deleted))
        changes.append(Removed(tag, ids=tuple(deleted)))
    found = set(deleted)
    return Deleted(deleted, [i for i in wanted if i not in found])


def _linked(meta: str | None, link_tag: str, row_id: int) -> str:
    """A copy's meta: the original's with ``forked_from`` (compact JSON, as SQLite's
    ``json_set`` writes it)."""
    decoded: Any = {} if meta is None else json.loads(meta)
    if isinstance(decoded, dict):
        decoded["forked_from"] = {"session_tag": link_tag, "id": row_id}
    return json.dumps(decoded, separators=(",", ":"), ensure_ascii=False)


async def fork_rows(conn: Conn, op: Fork) -> list[NewRow] | NexusError:
    """The rows :class:`Fork` stores (inserted like an append's), or why it refuses."""
    refused = ops.fork_refused(op, await count_of(conn, op.new_tag))
    if refused is not None:
        return refused
    src = op.source_tag
    upto = op.up_to_id if op.up_to_id is not None else 2**63 - 1
    where = f"session_tag = %s AND id <= %s AND {VISIBLE_ONE}"
    params = (src, upto, src)
    if op.up_to_id is not None:
        hit = await _one(
            conn, f"SELECT 1 FROM nexus_messages WHERE id = %s AND {where}", (op.up_to_id, *params)
        )
        if hit is None:
            return ops.fork_missing(op, up_to=True)
    n, size = await _one(
        conn,
        f"SELECT count(*), coalesce(sum({row_size()}), 0) FROM nexus_messages WHERE {where}",
        params,
    )
    if n == 0:
        return ops.fork_missing(op, up_to=False)
    too_large = ops.fork_too_large(n, int(size))
    if too_large is not None:
        return too_large
    cur = await conn.execute(
        f"SELECT id, role, content, timestamp, meta FROM nexus_messages WHERE {where} ORDER BY id",
        params,
    )
    rows: list[NewRow] = []
    for row_id, role, content, ts, meta in await cur.fetchall():
        linked = _linked(meta, op.link_tag, row_id)
        if op.max_meta and len(linked.encode()) > op.max_meta:
            return ops.fork_meta_too_big(op, row_id)
        rows.append((role, content, ts, linked, None))
    return rows


async def set_retention(
    conn: Conn, op: SetRetention, default_messages: int, changes: list[Change]
) -> Retention | NexusError:
    """Store ``op``'s retention; hide the overflow a lower ``max_messages`` leaves."""
    tag, r = op.session_tag, op.retention
    own, mine = await _one(
        conn,
        "SELECT count(*), count(*) FILTER (WHERE session_tag = %s) FROM nexus_retention",
        (tag,),
    )
    full = ops.retentions_full(own, bool(mine))
    if full is not None:
        return full
    if r.max_messages is None and r.max_age is None:
        await conn.execute("DELETE FROM nexus_retention WHERE session_tag = %s", (tag,))
    else:
        await conn.execute(
            "INSERT INTO nexus_retention (session_tag, max_messages, max_age) VALUES (%s, %s, %s)"
            " ON CONFLICT (session_tag) DO UPDATE"
            " SET max_messages = excluded.max_messages, max_age = excluded.max_age",
            (tag, r.max_messages, r.max_age),
        )
    keep = default_messages if r.max_messages is None else r.max_messages
    excess = await count_of(conn, tag) - keep if keep else 0
    if excess > 0:
        (first_kept,) = await _one(
            conn,
            f"SELECT id FROM nexus_messages WHERE session_tag = %s AND {VISIBLE_ONE}"
            " ORDER BY id LIMIT 1 OFFSET %s",
            (tag, tag, excess),
        )
        await _hide_below(conn, [tag], int(first_kept))
        await _set_count(conn, tag, keep)
        changes.append(Removed(tag, before_id=int(first_kept)))
    return r


async def retentions_and_size(
    conn: Conn, default_messages: int, default_age: float
) -> tuple[Retentions, int]:
    """Every session's own retention (another daemon may have set one since), and
    about how many bytes the tables take (with their indexes and TOAST)."""
    fresh = Retentions(default_messages, default_age)
    cur = await conn.execute("SELECT session_tag, max_messages, max_age FROM nexus_retention")
    for tag, n, age in await cur.fetchall():
        fresh.update(tag, Retention(n, age))
    row = await _one(conn, _SIZE)
    return fresh, int(row[0]) if row is not None else 0
