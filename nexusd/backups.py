"""Consistent backups served over the socket.

``backup_begin`` takes a snapshot (SQLite's online backup, one read
transaction, so writers are not blocked) into a hidden file next to the
database, in the daemon's own state directory; ``backup_read`` streams it in
chunks; ``backup_end`` (or the connection closing) deletes it.  The client
process writes the destination file, so a backup works even when the daemon
is sandboxed by systemd and the destination belongs to the caller.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Final

import anyio

from .errors import NotFound, Unavailable
from .schema import snapshot

logger = logging.getLogger(__name__)

_PREFIX: Final = ".nexusd-backup-"


class Snapshots:
    """The snapshot files of one daemon."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.dir = db_path.parent
        self._files: dict[str, Path] = {}

    def remove_stale(self) -> None:
        """Delete snapshots a previous daemon left behind (it died mid-backup)."""
        for path in self.dir.glob(f"{_PREFIX}*.db"):
            logger.info("removing stale backup snapshot %s", path)
            path.unlink(missing_ok=True)

    async def begin(self) -> tuple[str, int]:
        token = secrets.token_hex(12)
        dest = self.dir / f"{_PREFIX}{token}.db"
        try:
            size = await anyio.to_thread.run_sync(snapshot, self.db_path, dest)
        except Exception as exc:
            dest.unlink(missing_ok=True)
            logger.error("backup snapshot failed: %s", exc)
            raise Unavailable(f"backup snapshot failed: {exc}") from None
        self._files[token] = dest
        logger.info("backup snapshot %s taken (%d bytes)", token, size)
        return token, size

    async def read(self, token: str, offset: int, length: int) -> tuple[bytes, bool]:
        path = self._files.get(token)
        if path is None:
            raise NotFound("no such backup in progress", field="backup")

        def read() -> tuple[bytes, bool]:
            with path.open("rb") as fh:
                fh.seek(offset)
                data = fh.read(length)
                return data, offset + len(data) >= os.fstat(fh.fileno()).st_size

        return await anyio.to_thread.run_sync(read)

    def end(self, token: str) -> None:
        path = self._files.pop(token, None)
        if path is None:
            raise NotFound("no such backup in progress", field="backup")
        path.unlink(missing_ok=True)

    def end_all(self, tokens: set[str]) -> None:
        for token in tokens:
            path = self._files.pop(token, None)
            if path is not None:
                path.unlink(missing_ok=True)
