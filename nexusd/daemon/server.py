"""The daemon: owns the lock, the writer, the reader pool and the listening sockets.

:class:`Server` opens everything in order (lock → database → readers →
sockets, its own or systemd's), tells systemd it is ready, checks every peer's
credentials at accept, and shuts down in the order that loses nothing: stop
accepting, answer new requests with ``unavailable``, wait (bounded) until every
accepted request is answered, commit what the writer still holds, checkpoint
the WAL, remove the socket it created (never one systemd passed it).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

import anyio

from .._version import __version__
from ..storage.files import DbFiles, InstanceLock, LockError
from ..storage.sqlite import SQLiteStorage
from ..wire import protocol as p
from ..wire.errors import Forbidden, NexusError, Overloaded
from ..wire.paths import default_socket_path
from .backups import Snapshots
from .config import Config
from .connection import Connection
from .limits import Budget, QuietLog, tune_malloc
from .peers import Namespace, allowed, namespace_for, peer_of
from .systemd import ActivationError, Notifier, listen_fds
from .writer import Writer

logger = logging.getLogger(__name__)
#: Refused connects come in floods: one line per reason per 10 s, with a count.
_quiet = QuietLog(logger)


class StartupError(NexusError):
    """The daemon cannot start (lock held, socket in use, bad database...)."""

    code = "unavailable"


class Server:
    """One nexusd instance.  ``await server.serve()`` runs it until :meth:`request_shutdown`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        #: The storage seam (storage/base.py): opened and closed here, written
        #: through the writer, read by the handlers.
        self.storage = SQLiteStorage(
            config.db,
            max_messages=config.max_messages,
            synchronous=config.synchronous,
            wal_autocheckpoint=config.wal_autocheckpoint,
            readers=config.readers,
        )
        self.writer = Writer(self.storage, queue_size=config.queue_size, batch_max=config.batch_max)
        self.readers = self.storage
        #: The database's real files: a symlinked db keeps its WAL and the
        #: snapshots next to the file it points to, not next to the link.
        self.files = DbFiles.of(config.db)
        self.snapshots = Snapshots(
            self.storage, self.files.db.parent, max_snapshots=config.max_snapshots
        )
        self.notifier = Notifier()
        #: Bytes held for big partial frames and unsent replies, over all connections.
        self.budget = Budget(config.max_buffered)
        self.draining = False
        self.inflight = 0
        self._per_uid: collections.Counter[int] = collections.Counter()
        self.started = time.monotonic()
        self._stop = anyio.Event()
        self._idle = anyio.Event()
        self._lock: InstanceLock | None = None
        self._created_socket: Path | None = None
        self._socket_id: tuple[int, int] = (0, 0)
        self._where: list[str] = []
        self._accepted = 0
        #: Admitted connections and their peer's uid.
        self._live: dict[Connection, int] = {}
        self._reporting = anyio.CancelScope()
        self._allowed_uids = config.allowed_uids()
        self._allowed_gids = config.allowed_gids()
        self._admins = set(config.admin_uids)

    # ── public control ────────────────────────────────────────────────────
    def request_shutdown(self) -> None:
        """Begin a graceful shutdown (idempotent; safe from any task)."""
        self._stop.set()

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[Server] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Open everything, report started, serve until shutdown, then close in order."""
        try:
            activated = listen_fds()  # first: systemd's sockets must not leak to children
        except ActivationError as exc:
            raise StartupError(str(exc)) from None
        tune_malloc()  # before the first big buffer
        if not activated:  # systemd's sockets are systemd's business
            path = self.config.socket
            _check_socket_dir(path, explicit=path != default_socket_path())
            # A live daemon on that socket is refused before any database file is made.
            _clear_stale_socket(path)
        self._take_lock()
        socks: list[socket.socket] = []
        try:
            await self.storage.open()
            self.snapshots.remove_stale()
            socks = self._listen(activated)
            await self._serve(socks, task_status)
        finally:
            self._unlink_socket()
            for sock in socks:
                sock.close()
            await self.storage.close()
            self._release_lock()
            self.notifier.close()
        logger.info("nexusd stopped")

    async def _serve(self, socks: list[socket.socket], task_status: Any) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        async with anyio.create_task_group() as root:
            root.start_soon(self.writer.run)
            servers = [
                await loop.create_unix_server(
                    lambda: Connection(self), sock=sock, backlog=socket.SOMAXCONN
                )
                for sock in socks
            ]
            where = ", ".join(self._where)
            logger.info(
                "nexusd %s serving %s on %s (max_messages=%d, synchronous=%s)",
                __version__,
                cfg.db,
                where,
                cfg.max_messages,
                cfg.synchronous,
            )
            task_status.started(self)
            self.notifier.ready(f"serving on {where}")
            if self.notifier.enabled:
                root.start_soon(self._report_to_systemd)
            await self._stop.wait()
            logger.info("shutting down: draining %d request(s) in flight", self.inflight)
            self.notifier.stopping(f"draining {self.inflight} request(s)")
            self.draining = True
            for server in servers:
                server.close()  # no new connections
            self._unlink_socket()
            if self.inflight > 0:
                with anyio.move_on_after(cfg.shutdown_timeout) as waited:
                    await self._idle.wait()
                if waited.cancelled_caught:
                    logger.warning(
                        "shutdown deadline of %gs passed with %d request(s) unanswered",
                        cfg.shutdown_timeout,
                        self.inflight,
                    )
            live = list(self._live)
            for conn in live:
                conn.close()
            with anyio.move_on_after(5):
                for conn in live:
                    await conn.finished.wait()
            # No connection is left to submit: let the writer finish its queue.
            self.writer.close()
            self._reporting.cancel()

    async def _report_to_systemd(self) -> None:
        """``WATCHDOG=1`` at half the watchdog timeout, and a ``STATUS=`` line.

        Sent by a task of the event loop itself: when the loop stalls, the
        pings stop and systemd restarts the service.
        """
        interval = self.notifier.watchdog_interval
        period = min(interval, 5.0) if interval else 5.0
        with self._reporting:
            while True:
                if interval:
                    self.notifier.watchdog()
                self.notifier.status(
                    f"{self.connections} connection(s), {self.writer.stats.rows} rows committed, "
                    f"queue depth {self.writer.queue_depth}"
                )
                await anyio.sleep(period)

    # ── accounting used by connections ────────────────────────────────────
    def admit(
        self, sock: socket.socket, conn: Connection
    ) -> tuple[NexusError | None, Namespace | None]:
        """Decide on a new connection: a refusal to send, or its tag namespace."""
        cfg = self.config
        if self.connections >= cfg.max_connections:
            _quiet.warning(
                "full", "refused a connection: max_connections (%d) reached", cfg.max_connections
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
        if self._per_uid[peer.uid] >= cfg.max_connections_per_uid:
            _quiet.warning(
                f"uid{peer.uid}",
                "refused a connection of uid %d: max_connections_per_uid (%d) reached",
                peer.uid,
                cfg.max_connections_per_uid,
            )
            return Overloaded("too many connections from this uid", retry_after=1.0), None
        self._accepted += 1
        self._live[conn] = peer.uid
        self._per_uid[peer.uid] += 1
        return None, namespace_for(peer, isolate=self.config.isolate_peers, admin_uids=self._admins)

    @property
    def connections(self) -> int:
        """Connections admitted and not yet gone."""
        return len(self._live)

    def forget(self, conn: Connection) -> None:
        """An admitted connection ended; the replies it was owed can no longer go out."""
        uid = self._live.pop(conn, None)
        if uid is not None:
            self._per_uid[uid] -= 1
            if not self._per_uid[uid]:
                del self._per_uid[uid]
        if conn.outstanding:
            self.replied(conn.outstanding)
            conn.outstanding = 0

    def replied(self, n: int) -> None:
        self.inflight -= n
        if self.draining and self.inflight <= 0:
            self._idle.set()

    def hello(self, request_id: int) -> p.HelloReply:
        cfg = self.config
        return p.HelloReply(
            id=request_id,
            version=p.PROTOCOL_VERSION,
            server=f"nexusd/{__version__}",
            limits={
                "max_frame": cfg.max_frame,
                "max_content": cfg.max_content,
                "max_role_chars": p.MAX_ROLE_CHARS,
                "max_session_chars": p.MAX_SESSION_CHARS,
                "max_history_limit": p.MAX_HISTORY_LIMIT,
                "max_inflight": cfg.max_inflight,
                "max_messages": cfg.max_messages,
                "max_meta": cfg.max_meta,
                "max_connections": cfg.max_connections,
                "max_connections_per_uid": cfg.max_connections_per_uid,
                "max_snapshots": cfg.max_snapshots,
            },
        )

    def stats(self) -> dict[str, Any]:
        out = self.writer.snapshot()
        out.update(
            connections=self.connections,
            connections_accepted=self._accepted,
            requests_in_flight=self.inflight,
            buffered_bytes=self.budget.used,
            buffered_peak=self.budget.peak,
            buffered_max=self.budget.total,
            buffered_waiting=self.budget.waiting,
            uptime_s=round(time.monotonic() - self.started, 3),
            db_bytes=self.files.bytes_on_disk(),
            max_messages=self.config.max_messages,
            synchronous=self.config.synchronous,
            version=__version__,
        )
        return out

    # ── sockets ───────────────────────────────────────────────────────────
    def _listen(self, activated: list[tuple[socket.socket, str]]) -> list[socket.socket]:
        if activated:
            # Socket activation: serve what systemd passed, and never unlink it.
            for sock, name in activated:
                sock.setblocking(False)
                self._where.append(f"{sock.getsockname() or name} (from systemd)")
            return [sock for sock, _ in activated]
        path = self.config.socket  # its directory was checked at start-up
        _clear_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            self._created_socket = path
            st = os.lstat(path)
            self._socket_id = (st.st_dev, st.st_ino)
            os.chmod(path, self.config.socket_mode)
            gid = self.config.socket_gid()
            if gid is not None:
                os.chown(path, -1, gid)
            sock.listen(socket.SOMAXCONN)
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        sock.setblocking(False)
        self._where.append(str(path))
        return [sock]

    def _unlink_socket(self) -> None:
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

    # ── single instance ───────────────────────────────────────────────────
    def _take_lock(self) -> None:
        # Keyed on the database file itself (resolved path and inode): a
        # second daemon reaching it through a symlink or a hard link is
        # refused, and every OS error becomes one clear line.
        lock = InstanceLock(self.config.db)
        try:
            lock.acquire()
        except LockError as exc:
            raise StartupError(exc.message) from None
        self._lock = lock
        if lock.unclean_pid is not None:
            logger.warning(
                "the previous nexusd (pid %s) on %s did not stop cleanly (killed or crashed);"
                " SQLite recovers every committed write from the WAL",
                lock.unclean_pid,
                lock.files.db,
            )

    def _release_lock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()


def _check_socket_dir(path: Path, *, explicit: bool) -> None:
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


def _clear_stale_socket(path: Path) -> None:
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
