"""What the clients send and how they read the answers, without any I/O.

:class:`~nexusd.client.Client` and :class:`~nexusd.client.AsyncClient` are
twins that differ only in how bytes move; everything they share lives here:
building requests (with idempotency keys), checking replies, continuing
history pages the server cut short, and deciding which calls are safe to retry
after the connection dropped.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

from . import protocol as p
from .errors import ConnectionLost, DaemonNotRunning, NexusError, Overloaded, Unavailable
from .protocol import Message

R = TypeVar("R")

#: An ``append_many`` item: ``(role, content)`` or a mapping with ``role``,
#: ``content`` and optionally ``timestamp``, ``meta``, ``idempotency_key``.
MessageInput = tuple[str, str] | Mapping[str, Any]

#: Backup progress callback: ``progress(bytes_done, bytes_total)``.
Progress = Callable[[int, int], None]

CLIENT_NAME: Final = "nexusd-python"
RECV_BYTES: Final = 256 * 1024
#: Replies are bounded by the server's frame limit; accept anything sane.
CLIENT_MAX_FRAME: Final = 64 * 1024 * 1024
#: Errors after which a retry may succeed (the request was not applied, or it
#: carries an idempotency key that makes applying it twice harmless).
RETRY_ON: Final = (ConnectionLost, DaemonNotRunning, Unavailable, Overloaded)
_READS: Final = (p.Ping, p.Hello, p.History, p.Count, p.Sessions, p.Stats)
FIRST_BACKOFF: Final = 0.05
MAX_BACKOFF: Final = 1.0


def unreachable(path: os.PathLike[str] | str, why: str) -> DaemonNotRunning:
    return DaemonNotRunning(
        f"cannot reach nexusd at {path} ({why}). Start the daemon with `nexusd serve`"
        " (or `systemctl --user start nexusd`), or point NEXUSD_SOCKET / socket_path at it."
    )


class KeyMaker:
    """Idempotency keys: a random per-client prefix and a counter (cheap, unique).

    22 characters: every key is stored and indexed with its row, so short keys
    are measurably faster (29-character keys cost ~7% of batched throughput).
    """

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = secrets.token_urlsafe(9)  # 72 random bits in 12 characters
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        # Fixed width, so keys sort in the order they are made: the daemon's
        # key index then grows at one end instead of everywhere.
        return f"{self._prefix}{next(self._counter):010x}"


def append_request(
    keys: KeyMaker | None,
    role: str,
    content: str,
    timestamp: str | None,
    session_tag: str,
    meta: Mapping[str, Any] | None,
    idempotency_key: str | None,
) -> p.Append:
    key = idempotency_key if idempotency_key is not None else (keys() if keys else None)
    return p.Append(
        id=0,
        role=role,
        content=content,
        session_tag=session_tag,
        timestamp=timestamp,
        meta=dict(meta) if meta is not None else None,
        idem_key=key,
    )


def append_many_request(
    keys: KeyMaker | None, messages: Iterable[MessageInput], session_tag: str
) -> p.AppendMany:
    items = []
    for item in messages:
        # Tuples are the common case: test for them first (isinstance(Mapping) is slow).
        if type(item) is not tuple and isinstance(item, Mapping):
            key = item.get("idempotency_key")
            meta = item.get("meta")
            items.append(
                p.NewMessage(
                    role=item["role"],
                    content=item["content"],
                    timestamp=item.get("timestamp"),
                    meta=dict(meta) if meta is not None else None,
                    idem_key=key if key is not None else (keys() if keys else None),
                )
            )
        else:
            role, content = item
            items.append(
                p.NewMessage(role=role, content=content, idem_key=keys() if keys else None)
            )
    return p.AppendMany(id=0, messages=items, session_tag=session_tag)


def history_request(
    session_tag: str, limit: int, before_id: int | None, after_id: int | None
) -> p.History:
    return p.History(
        id=0, session_tag=session_tag, limit=limit, before_id=before_id, after_id=after_id
    )


def retryable(req: Any) -> bool:
    """Whether sending ``req`` again cannot store or delete anything twice."""
    if isinstance(req, _READS):
        return True
    if type(req) is p.Append:
        return req.idem_key is not None
    if type(req) is p.AppendMany:
        return all(m.idem_key is not None for m in req.messages)
    return False  # pop / clear / clear_all: a second run would remove more


def backoff(err: NexusError, previous: float) -> float:
    """Seconds to wait before the next try."""
    if isinstance(err, Overloaded):
        return max(err.retry_after, FIRST_BACKOFF)
    return min(previous * 2, MAX_BACKOFF) if previous else FIRST_BACKOFF


def expect(reply: Any, kind: type[R]) -> R:
    """``reply`` as ``kind``, or raise the error it carries."""
    if type(reply) is kind:
        return reply
    if isinstance(reply, p.ErrorReply):
        p.raise_for_error(reply)
    raise NexusError(f"unexpected reply {type(reply).__name__} to a {kind.__name__[:-5]} request")


def next_page(first: p.History, got: list[Message], page: p.HistoryReply) -> p.History | None:
    """The request continuing a history page the server cut short, else None."""
    if not page.truncated or not page.messages or len(got) >= first.limit:
        return None
    rest = first.limit - len(got)
    if first.after_id is None:  # paging back from the newest: continue below the oldest seen
        return history_request(first.session_tag, rest, page.messages[0].id, None)
    return history_request(first.session_tag, rest, first.before_id, page.messages[-1].id)


def merge(first: p.History, got: list[Message], page: list[Message]) -> list[Message]:
    """Join a continued page to what came before, keeping oldest-first order."""
    return page + got if first.after_id is None else got + page


def backup_chunk(hello: p.HelloReply) -> int:
    """The largest backup chunk whose reply fits the server's frame limit."""
    return max(4096, min(p.MAX_BACKUP_CHUNK, hello.limits.get("max_frame", 0) - 4096))


class BackupTarget:
    """The file a backup is written to: a ``.partial`` sibling, renamed when complete."""

    def __init__(self, dest: str | os.PathLike[str]) -> None:
        self.dest = Path(dest)
        self.partial = self.dest.with_name(self.dest.name + ".partial")
        self._fh = self.partial.open("wb")

    def write(self, data: bytes) -> None:
        self._fh.write(data)

    def commit(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.partial, self.dest)

    def discard(self) -> None:
        """Remove the partial file unless :meth:`commit` renamed it (idempotent)."""
        if not self._fh.closed:
            self._fh.close()
        self.partial.unlink(missing_ok=True)
