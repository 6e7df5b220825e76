"""Who may connect: connection limits, peer credentials, per-uid counts, namespaces.

:class:`Admission` decides on each accepted connection before it may send a
request: the total and per-uid connection limits, the kernel's credentials of
the peer against ``allow_uids``/``allow_gids``, and the tag namespace the peer
gets (``isolate_peers``).  It keeps the connections it admitted (with their
peer's uid) until they end, so the counts derive from one record, and
shutdown finds every live connection there.  Refusals come in floods: they
are logged at most once per reason per 10 s, with a count.
"""

from __future__ import annotations

import collections
import logging
import socket
from collections.abc import Iterable

from ..wire.errors import Forbidden, NexusError, Overloaded
from .context import Closable
from .limits import QuietLog
from .peers import Namespace, allowed, namespace_for, peer_of

__all__ = ["Admission"]

logger = logging.getLogger(__name__)
_quiet = QuietLog(logger)


class Admission:
    """Decides on each new connection (admit), and keeps it until it ends (forget)."""

    def __init__(
        self,
        *,
        max_connections: int,
        max_connections_per_uid: int,
        allowed_uids: Iterable[int],
        allowed_gids: Iterable[int],
        admin_uids: Iterable[int],
        isolate_peers: bool,
    ) -> None:
        self.max_connections = max_connections
        self.max_connections_per_uid = max_connections_per_uid
        self._allowed_uids = set(allowed_uids)
        self._allowed_gids = set(allowed_gids)
        self._admins = set(admin_uids)
        self._isolate = isolate_peers
        #: Connections admitted since start.
        self.accepted = 0
        #: Admitted connections and their peer's uid.
        self._live: dict[Closable, int] = {}
        self._per_uid: collections.Counter[int] = collections.Counter()

    @property
    def connections(self) -> int:
        """Connections admitted and not yet gone."""
        return len(self._live)

    def live(self) -> list[Closable]:
        """The connections admitted and not yet gone."""
        return list(self._live)

    def admit(
        self, sock: socket.socket, conn: Closable
    ) -> tuple[NexusError | None, Namespace | None]:
        """Decide on a new connection: a refusal to send, or its tag namespace."""
        if self.connections >= self.max_connections:
            _quiet.warning(
                "full", "refused a connection: max_connections (%d) reached", self.max_connections
            )
            return Overloaded("too many connections", retry_after=1.0), None
        try:
            peer = peer_of(sock)
        except OSError as exc:
            _quiet.warning("creds", "cannot read peer credentials (%s); refusing", exc)
            return Forbidden("peer credentials unavailable"), None
        if not allowed(peer, self._allowed_uids, self._allowed_gids):
            _quiet.warning(
                "forbidden",
                "refused pid %d (uid %d, gid %d): not in allow_uids / allow_gids",
                peer.pid,
                peer.uid,
                peer.gid,
            )
            return Forbidden(f"uid {peer.uid} may not use this daemon"), None
        if self._per_uid[peer.uid] >= self.max_connections_per_uid:
            _quiet.warning(
                f"uid{peer.uid}",
                "refused a connection of uid %d: max_connections_per_uid (%d) reached",
                peer.uid,
                self.max_connections_per_uid,
            )
            return Overloaded("too many connections from this uid", retry_after=1.0), None
        self.accepted += 1
        self._live[conn] = peer.uid
        self._per_uid[peer.uid] += 1
        return None, namespace_for(peer, isolate=self._isolate, admin_uids=self._admins)

    def forget(self, conn: Closable) -> None:
        """An admitted connection ended."""
        uid = self._live.pop(conn, None)
        if uid is not None:
            self._per_uid[uid] -= 1
            if not self._per_uid[uid]:
                del self._per_uid[uid]
