"""The daemon: owns the lock, the writer, the reader pool and the listening socket.

:class:`Server` opens everything in order (lock → database → readers →
socket), accepts connections into one task group, and shuts down in the order
that loses nothing: stop accepting, answer new requests with ``unavailable``,
wait (bounded) until every accepted request is answered, commit what the writer
still holds, checkpoint the WAL, remove the socket it created.
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
from anyio.abc import SocketListener, SocketStream

from . import __version__
from . import protocol as p
from .backups import Snapshots
from .config import Config
from .connection import Connection
from .errors import NexusError, Overloaded
from .framing import encode_frame
from .readers import ReaderPool
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
        self.draining = False
        self.inflight = 0
        self.connections = 0
        self.started = time.monotonic()
        self._stop = anyio.Event()
        self._idle = anyio.Event()
        self._lock_fd: int | None = None
        self._created_socket: Path | None = None
        self._accepted = 0
        self._live: set[Connection] = set()

    # ── public control ────────────────────────────────────────────────────
    def request_shutdown(self) -> None:
        """Begin a graceful shutdown (idempotent; safe from any task)."""
        self._stop.set()

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[Server] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Open everything, report started, serve until shutdown, then close in order."""
        self._take_lock()
        try:
            await self.writer.open()
            await self.readers.open()
            self.snapshots.remove_stale()
            listener = await self._listen()
            try:
                await self._serve(listener, task_status)
            finally:
                await self._close(listener)
        finally:
            await self.readers.aclose()
            await self.writer.aclose()
            self._release_lock()
        logger.info("nexusd stopped")

    async def _serve(self, listener: SocketListener, task_status: Any) -> None:
        cfg = self.config
        async with anyio.create_task_group() as root:
            root.start_soon(self.writer.run)
            async with anyio.create_task_group() as conns:
                accept_scope = anyio.CancelScope()
                conns.start_soon(self._accept_loop, listener, conns, accept_scope)
                logger.info(
                    "nexusd %s serving %s on %s (max_messages=%d, synchronous=%s)",
                    __version__,
                    cfg.db,
                    cfg.socket,
                    cfg.max_messages,
                    cfg.synchronous,
                )
                task_status.started(self)
                await self._stop.wait()
                logger.info("shutting down: draining %d request(s) in flight", self.inflight)
                self.draining = True
                # Closing the listener ends accept() without cancelling it
                # (see Connection: cancelled socket waits race on asyncio).
                await self._close(listener)
                accept_scope.cancel()
                if self.inflight:
                    with anyio.move_on_after(cfg.shutdown_timeout) as scope:
                        await self._idle.wait()
                    if scope.cancelled_caught:
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
    async def _listen(self) -> SocketListener:
        path = self.config.socket
        parent = path.parent
        if not parent.exists():
            parent.mkdir(parents=True, mode=0o700)
        _clear_stale_socket(path)
        try:
            listener = await anyio.create_unix_listener(path, mode=self.config.socket_mode)
        except OSError as exc:
            raise StartupError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        self._created_socket = path
        return listener

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
            self.connections += 1
            self._accepted += 1
            conn = Connection(self, stream)
            self._live.add(conn)
            try:
                await conn.run()
            except Exception:
                logger.exception("connection handler failed")
            finally:
                self._live.discard(conn)
                self.connections -= 1

    async def _close(self, listener: SocketListener) -> None:
        with anyio.CancelScope(shield=True):
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
