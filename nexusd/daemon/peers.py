"""Who is on the other end of a connection, and which session tags they see.

Peer credentials come from the kernel (``SO_PEERCRED``, plus
``SO_PEERGROUPS`` for supplementary groups), so they cannot be forged by the
client.  With ``isolate_peers`` every uid gets its own namespace of session
tags: the tags a peer sends are stored under a prefix only it maps to, so it
can neither read, count, list, pop nor clear another uid's sessions.  The
daemon's own uid keeps the plain, unprefixed tags (which is where data from
v1 lives); admin uids see and address every tag as stored.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from dataclasses import dataclass
from typing import Final

from ..storage.scope import NS_MARK
from ..wire.errors import BadRequest
from ..wire.local import peer_cred

logger = logging.getLogger(__name__)

#: Stored tags of isolated peers start with this; clients may not send it.
_SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
#: CPython's getsockopt accepts at most 1024 bytes: 256 groups.  A peer in more
#: groups (ERANGE) has them read from /proc instead.
_GROUPS_BUFLEN: Final = 1024


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def peer_of(sock: socket.socket) -> Peer:
    """The credentials of the process at the other end of a Unix socket."""
    pid, uid, gid = peer_cred(sock)
    return Peer(pid, uid, gid, _peer_groups(sock, pid))


def _peer_groups(sock: socket.socket, pid: int) -> tuple[int, ...]:
    """The peer's supplementary groups (as they were when it connected)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, _GROUPS_BUFLEN)
    except OSError as exc:
        if exc.errno == errno.ERANGE:
            return _proc_groups(pid)
        # Not silent: without them a member of an allowed group is refused.
        logger.warning("cannot read the supplementary groups of pid %d: %s", pid, exc)
        return ()
    n = len(raw) // 4
    return struct.unpack(f"{n}I", raw[: n * 4])


def _proc_groups(pid: int) -> tuple[int, ...]:
    """``Groups:`` of /proc/<pid>/status: the fallback for a peer in over 256 groups.

    Read now rather than at connect: if the process changed its groups or
    exited meanwhile the answer may differ, so this is only used when the
    kernel's own record does not fit the buffer.
    """
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except (OSError, ValueError) as exc:
        logger.warning("cannot read the groups of pid %d from /proc: %s", pid, exc)
    return ()


def allowed(peer: Peer, uids: set[int], gids: set[int]) -> bool:
    return peer.uid in uids or peer.gid in gids or any(g in gids for g in peer.groups)


@dataclass(frozen=True, slots=True)
class Namespace:
    """How one peer's tags map to stored tags.

    ``scope`` is what ``sessions`` and ``clear_all`` cover: ``None`` for every
    tag, ``""`` for the unprefixed tags only, else the tags under ``prefix``.
    """

    prefix: str
    scope: str | None

    def inner(self, tag: str, field: str = "session_tag") -> str:
        """The stored form of ``tag``; ``field``: the request key it came in (for errors)."""
        if tag.startswith(NS_MARK):
            raise BadRequest(f"{field} may not start with \\x1f", field=field)
        return self.prefix + tag

    def outer(self, stored: str) -> str:
        return stored[len(self.prefix) :]


def namespace_for(peer: Peer, *, isolate: bool, admin_uids: set[int]) -> Namespace | None:
    """The peer's namespace, or None when tags pass through unchanged."""
    if not isolate or peer.uid in admin_uids:
        return None
    if peer.uid == os.getuid():
        return Namespace(prefix="", scope="")
    prefix = f"{NS_MARK}u{peer.uid}{NS_MARK}"
    return Namespace(prefix=prefix, scope=prefix)
