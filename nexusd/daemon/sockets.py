"""The listening sockets: the daemon's own Unix socket file, or the ones systemd passed.

:class:`Listener` binds the socket file (mode and group as configured),
remembers which file it created so it removes only that one at shutdown (never
a file written over it meanwhile, never a socket systemd passed), and says
where it listens.  Before anything is created, :func:`check_socket_dir`
refuses a directory where another user could replace the socket, and
:func:`clear_stale_socket` removes a dead daemon's socket but refuses to steal
a live one.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from pathlib import Path

from ..wire.errors import NexusError

__all__ = ["Listener", "StartupError", "check_socket_dir", "clear_stale_socket"]

logger = logging.getLogger(__name__)


class StartupError(NexusError):
    """The daemon cannot start (lock held, socket in use, bad database...)."""

    code = "unavailable"


class Listener:
    """The sockets one daemon serves, and the socket file it must remove at the end."""

    def __init__(self, path: Path, *, mode: int, gid: int | None) -> None:
        self.path = path
        self._mode = mode
        self._gid = gid
        #: Where the daemon listens, for the log and systemd's status.
        self.where: list[str] = []
        self._created_socket: Path | None = None
        self._socket_id: tuple[int, int] = (0, 0)

    def listen(self, activated: list[tuple[socket.socket, str]]) -> list[socket.socket]:
        if activated:
            # Socket activation: serve what systemd passed, and never unlink it.
            for sock, name in activated:
                sock.setblocking(False)
                self.where.append(f"{sock.getsockname() or name} (from systemd)")
            return [sock for sock, _ in activated]
        path = self.path  # its directory was checked at start-up
        clear_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            self._created_socket = path
            st = os.lstat(path)
            self._socket_id = (st.st_dev, st.st_ino)
            os.chmod(path, self._mode)
            gid = self._gid
            if gid is not None:
                os.chown(path, -1, gid)
            sock.listen(socket.SOMAXCONN)
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        sock.setblocking(False)
        self.where.append(str(path))
        return [sock]

    def unlink(self) -> None:
        path, self._created_socket = self._created_socket, None
        if path is None:
            return
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) != self._socket_id:
            # Something else took the name since (a file written over it):
            # it is not ours to delete.
            logger.warning("%s is no longer our socket; leaving it in place", path)
            return
        path.unlink(missing_ok=True)


def check_socket_dir(path: Path, *, explicit: bool) -> None:
    """Refuse a socket directory where another user could replace our socket.

    It must be ours and writable by nobody else.  The one exception is a
    root-owned sticky directory (/tmp, /run-like) the user named explicitly:
    there the sticky bit stops others from removing or renaming our socket.
    The default ``/tmp/nexusd-<uid>`` is created 0700; found existing, it must
    be a real directory (not a symlink) that passes the same test.
    """
    parent = path.parent
    uid = os.geteuid()
    if not os.path.lexists(parent):
        try:
            parent.mkdir(parents=True, mode=0o700)
        except OSError as exc:
            raise StartupError(
                f"cannot create socket directory {parent}: {exc.strerror or exc}"
            ) from None
    try:
        st = os.stat(parent) if explicit else os.lstat(parent)
    except OSError as exc:
        raise StartupError(f"cannot inspect socket directory {parent}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise StartupError(
            f"socket directory {parent} is {kind}; remove it or choose another --socket"
        )
    others_write = st.st_mode & 0o022
    if st.st_uid == uid and not others_write:
        return
    if explicit and st.st_uid == 0 and st.st_mode & stat.S_ISVTX:
        return
    if st.st_uid != uid:
        why = f"is owned by uid {st.st_uid}, not by us (uid {uid})"
    else:
        why = f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    raise StartupError(
        f"socket directory {parent} {why}: another user could replace the socket; "
        f"remove it, or make it ours with mode 0700, or choose another --socket"
    )


def clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead daemon; refuse to steal a live one."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
    if st.st_uid != os.geteuid():
        raise StartupError(
            f"{path} belongs to uid {st.st_uid}, not to us; refusing to remove or use it"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        logger.info("removing stale socket %s", path)
        path.unlink(missing_ok=True)
        return
    except OSError as exc:
        raise StartupError(f"cannot probe existing socket {path}: {exc}") from None
    finally:
        probe.close()
    raise StartupError(f"another nexusd is already listening on {path}")
