"""A watch's own connection for :class:`~nexusd.client.Client`: one blocking socket.

The blocking twin of :mod:`nexusd.client.stream_async`, with the same names
(:class:`FrameStream`, :func:`sleep`) and meaning, for the watch generated
into ``watch_sync.py``.  The socket blocks, bounded by the timeout each call
passes (None while the watch waits for what is written next, which may be
never).  :meth:`FrameStream.close` may be called from another thread: it
shuts the socket down first, which wakes a ``recv`` blocked in the iterating
thread (closing alone would not).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from ..wire.errors import ConnectionLost, NexusError, Timeout
from .connect import check_server, connect_error
from .replies import RECV_BYTES, ReplyReader

__all__ = ["FrameStream", "sleep"]

sleep = time.sleep


class FrameStream:
    """One connection to the daemon read one reply at a time (see the module doc)."""

    __slots__ = ("_inbox", "_reader", "_ready", "_sock", "_timeout")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader = ReplyReader()
        self._ready: list[Any] = []
        self._timeout: float | None = None  # what the socket is set to (connected: blocking)
        self._inbox = memoryview(bytearray(RECV_BYTES))  # reused: see transport_sync.py

    @classmethod
    def open(cls, path: os.PathLike[str] | str, trusted: frozenset[int]) -> FrameStream:
        """A new connection to ``path``, once its server's uid is known to be ``trusted``."""
        return cls(connect_checked(path, trusted))

    def _set_timeout(self, timeout: float | None) -> None:
        if timeout != self._timeout:
            self._sock.settimeout(timeout)
            self._timeout = timeout

    def send(self, frame: bytes, timeout: float | None) -> None:
        """Send one frame (``timeout`` None: no bound)."""
        try:
            self._set_timeout(timeout)
            self._sock.sendall(frame)
        except TimeoutError:  # before OSError: it is one too
            raise Timeout(f"nexusd did not take a request within {timeout}s") from None
        except OSError as exc:
            raise ConnectionLost(f"connection to nexusd lost while sending: {exc}") from None

    def receive(self, timeout: float | None) -> Any:
        """The next reply, error replies included (``timeout`` None: wait without bound).

        Raises :class:`ConnectionLost` when the connection ends or carries
        bytes that are not a reply, :class:`Timeout` when nothing came in time.
        The timeout bounds each ``recv``, not the whole reply (as the client's).
        """
        try:
            self._set_timeout(timeout)
            while not self._ready:
                n = self._sock.recv_into(self._inbox)
                if not n:
                    raise ConnectionLost("nexusd closed the connection")
                self._ready = self._reader.feed(self._inbox[:n])  # the reader copies what it keeps
        except NexusError:  # first: ConnectionLost is an OSError too
            raise
        except TimeoutError:  # before OSError: it is one too
            raise Timeout(f"no reply from nexusd within {timeout}s") from None
        except OSError as exc:
            raise ConnectionLost(f"connection to nexusd lost: {exc}") from None
        return self._ready.pop(0)

    def close(self) -> None:
        """Close the connection (idempotent), waking a ``receive`` blocked in another thread."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # not connected any more, or closed already
            pass
        self._sock.close()


def connect_checked(path: os.PathLike[str] | str, trusted: frozenset[int]) -> socket.socket:
    """A socket connected to ``path`` whose server's uid is ``trusted`` (the client's
    links and the watches' streams both connect here)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Connect blocking: a full accept backlog then waits instead of failing
    # with EAGAIN (which a socket with a timeout reports at once).
    try:
        sock.connect(str(path))
        check_server(sock, path, trusted)
    except OSError as exc:
        sock.close()
        raise connect_error(path, exc) from None
    except BaseException:
        sock.close()
        raise
    return sock
