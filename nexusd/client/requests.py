"""What the clients send and how they read the answers, without any I/O.

:class:`~nexusd.client.Client` and :class:`~nexusd.client.AsyncClient` are
twins that differ only in how bytes move; everything they share lives here:
building requests (with idempotency keys), checking replies, continuing
history pages the server cut short, and deciding which calls are safe to retry
after the connection dropped.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import re
import secrets
import socket
import stat
import struct
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

from ..wire import protocol as p
from ..wire.errors import (
    STORAGE_LOST,
    BadRequest,
    ConnectionLost,
    DaemonNotRunning,
    Forbidden,
    NexusError,
    Overloaded,
    TooLarge,
    Unavailable,
)
from ..wire.protocol import Message

logger = logging.getLogger(__name__)

R = TypeVar("R")

#: An ``append_many`` item: ``(role, content)`` or a mapping with ``role``,
#: ``content`` and optionally ``timestamp``, ``meta``, ``idempotency_key``.
MessageInput = tuple[str, str] | Mapping[str, Any]

#: Backup progress callback: ``progress(bytes_done, bytes_total)``.
Progress = Callable[[int, int], None]

CLIENT_NAME: Final = "nexusd-python"
RECV_BYTES: Final = 256 * 1024
#: Replies are bounded by the server's frame limit; accept anything sane.
CLIENT_MAX_FRAME: Final = 64 * 1024 * 1024
#: Errors after which a retry may succeed (the request was not applied, or it
#: carries an idempotency key that makes applying it twice harmless).
RETRY_ON: Final = (ConnectionLost, DaemonNotRunning, Unavailable, Overloaded)
_READS: Final = (p.Ping, p.Hello, p.History, p.Count, p.Sessions, p.Stats)
FIRST_BACKOFF: Final = 0.05
MAX_BACKOFF: Final = 1.0


#: Frames up to this size are sent without checking the server's max_frame
#: (every server accepts at least this much), so small calls cost nothing extra.
SMALL_FRAME: Final = 64 * 1024
#: The user the system service runs as (systemd/nexusd.service).
SERVICE_USER: Final = "nexusd"
TRUSTED_UIDS_ENV: Final = "NEXUSD_TRUSTED_UIDS"
_UCRED: Final = struct.Struct("3i")


#: Where a library user points a client at another socket; the CLI names ``--socket``.
LIBRARY_HINT: Final = "NEXUSD_SOCKET / socket_path"
#: The longest socket path AF_UNIX takes portably (``sun_path`` is 108 bytes with its NUL).
MAX_SOCKET_PATH: Final = 107
#: The longest per-call timeout a client takes (one day); None means no bound.
#: Far beyond any answer, and far below what the OS timers overflow at (~1e10 s).
MAX_TIMEOUT: Final = 86_400


def check_timeout(timeout: object) -> float | None:
    """``timeout`` if None or seconds in (0, :data:`MAX_TIMEOUT`]; else :class:`BadRequest`."""
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout <= MAX_TIMEOUT
    ):
        raise BadRequest(
            f"timeout must be None (no bound) or a number of seconds > 0 and at most "
            f"{MAX_TIMEOUT} (one day), not {timeout!r}",
            field="timeout",
        )
    return timeout


def check_retry_for(retry_for: object) -> float:
    """``retry_for``: seconds in [0, :data:`MAX_TIMEOUT`] (0: never retry); else BadRequest."""
    if (
        isinstance(retry_for, bool)
        or not isinstance(retry_for, int | float)
        or not 0 <= retry_for <= MAX_TIMEOUT
    ):
        raise BadRequest(
            f"retry_for must be a number of seconds from 0 (no retries) to {MAX_TIMEOUT},"
            f" not {retry_for!r}",
            field="retry_for",
        )
    return float(retry_for)


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


class Unreachable(DaemonNotRunning):
    """:class:`DaemonNotRunning` that keeps where and why, so each caller words its own hint.

    ``start`` says whether starting the daemon could help: not when the path
    names something that is not a socket.
    """

    def __init__(self, path: os.PathLike[str] | str, why: str, *, start: bool = True) -> None:
        self.path = str(path)
        self.why = why
        self.start = start
        super().__init__(self.explain(LIBRARY_HINT))

    def explain(self, option: str) -> str:
        """The message, telling the user to point ``option`` at the right socket."""
        if self.start:
            return (
                f"cannot reach nexusd at {self.path} ({self.why}). Start the daemon with "
                f"`nexusd serve` (or `systemctl --user start nexusd`), or point {option} at it."
            )
        return f"cannot reach nexusd: {self.why}; point {option} at the daemon's socket."


def unreachable(path: os.PathLike[str] | str, why: str) -> DaemonNotRunning:
    return Unreachable(path, why)


def socket_path_problem(path: os.PathLike[str] | str) -> str | None:
    """What makes ``path`` unusable as a socket path before trying it, else None.

    Worded to follow the name of wherever the path came from.
    """
    raw = os.fsencode(path)
    if not raw:
        return "must not be empty"
    if len(raw) > MAX_SOCKET_PATH:
        return (
            f"is {len(raw)} bytes long; a Unix socket path can be at most {MAX_SOCKET_PATH} "
            "bytes (use a shorter directory)"
        )
    return None


def check_socket_path(path: os.PathLike[str] | str | None) -> None:
    """Refuse an explicit socket path no connection could use (:class:`BadRequest`)."""
    if path is None:
        return
    problem = socket_path_problem(path)
    if problem is not None:
        raise BadRequest(f"socket_path {problem}", field="socket_path")


def _not_a_socket(path: os.PathLike[str] | str, exc: OSError) -> str | None:
    """Why ``path`` cannot be a socket when something else is in the way, else None."""
    p_ = Path(path)
    if exc.errno == errno.ENOTDIR:  # a component of the path is a file
        for parent in p_.parents:
            if parent.exists() and not parent.is_dir():
                return f"{parent} is not a directory"
        return None
    try:
        mode = os.stat(p_).st_mode
    except OSError:
        return None
    if stat.S_ISSOCK(mode):
        return None
    if stat.S_ISDIR(mode):
        return f"{path} is not a socket (it is a directory)"
    if stat.S_ISREG(mode):
        return f"{path} is not a socket (it is a regular file)"
    return f"{path} is not a socket"


def connect_error(path: os.PathLike[str] | str, exc: OSError) -> NexusError:
    """The error for a failed connect: "permission denied" is not "not running"."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        try:
            st = os.stat(path)
            whose = f" (owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"
        except OSError:
            whose = ""
        return Forbidden(
            f"permission denied: you may not open nexusd's socket at {path}{whose}. "
            "Ask its owner to let you in (socket_group / allow_uids), or use your own daemon."
        )
    wrong = _not_a_socket(path, exc)
    if wrong is not None:
        return Unreachable(path, wrong, start=False)
    return unreachable(path, exc.strerror or str(exc))


