"""A watch's own connection for :class:`~nexusd.client.AsyncClient`: frames out, replies in.

A watch (:mod:`nexusd.client.watch_async`, written once and generated into
``watch_sync.py``) reads one long stream of frames that all carry the same
request id, so it does not share the client's pipelined link: it has a
connection of its own, read by whoever iterates.  This module is that
connection on every backend anyio supports (asyncio and trio); its blocking
twin, :mod:`nexusd.client.stream_sync`, offers the same names
(:class:`AsyncFrameStream` as ``FrameStream``, :func:`sleep`).

No task of its own: the iterating task receives.  anyio's stream keeps what
a cancelled ``receive`` had not returned yet, but a receive cancelled while
asyncio's reader callback runs can race it (anyio issue 1267, see
``transport_async.py``), so the watch never reuses a stream a cancellation
went through: it closes it and watches again from its last id (lossless).
"""

from __future__ import annotations

import os
from typing import Any

import anyio
from anyio.abc import SocketAttribute, SocketStream

from ..wire.errors import ConnectionLost, NexusError, Timeout
from .connect import check_server, connect_error
from .replies import RECV_BYTES, ReplyReader

__all__ = ["AsyncFrameStream", "sleep"]

sleep = anyio.sleep


class AsyncFrameStream:
    """One connection to the daemon read one reply at a time (see the module doc)."""

    __slots__ = ("_reader", "_ready", "_stream")

    def __init__(self, stream: SocketStream) -> None:
        self._stream = stream
        self._reader = ReplyReader()
        self._ready: list[Any] = []

    @classmethod
    async def open(cls, path: os.PathLike[str] | str, trusted: frozenset[int]) -> AsyncFrameStream:
        """A new connection to ``path``, once its server's uid is known to be ``trusted``."""
        return cls(await connect_checked(path, trusted))

    async def send(self, frame: bytes, timeout: float | None) -> None:
        """Send one frame (``timeout`` None: no bound)."""
        try:
            with anyio.fail_after(timeout):
                await self._stream.send(frame)
        except TimeoutError:  # before OSError: it is one too
            raise Timeout(f"nexusd did not take a request within {timeout}s") from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise ConnectionLost(f"connection to nexusd lost while sending: {exc}") from None

    async def receive(self, timeout: float | None) -> Any:
        """The next reply, error replies included (``timeout`` None: wait without bound).

        Raises :class:`ConnectionLost` when the connection ends or carries
        bytes that are not a reply, :class:`Timeout` when nothing came in time.
        """
        if self._ready:
            return self._ready.pop(0)
        try:
            with anyio.fail_after(timeout):
                while not self._ready:
                    chunk = await self._stream.receive(RECV_BYTES)
                    self._ready = self._reader.feed(chunk)
        except NexusError:  # bytes that are not a reply (first: ConnectionLost is an OSError)
            raise
        except TimeoutError:  # before OSError: it is one too
            raise Timeout(f"no reply from nexusd within {timeout}s") from None
        except anyio.EndOfStream:
            raise ConnectionLost("nexusd closed the connection") from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise ConnectionLost(f"connection to nexusd lost: {exc}") from None
        return self._ready.pop(0)

    async def aclose(self) -> None:
        """Close the connection (idempotent), even from a cancelled task."""
        with anyio.CancelScope(shield=True):
            await self._stream.aclose()


async def connect_checked(path: os.PathLike[str] | str, trusted: frozenset[int]) -> SocketStream:
    """An anyio stream connected to ``path`` whose server's uid is ``trusted`` (the
    AnyioLink's and the watches' streams both connect here)."""
    try:
        stream = await anyio.connect_unix(path)
    except OSError as exc:
        raise connect_error(path, exc) from None
    try:
        check_server(stream.extra(SocketAttribute.raw_socket), path, trusted)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await stream.aclose()
        raise
    return stream
