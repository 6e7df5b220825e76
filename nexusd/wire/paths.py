"""Where nexusd keeps its database and socket by default.

A leaf module shared by the daemon's configuration and the clients, so both
resolve the same default socket and zero configuration works on one machine:
systemd's directories first (``$STATE_DIRECTORY``, ``$RUNTIME_DIRECTORY``),
then XDG, then a private directory under /tmp.

Defaults are computed only when asked for: the database's may need a home
directory (``$HOME`` or the passwd entry), which a service uid may not have;
it is then :class:`NoHomeDirectory`, and only when no path was given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from .errors import BadRequest

__all__ = [
    "MAX_SOCKET_PATH",
    "SYSTEM_SOCKET",
    "NoHomeDirectory",
    "default_db_path",
    "default_socket_path",
    "resolve_socket_path",
    "socket_path_problem",
]

#: Where the system service's socket unit listens.
SYSTEM_SOCKET = Path("/run/nexusd.sock")


class NoHomeDirectory(BadRequest):
    """The default database path is needed and there is no home directory to put it in."""

    def __init__(self) -> None:
        super().__init__(
            "cannot find a home directory for the default database; give --db (or NEXUSD_DB) "
            "or set XDG_STATE_HOME",
            field="db",
        )


def default_db_path(env: Mapping[str, str] | None = None) -> Path:
    """``$STATE_DIRECTORY/nexus.db``, else ``$XDG_STATE_HOME/nexusd/nexus.db``.

    Else ``~/.local/state/nexusd/nexus.db``, the home directory being ``$HOME``
    or the uid's passwd entry; :class:`NoHomeDirectory` when there is neither.
    """
    env = os.environ if env is None else env
    if env.get("STATE_DIRECTORY"):
        # systemd may pass several, colon-separated: the first is ours.
        return Path(env["STATE_DIRECTORY"].split(":")[0]) / "nexus.db"
    base = env.get("XDG_STATE_HOME") or str(_home(env) / ".local" / "state")
    return Path(base) / "nexusd" / "nexus.db"


def _home(env: Mapping[str, str]) -> Path:
    """``$HOME``, else the passwd entry's directory (as ``Path.home``, minus its RuntimeError)."""
    if env.get("HOME"):
        return Path(env["HOME"])
    try:
        import pwd

        home = pwd.getpwuid(os.getuid()).pw_dir
    except (ImportError, KeyError):
        home = ""
    if not home:
        raise NoHomeDirectory()
    return Path(home)


def default_socket_path(env: Mapping[str, str] | None = None) -> Path:
    """``$RUNTIME_DIRECTORY``, else ``$XDG_RUNTIME_DIR``, else ``/tmp/nexusd-<uid>``."""
    env = os.environ if env is None else env
    if env.get("RUNTIME_DIRECTORY"):
        return Path(env["RUNTIME_DIRECTORY"].split(":")[0]) / "nexusd.sock"
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "nexusd.sock"
    return Path(f"/tmp/nexusd-{os.getuid()}") / "nexusd.sock"


def resolve_socket_path(
    explicit: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Path:
    """What clients connect to.

    The explicit path, else ``$NEXUSD_SOCKET``, else the per-user default when
    a daemon listens there, else the system service's ``/run/nexusd.sock``
    when it exists, else the per-user default (for the error message).
    """
    env = os.environ if env is None else env
    if explicit is not None:
        return Path(explicit)
    if env.get("NEXUSD_SOCKET"):
        return Path(env["NEXUSD_SOCKET"])
    own = default_socket_path(env)
    # A per-user daemon wins; else the system service's socket (systemd/nexusd.socket).
    if not own.exists() and SYSTEM_SOCKET.exists():
        return SYSTEM_SOCKET
    return own


#: The longest socket path AF_UNIX takes portably (``sun_path`` is 108 bytes with its NUL).
MAX_SOCKET_PATH: Final = 107


def socket_path_problem(path: os.PathLike[str] | str) -> str | None:
    """What makes ``path`` unusable as a socket path before trying it, else None.

    Worded to follow the name of wherever the path came from.
    """
    raw = os.fsencode(path)
    if not raw:
        return "must not be empty"
    if len(raw) > MAX_SOCKET_PATH:
        return (
            f"is {len(raw)} bytes long; a Unix socket path can be at most {MAX_SOCKET_PATH} "
            "bytes (use a shorter directory)"
        )
    return None