# ── who may answer us ────────────────────────────────────────────────────────
def trusted_uids(extra: Iterable[int] | None = None) -> frozenset[int]:
    """Uids a client accepts as the daemon: its own, root, the service user, and more.

    Root covers socket activation (systemd owns the listening socket); the
    service user is the system service's.  ``extra`` and ``$NEXUSD_TRUSTED_UIDS``
    (comma-separated uids) add others.
    """
    uids = {os.getuid(), 0}
    try:
        import pwd

        uids.add(pwd.getpwnam(SERVICE_USER).pw_uid)
    except (ImportError, KeyError):
        pass
    uids.update(extra or ())
    raw = os.environ.get(TRUSTED_UIDS_ENV, "")
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        if not item.isdigit():
            raise BadRequest(
                f"{TRUSTED_UIDS_ENV} must list uids separated by commas, not {raw!r}",
                field=TRUSTED_UIDS_ENV,
            )
        uids.add(int(item))
    return frozenset(uids)


def server_uid(sock: Any) -> int:
    """The uid of the process that listens at the other end (``SO_PEERCRED``)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return int(_UCRED.unpack(raw)[1])


def check_server(sock: Any, path: os.PathLike[str] | str, trusted: frozenset[int]) -> None:
    """Refuse to talk to a socket served by an untrusted uid (nothing is sent before).

    Anyone able to create the socket's directory first (``/tmp/nexusd-<uid>``
    without ``XDG_RUNTIME_DIR``) could otherwise serve a fake daemon and read
    every message.
    """
    try:
        uid = server_uid(sock)
    except OSError as exc:
        raise Forbidden(f"cannot tell who serves {path} ({exc.strerror}); refusing") from None
    if uid not in trusted:
        raise Forbidden(
            f"refusing to talk to {path}: it is served by uid {uid}, which is not trusted "
            f"(trusted: {', '.join(str(u) for u in sorted(trusted))}). If that daemon is "
            f"yours, add its uid to {TRUSTED_UIDS_ENV} or trusted_uids=."
        )


def frame_limit(hello: p.HelloReply) -> int:
    """The daemon's frame limit (no limit when it states none)."""
    return hello.limits.get("max_frame", sys.maxsize)


