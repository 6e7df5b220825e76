"""One connection's replies on their way out: encoded, sent together, paid for while unsent.

* Replies produced in one turn of the loop leave in one ``write``.
* A reply over the frame limit is replaced by a ``too_large`` error for its
  request: the peer's decoder would refuse the frame and lose the stream.
  One that cannot be encoded at all (a stored value MessagePack cannot carry)
  is replaced by an ``internal`` error: encoding never raises out of here, so
  no task answering a request can fail on it.
* Memory: bytes the transport could not write yet count against the daemon's
  budget (the connection's :class:`~nexusd.daemon.limits.Share`) until it has
  written them.  A big request's reservations (its frame's, its reply's) are
  handed over as :attr:`Outbox.credit` and pay for its reply's bytes, so a
  reply is never counted twice.  The transport is set with
  ``high=0, low=0``: "paused" means "bytes wait in the buffer", "resumed"
  means "all written".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final

from ..wire import protocol as p
from ..wire.codec import encode_reply
from ..wire.errors import NexusError, TooLarge
from ..wire.framing import encode_frame
from .limits import Share

__all__ = ["WRITE_HIGH_WATER", "Outbox"]

logger = logging.getLogger(__name__)

#: The transport's buffer size above which we stop reading the peer.
WRITE_HIGH_WATER: Final = 1024 * 1024


class Outbox:
    """Encodes, batches and writes one connection's replies; counts what waits unsent."""

    __slots__ = (
        "_flush_handle",
        "_flushed",
        "_loop",
        "_out",
        "_pushed",
        "charged",
        "closed",
        "credit",
        "max_frame",
        "paused",
        "share",
        "transport",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        share: Share,
        max_frame: int,
        flushed: Callable[[int], None],
    ) -> None:
        self._loop = loop
        self.share = share
        self.max_frame = max_frame
        #: Called after each write with the number of replies it carried.
        self._flushed = flushed
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._out: list[bytes] = []
        #: Of those, frames pushed (watches'), which answer no request in flight.
        self._pushed = 0
        self._flush_handle: asyncio.Handle | None = None
        #: Budget held for bytes in the transport's buffer.
        self.charged = 0
        #: Reservations of replies built, not yet written: they pay for them.
        self.credit = 0
        #: The transport holds more than WRITE_HIGH_WATER: the peer does not read.
        self.paused = False

    def error(self, request_id: int | None, err: NexusError) -> None:
        self.reply(p.error_reply(request_id, err))

    def push(self, reply: Any) -> None:
        """Send a frame that answers no request in flight (a watch's)."""
        if self.closed:
            return
        self._pushed += 1
        self.reply(reply)

    def unsent(self) -> int:
        """Bytes written to the transport and not yet taken by the peer."""
        return 0 if self.transport is None else self.transport.get_write_buffer_size()

    def reply(self, reply: Any) -> None:
        if self.closed:
            return
        try:
            body = encode_reply(reply)
        except NexusError as exc:
            logger.error("answering %s %s: %s", type(reply).__name__, reply.id, exc.message)
            body = p.encoder.encode(p.error_reply(reply.id, exc))
        if len(body) > self.max_frame:
            err = TooLarge(f"reply of {len(body)} bytes exceeds the frame limit")
            body = p.encoder.encode(p.error_reply(reply.id, err))
        self._out.append(encode_frame(body))
        if self._flush_handle is None:
            # Everything answered in this turn of the loop goes out in one write.
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        out, self._out = self._out, []
        pushed, self._pushed = self._pushed, 0
        if self.closed or self.transport is None or not out:
            return  # (a lost connection's share gave its credit back)
        transport = self.transport
        transport.write(b"".join(out) if len(out) > 1 else out[0])
        # What the peer has not taken yet counts against the budget until written.
        buffered = transport.get_write_buffer_size()
        grown = buffered - self.charged
        credit, self.credit = self.credit, 0
        if grown > credit:
            self.share.charge(grown - credit)
        elif grown < credit:
            self.share.release(credit - grown)
        self.charged = buffered
        if buffered > WRITE_HIGH_WATER:
            self.paused = True
        self._flushed(len(out) - pushed)

    def written(self) -> None:
        """The transport wrote everything it held: give its budget back."""
        charged, self.charged = self.charged, 0
        self.share.release(charged)
        self.paused = False

    def close(self) -> None:
        """The connection is gone: nothing more is sent (its share gives the budget back)."""
        self.closed = True
        self.charged = self.credit = 0
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._out.clear()
        self._pushed = 0
