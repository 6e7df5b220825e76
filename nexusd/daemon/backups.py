"""Consistent backups served over the socket.

``backup_begin`` has storage write a consistent snapshot
(:meth:`~nexusd.storage.base.Storage.backup`; SQLite's online backup, one read
transaction, so writers are not blocked) into a hidden file in the directory
storage names for it (:attr:`~nexusd.storage.base.Storage.snapshot_dir`; the
SQLite backend: next to the database); ``backup_read`` streams it in
chunks; ``backup_end`` (or the connection closing) deletes it.  The client
process writes the destination file, so a backup works even when the daemon
is sandboxed by systemd and the destination belongs to the caller.

Snapshots cost disk space in the state directory, next to the database the
writer needs room for, so they are bounded: one per connection, at most
``max_snapshots`` in total (``overloaded`` beyond), and none is started unless
the file system keeps a margin free after it (``unavailable`` otherwise).
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Final

import anyio

from ..storage.base import Storage
from ..wire.errors import NotFound, Overloaded, Unavailable

logger = logging.getLogger(__name__)

_PREFIX: Final = ".nexusd-backup-"
MiB: Final = 1024 * 1024
#: Free space a snapshot must leave behind: the writer (and its WAL) keeps
#: growing while the copy is held, and a full disk fails everyone's writes.
MIN_FREE_AFTER: Final = 64 * MiB
#: Snapshots one connection may hold (a client needs one at a time).
PER_OWNER: Final = 1


class Snapshots:
    """The snapshot files of one daemon, each owned by one connection, kept in ``directory``."""

    def __init__(self, storage: Storage, directory: Path, *, max_snapshots: int) -> None:
        self.storage = storage
        self.dir = directory
        self.max_snapshots = max_snapshots
        self._files: dict[str, Path] = {}
        #: Owner (a connection's dispatcher) -> its tokens, including snapshots
        #: still being taken; an owner missing here has gone away.
        self._owned: dict[object, set[str]] = {}
        #: Estimated bytes of the snapshots being taken right now.
        self._taking: dict[str, int] = {}

    @property
    def held(self) -> int:
        """Snapshots on disk or being taken."""
        return len(self._files) + len(self._taking)

    def remove_stale(self) -> None:
        """Delete snapshots a previous daemon left behind (it died mid-backup)."""
        for path in self.dir.glob(f"{_PREFIX}*.db"):
            logger.info("removing stale backup snapshot %s", path)
            path.unlink(missing_ok=True)

    def live_files(self) -> list[list[int]]:
        """``[st_dev, st_ino]`` of the files storage has open (SQLite: the database,
        its WAL, shared memory and lock files).

        The client compares its destination with these before writing, so a
        backup can never be renamed over a file the daemon has open (which
        would silently detach the daemon from the database everyone sees).
        The files are those of the resolved path (where SQLite keeps them); a
        destination that is a link to one of them has its identity anyway.
        """
        out: list[list[int]] = []
        for path in self.storage.live_files():
            try:
                st = os.stat(path)
            except OSError:
                continue
            out.append([st.st_dev, st.st_ino])
        return out

    def _check_space(self, estimate: int) -> None:
        """Refuse (``unavailable``) when the snapshot would leave too little free."""
        try:
            vfs = os.statvfs(self.dir)
        except OSError as exc:
            raise Unavailable(f"cannot check free space for a backup: {exc.strerror}") from None
        free = vfs.f_bavail * vfs.f_frsize
        pending = sum(self._taking.values())  # snapshots still growing
        need = estimate + pending + max(MIN_FREE_AFTER, estimate // 10)
        if free < need:
            logger.warning(
                "backup refused: %d bytes free in %s, a snapshot needs about %d",
                free,
                self.dir,
                need,
            )
            raise Unavailable(
                f"not enough free space for a backup snapshot in the daemon's state directory: "
                f"{free // MiB} MiB free, about {-(-need // MiB)} MiB needed"
            )

    async def begin(self, owner: object) -> tuple[str, int]:
        """Take a snapshot for ``owner``; return its token and size."""
        refused = self.storage.backup_refused
        if refused is not None:  # before the space check: no copy is made at all
            raise Unavailable(f"backup snapshot failed: {refused}")
        held = self._owned.setdefault(owner, set())
        if len(held) >= PER_OWNER:
            raise Overloaded(
                "this connection already holds a backup snapshot; end it first (backup_end)",
                retry_after=1.0,
            )
        if self.held >= self.max_snapshots:
            raise Overloaded(
                f"{self.held} backup snapshot(s) already held (max_snapshots); retry later",
                retry_after=5.0,
            )
        estimate = self.storage.size_bytes()
        self._check_space(estimate)
        token = secrets.token_hex(12)
        dest = self.dir / f"{_PREFIX}{token}.db"
        # Reserve the slot before the first await: concurrent begins see it.
        held.add(token)
        self._taking[token] = estimate
        try:
            size = await self.storage.backup(dest)  # a cancelled one leaves no file
        except BaseException as exc:
            held.discard(token)
            if isinstance(exc, Exception):
                logger.error("backup snapshot failed: %s", exc)
                raise Unavailable(f"backup snapshot failed: {exc}") from None
            raise
        finally:
            del self._taking[token]
        if self._owned.get(owner) is not held:
            # The connection went away while the snapshot was being taken.
            dest.unlink(missing_ok=True)
            raise Unavailable("the connection closed during the snapshot")
        self._files[token] = dest
        logger.info("backup snapshot %s taken (%d bytes)", token, size)
        return token, size

    async def read(self, token: str, offset: int, length: int) -> tuple[bytes, bool]:
        """``length`` bytes at ``offset``; past the end: no data and ``eof`` true."""
        path = self._files.get(token)
        if path is None:
            raise NotFound("no such backup in progress", field="backup")

        def read() -> tuple[bytes, bool]:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                # backup_end (pipelined behind this read) removed it first.
                raise NotFound("no such backup in progress", field="backup") from None
            try:
                size = os.fstat(fd).st_size
                if offset >= size:
                    return b"", True
                data = os.pread(fd, min(length, size - offset), offset)
                return data, offset + len(data) >= size
            finally:
                os.close(fd)

        return await anyio.to_thread.run_sync(read)

    def owns(self, owner: object, token: str) -> bool:
        """Whether ``token`` names a snapshot ``owner`` took (handles are per connection)."""
        return token in self._owned.get(owner, ())

    def end(self, owner: object, token: str) -> None:
        self._owned.get(owner, set()).discard(token)
        path = self._files.pop(token, None)
        if path is None:
            raise NotFound("no such backup in progress", field="backup")
        path.unlink(missing_ok=True)
        logger.info("backup snapshot %s released", token)

    def release(self, owner: object) -> None:
        """``owner`` is gone (its connection closed): delete its snapshots now."""
        for token in self._owned.pop(owner, set()):
            path = self._files.pop(token, None)
            if path is not None:
                path.unlink(missing_ok=True)
                logger.info("backup snapshot %s released: its connection closed", token)