def check_frame(size: int, max_frame: int) -> None:
    """Refuse locally a request the daemon would reject by closing the connection."""
    if size > max_frame:
        raise TooLarge(
            f"the request is {size} bytes, over the daemon's frame limit of {max_frame} "
            "bytes (max_frame); send less at once"
        )


#: Request fields whose argument has another name in the Python API.
_ARGUMENT: Final = {"idem_key": "idempotency_key"}
_UNSUPPORTED = re.compile(r"Encoding objects of type (\S+) is unsupported")


def encode(req: Any) -> bytes:
    """``req`` as a MessagePack body; what cannot be encoded is the caller's :class:`BadRequest`.

    Both clients encode through here, so an int out of range or a value JSON
    cannot hold (in ``meta``) never surfaces as msgspec's own exception.
    """
    try:
        return p.encoder.encode(req)
    except (OverflowError, TypeError, ValueError) as exc:
        field = _culprit(req)
        what = _why_unencodable(exc)
        if field is None:
            raise BadRequest(f"the request cannot be sent: {what}") from None
        raise BadRequest(f"{field} cannot be sent: {what}", field=field) from None


def _culprit(req: Any) -> str | None:
    """The argument (``before_id``, ``messages[3].meta``) whose value cannot be encoded."""
    for name in req.__struct_fields__:
        value = getattr(req, name)
        try:
            p.encoder.encode(value)
        except (OverflowError, TypeError, ValueError):
            if name == "messages" and isinstance(value, list):
                for i, item in enumerate(value):
                    inner = _culprit(item)
                    if inner is not None:
                        return f"messages[{i}].{inner}"
            return _ARGUMENT.get(str(name), str(name))
    return None


def _why_unencodable(exc: Exception) -> str:
    if isinstance(exc, UnicodeEncodeError) and isinstance(exc.object, str):
        # json.loads turns "\\ud800" into one; so does surrogateescape on bytes.
        bad = ord(exc.object[exc.start])
        return f"it holds a lone surrogate (U+{bad:04X}), which is not Unicode text"
    if isinstance(exc, OverflowError):
        return "an integer is out of range (at most 64 bits)"
    m = _UNSUPPORTED.match(str(exc))
    if m is not None:
        return (
            f"it holds a value of type {m.group(1)}; only str, int, float, bool, None, "
            "lists and dicts with str keys can be sent"
        )
    return str(exc)


class KeyMaker:
    """Idempotency keys: a random per-client prefix and a counter (cheap, unique).

    22 characters: every key is stored and indexed with its row, so short keys
    are measurably faster (29-character keys cost ~7% of batched throughput).
    """

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = secrets.token_urlsafe(9)  # 72 random bits in 12 characters
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        # Fixed width, so keys sort in the order they are made: the daemon's
        # key index then grows at one end instead of everywhere.
        return f"{self._prefix}{next(self._counter):010x}"


def _meta(meta: Any, field: str) -> dict[str, Any] | None:
    if meta is None:
        return None
    # dict() would take a list of pairs, or fail with Python's wording on a string.
    if not isinstance(meta, Mapping):
        raise BadRequest(f"{field} must be a mapping (a dict)", field=field)
    return dict(meta)


def append_request(
    keys: KeyMaker | None,
    role: str,
    content: str,
    timestamp: str | None,
    session_tag: str,
    meta: Mapping[str, Any] | None,
    idempotency_key: str | None,
) -> p.Append:
    key = idempotency_key if idempotency_key is not None else (keys() if keys else None)
    return p.Append(
        id=0,
        role=role,
        content=content,
        session_tag=session_tag,
        timestamp=timestamp,
        meta=_meta(meta, "meta"),
        idem_key=key,
    )


