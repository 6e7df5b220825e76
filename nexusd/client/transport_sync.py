"""How :class:`~nexusd.client.Client` moves frames: one blocking socket, one call at a time.

The blocking client is generated from the async one, so this module offers
the names :mod:`nexusd.client.transport_async` offers, with the same meaning
(the link interface is described there): :class:`SocketLink` (as ``Link``),
:class:`Connector`, :data:`CallGate`, :data:`Lock`, :func:`sleep`,
:func:`offload`, :func:`shielded`, :data:`LINK_SURVIVES_INTERRUPTS`.

What differs is the I/O.  A call holds the client's :data:`CallGate` (a
thread lock) from first try to last retry, so threads share a client one
call at a time; the socket blocks, bounded by the call's timeout.  Nothing has
to be entered first, so a ``Client`` connects on first use, and before each
call one ``poll(0)`` notices whether the daemon closed the connection while it
sat unused (idle timeout, restart), so nothing is sent on a dead connection.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

from ..wire import protocol as p
from ..wire.errors import ConnectionLost, NexusError, Timeout
from .replies import RECV_BYTES, ReplyReader
from .stream_sync import connect_checked

__all__ = [
    "LINK_SURVIVES_INTERRUPTS",
    "CallGate",
    "Connector",
    "Link",
    "Lock",
    "SocketLink",
    "offload",
    "shielded",
    "sleep",
]

T = TypeVar("T")


class SocketLink:
    """A connected Unix socket, its reply reader, and the replies read ahead."""

    __slots__ = (
        "_inbox",
        "_poller",
        "_reader",
        "_ready",
        "_timeout",
        "broken",
        "max_frame",
        "reported",
        "sock",
    )

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.broken: NexusError | None = None
        #: Whether some caller has been told that this connection broke.
        self.reported = False
        #: The server's frame limit once learnt.
        self.max_frame: int | None = None
        self._timeout: float | None = None  # what the socket is set to (connected blocking)
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self._reader = ReplyReader()
        self._ready: list[Any] = []
        # Received into, every time: recv(n) would allocate n bytes per call, and
        # 256 KiB is past malloc's mmap threshold (an mmap, mremap and munmap
        # per call: measured +30 us of system time per round trip).
        self._inbox = memoryview(bytearray(RECV_BYTES))

    def usable(self) -> bool:
        """Whether the daemon has not closed (or begun closing) this connection.

        One zero-timeout ``poll``: usually nothing to read.  Bytes waiting
        between calls are late replies to calls that timed out (skipped as
        usual) or the daemon's parting error (id nil); EOF means it closed.
        """
        if self.broken is not None:
            return False
        try:
            while self._poller.poll(0):
                n = self.sock.recv_into(self._inbox)  # readable: returns at once
                if not n:
                    self._fail(ConnectionLost("nexusd closed the connection"))
                    return False
                self._ready += self._reader.feed(self._inbox[:n])
                for reply in self._ready:
                    if reply.id is None:
                        self._fail(p.error_for_reply(reply))
                        return False
        except NexusError as exc:  # first: ConnectionLost is an OSError too
            self._fail(exc)
            return False
        except OSError as exc:
            self._fail(ConnectionLost(f"connection to nexusd lost: {exc}"))
            return False
        return True

    def roundtrip(self, rid: int, frame: bytes, timeout: float | None) -> Any:
        """Send one frame and return its reply; on any failure the link is dropped."""
        if timeout != self._timeout:  # set once per connection unless the client's changes
            self.sock.settimeout(timeout)
            self._timeout = timeout
        try:
            self.sock.sendall(frame)
            while True:
                reply = self._next_reply()
                if reply.id == rid or reply.id is None:
                    break
                # else: a late reply to an earlier call that timed out; skip it.
        except NexusError as exc:  # not a reply, too large, or the daemon closed
            raise self._told(exc) from None  # (first: ConnectionLost is an OSError too)
        except (TimeoutError, BlockingIOError):  # BlockingIOError: a timeout of 0 (no wait)
            raise self._told(Timeout(f"no reply from nexusd within {timeout}s")) from None
        except OSError as exc:
            raise self._told(ConnectionLost(f"connection to nexusd lost: {exc}")) from None
        except BaseException:
            # Ctrl-C may land mid-frame: what is left of the stream cannot be trusted.
            self._told(ConnectionLost("the previous call was interrupted"))
            raise
        if isinstance(reply, p.ErrorReply):
            err = p.error_for_reply(reply)
            if reply.id is None:  # not tied to a request: we are being dropped
                self._told(err)
            raise err
        return reply

    def _next_reply(self) -> Any:
        while not self._ready:
            n = self.sock.recv_into(self._inbox)
            if not n:
                raise ConnectionLost("nexusd closed the connection")
            self._ready = self._reader.feed(self._inbox[:n])  # the reader copies what it keeps
        return self._ready.pop(0)

    def _fail(self, err: NexusError) -> None:
        """Mark the link broken by ``err`` and close the socket."""
        if self.broken is None:
            self.broken = err
        self.sock.close()

    def _told(self, err: NexusError) -> NexusError:
        """:meth:`_fail`, for an ``err`` the calling client is about to raise."""
        self._fail(err)
        self.reported = True
        return err

    def close(self) -> None:
        self._fail(ConnectionLost("client closed"))


#: The name the generated client uses for a link.
Link = SocketLink


class Connector:
    """Opens a :class:`~nexusd.client.Client`'s links: nothing to start, nothing to stop."""

    __slots__ = ()

    def start(self) -> None:
        return None

    def close(self) -> None:
        return None

    def open(self, path: os.PathLike[str] | str, trusted: frozenset[int]) -> SocketLink:
        """A new link to ``path``, once its server's uid is known to be ``trusted``."""
        return SocketLink(connect_checked(path, trusted))


#: One call at a time on a client's connection, from first try to last retry.
CallGate = threading.Lock
#: Serialises reconnecting (calls already hold the gate: this one is never contended).
Lock = threading.Lock

#: Ctrl-C can land anywhere, mid-frame too: the link is dropped rather than
#: used again, so an interrupted backup is released by closing the connection.
LINK_SURVIVES_INTERRUPTS: Final = False

sleep = time.sleep


def offload(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking file work (backup writes): here, in the caller's thread."""
    return fn(*args)


def shielded() -> contextlib.nullcontext[None]:
    """Nothing cancels a blocking call from outside: no shield needed."""
    return contextlib.nullcontext()
