"""Sans-IO framing: a 4-byte big-endian length, then that many bytes of body.

:class:`FrameDecoder` does no I/O.  Feed it whatever bytes arrived and it
returns every complete frame body in them; the server and all clients share it.
The length is checked against the limit *before* anything is buffered, so a
peer announcing a 4 GiB frame costs nothing but the error.  :attr:`expected`
tells the caller how big the frame in progress will be, so it can reserve
memory before buffering it; a big buffer is given back once its frame is out.
"""

from __future__ import annotations

import struct
import sys
from typing import Final

from .errors import TooLarge

__all__ = ["HEADER", "FrameDecoder", "encode_frame"]

HEADER: Final = struct.Struct(">I")
_HSIZE: Final = HEADER.size
#: A buffer that grew past this for one big frame is replaced once the frame is out.
_KEEP: Final = 256 * 1024


def encode_frame(body: bytes) -> bytes:
    """Prefix ``body`` with its length."""
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Incremental frame parser with a size limit.

    After :class:`~nexusd.wire.errors.TooLarge` the decoder is poisoned: the stream
    is out of sync and the caller must close the connection.
    """

    __slots__ = ("_buf", "_failed", "max_frame")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._failed = False

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame waiting for the rest."""
        return len(self._buf)

    @property
    def expected(self) -> int:
        """Announced body size of the incomplete frame (0 until its header is in)."""
        buf = self._buf
        return HEADER.unpack_from(buf)[0] if len(buf) >= _HSIZE else 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add received bytes and return the bodies of all frames now complete."""
        if self._failed:
            raise TooLarge("stream is out of sync after an oversized frame")
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        pos = 0
        end = len(buf)
        while end - pos >= _HSIZE:
            (size,) = HEADER.unpack_from(buf, pos)
            if size > self.max_frame:
                self._failed = True
                del buf[:]
                raise TooLarge(f"frame of {size} bytes exceeds the limit of {self.max_frame}")
            if end - pos - _HSIZE < size:
                break
            start = pos + _HSIZE
            with memoryview(buf) as view:  # one copy, not a slice and then a copy
                frames.append(bytes(view[start : start + size]))
            pos = start + size
        if pos:
            if sys.getsizeof(buf) > _KEEP and end - pos < _KEEP:
                # A big frame is done: do not keep its allocation for the next small ones.
                self._buf = buf[pos:]
            else:
                del buf[:pos]
        return frames
