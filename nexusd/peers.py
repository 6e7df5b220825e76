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

import os
import socket
import struct
from dataclasses import dataclass
from typing import Final

from .errors import BadRequest

#: Stored tags of isolated peers start with this; clients may not send it.
NS_MARK: Final = "\x1f"
_SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
_UCRED: Final = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def peer_of(sock: socket.socket) -> Peer:
    """The credentials of the process at the other end of a Unix socket."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * 1024)
        groups = tuple(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError:
        groups = ()
    return Peer(pid, uid, gid, groups)


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

    def inner(self, tag: str) -> str:
        if tag.startswith(NS_MARK):
            raise BadRequest("session tags may not start with \\x1f", field="session_tag")
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


def scope_bounds(scope: str) -> tuple[str, str]:
    """The half-open range [lo, hi) of stored tags that start with ``scope``."""
    return scope, scope[:-1] + chr(ord(scope[-1]) + 1)
