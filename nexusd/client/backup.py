"""Where a backup lands: the destination checks and the file written, without any network I/O.

The daemon snapshots its database and streams it in chunks (``backup_begin``,
``backup_read``, ``backup_end``); both clients write the chunks through a
:class:`BackupTarget`, which checks every mistake a user can make before the
daemon is asked for anything, and never leaves ``dest`` half written.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

from ..wire import protocol as p
from ..wire.errors import BadRequest
from ..wire.local import file_id

__all__ = ["BackupTarget", "Progress", "backup_chunk", "file_kind", "foreign_link"]

logger = logging.getLogger(__name__)

#: Backup progress callback: ``progress(bytes_done, bytes_total)``.
Progress = Callable[[int, int], None]

#: Room left in a reply frame around a chunk's data.
_REPLY_OVERHEAD: Final = 4096


def file_kind(mode: int) -> str:
    """What ``mode`` (``st_mode``) is, in words: "a directory", "a fifo", ..."""
    for test, kind in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a fifo"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def backup_chunk(hello: p.HelloReply) -> int:
    """The largest backup chunk whose reply fits the server's frame limit."""
    limit = hello.limits.get("max_frame", 0)
    return max(_REPLY_OVERHEAD, min(p.MAX_BACKUP_CHUNK, limit - _REPLY_OVERHEAD))


def foreign_link(directory: Path) -> tuple[Path, int] | None:
    """The first symbolic link on the way to ``directory`` owned by neither us nor root.

    Walked as the kernel resolves it, component by component and into each
    link's target, so a link inside a link's target counts too.
    """
    trusted = (os.getuid(), 0)
    pending = list(reversed(Path(os.getcwd(), directory).parts[1:]))
    current = Path("/")
    hops = 0
    while pending:
        name = pending.pop()
        if name == "..":
            current = current.parent
            continue
        candidate = current / name
        try:
            st = os.lstat(candidate)
        except OSError:
            return None  # missing or unreadable: the caller's next checks say so
        if not stat.S_ISLNK(st.st_mode):
            current = candidate
            continue
        if st.st_uid not in trusted:
            return candidate, st.st_uid
        hops += 1
        if hops > 40:  # the kernel's ELOOP limit; mkstemp will fail with it
            return None
        target = Path(os.readlink(candidate))
        if target.is_absolute():
            current = Path("/")
            pending.extend(reversed(target.parts[1:]))
        else:
            pending.extend(reversed(target.parts))
    return None


class BackupTarget:
    """The file a backup is written to.

    The bytes go to a new temporary file in the destination's directory
    (``mkstemp``: ``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0600, so a planted
    symlink is never followed and the copy is as private as the database),
    which is fsynced, renamed over ``dest`` and the directory fsynced.  Every
    check a user can get wrong happens here, before the daemon is asked for
    anything; :meth:`discard` removes the temporary file on any failure.

    ``dest`` must be new or a regular file: the rename would replace a socket
    (the daemon's own), a fifo or a device node.  No directory on the way may
    be a symbolic link owned by another user than the caller or root: that
    user chooses where the copy lands (the rule of the kernel's
    ``protected_symlinks``, which covers only sticky directories).  Both are
    checked once, before writing; a link swapped in afterwards is not seen.
    """

    def __init__(self, dest: str | os.PathLike[str]) -> None:
        self.dest = Path(dest)
        self.dir = self.dest.parent
        try:
            mode: int | None = os.stat(self.dest).st_mode
        except OSError:  # missing, or a path problem the checks below word
            mode = None
        if mode is not None and stat.S_ISDIR(mode):
            raise BadRequest(
                f"backup destination {self.dest} is a directory; give a file name "
                f"(e.g. {self.dest / 'nexus-backup.db'})",
                field="dest",
            )
        if mode is not None and not stat.S_ISREG(mode):
            raise BadRequest(
                f"backup destination {self.dest} is {file_kind(mode)}, not a regular file; "
                "the backup would replace it. Give a new file name.",
                field="dest",
            )
        foreign = foreign_link(self.dir)
        if foreign is not None:
            link, uid = foreign
            raise BadRequest(
                f"cannot write the backup: {link} is a symbolic link owned by uid {uid} "
                f"(another user), who chooses where it leads (now {os.path.realpath(link)}); "
                "give the real directory if that is where you mean",
                field="dest",
            )
        if not self.dir.exists():
            raise BadRequest(
                f"cannot write the backup: directory {self.dir} does not exist", field="dest"
            )
        if not self.dir.is_dir():
            raise BadRequest(
                f"cannot write the backup: {self.dir} is not a directory", field="dest"
            )
        try:
            fd, name = tempfile.mkstemp(
                dir=self.dir, prefix=f".{self.dest.name}.", suffix=".partial"
            )
        except OSError as exc:
            why = "permission denied" if exc.errno in (errno.EACCES, errno.EPERM) else exc.strerror
            raise BadRequest(
                f"cannot write the backup into {self.dir}: {why}", field="dest"
            ) from None
        self.partial = Path(name)
        self._fd: int | None = fd
        self._done = False

    def refuse_live(self, files: Iterable[Iterable[int]]) -> None:
        """Refuse a destination that is one of the daemon's live files (any name for it).

        Renaming over the live database would leave the daemon writing to an
        unlinked file: every row acknowledged after that is lost at restart.
        """
        live = {tuple(f) for f in files}
        try:
            mine = file_id(self.dest)  # follows symlinks; hard links share the inode
        except OSError as exc:
            raise BadRequest(f"cannot use {self.dest}: {exc.strerror}", field="dest") from None
        if mine is not None and mine in live:
            raise BadRequest(
                f"{self.dest} is the daemon's live database (or its WAL, shared-memory or "
                "lock file); writing the backup there would destroy it. Choose another file.",
                field="dest",
            )

    def write(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def commit(self) -> None:
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.replace(self.partial, self.dest)
        self._done = True
        try:  # the rename is durable once the directory is
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        try:
            os.fsync(dfd)
        except OSError as exc:
            logger.debug("fsync of %s failed: %s", self.dir, exc)
        finally:
            os.close(dfd)

    def discard(self) -> None:
        """Remove the temporary file unless :meth:`commit` renamed it (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        if not self._done:
            self.partial.unlink(missing_ok=True)
