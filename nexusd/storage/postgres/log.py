"""The commit log, ``nexus_log``: what each commit changed, in commit order.

The watches of a daemon hear of its own commits in-process (``on_commit``);
the commits of the *other* daemons sharing the database reach them through
this table.  Every write transaction that changed anything (a batch, a sweep
step) records its :class:`~nexusd.storage.ops.Change` list here as one row,
inside the transaction and under the write lock, so ``seq`` is the commit
order across every daemon, and announces it with ``NOTIFY`` (delivered at
commit, to listeners only).  :mod:`.follow` reads it back.

A row carries the changes whole (the stored rows' content included), not
ids to look up later: a row stored and deleted again before another daemon
reads the log would otherwise never reach that daemon's watches.  The sweep
deletes rows older than :data:`LOG_KEEP` seconds.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
import psycopg

from ..ops import Added, Change, Removed, StoredRow
from .schema import CHANNEL

__all__ = ["LOG_KEEP", "Entry", "decode", "encode", "entries_after", "record"]

#: Seconds a log row is kept: a daemon cut off from the database for longer
#: cannot know what it missed, and ends its watches ``lagged`` (they resume
#: from ``history`` with ``after_id``, which loses nothing).
LOG_KEEP: Final = 600.0

# One change as msgpack: ["a", first_id, [[role, content, ts, tag, meta, key], ...]]
# or ["r", session_tag, [ids...], before_id, scope].  Plain arrays: the log is
# written per batch on the hot path, and read back by nexusd only.
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(list[list[Any]]).decode

_RECORD: Final = (
    "WITH l AS (INSERT INTO nexus_log (seq, at, origin, changes)"
    " VALUES (nextval('nexus_log_seq'), %s, %s, %s) RETURNING seq)"
    f" SELECT seq, pg_notify('{CHANNEL}', seq::text) FROM l"
)


def encode(changes: list[Change]) -> bytes:
    out: list[list[Any]] = []
    for c in changes:
        if type(c) is Added:
            out.append(["a", c.first_id, [list(r) for r in c.rows]])
        else:
            assert type(c) is Removed
            out.append(["r", c.session_tag, list(c.ids), c.before_id, c.scope])
    return _encode(out)


def decode(data: bytes) -> list[Change]:
    changes: list[Change] = []
    for item in _decode(data):
        if item[0] == "a":
            rows: list[StoredRow] = [(r[0], r[1], r[2], r[3], r[4], r[5]) for r in item[2]]
            changes.append(Added(first_id=int(item[1]), rows=rows))
        else:
            changes.append(
                Removed(session_tag=item[1], ids=tuple(item[2]), before_id=item[3], scope=item[4])
            )
    return changes


async def record(
    conn: psycopg.AsyncConnection[Any], changes: list[Change], *, origin: str, clock: float
) -> int:
    """Inside a write transaction (under the write lock): log ``changes``; their seq."""
    cur = await conn.execute(_RECORD, (clock, origin, encode(changes)))
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


#: One log row as :func:`entries_after` returns it: (seq, origin, changes).
Entry = tuple[int, str, list[Change]]


async def entries_after(
    conn: psycopg.AsyncConnection[Any], seq: int, *, limit: int = 1000
) -> list[Entry]:
    """Log rows after ``seq``, in seq order, at most ``limit``."""
    cur = await conn.execute(
        "SELECT seq, origin, changes FROM nexus_log WHERE seq > %s ORDER BY seq LIMIT %s",
        (seq, limit),
    )
    return [(int(s), str(o), decode(bytes(c))) for s, o, c in await cur.fetchall()]
