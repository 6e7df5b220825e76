"""The daemon: owns the lock, the writer, the reader pool and the listening sockets.

:class:`Server` opens everything in order (lock → database → readers →
sockets, its own or systemd's), tells systemd it is ready, checks every peer's
credentials at accept, and shuts down in the order that loses nothing: stop
accepting, answer new requests with ``unavailable``, wait (bounded) until every
accepted request is answered, commit what the writer still holds, checkpoint
the WAL, remove the socket it created (never one systemd passed it).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketAttribute, SocketListener, SocketStream

from . import __version__
from . import protocol as p
from .backups import Snapshots
from .config import Config
from .connection import Connection
from .errors import Forbidden, NexusError, Overloaded
from .framing import encode_frame
from .peers import allowed, namespace_for, peer_of
from .readers import ReaderPool
from .systemd import ActivationError, Notifier, listen_fds
from .writer import Writer

logger = logging.getLogger(__name__)


class StartupError(NexusError):
    """The daemon cannot start (lock held, socket in use, bad database...)."""

    code = "unavailable"


class Server:
    """One nexusd instance.  ``await server.serve()`` runs it until :meth:`request_shutdown`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.writer = Writer(
            config.db,
            max_messages=config.max_messages,
            synchronous=config.synchronous,
            queue_size=config.queue_size,
            batch_max=config.batch_max,
            commit_delay=config.commit_delay,
        )
        self.readers = ReaderPool(config.db, size=config.readers)
        self.snapshots = Snapshots(config.db)
        self.notifier = Notifier()
        self.draining = False
        self.inflight = 0
        self.connections = 0
        self.started = time.monotonic()
        self._stop = anyio.Event()
        self._idle = anyio.Event()
        self._lock_fd: int | None = None
        self._created_socket: Path | None = None
        self._where: list[str] = []
        self._accepted = 0
        self._live: set[Connection] = set()
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
        self._take_lock()
        listeners: list[SocketListener] = []
        try:
            await self.writer.open()
            await self.readers.open()
            self.snapshots.remove_stale()
            listeners = await self._listen(activated)
            await self._serve(listeners, task_status)
        finally:
            await self._close(listeners)
            await self.readers.aclose()
            await self.writer.aclose()
            self._release_lock()
            self.notifier.close()
        logger.info("nexusd stopped")

    async def _serve(self, listeners: list[SocketListener], task_status: Any) -> None:
        cfg = self.config
        async with anyio.create_task_group() as root:
            root.start_soon(self.writer.run)
            async with anyio.create_task_group() as conns:
                accept_scopes = [anyio.CancelScope() for _ in listeners]
                for listener, scope in zip(listeners, accept_scopes, strict=True):
                    conns.start_soon(self._accept_loop, listener, conns, scope)
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
                # Closing the listeners ends accept() without cancelling it
                # (see Connection: cancelled socket waits race on asyncio).
                await self._close(listeners)
                for scope in accept_scopes:
                    scope.cancel()
                if self.inflight:
                    with anyio.move_on_after(cfg.shutdown_timeout) as waited:
                        await self._idle.wait()
                    if waited.cancelled_caught:
                        logger.warning(
                            "shutdown deadline of %gs passed with %d request(s) unanswered",
                            cfg.shutdown_timeout,
                            self.inflight,
                        )
                for conn in list(self._live):
                    await conn.close_stream()
                conns.cancel_scope.cancel()  # anything still blocked (not on a socket)
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
    def replied(self, n: int) -> None:
        self.inflight -= n
        if self.draining and self.inflight <= 0:
            self._idle.set()

    def forget_outstanding(self, n: int) -> None:
        """A connection ended owing ``n`` replies that can no longer be delivered."""
        if n:
            self.replied(n)

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
            },
        )

    def stats(self) -> dict[str, Any]:
        out = self.writer.snapshot()
        out.update(
            connections=self.connections,
            connections_accepted=self._accepted,
            requests_in_flight=self.inflight,
            uptime_s=round(time.monotonic() - self.started, 3),
            db_bytes=_size(self.config.db) + _size(Path(f"{self.config.db}-wal")),
            max_messages=self.config.max_messages,
            synchronous=self.config.synchronous,
            version=__version__,
        )
        return out

    # ── sockets ───────────────────────────────────────────────────────────
    async def _listen(self, activated: list[tuple[socket.socket, str]]) -> list[SocketListener]:
        if activated:
            # Socket activation: serve what systemd passed, and never unlink it.
            listeners = []
            for sock, name in activated:
                listeners.append(await SocketListener.from_socket(sock))
                self._where.append(f"{sock.getsockname() or name} (from systemd)")
            return listeners
        path = self.config.socket
        if not path.parent.exists():
            path.parent.mkdir(parents=True, mode=0o700)
        _clear_stale_socket(path)
        try:
            listener = await anyio.create_unix_listener(path, mode=self.config.socket_mode)
        except OSError as exc:
            raise StartupError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        self._created_socket = path
        gid = self.config.socket_gid()
        if gid is not None:
            os.chown(path, -1, gid)
        self._where.append(str(path))
        return [listener]

    async def _accept_loop(
        self, listener: SocketListener, conns: anyio.abc.TaskGroup, scope: anyio.CancelScope
    ) -> None:
        with scope:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        logger.error("accept failed (%s); backing off", exc)
                        await anyio.sleep(0.1)
                        continue
                    raise
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    return
                conns.start_soon(self._handle, stream)

    async def _handle(self, stream: SocketStream) -> None:
        async with stream:
            if self.connections >= self.config.max_connections:
                await _refuse(stream, Overloaded("too many connections", retry_after=1.0))
                return
            try:
                peer = peer_of(stream.extra(SocketAttribute.raw_socket))
            except OSError as exc:
                logger.warning("cannot read peer credentials (%s); refusing", exc)
                await _refuse(stream, Forbidden("peer credentials unavailable"))
                return
            if not allowed(peer, self._allowed_uids, self._allowed_gids):
                logger.warning(
                    "refused pid %d (uid %d, gid %d): not in allow_uids / allow_gids",
                    peer.pid,
                    peer.uid,
                    peer.gid,
                )
                await _refuse(stream, Forbidden(f"uid {peer.uid} may not use this daemon"))
                return
            ns = namespace_for(peer, isolate=self.config.isolate_peers, admin_uids=self._admins)
            self.connections += 1
            self._accepted += 1
            conn = Connection(self, stream, ns)
            self._live.add(conn)
            try:
                await conn.run()
            except Exception:
                logger.exception("connection handler failed")
            finally:
                self._live.discard(conn)
                self.connections -= 1

    async def _close(self, listeners: list[SocketListener]) -> None:
        with anyio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()
        path, self._created_socket = self._created_socket, None
        if path is not None:
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    # ── single instance ───────────────────────────────────────────────────
    def _take_lock(self) -> None:
        db = self.config.db
        db.parent.mkdir(parents=True, exist_ok=True)
        lock_path = Path(f"{db}.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StartupError(
                f"another nexusd (pid {holder}) already serves {db}; stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead daemon; refuse to steal a live one."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
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


async def _refuse(stream: SocketStream, err: NexusError) -> None:
    body = p.encoder.encode(p.error_reply(None, err))
    with anyio.move_on_after(1.0):
        try:
            await stream.send(encode_frame(body))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
