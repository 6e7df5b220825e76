"""The daemon's lifecycle: it owns the storage, the writer and the sockets.

:class:`Server` opens everything in order (socket checks → storage, which
takes its single-instance lock first → sockets, its own or systemd's), tells
systemd it is ready, and shuts down in the order that loses nothing: stop
accepting, answer new requests with ``unavailable``, wait (bounded) until
every accepted request is answered, commit what the writer still holds, close
the storage (the SQLite backend checkpoints its WAL and releases its lock),
remove the socket it created (never one systemd passed it).

Storage is reached only through the seam (:class:`~nexusd.storage.base.Storage`):
the one place that knows the backends is :func:`make_storage`, which builds
:class:`~nexusd.storage.sqlite.SQLiteStorage` at ``db``, or, when ``storage``
is a ``postgresql://`` URL, :class:`~nexusd.storage.postgres.backend.PostgresStorage`
(imported only then: SQLite users never load psycopg).  Its files, its lock,
the size of its data and where backup snapshots go are the backend's to
answer.  The URL is only ever shown redacted (no password): in the log, in
errors, in ``stats``.

It builds the narrow values the rest of the daemon works with and hands each
part only what it uses: connections get a :class:`~.context.Context`
(limits, memory budget, in-flight count, admission, the writer's submit
functions, the handlers' :class:`~.handlers.Services`, and the task group
their tasks run in); nothing below it ever sees the server.

Concurrency: everything runs on one asyncio event loop (aiosqlite needs
asyncio), driven through anyio.  Every task lives in the root task group
opened in :meth:`Server._serve` (the writer, the systemd reporter, and the
connections' queries and backlogs); events are anyio's (asyncio futures
remain only where the memory budget hands out grants, see
:mod:`.limits`).  The only threads are the storage's and the backup
readers': :mod:`nexusd.storage.sqlite` says why each exists.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel

from .._version import __version__
from ..storage.base import Storage
from ..storage.postgres import dsn
from ..storage.sqlite import SQLiteStorage
from ..wire import protocol as p
from ..wire.durations import format_duration
from ..wire.errors import NexusError, Unavailable
from ..wire.paths import default_socket_path
from .admission import Admission
from .backups import Snapshots
from .binding import Services
from .config import Config
from .connection import Connection
from .context import Context
from .hub import Hub
from .limits import Budget, InFlight, Limits, tune_malloc
from .sockets import Listener, StartupError, check_socket_dir, clear_stale_socket
from .sweeper import Sweeper
from .systemd import ActivationError, Notifier, listen_fds
from .tasks import Spawner
from .writer import Writer

__all__ = ["Server", "StartupError", "make_storage"]

logger = logging.getLogger(__name__)


def make_storage(config: Config) -> Storage:
    """The backend ``config.storage`` chooses ("": SQLite at ``db``), not yet opened.

    Raises :class:`~nexusd.storage.postgres.dsn.MissingDriver` (one line naming
    the extra) when the URL needs psycopg and it is not installed.
    """
    if not config.storage:
        return SQLiteStorage(
            config.db,
            max_messages=config.max_messages,
            synchronous=config.synchronous,
            wal_autocheckpoint=config.wal_autocheckpoint,
            readers=config.readers,
            search=config.search,
            max_age=config.max_age_seconds,
        )
    dsn.require_driver()  # before the import, which would fail on psycopg with a traceback
    from ..storage.postgres.backend import PostgresStorage

    # With PostgreSQL, db says only where backup snapshots are written (its
    # directory, as with SQLite); synchronous and wal_autocheckpoint are
    # SQLite's (the server's synchronous_commit decides durability).
    return PostgresStorage(
        config.storage,
        max_messages=config.max_messages,
        max_age=config.max_age_seconds,
        readers=config.readers,
        search=config.search,
        snapshot_dir=Path(os.path.abspath(config.db)).parent,
    )


def where(config: Config) -> str:
    """Where the messages are, for the log and ``stats``: the file, or the URL redacted."""
    return dsn.redact(config.storage) if config.storage else str(config.db)


class Server:
    """One nexusd instance.  ``await server.serve()`` runs it until :meth:`request_shutdown`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        #: The storage seam (storage/base.py): opened and closed here, written
        #: through the writer, read by the handlers; chosen by make_storage.
        self.storage: Storage = make_storage(config)
        self.writer = Writer(self.storage, queue_size=config.queue_size, batch_max=config.batch_max)
        #: Every open watch; storage tells it each commit.
        self.hub = Hub(buffer=config.watch_buffer, total=config.max_buffered)
        self.storage.on_commit = self.hub.publish
        self.storage.on_gap = self.hub.interrupt
        #: Deletes what clear and retention hid, and what aged, between batches.
        self.sweeper = Sweeper(self.storage)
        self.readers = self.storage
        self.snapshots = Snapshots(
            self.storage, self.storage.snapshot_dir, max_snapshots=config.max_snapshots
        )
        self.notifier = Notifier()
        #: Bytes held for big partial frames and unsent replies, over all connections.
        self.budget = Budget(config.max_buffered)
        #: Requests taken and not yet answered, over all connections.
        self.inflight = InFlight()
        self.admission = Admission(
            max_connections=config.max_connections,
            max_connections_per_uid=config.max_connections_per_uid,
            allowed_uids=config.allowed_uids(),
            allowed_gids=config.allowed_gids(),
            admin_uids=config.admin_uids,
            isolate_peers=config.isolate_peers,
        )
        self.listener = Listener(config.socket, mode=config.socket_mode, gid=config.socket_gid())
        self.limits = Limits(
            max_frame=config.max_frame,
            max_content=config.max_content,
            max_meta=config.max_meta,
            max_inflight=config.max_inflight,
            enqueue_timeout=config.enqueue_timeout,
            frame_timeout=config.frame_timeout,
            idle_timeout=config.idle_timeout,
        )
        self.started = time.monotonic()
        self._stop = anyio.Event()
        self._reporting = anyio.CancelScope()
        self._indexing = anyio.CancelScope()
        self._following = anyio.CancelScope()

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
            check_socket_dir(path, explicit=path != default_socket_path())
            # A live daemon on that socket is refused before any database file is made.
            clear_stale_socket(path)
        socks: list[socket.socket] = []
        try:
            await self._open_storage()
            self.snapshots.remove_stale()
            socks = self.listener.listen(activated)
            await self._serve(socks, task_status)
        finally:
            self.listener.unlink()
            for sock in socks:
                sock.close()
            await self.storage.close()  # also after a failed open: it does what is left
            self.notifier.close()
        logger.info("nexusd stopped")

    def _context(self, tasks: anyio.abc.TaskGroup) -> Context:
        """What the connections get of the daemon."""
        services = Services(
            limits=self.limits,
            readers=self.readers,
            snapshots=self.snapshots,
            hello=self.hello,
            stats=self.stats,
            hub=self.hub,
            searches=anyio.Semaphore(max(1, self.config.readers - 1)),
        )
        return Context(
            limits=self.limits,
            budget=self.budget,
            inflight=self.inflight,
            gate=self.admission,
            services=services,
            submit_nowait=self.writer.submit_nowait,
            submit=self.writer.submit,
            tasks=Spawner(tasks),
        )

    async def _serve(self, socks: list[socket.socket], task_status: Any) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        async with anyio.create_task_group() as root:
            root.start_soon(self.writer.run)
            ctx = self._context(root)
            servers = [
                await loop.create_unix_server(
                    lambda: Connection(ctx), sock=sock, backlog=socket.SOMAXCONN
                )
                for sock in socks
            ]
            listening = ", ".join(self.listener.where)
            logger.info(
                "nexusd %s serving %s on %s (max_messages=%d, max_age=%s%s)",
                __version__,
                where(cfg),
                listening,
                cfg.max_messages,
                format_duration(cfg.max_age_seconds),
                "" if cfg.storage else f", synchronous={cfg.synchronous}",
            )
            task_status.started(self)
            self.notifier.ready(f"serving on {listening}")
            root.start_soon(self._build_search_index)
            root.start_soon(self._follow_commits)
            root.start_soon(self.sweeper.run)
            if self.notifier.enabled:
                root.start_soon(self._report_to_systemd)
            await self._stop.wait()
            await self._drain(servers)
            # No connection is left to submit: let the writer finish its queue.
            self.writer.close()
            self._reporting.cancel()
            self._indexing.cancel()
            self._following.cancel()
            self.sweeper.stop()

    async def _build_search_index(self) -> None:
        """Index older rows (a database from before search) while serving; stopped by a stop."""
        with self._indexing:
            await self.storage.build_search_index()

    async def _follow_commits(self) -> None:
        """Other daemons' commits to this one's watches (shared storage); stopped by a stop."""
        with self._following:
            await self.storage.follow_commits()

    async def _drain(self, servers: list[asyncio.Server]) -> None:
        """Refuse new work, wait (bounded) for the answers owed, close every connection."""
        cfg = self.config
        inflight = self.inflight
        logger.info("shutting down: draining %d request(s) in flight", inflight.count)
        self.notifier.stopping(f"draining {inflight.count} request(s)")
        inflight.drain()
        for server in servers:
            server.close()  # no new connections
        self.listener.unlink()
        if inflight.count > 0:
            with anyio.move_on_after(cfg.shutdown_timeout) as waited:
                await inflight.wait_idle()
            if waited.cancelled_caught:
                logger.warning(
                    "shutdown deadline of %gs passed with %d request(s) unanswered",
                    cfg.shutdown_timeout,
                    inflight.count,
                )
        # Watches end with a word (clients resume from their last id elsewhere or
        # later); one turn of the loop hands those frames to the transports.
        self.hub.close(Unavailable("nexusd is shutting down"))
        await anyio.lowlevel.checkpoint()
        live = self.admission.live()
        for conn in live:
            conn.close()
        with anyio.move_on_after(5):
            for conn in live:
                await conn.finished.wait()

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
                    f"{self.admission.connections} connection(s),"
                    f" {self.writer.stats.rows} rows committed,"
                    f" queue depth {self.writer.queue_depth}"
                )
                await anyio.sleep(period)

    # ── what the handlers answer for the daemon ───────────────────────────
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
        admission = self.admission
        out.update(
            connections=admission.connections,
            connections_accepted=admission.accepted,
            requests_in_flight=self.inflight.count,
            buffered_bytes=self.budget.used,
            buffered_peak=self.budget.peak,
            buffered_max=self.budget.total,
            buffered_waiting=self.budget.waiting,
            uptime_s=round(time.monotonic() - self.started, 3),
            db_bytes=self.storage.size_bytes(),
            max_messages=self.config.max_messages,
            max_age_s=self.config.max_age_seconds,
            # SQLite's setting; with PostgreSQL the server's synchronous_commit decides.
            synchronous=None if self.config.storage else self.config.synchronous,
            storage=where(self.config),
            search=self.storage.search_status,
            watches=self.hub.count,
            watches_lagged=self.hub.lagged,
            version=__version__,
        )
        return out

    # ── storage ───────────────────────────────────────────────────────────
    async def _open_storage(self) -> None:
        # Storage refuses a second daemon on the same data first thing (before
        # creating any file of it), and says why in one line: every refusal or
        # failure of open() is the daemon's start-up error, with that line.
        try:
            await self.storage.open()
        except NexusError as exc:
            raise StartupError(exc.message) from None
