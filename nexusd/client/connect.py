"""Reaching the daemon: is the socket path usable, why did connect fail, who serves it.

Both clients' transports call :func:`connect_error` when ``connect`` fails (so
"permission denied" and "not a socket" are not reported as "not running") and
:func:`check_server` on every new connection before sending one byte.  No I/O
of their own beyond ``stat`` and ``getsockopt``.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from ..wire.errors import BadRequest, DaemonNotRunning, Forbidden, NexusError
from ..wire.local import peer_cred
from ..wire.paths import MAX_SOCKET_PATH, socket_path_problem

__all__ = [
    "LIBRARY_HINT",
    "MAX_SOCKET_PATH",
    "SERVICE_USER",
    "TRUSTED_UIDS_ENV",
    "Unreachable",
    "check_server",
    "check_socket_path",
    "connect_error",
    "socket_path_problem",
    "trusted_uids",
]

#: Where a library user points a client at another socket; the CLI names ``--socket``.
LIBRARY_HINT: Final = "NEXUSD_SOCKET / socket_path"
#: The user the system service runs as (systemd/nexusd.service).
SERVICE_USER: Final = "nexusd"
TRUSTED_UIDS_ENV: Final = "NEXUSD_TRUSTED_UIDS"


class Unreachable(DaemonNotRunning):
    """:class:`DaemonNotRunning` that keeps where and why, so each caller words its own hint.

    ``start`` says whether starting the daemon could help: not when the path
    names something that is not a socket.
    """

    def __init__(self, path: os.PathLike[str] | str, why: str, *, start: bool = True) -> None:
        self.path = str(path)
        self.why = why
        self.start = start
        super().__init__(self.explain(LIBRARY_HINT))

    def explain(self, option: str) -> str:
        """The message, telling the user to point ``option`` at the right socket."""
        if self.start:
            return (
                f"cannot reach nexusd at {self.path} ({self.why}). Start the daemon with "
                f"`nexusd serve` (or `systemctl --user start nexusd`), or point {option} at it."
            )
        return f"cannot reach nexusd: {self.why}; point {option} at the daemon's socket."


def check_socket_path(path: os.PathLike[str] | str | None) -> None:
    """Refuse an explicit socket path no connection could use (:class:`BadRequest`)."""
    if path is None:
        return
    problem = socket_path_problem(path)
    if problem is not None:
        raise BadRequest(f"socket_path {problem}", field="socket_path")


def _not_a_socket(path: os.PathLike[str] | str, exc: OSError) -> str | None:
    """Why ``path`` cannot be a socket when something else is in the way, else None."""
    p_ = Path(path)
    if exc.errno == errno.ENOTDIR:  # a component of the path is a file
        for parent in p_.parents:
            if parent.exists() and not parent.is_dir():
                return f"{parent} is not a directory"
        return None
    try:
        mode = os.stat(p_).st_mode
    except OSError:
        return None
    if stat.S_ISSOCK(mode):
        return None
    if stat.S_ISDIR(mode):
        return f"{path} is not a socket (it is a directory)"
    if stat.S_ISREG(mode):
        return f"{path} is not a socket (it is a regular file)"
    return f"{path} is not a socket"


def connect_error(path: os.PathLike[str] | str, exc: OSError) -> NexusError:
    """The error for a failed connect: "permission denied" is not "not running"."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        try:
            st = os.stat(path)
            whose = f" (owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"
        except OSError:
            whose = ""
        return Forbidden(
            f"permission denied: you may not open nexusd's socket at {path}{whose}. "
            "Ask its owner to let you in (socket_group / allow_uids), or use your own daemon."
        )
    wrong = _not_a_socket(path, exc)
    if wrong is not None:
        return Unreachable(path, wrong, start=False)
    return Unreachable(path, exc.strerror or str(exc))


# ── who may answer us ────────────────────────────────────────────────────────
def trusted_uids(extra: Iterable[int] | None = None) -> frozenset[int]:
    """Uids a client accepts as the daemon: its own, root, the service user, and more.

    Root covers socket activation (systemd owns the listening socket); the
    service user is the system service's.  ``extra`` and ``$NEXUSD_TRUSTED_UIDS``
    (comma-separated uids) add others.
    """
    uids = {os.getuid(), 0}
    try:
        import pwd

        uids.add(pwd.getpwnam(SERVICE_USER).pw_uid)
    except (ImportError, KeyError):
        pass
    uids.update(extra or ())
    raw = os.environ.get(TRUSTED_UIDS_ENV, "")
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        if not item.isdigit():
            raise BadRequest(
                f"{TRUSTED_UIDS_ENV} must list uids separated by commas, not {raw!r}",
                field=TRUSTED_UIDS_ENV,
            )
        uids.add(int(item))
    return frozenset(uids)


def check_server(
    sock: socket.socket, path: os.PathLike[str] | str, trusted: frozenset[int]
) -> None:
    """Refuse to talk to a socket served by an untrusted uid (nothing is sent before).

    Anyone able to create the socket's directory first (``/tmp/nexusd-<uid>``
    without ``XDG_RUNTIME_DIR``) could otherwise serve a fake daemon and read
    every message.
    """
    try:
        _, uid, _ = peer_cred(sock)
    except OSError as exc:
        raise Forbidden(f"cannot tell who serves {path} ({exc.strerror}); refusing") from None
    if uid not in trusted:
        raise Forbidden(
            f"refusing to talk to {path}: it is served by uid {uid}, which is not trusted "
            f"(trusted: {', '.join(str(u) for u in sorted(trusted))}). If that daemon is "
            f"yours, add its uid to {TRUSTED_UIDS_ENV} or trusted_uids=."
        )
