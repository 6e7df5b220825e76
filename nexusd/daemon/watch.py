"""Watches: every committed message pushed, in id order, to whoever follows its session.

* :class:`Watch`, one per ``watch`` request: registered with the
  :class:`~nexusd.daemon.hub.Hub` *before* the stored messages after
  ``after_id`` are read (the replay, paged like ``history``), so nothing
  committed meanwhile is missed; what arrives during the replay waits in the
  watch's buffer and is sent after it, without the messages the replay already
  sent (ids only grow: one writer, AUTOINCREMENT, ids handed out in commit
  order).  Then each batch is one frame, pushed as it commits.  A watch whose
  connection does not take its frames keeps them in its buffer (references to
  the shared messages, about ``watch_buffer`` bytes of them); past that it is
  ended with ``lagged``, carrying the id to resume from.  A slow watcher so
  costs the writers and the other watchers nothing: frames are written only
  while the connection's transport holds less than :data:`HIGH_WATER` unsent.
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

from ..storage.base import Removed, Storage
from ..wire import protocol as p
from ..wire.errors import BadRequest, Internal, Lagged, NexusError, NotFound, TooLarge
from .hub import PER_MESSAGE, Batch, Frame, Hub
from .outbox import Outbox
from .peers import Namespace
from .tasks import Spawner

__all__ = ["HIGH_WATER", "Watch", "Watches"]

logger = logging.getLogger(__name__)

#: Watch frames wait in their watch's buffer while the transport holds more than this.
HIGH_WATER: Final = 256 * 1024
#: Messages per replay page (and the frame limit bounds each page too).
REPLAY_PAGE: Final = 1_000
#: Room for a frame's envelope around the messages it carries.
_ENVELOPE: Final = 16 * 1024
#: A watch frame's bytes besides its one message (keys, id, flags), with room.
_SMALL_ENVELOPE: Final = 256


#: Bytes a waiting batch costs a watch besides its messages (its entry, lists).
_ENTRY: Final = 200


def _held(batch: Batch) -> int:
    """What a batch waiting in a watch's buffer counts against its limits."""
    return _ENTRY + sum(size for _, size in batch.items)


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
        self.pending: deque[tuple[Batch, list[Removed]]] = deque()
        self.pending_bytes = 0
        self.ended = False
        self.writable = anyio.Event()
        self.task: Any = None

    # ── fed by the hub ────────────────────────────────────────────────────
    def offer(self, batch: Batch, removed: list[Removed]) -> None:
        if self.ended:
            return
        if self.replaying or self.pending or self.out.unsent() > HIGH_WATER:
            self.pending.append((batch, removed))
            size = _held(batch)
            self.pending_bytes += size
            hub = self.hub
            hub.held += size
            if self.pending_bytes > hub.buffer or hub.held > hub.total:
                hub.lagged += 1
                limit = (
                    f"more than {hub.buffer} bytes behind"
                    if self.pending_bytes > hub.buffer
                    else f"behind while all watches held {hub.total} bytes (the most)"
                )
                self.end(
                    Lagged(
                        f"this watch fell {limit}; watch again from last_id", last_id=self.last_sent
                    )
                )
            return
        self._send_batch(batch, removed)

    def drain(self) -> None:
        """The transport has room: send what waits, and let the replay go on."""
        if self.ended or self.out.unsent() > HIGH_WATER:
            return
        self.writable.set()
        while self.pending and not self.replaying:
            batch, removed = self.pending.popleft()
            size = _held(batch)
            self.pending_bytes -= size
            self.hub.held -= size
            self._send_batch(batch, removed)
            if self.ended or self.out.unsent() > HIGH_WATER:
                return

    def end(self, err: NexusError | None) -> None:
        """End it (an error frame unless ``err`` is None); idempotent."""
        if self.ended:
            return
        self.ended = True
        self.hub.remove(self)
        self.hub.held -= self.pending_bytes
        self.pending_bytes = 0
        self.pending.clear()
        self.writable.set()
        if self.task is not None:
            self.task.cancel()
        if err is not None:
            self.out.push(p.error_reply(self.rid, err))
        self._ended(self)

    # ── frames ────────────────────────────────────────────────────────────
    def _send_batch(self, batch: Batch, removed: list[Removed]) -> None:
        """A live batch: as encoded once for every watch of its session when it can be."""
        items = batch.items
        last = self.last_sent
        plain = self.ns is None or not self.ns.prefix
        if (
            plain
            and items
            and (last is None or items[0][0].id > last)
            and batch.bound() < self.max_frame - _ENVELOPE
        ):
            gone = [self._removal(r) for r in removed]
            self.out.push(Frame(id=self.rid, messages=batch.raw(), removed=gone, live=True))
            self.last_sent = items[-1][0].id
            return
        self._send([m for m, _ in items], removed, live=True)

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
            size = 4 * (len(m.content) + len(m.role) + len(m.session_tag) + len(m.timestamp))
            size += PER_MESSAGE
            if m.meta is not None:
                size += 3 * len(msgspec.json.encode(m.meta))
            if size > room and len(p.encoder.encode(m)) > self.max_frame - _SMALL_ENVELOPE:
                # No frame can carry it (stored under a larger max_frame, or its
                # content and meta together): say so, with the id to go on after.
                if i > start:
                    self._push(msgs[start:i], [], live)
                    self.last_sent = msgs[i - 1].id
                err = TooLarge(
                    f"message {m.id} is too big for any frame (max_frame {self.max_frame});"
                    f" watch again from after_id {m.id} (last_id) to go on without it"
                )
                err.last_id = m.id  # carried by the error frame
                self.end(err)
                return
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
            self._send(page.items, [], live=False)  # (measures a lone oversized one)
            if self.ended:
                return
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
            # Its error frame carries that id, which ends a watch: end the open one too.
            self._open[req.id].end(None)
            raise BadRequest(
                f"watch {req.id} was open on this connection already; both are ended",
                field="id",
            )
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
