"""Watches: every committed message pushed, in id order, to whoever follows its session.

Three parts:

* :class:`Hub`, one per daemon: every open watch, by session tag and by scope.
  Storage calls :meth:`Hub.publish` in the event loop after each committed
  batch (``Storage.on_commit``, after the batch's callers were answered), with
  what the batch stored and deleted in the order it happened; each message is
  built once, shared by every watch it goes to.
* :class:`Watch`, one per ``watch`` request: registered with the hub *before*
  the stored messages after ``after_id`` are read (the replay, paged like
  ``history``), so nothing committed meanwhile is missed; what arrives during
  the replay waits in the watch's buffer and is sent after it, without the
  messages the replay already sent (ids only grow: one writer, AUTOINCREMENT,
  ids handed out in commit order).  Then each batch is one frame, pushed as it
  commits.  A watch whose connection does not take its frames keeps them in its
  buffer (references to the shared messages, about ``watch_buffer`` bytes of
  them); past that it is ended with ``lagged``, carrying the id to resume
  from.  A slow watcher therefore costs the writers nothing and other watchers
  nothing: frames are written only while the connection's transport holds less
  than :data:`HIGH_WATER` unsent.
* :class:`Watches`, one per connection: its watches by request id (for
  ``unwatch``), woken when its transport drained, ended with it.

Pushed frames are not answers to requests in flight (the outbox's ``push``):
a watch never holds the connection's count of unanswered requests, the idle
deadline or the daemon's drain.  At shutdown every watch ends with
``unavailable``; clients resume from their last id.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import anyio
import msgspec

from ..storage.base import Added, Change, Removed, Storage
from ..storage.scope import NS_MARK
from ..wire import protocol as p
from ..wire.errors import BadRequest, Internal, Lagged, NexusError, NotFound, TooLarge
from .outbox import Outbox
from .peers import Namespace
from .tasks import Spawner

__all__ = ["HIGH_WATER", "Hub", "Watch", "Watches"]

logger = logging.getLogger(__name__)

#: Watch frames wait in their watch's buffer while the transport holds more than this.
HIGH_WATER: Final = 256 * 1024
#: Messages per replay page (and the frame limit bounds each page too).
REPLAY_PAGE: Final = 1_000
#: Room for a frame's envelope around the messages it carries.
_ENVELOPE: Final = 16 * 1024
#: Bytes counted per message besides its content (keys, role, tag, timestamp).
_PER_MESSAGE: Final = 160

_decode_meta = msgspec.json.decode
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

    def __init__(self, *, buffer: int) -> None:
        #: Bytes of messages a watch may hold unsent before it is ``lagged``.
        self.buffer = buffer
        self._by_tag: dict[str, set[Watch]] = {}
        self._all: set[Watch] = set()
        self.count = 0
        #: Watches ended because they fell behind, since start.
        self.lagged = 0

    def add(self, w: Watch) -> None:
        if w.tag is None:
            self._all.add(w)
        else:
            self._by_tag.setdefault(w.tag, set()).add(w)
        self.count += 1

    def remove(self, w: Watch) -> None:
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

    def _targets(self, tag: str) -> list[Watch]:
        found = [w for w in self._all if _covers(w.scope, tag)] if self._all else []
        group = self._by_tag.get(tag)
        if group:
            found += group
        return found

    def publish(self, changes: list[Change]) -> None:
        """One committed batch: what it stored and removed, to every watch concerned."""
        if not self.count:
            return
        out: dict[Watch, tuple[list[Item], list[Removed]]] = {}
        targets: dict[str, list[Watch]] = {}
        for change in changes:
            if type(change) is Added:
                first = change.first_id
                for i, (role, content, ts, tag, meta, _) in enumerate(change.rows):
                    to = targets.get(tag)
                    if to is None:
                        to = targets[tag] = self._targets(tag)
                    if not to:
                        continue
                    msg = p.Message(
                        id=first + i,
                        role=role,
                        content=content,
                        timestamp=ts,
                        session_tag=tag,
                        meta=None if meta is None else _decode_meta(meta),
                    )
                    item = (msg, len(content) + (len(meta) if meta else 0) + _PER_MESSAGE)
                    for w in to:
                        out.setdefault(w, ([], []))[0].append(item)
            else:
                assert type(change) is Removed
                for w in self._removal_targets(change):
                    out.setdefault(w, ([], []))[1].append(change)
        for w, (items, removed) in out.items():
            w.offer(items, removed)

    def _removal_targets(self, change: Removed) -> list[Watch]:
        tag = change.session_tag
        if tag is not None:
            return self._targets(tag)
        scope = change.scope  # clear_all: every session of its scope
        found = [w for w in self._all if scope is None or w.scope == scope]
        for t, group in self._by_tag.items():
            if _covers(scope, t):
                found += group
        return found


class Watch:
    """One watch: its replay, its buffer, its frames."""

    def __init__(
        self,
        rid: int,
        *,
        tag: str | None,
        scope: str | None,
        after_id: int | None,
        ns: Namespace | None,
        out: Outbox,
        hub: Hub,
        max_frame: int,
        ended: Callable[[Watch], None],
    ) -> None:
        self.rid = rid
        #: The stored tag followed, or None: every session in ``scope``.
        self.tag = tag
        self.scope = scope
        self.ns = ns
        self.out = out
        self.hub = hub
        self.max_frame = max_frame
        self._ended = ended
        #: The id after which a new watch loses nothing: the last message sent.
        self.last_sent = after_id
        self.replaying = after_id is not None
        self.pending: deque[tuple[list[Item], list[Removed]]] = deque()
        self.pending_bytes = 0
        self.ended = False
        self.writable = anyio.Event()
        self.task: Any = None

    # ── fed by the hub ────────────────────────────────────────────────────
    def offer(self, items: list[Item], removed: list[Removed]) -> None:
        if self.ended:
            return
        if self.replaying or self.pending or self.out.unsent() > HIGH_WATER:
            self.pending.append((items, removed))
            self.pending_bytes += sum(size for _, size in items)
            if self.pending_bytes > self.hub.buffer:
                self.hub.lagged += 1
                self.end(
                    Lagged(
                        f"this watch fell more than {self.hub.buffer} bytes behind;"
                        " watch again from last_id",
                        last_id=self.last_sent,
                    )
                )
            return
        self._send([m for m, _ in items], removed, live=True)

    def drain(self) -> None:
        """The transport has room: send what waits, and let the replay go on."""
        if self.ended or self.out.unsent() > HIGH_WATER:
            return
        self.writable.set()
        while self.pending and not self.replaying:
            items, removed = self.pending.popleft()
            self.pending_bytes -= sum(size for _, size in items)
            self._send([m for m, _ in items], removed, live=True)
            if self.ended or self.out.unsent() > HIGH_WATER:
                return

    def end(self, err: NexusError | None) -> None:
        """End it (an error frame unless ``err`` is None); idempotent."""
        if self.ended:
            return
        self.ended = True
        self.hub.remove(self)
        self.pending.clear()
        self.writable.set()
        if self.task is not None:
            self.task.cancel()
        if err is not None:
            self.out.push(p.error_reply(self.rid, err))
        self._ended(self)

    # ── frames ────────────────────────────────────────────────────────────
    def _send(
        self, msgs: list[p.Message], removed: list[Removed], *, live: bool, marker: bool = False
    ) -> None:
        last = self.last_sent
        if last is not None and msgs and msgs[0].id <= last:
            msgs = [m for m in msgs if m.id > last]  # the replay sent these already
        if not msgs and not removed and not marker:
            return
        ns = self.ns
        if ns is not None and ns.prefix:
            outer = ns.outer
            msgs = [msgspec.structs.replace(m, session_tag=outer(m.session_tag)) for m in msgs]
        gone = [self._removal(r) for r in removed]
        # Frames within the frame limit: an upper bound of each message's bytes.
        room = self.max_frame - _ENVELOPE
        start = used = 0
        for i, m in enumerate(msgs):
            size = 4 * (len(m.content) + len(m.role) + len(m.session_tag)) + _PER_MESSAGE
            if m.meta is not None:
                size += 3 * len(msgspec.json.encode(m.meta))
            if used + size > room and i > start:
                self._push(msgs[start:i], [], live)
                start, used = i, 0
            used += size
        self._push(msgs[start:], gone, live)
        if msgs:
            self.last_sent = msgs[-1].id

    def _push(self, msgs: list[p.Message], gone: list[p.Removal], live: bool) -> None:
        self.out.push(p.WatchReply(id=self.rid, messages=msgs, removed=gone, live=live))

    def _removal(self, r: Removed) -> p.Removal:
        tag = r.session_tag
        if tag is not None and self.ns is not None and self.ns.prefix:
            tag = self.ns.outer(tag)
        return p.Removal(session_tag=tag, ids=list(r.ids), before_id=r.before_id)

    # ── the replay ────────────────────────────────────────────────────────
    async def replay(self, storage: Storage) -> None:
        """Send the stored messages after ``after_id``, then what came meanwhile; live."""
        try:
            await self._replay(storage)
        except NexusError as exc:
            self.end(exc)
        except Exception:
            logger.exception("a watch's replay failed")
            self.end(Internal("the watch failed; see the daemon's log"))

    async def _replay(self, storage: Storage) -> None:
        budget = self.max_frame - _ENVELOPE
        while True:
            while self.out.unsent() > HIGH_WATER:
                self.writable = anyio.Event()
                await self.writable.wait()
            if self.ended:
                return
            after = self.last_sent
            assert after is not None
            if self.tag is not None:
                page = await storage.history(
                    self.tag, REPLAY_PAGE, before_id=None, after_id=after, budget=budget
                )
            else:
                page = await storage.feed(after, scope=self.scope, limit=REPLAY_PAGE, budget=budget)
            if self.ended:
                return
            if page.over:
                m = page.items[0]
                raise TooLarge(
                    f"message {m.id} is too big for any frame (max_frame {self.max_frame});"
                    f" watch again from after_id {m.id}"
                )
            self._send(page.items, [], live=False)
            if not page.truncated and len(page.items) < REPLAY_PAGE:
                break
        self.replaying = False
        self._send([], [], live=True, marker=True)
        self.drain()


class Watches:
    """One connection's watches."""

    def __init__(
        self,
        hub: Hub,
        out: Outbox,
        tasks: Spawner,
        storage: Storage,
        *,
        ns: Namespace | None,
        max_frame: int,
    ) -> None:
        self.hub = hub
        self.out = out
        self.tasks = tasks
        self.storage = storage
        self.ns = ns
        self.max_frame = max_frame
        self._open: dict[int, Watch] = {}

    def __bool__(self) -> bool:
        return bool(self._open)

    def start(self, req: p.Watch, *, tag: str | None) -> None:
        """Open a watch (``tag``: the stored tag, None for every session of the peer)."""
        if req.id in self._open:
            raise BadRequest(f"watch {req.id} is open on this connection already", field="id")
        if len(self._open) >= p.MAX_WATCHES:
            raise BadRequest(
                f"this connection has {p.MAX_WATCHES} watches open, the most it may;"
                " unwatch one first"
            )
        w = Watch(
            req.id,
            tag=tag,
            scope=None if self.ns is None else self.ns.scope,
            after_id=req.after_id,
            ns=self.ns,
            out=self.out,
            hub=self.hub,
            max_frame=self.max_frame,
            ended=self._forget,
        )
        self._open[req.id] = w
        self.hub.add(w)  # first: nothing committed from now on is missed
        if w.replaying:
            w.task = self.tasks.start_soon(w.replay, self.storage)
        else:
            w._send([], [], live=True, marker=True)

    def stop(self, req: p.Unwatch) -> None:
        w = self._open.get(req.watch)
        if w is None:
            raise NotFound(f"no watch {req.watch} is open on this connection", field="watch")
        w.end(None)
        self.out.push(p.UnwatchReply(id=req.id))

    def wake(self) -> None:
        """The transport wrote everything it held."""
        for w in list(self._open.values()):
            w.drain()

    def cancel(self) -> None:
        """The connection is gone: end its watches without a word."""
        for w in list(self._open.values()):
            w.end(None)

    def _forget(self, w: Watch) -> None:
        self._open.pop(w.rid, None)
