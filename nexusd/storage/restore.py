"""Putting a backup in place of the database: check it, lock the database, swap the files.

``nexusd restore`` (:mod:`nexusd.cli.restore`) is a thin wrapper over
:func:`restore`.  Everything here is about SQLite's files, so it lives in storage:

1. **The backup is checked before the database is touched**: a regular,
   non-empty SQLite file, not the database itself under any name (device and
   inode), with no changes waiting beside it in a ``-wal`` or ``-journal`` of
   its own (they are not in the file, so they would be lost).  It is copied
   into a new 0600 file in the database's directory and fsynced (the backup is
   only read).  The *copy* must hold exactly the schema nexusd makes at its
   version, no more (no trigger, view or index of another's: :mod:`.shape`),
   then pass ``nexusd check``'s ``PRAGMA integrity_check``: what is put in
   place is what was checked.  A v1 store's file (schema 0) is fine.
2. **The database is locked** with the daemon's own :class:`~.files.InstanceLock`,
   without waiting, for the whole replace: a running daemon (or another
   restore) makes it refuse, and a daemon started meanwhile is refused by the
   lock ("another nexusd (pid N) already serves ...") instead of opening a
   file that is being replaced.
3. **The previous database is kept** as ``<db>.bak``, a complete file of its
   own: its WAL, which holds the last commits of a daemon that was killed, is
   checkpointed into it first and the file switched to the rollback journal.
   One SQLite cannot open (damaged) is kept as it is, its ``-wal`` or
   ``-journal`` beside it as ``<db>.bak-wal`` or ``<db>.bak-journal``.  The
   file is kept under its new name by a hard link, so the database path never
   stops holding a whole database.
4. **Nothing of the old database stays beside the new one**: its ``-wal``,
   ``-shm`` and ``-journal`` are removed *before* the copy is renamed over the
   database (SQLite would replay an old WAL into the new file); then the
   directory is fsynced.  The copy takes the previous file's mode and owner.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..wire.local import file_id
from . import shape
from .files import DbFiles, InstanceLock, LockError
from .schema import TABLE, StorageError, describe, integrity_check

__all__ = ["BUSY_WAIT", "BadBackup", "RestoreRefused", "Restored", "restore"]

logger = logging.getLogger(__name__)

_MAGIC: Final = b"SQLite format 3\x00"
#: Files beside a database holding changes that are not in it: a WAL, a hot rollback journal.
_PENDING: Final = ("-wal", "-journal")
#: Every file SQLite keeps beside a database (``-shm`` is rebuilt from the WAL).
_BESIDE: Final = ("-wal", "-shm", "-journal")
#: Seconds the previous database may stay busy in another program before restore refuses.
BUSY_WAIT: Final = 0.5
#: Problems of a damaged backup named in the refusal (``nexusd check`` lists them all).
_SHOWN: Final = 3
#: SQLite's primary result codes for "another connection holds a lock".
_SQLITE_BUSY: Final = (5, 6)


class BadBackup(StorageError):
    """Not a backup this nexusd can restore: missing, not SQLite, another program's,
    a newer schema, changes left beside it, or the database itself."""

    code = "bad_request"


class RestoreRefused(StorageError):
    """Not restored, the database as it was: the backup is damaged, a daemon holds the
    database, another program has it open, or a file operation failed."""


@dataclass(frozen=True, slots=True)
class Restored:
    """What :func:`restore` did."""

    #: The database replaced (symlinks resolved: where SQLite keeps it).
    db: Path
    schema_version: int
    messages: int
    sessions: int
    #: There was a database at that path before (a non-empty file, or a WAL).
    previous: bool
    #: Where the previous database is now (None: there was none, or it was discarded).
    kept: Path | None
    #: Its WAL or journal kept beside it (it could not be checkpointed into it).
    kept_beside: tuple[Path, ...]
    #: The pid of a daemon that had not stopped cleanly on that database, if any.
    unclean_pid: str | None


def restore(backup: Path, db: Path, *, keep: bool = True) -> Restored:
    """Replace the database at ``db`` with a checked copy of ``backup``; see the module doc.

    Raises :class:`BadBackup` or :class:`RestoreRefused` (one line each); the
    database is then as it was.
    """
    files = DbFiles.of(db)
    src = _open_backup(backup, files)
    try:
        return _restore(src, backup, db, files, keep)
    except OSError as exc:
        raise RestoreRefused(f"not restored: {_reason(exc)}") from None
    finally:
        os.close(src)


def _open_backup(backup: Path, files: DbFiles) -> int:
    """The backup's descriptor, once it is a non-empty SQLite file other than the database.

    Opened once: every check and the copy are of the same file, whatever
    happens to its name meanwhile.
    """
    try:
        # O_NONBLOCK: a fifo must not hang the open; it is refused below.
        fd = os.open(backup, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise BadBackup(f"{backup} does not exist") from None
    except OSError as exc:
        raise BadBackup(f"cannot read {backup}: {_reason(exc)}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise BadBackup(f"{backup} is a directory, not a database file")
        if not stat.S_ISREG(st.st_mode):
            raise BadBackup(f"{backup} is not a regular file")
        if st.st_size == 0:
            raise BadBackup(f"{backup} is an empty file, not a nexusd database")
        if os.pread(fd, len(_MAGIC), 0) != _MAGIC:
            raise BadBackup(f"{backup} is not an SQLite database")
        if file_id(files.db) == (st.st_dev, st.st_ino):
            raise BadBackup(
                f"{backup} is the database itself ({files.db}); restore from a copy written"
                " by `nexusd backup`"
            )
        real = os.path.realpath(backup)  # SQLite keeps a file's WAL beside the resolved path
        for suffix in _PENDING:
            if _size(Path(real + suffix)) > 0:
                raise BadBackup(
                    f"{real}{suffix} holds changes that are not in {backup} (a copy of a live"
                    " database?); write the backup with `nexusd backup`, or open it once with"
                    " sqlite3 to fold them in"
                )
    except OSError as exc:
        os.close(fd)
        raise BadBackup(f"cannot read {backup}: {_reason(exc)}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _restore(src: int, backup: Path, db: Path, files: DbFiles, keep: bool) -> Restored:
    before = _stat(files.db)
    files.db.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = InstanceLock(db)
    try:
        lock.acquire()  # creates an empty database file when there was none
    except LockError as exc:
        raise RestoreRefused(f"not restored: {exc.message}") from None
    tmp: Path | None = None
    try:
        _remove_stale(files, os.fstat(src))
        tmp = _copy(src, files, before)
        info = _check_copy(tmp, backup)
        previous = _size(files.db) > 0 or _size(files.wal) > 0
        kept: Path | None = None
        beside: tuple[Path, ...] = ()
        if previous and keep:
            kept = Path(f"{files.db}.bak")
            beside = _keep(files, kept)
        # Before the rename: SQLite would replay the old WAL (or journal) into the new file.
        for suffix in _BESIDE:
            Path(f"{files.db}{suffix}").unlink(missing_ok=True)
        os.replace(tmp, files.db)
        tmp = None
        _fsync_dir(files.db.parent)
    except BaseException:
        if tmp is not None:
            _remove(tmp)
        if before is None and _size(files.db) == 0:
            files.db.unlink(missing_ok=True)  # the empty file the lock made
        raise
    finally:
        lock.release()
    return Restored(
        db=files.db,
        schema_version=info["schema_version"],
        messages=info["messages"],
        sessions=info["sessions"],
        previous=previous,
        kept=kept,
        kept_beside=beside,
        unclean_pid=lock.unclean_pid,
    )


def _temp_name(files: DbFiles) -> Path:
    """A new name for a file of this restore, beside the database (see :func:`_remove_stale`)."""
    return files.db.parent / f".{files.db.name}.restore-{secrets.token_hex(6)}"


def _remove_stale(files: DbFiles, source: os.stat_result) -> None:
    """Remove what a restore of this database that was killed left behind.

    Safe under the lock: no other restore of this database runs.  The backup
    itself is spared, whatever its name.
    """
    prefix = f".{files.db.name}.restore-"
    for name in os.listdir(files.db.parent):
        path = files.db.parent / name
        if name.startswith(prefix) and file_id(path) != (source.st_dev, source.st_ino):
            logger.info("removing %s, left by a restore that did not finish", path)
            _remove(path)


def _copy(src: int, files: DbFiles, before: os.stat_result | None) -> Path:
    """The backup copied into a new file beside the database, fsynced; the previous
    file's mode and owner (else 0600)."""
    tmp = _temp_name(files)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        with open(src, "rb", closefd=False) as fin, open(fd, "wb", closefd=False) as fout:
            fin.seek(0)
            shutil.copyfileobj(fin, fout, 1 << 20)
        if before is not None:
            os.fchmod(fd, stat.S_IMODE(before.st_mode))
            if (before.st_uid, before.st_gid) != (os.geteuid(), os.getegid()):
                try:  # a daemon running as a service user must still open it
                    os.fchown(fd, before.st_uid, before.st_gid)
                except PermissionError:
                    pass  # not root: then the directory, and the file, are ours anyway
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _remove(tmp)
        raise
    os.close(fd)
    return tmp