def append_many_request(
    keys: KeyMaker | None, messages: Iterable[MessageInput], session_tag: str
) -> p.AppendMany:
    items: list[p.NewMessage] = []
    for item in messages:
        # Tuples are the common case: test for them first (isinstance(Mapping) is slow).
        if type(item) is not tuple and isinstance(item, Mapping):
            items.append(_new_message(keys, item, len(items)))
        else:
            try:
                if isinstance(item, str | bytes):
                    raise ValueError  # "ab" would unpack into role "a", content "b"
                role, content = item
            except (TypeError, ValueError):
                where = f"messages[{len(items)}]"
                raise BadRequest(
                    f"{where} must be a (role, content) pair or a mapping, not "
                    f"{type(item).__name__}",
                    field=where,
                ) from None
            items.append(
                p.NewMessage(role=role, content=content, idem_key=keys() if keys else None)
            )
    return p.AppendMany(id=0, messages=items, session_tag=session_tag)


def _new_message(keys: KeyMaker | None, item: Mapping[str, Any], index: int) -> p.NewMessage:
    where = f"messages[{index}]"
    missing = [k for k in ("role", "content") if k not in item]
    if missing:
        raise BadRequest(f"{where} has no {' and no '.join(missing)}", field=where)
    key = item.get("idempotency_key")
    return p.NewMessage(
        role=item["role"],
        content=item["content"],
        timestamp=item.get("timestamp"),
        meta=_meta(item.get("meta"), f"{where}.meta"),
        idem_key=key if key is not None else (keys() if keys else None),
    )


def history_request(
    session_tag: str, limit: int, before_id: int | None, after_id: int | None
) -> p.History:
    return p.History(
        id=0, session_tag=session_tag, limit=limit, before_id=before_id, after_id=after_id
    )


def worth_retrying(req: Any, err: NexusError) -> bool:
    """Whether ``req`` may be sent again after ``err`` (one of :data:`RETRY_ON`)."""
    if isinstance(err, Unavailable) and err.field == STORAGE_LOST:
        return False  # the daemon lost its database: only a restart helps
    return retryable(req)


def retryable(req: Any) -> bool:
    """Whether sending ``req`` again cannot store or delete anything twice."""
    if isinstance(req, _READS):
        return True
    if type(req) is p.Append:
        return req.idem_key is not None
    if type(req) is p.AppendMany:
        return all(m.idem_key is not None for m in req.messages)
    return False  # pop / clear / clear_all: a second run would remove more


def backoff(err: NexusError, previous: float) -> float:
    """Seconds to wait before the next try."""
    if isinstance(err, Overloaded):
        return max(err.retry_after, FIRST_BACKOFF)
    return min(previous * 2, MAX_BACKOFF) if previous else FIRST_BACKOFF


def expect(reply: Any, kind: type[R]) -> R:
    """``reply`` as ``kind``, or raise the error it carries."""
    if type(reply) is kind:
        return reply
    if isinstance(reply, p.ErrorReply):
        p.raise_for_error(reply)
    raise NexusError(f"unexpected reply {type(reply).__name__} to a {kind.__name__[:-5]} request")


def next_page(first: p.History, got: list[Message], page: p.HistoryReply) -> p.History | None:
    """The request continuing a history page the server cut short, else None."""
    if not page.truncated or not page.messages or len(got) >= first.limit:
        return None
    rest = first.limit - len(got)
    if first.after_id is None:  # paging back from the newest: continue below the oldest seen
        return history_request(first.session_tag, rest, page.messages[0].id, None)
    return history_request(first.session_tag, rest, first.before_id, page.messages[-1].id)


def merge(first: p.History, got: list[Message], page: list[Message]) -> list[Message]:
    """Join a continued page to what came before, keeping oldest-first order."""
    return page + got if first.after_id is None else got + page


def backup_chunk(hello: p.HelloReply) -> int:
    """The largest backup chunk whose reply fits the server's frame limit."""
    return max(4096, min(p.MAX_BACKUP_CHUNK, hello.limits.get("max_frame", 0) - 4096))


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
            st = os.stat(self.dest)  # follows symlinks; hard links share the inode
        except FileNotFoundError:
            return
        except OSError as exc:
            raise BadRequest(f"cannot use {self.dest}: {exc.strerror}", field="dest") from None
        if (st.st_dev, st.st_ino) in live:
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
