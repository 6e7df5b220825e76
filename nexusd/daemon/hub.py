"""The hub of the watches: every open watch, and the fan-out of each committed batch.

Storage calls :meth:`Hub.publish` in the event loop after each committed batch
(``Storage.on_commit``, once the batch's callers were answered) with what it
stored and deleted, in the order it happened.  Each message is built once and
shared by every watch it goes to; the watches of one session also share its
encoding (:class:`Batch`, sent as :class:`Frame`).  What a watch does with a
batch (send it, or keep it while its reader is slow) is
:mod:`nexusd.daemon.watch`'s; the hub knows watches only as :class:`Follower`.
"""

from __future__ import annotations

from typing import Final, Protocol

import msgspec

from ..storage.base import Added, Change, Removed
from ..storage.scope import NS_MARK
from ..wire import protocol as p
from ..wire.errors import Lagged, NexusError

__all__ = ["PER_MESSAGE", "Batch", "Follower", "Frame", "Hub", "Item"]

#: Bytes counted per message besides its content and meta (keys, role, tag, timestamp).
PER_MESSAGE: Final = 160
_decode_meta = msgspec.json.decode


class Follower(Protocol):
    """A watch, as the hub sees it."""

    #: The stored tag followed, or None: every session in ``scope``.
    tag: str | None
    scope: str | None
    #: The id of the last message sent on it (None: none yet).
    last_sent: int | None

    def offer(self, batch: Batch, removed: list[Removed]) -> None: ...

    def end(self, err: NexusError | None) -> None: ...


#: A message with its size, as counted against a watch's buffer.
Item = tuple[p.Message, int]


def _covers(scope: str | None, tag: str) -> bool:
    """Whether the stored ``tag`` is in ``scope`` (as ``ClearAll``'s)."""
    if scope is None:
        return True
    if scope == "":
        return not tag.startswith(NS_MARK)
    return tag.startswith(scope)


class Hub:
    """Every open watch of the daemon, and the fan-out of each committed batch."""

    def __init__(self, *, buffer: int, total: int | None = None) -> None:
        #: Bytes of messages a watch may hold unsent before it is ``lagged``.
        self.buffer = buffer
        #: ... and all watches together (counted per watch, though the messages
        #: are shared: an upper bound of the memory they hold).
        self.total = total if total is not None else 256 * buffer
        #: What they hold now.
        self.held = 0
        self._by_tag: dict[str, set[Follower]] = {}
        self._all: set[Follower] = set()
        self.count = 0
        #: Watches ended because they fell behind, since start.
        self.lagged = 0

    def add(self, w: Follower) -> None:
        if w.tag is None:
            self._all.add(w)
        else:
            self._by_tag.setdefault(w.tag, set()).add(w)
        self.count += 1

    def remove(self, w: Follower) -> None:
        if w.tag is None:
            self._all.discard(w)
        else:
            group = self._by_tag.get(w.tag)
            if group is None or w not in group:
                return
            group.discard(w)
            if not group:
                del self._by_tag[w.tag]
        self.count -= 1

    def close(self, err: NexusError) -> None:
        """End every watch with ``err`` (shutdown)."""
        for w in [*self._all, *(w for g in self._by_tag.values() for w in g)]:
            w.end(err)

    def interrupt(self) -> None:
        """Storage may have missed commits (cut off from a database other daemons
        write): end every watch ``lagged`` at what it was sent, so that each
        resumes from ``history`` and loses nothing still stored."""
        for w in [*self._all, *(w for g in self._by_tag.values() for w in g)]:
            self.lagged += 1
            w.end(
                Lagged(
                    "this daemon lost touch with the database and may have missed"
                    " commits; watch again from last_id",
                    last_id=w.last_sent,
                )
            )

    def publish(self, changes: list[Change]) -> None:
        """One committed batch: what it stored and removed, to every watch concerned.

        Each message is built once; the watches of one session share its list,
        encoded once for all of them (:class:`Batch`).
        """
        if not self.count:
            return
        by_tag: dict[str, list[Item]] = {}
        removals: list[Removed] = []
        watched, everyone = self._by_tag, bool(self._all)
        for change in changes:
            if type(change) is Added:
                first = change.first_id
                for i, (role, content, ts, tag, meta, _) in enumerate(change.rows):
                    if not everyone and tag not in watched:
                        continue
                    msg = p.Message(
                        id=first + i,
                        role=role,
                        content=content,
                        timestamp=ts,
                        session_tag=tag,
                        meta=None if meta is None else _decode_meta(meta),
                    )
                    size = len(content) + (len(meta) if meta else 0) + PER_MESSAGE
                    by_tag.setdefault(tag, []).append((msg, size))
            else:
                assert type(change) is Removed
                removals.append(change)
        # Only the sessions this commit touched (all of them only for clear_all):
        # idle watches of other sessions cost a commit nothing.
        touched = set(by_tag)
        for r in removals:
            if r.session_tag is not None:
                touched.add(r.session_tag)
            else:
                touched.update(t for t in watched if _covers(r.scope, t))
        for tag in touched:
            group = watched.get(tag)
            if not group:
                continue
            items = by_tag.get(tag, [])
            gone = [r for r in removals if _removes(r, tag)]
            if items or gone:
                batch = Batch(items)
                for w in list(group):
                    w.offer(batch, gone)
        for w in list(self._all):
            items = [it for t, its in by_tag.items() if _covers(w.scope, t) for it in its]
            items.sort(key=_item_id)  # several sessions: back in id (commit) order
            gone = [r for r in removals if _removes_any(r, w.scope)]
            if items or gone:
                w.offer(Batch(items), gone)


def _item_id(item: Item) -> int:
    return item[0].id


def _removes(r: Removed, tag: str) -> bool:
    """Whether removal ``r`` concerns the stored session ``tag``."""
    return r.session_tag == tag if r.session_tag is not None else _covers(r.scope, tag)


def _removes_any(r: Removed, scope: str | None) -> bool:
    """Whether removal ``r`` concerns a watch of every session in ``scope``."""
    if r.session_tag is not None:
        return _covers(scope, r.session_tag)
    return r.scope is None or r.scope == scope


class Frame(msgspec.Struct, frozen=True, kw_only=True, tag_field="op", tag="watch"):
    """A ``watch`` frame as the daemon encodes it: :class:`~nexusd.wire.protocol.WatchReply`
    with its messages already encoded (once for every watch of the session)."""

    id: int
    messages: msgspec.Raw
    removed: list[p.Removal] = []
    live: bool = False


class Batch:
    """One committed batch's messages for a session's watches, encoded at most once."""

    __slots__ = ("_raw", "items")

    def __init__(self, items: list[Item]) -> None:
        self.items = items
        self._raw: msgspec.Raw | None = None

    def bound(self) -> int:
        """An upper bound of the messages' encoded size: every string at 4 bytes a
        character, meta at 3 times its JSON, and the map's overhead."""
        total = 0
        for m, size in self.items:
            meta = size - len(m.content) - PER_MESSAGE
            total += 4 * (len(m.content) + len(m.role) + len(m.session_tag) + len(m.timestamp))
            total += 3 * meta + PER_MESSAGE
        return total

    def raw(self) -> msgspec.Raw:
        if self._raw is None:
            self._raw = msgspec.Raw(p.encoder.encode([m for m, _ in self.items]))
        return self._raw