def _check_copy(tmp: Path, backup: Path) -> dict[str, int]:
    """The schema (:mod:`.shape`), then ``nexusd check``'s checks, on the copy; errors
    name the backup."""
    try:
        wrong = shape.problem(shape.read(tmp))  # first: nothing else reads it before
        if wrong is not None:
            raise BadBackup(f"{backup} {wrong}")
        problems = integrity_check(tmp)
        if problems == ["ok"]:
            info = describe(tmp)
    except StorageError as exc:  # not SQLite, another program's
        raise BadBackup(exc.message.replace(str(tmp), str(backup))) from None
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise RestoreRefused(f"{backup} is damaged ({exc}); not restored") from None
        raise BadBackup(
            f"{backup} is an SQLite database without nexusd's table ({TABLE}),"
            " not a nexusd database"
        ) from None
    except sqlite3.DatabaseError as exc:
        raise RestoreRefused(f"{backup} is damaged ({exc}); not restored") from None
    finally:
        # A read-only connection to a file in WAL mode leaves an empty -wal and -shm.
        for suffix in ("-wal", "-shm"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    if problems != ["ok"]:
        lines = [ln.strip() for row in problems for ln in row.splitlines() if ln.strip()]
        more = f"; and {len(lines) - _SHOWN} more" if len(lines) > _SHOWN else ""
        raise RestoreRefused(
            f"{backup} is damaged ({'; '.join(lines[:_SHOWN])}{more}); not restored"
            f" (`nexusd check --db {backup}` lists every problem)"
        )
    return info


def _settle(db: Path) -> bool:
    """Make the previous database one complete file: its WAL checkpointed into it,
    the rollback journal on (no ``-wal`` needed to read it); True when done.

    A hot rollback journal is rolled back by SQLite on the way.  A file SQLite
    cannot do this to (damaged, not SQLite) is left as it is: False.  One
    another program has open is refused.
    """
    try:
        conn = sqlite3.connect(db, timeout=BUSY_WAIT, isolation_level=None)
    except sqlite3.Error as exc:
        logger.info("keeping %s as it is: %s", db, exc)
        return False
    try:
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        if busy:
            raise RestoreRefused(_busy(db))
        mode = conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        if (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _SQLITE_BUSY:
            raise RestoreRefused(_busy(db)) from None
        logger.info("keeping %s as it is: %s", db, exc)
        return False
    finally:
        conn.close()
    return str(mode).lower() == "delete"


def _busy(db: Path) -> str:
    return f"not restored: {db} is open in another program (SQLite: busy); close it and try again"


def _keep(files: DbFiles, kept: Path) -> tuple[Path, ...]:
    """Give the previous database the name ``kept``, and the WAL or journal it still needs
    (when it could not be checkpointed) the names beside it; return those."""
    # An older .bak's WAL would be replayed into the file about to take its name.
    for suffix in _BESIDE:
        Path(f"{kept}{suffix}").unlink(missing_ok=True)
    # SQLite deletes a log it finds nothing usable in, even beside a database it
    # cannot read: one that is damaged is kept as it was, for recovery tools.
    logs: dict[str, Path] = {}
    try:
        for suffix in _PENDING:
            if _size(Path(f"{files.db}{suffix}")) > 0:
                logs[suffix] = _temp_name(files)
                _link(Path(f"{files.db}{suffix}"), logs[suffix], kept)
        whole = _settle(files.db)
        _link(files.db, kept, kept, via=_temp_name(files))
        beside = []
        for suffix, log in logs.items():
            if not whole and _size(log) > 0:
                dest = Path(f"{kept}{suffix}")
                _link(log, dest, kept, via=_temp_name(files))
                beside.append(dest)
        return tuple(beside)
    finally:
        for log in logs.values():
            log.unlink(missing_ok=True)


def _link(src: Path, dest: Path, kept: Path, *, via: Path | None = None) -> None:
    """``dest`` becomes another name of ``src`` (which keeps its own); ``via``: a new name
    first, renamed over ``dest``, so what was there is replaced atomically."""
    try:
        if via is None:
            os.link(src, dest)
        else:
            os.link(src, via)
            os.replace(via, dest)
    except OSError as exc:
        if via is not None:
            via.unlink(missing_ok=True)
        raise RestoreRefused(
            f"not restored: cannot keep the previous database as {kept}: {_reason(exc)}"
            " (--no-keep discards it instead)"
        ) from None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _size(path: Path) -> int:
    st = _stat(path)
    return 0 if st is None else st.st_size


def _reason(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{(exc.strerror or str(exc)).lower()}{where}"
