"""What both sides read of the local machine: who serves or calls a socket, which file a path is.

A leaf shared by the daemon and the clients (it imports nothing of nexusd):

* :func:`peer_cred` decodes ``SO_PEERCRED``.  The daemon asks it who connected
  (:func:`nexusd.daemon.peers.peer_of`); a client asks it who serves the
  socket before sending one byte (``check_server`` in :mod:`nexusd.client.connect`).
* :func:`file_id` names a file by ``(st_dev, st_ino)``, which every name of it
  (hard links, symlinks to it) shares.  The daemon watches its live files with
  it (:mod:`nexusd.storage.files`) and sends their ids in ``backup_begin``; a
  client refuses to write a backup over any of them.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Final

__all__ = ["UCRED", "FileId", "file_id", "peer_cred"]

#: Linux ``struct ucred``: pid, uid, gid, three C ints.
UCRED: Final = struct.Struct("3i")

#: A file's identity: ``(st_dev, st_ino)``.
FileId = tuple[int, int]


def peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a connected Unix socket.

    The kernel records them at ``connect``/``listen``, so the other side cannot
    forge them.  Raises :class:`OSError` when the socket cannot say.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size)
    pid, uid, gid = UCRED.unpack(raw)
    return pid, uid, gid


def file_id(path: str | os.PathLike[str]) -> FileId | None:
    """``(st_dev, st_ino)`` of ``path`` (symlinks followed), or None when nothing is there.

    Other failures (permission denied, a file where a directory should be)
    raise :class:`OSError`: the caller words them.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino
