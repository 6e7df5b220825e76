"""The storage seam: what the daemon asks of a place that keeps messages.

The daemon's writer actor and its request handlers talk to storage only
through :class:`Storage`; :class:`~nexusd.storage.sqlite.SQLiteStorage` is the
one implementation today.  Everything here is backend-neutral: no SQL, no
connections, no pragmas, no files except where backups are written.  What
is particular to a backend (its files, its single-instance lock, where its
snapshots go) stays behind this seam: the daemon constructs a backend and
from then on knows only :class:`Storage`.
What travels across are the write ops below and the wire's own typed values
(:class:`~nexusd.wire.protocol.Message`, :class:`~nexusd.wire.protocol.SessionInfo`),
with ``meta`` already decoded.

Session tags are the *stored* tags: a peer's namespace prefix (see
:mod:`nexusd.storage.scope`) is added and removed by the daemon, never here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Generic, Protocol, TypeVar

from ..wire.protocol import Message, SearchHit, SessionInfo
from .ops import MAX_FORK_BYTES as MAX_FORK_BYTES
from .ops import MAX_FORK_MESSAGES as MAX_FORK_MESSAGES
from .ops import Added as Added
from .ops import Answer as Answer
from .ops import Change as Change
from .ops import ClearAll as ClearAll
from .ops import ClearSession as ClearSession
from .ops import Deleted as Deleted
from .ops import DeleteIds as DeleteIds
from .ops import Fork as Fork
from .ops import Forked as Forked
from .ops import Insert as Insert
from .ops import NewRow as NewRow
from .ops import Op as Op
from .ops import PopNewest as PopNewest
from .ops import Removed as Removed
from .ops import Retention as Retention
from .ops import SetRetention as SetRetention
from .ops import StoredRow as StoredRow
from .ops import WriteOp as WriteOp

__all__ = [
    "Added",
    "Answer",
    "Change",
    "ClearAll",
    "ClearSession",
    "DeleteIds",
    "Deleted",
    "Fork",
    "Forked",
    "Insert",
    "NewRow",
    "Op",
    "Page",
    "PopNewest",
    "Removed",
    "Retention",
    "SESSION_OVERHEAD",
    "SearchQuery",
    "SetRetention",
    "Storage",
    "Swept",
    "StoredRow",
    "WriteOp",
    "WriteStats",
    "keep_sessions",
    "utc_now",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a read: its items, whether more follow, whether it is one oversized item.

    ``over``: the page is a single item whose size *estimate* alone is over the
    byte budget; the caller measures its real size before sending it.
    """

    items: list[T]
    truncated: bool
    over: bool = False


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """One page of a full-text search, as the daemon asks it of a backend.

    ``text``: plain words (each must occur, in any order, case and accents
    folded), or with ``syntax`` the backend's own query language.  The
    filters narrow it (None: no narrowing); ``since``/``until`` are stored-form
    timestamps (``since`` inclusive, ``until`` exclusive).  ``scope`` as for
    :class:`ClearAll`.  Hits come best match first, or newest first with
    ``newest``; ``after`` is the (rank, id) of the previous page's last hit
    (only the id counts when ``newest``).  At most ``limit`` hits and about
    ``budget`` bytes of them.
    """

    text: str
    syntax: bool = False
    sessions: tuple[str, ...] | None = None
    role: str | None = None
    since: str | None = None
    until: str | None = None
    scope: str | None = None
    newest: bool = False
    after: tuple[float, int] | None = None
    limit: int = 20
    budget: int = 1 << 20


@dataclass(frozen=True, slots=True)
class Swept:
    """What one :meth:`Storage.sweep` step removed, whether work is left, and in how
    many seconds the next sweep is worth it (rows will be past their age, or the
    backend has upkeep of its own to do)."""

    removed: int
    more: bool
    next_in: float


@dataclass(slots=True)
class WriteStats:
    """What the writes did since open (for the ``stats`` operation)."""

    #: Transactions committed (a batch retried op by op counts each op's).
    batches: int = 0
    #: Ops committed.
    ops: int = 0
    #: Rows stored (an idempotent resend stores none).
    rows: int = 0
    #: Batches whose transaction failed.
    failed_batches: int = 0
    #: Rows deleted by retention by count.
    pruned: int = 0
    #: Rows deleted by retention by age.
    expired: int = 0
    #: Hidden rows (cleared, or over a lowered retention) removed in the background.
    swept: int = 0
    #: Commits by other programs noticed (they force a recount of sessions).
    external_writes: int = 0


#: msgpack bytes per SessionInfo map besides its two strings (keys, headers, three ints).
SESSION_OVERHEAD: Final = 128


def keep_sessions(
    rows: Sequence[Sequence[Any]], limit: int, budget: int
) -> tuple[list[Sequence[Any]], bool, bool]:
    """Every backend's cut of a ``sessions`` page: of ``rows`` (one more than
    ``limit`` asked for; ``row[5]``: the entry's strings' bytes), those that fit
    ``budget`` with :data:`SESSION_OVERHEAD` each, the first always; whether more
    follow; whether the first alone is over (then it is kept alone)."""
    kept: list[Sequence[Any]] = []
    run = 0
    for row in rows[:limit]:
        run += row[5] + SESSION_OVERHEAD
        if run > budget and kept:
            break
        kept.append(row)
    over = rows[0][5] + SESSION_OVERHEAD > budget
    return kept, len(kept) < len(rows), over


def utc_now() -> str:
    """The timestamp format nexusd writes: ISO 8601 UTC, microseconds, ``Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Storage(Protocol):
    """Where messages are kept: one batch writer, concurrent readers.

    Lifecycle: :meth:`open` once, then any number of reads and writes, then
    :meth:`close` once, after the last write was answered.

    - :meth:`open` first makes sure this process is the only daemon using the
      stored data, for as long as it stays open (the SQLite backend: an
      ``flock`` on the database file, whatever name reaches it), and refuses
      otherwise before creating or touching anything of the stored data; then
      it creates or migrates what it needs.  Any refusal or failure is raised
      as a :class:`NexusError` whose message is one line for the operator
      (the daemon reports it as its start-up error) after undoing whatever
      was done, the exclusivity released last.  A backend notices, and logs
      as a warning, that the previous daemon did not stop cleanly.
    - :meth:`close` makes everything committed durable on its own (the SQLite
      backend checkpoints its WAL), closes, and gives up exclusivity last.
      It may be called again, or after a failed :meth:`open`: it does only
      what is left to do.

    **Writes.**  :meth:`write` is called by one writer at a time (the daemon's
    writer actor), never concurrently with itself.

    - *Order.*  Ops take effect in list order; results come back in list order,
      one per op.  New rows get ids that increase in op order and across
      batches and are never reused (not after pruning, not after a clear); the
      rows of one :class:`Insert` get consecutive ids, unless an idempotent
      resend among them gets its original (older) id.
    - *Atomicity.*  Each op is all or nothing.  A batch is normally one
      transaction; retention (at most :attr:`max_messages` newest rows per
      session, 0 = unbounded) prunes every session the batch grew inside that
      same transaction, so an acknowledged row is never one just pruned by the
      commit that acknowledges it.
    - *Visibility.*  ``answer`` is called only after the commit is durable (as
      durable as the backend was configured to make it); a read that starts
      after ``answer`` ran sees every op of the batch.
    - *Failure, per op.*  A result that is a :class:`NexusError` means that op
      changed nothing.  Three cases:

      1. *This op refused, the rest committed*: ``PopNewest.refuse`` said no;
         or the batch's transaction failed and the backend retried each op
         alone, in order, and only this op failed again (``unavailable``
         "nothing was written" for a storage fault such as a full disk,
         ``internal`` for anything else the storage refused).
      2. *The whole batch failed, nothing committed*: an unexpected exception
         (a bug, not a storage fault) inside the batch: its transaction is
         rolled back and :meth:`write` raises it without calling ``answer``;
         the writer answers every op ``internal``.  (Should it happen while
         ops are retried one by one, those already retried stay committed.)
      3. *Storage lost*: after a commit the backend found its storage is no
         longer the one it opened (the SQLite backend: the database, ``-wal``
         or ``-shm`` file deleted or replaced).  Every op of that batch is
         answered ``unavailable`` with field ``storage_lost`` ("may not have
         been stored"), :attr:`storage_error` says why from then on, and every
         later batch is answered the same without being tried.

    - :meth:`write` always finishes a batch once called, even if the awaiting
      task is cancelled, and, unless it raises (case 2), calls ``answer``
      exactly once, in the event loop, before it returns (so the writer can
      answer without waking its task).

    **Reads** run concurrently with each other and with a write, on a
    committed snapshot each.  A storage fault is raised as ``unavailable``.
    """

    #: Called in the event loop when a commit left :meth:`sweep` work to do (rows
    #: hidden, a retention changed); None: nobody asks.
    on_sweep: Callable[[], None] | None
    #: Why writes are refused for good (storage lost), or None while it is sound.
    storage_error: str | None
    write_stats: WriteStats
    #: Called in the event loop, after ``answer``, with what each committed batch
    #: changed (rows stored, rows deleted), in commit order; None: nobody asks.
    #: Not called for a batch whose storage was found lost.
    on_commit: Callable[[list[Change]], None] | None

    #: Called in the event loop when commits of other daemons may have been
    #: missed (the backend lost touch with shared storage for too long); None:
    #: nobody asks.  Never called by a backend alone on its data.
    on_gap: Callable[[], None] | None

    async def open(self) -> None: ...

    async def follow_commits(self) -> None:
        """Until cancelled: hand ``on_commit`` what other daemons sharing the
        storage commit, in commit order, after (never amid) this one's own.  A
        backend alone on its data (SQLite) returns at once."""
        ...

    async def close(self) -> None: ...

    async def write(self, ops: Sequence[Op], answer: Answer) -> None:
        """Run ``ops`` as one batch (see the class doc); ``answer`` gets the results."""
        ...

    @property
    def max_messages(self) -> int:
        """Rows kept per session by default (0: unbounded); pruning is in the write transaction."""
        ...

    @property
    def max_age(self) -> float:
        """Seconds after its commit past which a message is deleted (0: never), by :meth:`sweep`."""
        ...

    def max_messages_of(self, tag: str) -> int:
        """Rows ``tag`` keeps: its own retention, else :attr:`max_messages` (0: unbounded)."""
        ...

    async def sweep(self) -> Swept:
        """One short step of removal in the background, between batches: rows that
        ``clear``, ``clear_all`` or a lowered retention hid (already invisible to
        every read), then rows past their age.  Never holds the writer long: call
        it again while ``more``."""
        ...

    async def history(
        self, tag: str, limit: int, *, before_id: int | None, after_id: int | None, budget: int
    ) -> Page[Message]:
        """Messages of ``tag``, oldest first, at most ``limit`` and about ``budget`` bytes.

        No cursor, or only ``before_id``: the newest ``limit`` (older than
        ``before_id``).  ``after_id`` (with or without ``before_id``): the
        oldest ``limit`` newer than it.  A page cut by the budget keeps the
        messages nearest the side it starts from; it is never empty while the
        range holds one (a first message over the estimate comes back alone,
        ``over``).
        """
        ...

    async def count(self, tag: str) -> int: ...

    async def feed(
        self, after_id: int, *, scope: str | None, limit: int, budget: int
    ) -> Page[Message]:
        """Messages of every session in ``scope`` (as :class:`ClearAll`) with ids above
        ``after_id``, oldest first, bounded like :meth:`history`'s ``after_id`` pages."""
        ...

    async def sessions(
        self, *, after: str | None, limit: int, budget: int, scope: str | None = None
    ) -> Page[SessionInfo]:
        """Sessions by tag after ``after``, in ``scope`` (as :class:`ClearAll`), bounded
        by ``limit`` and about ``budget`` bytes; the first always comes back."""
        ...

    #: Why this backend makes no :meth:`backup` copies (None: it does); the daemon
    #: answers ``backup`` with it before anything else.
    backup_refused: str | None

    async def backup(self, dest: Path) -> int:
        """Write a consistent copy of everything committed into the new file ``dest``;
        return its size.  Runs concurrently with writes (they are not blocked) and,
        once started, to its end; a backup that fails leaves no file behind."""
        ...

    async def search(self, query: SearchQuery) -> Page[SearchHit]:
        """One page of hits for ``query``, each with its message, a snippet with
        the matched terms' spans, and its rank (lower is better).  ``truncated``:
        more hits follow (ask again with ``after`` = the last hit's rank and id).

        Raises ``bad_request`` (field ``query``) for a query the backend's
        language refuses or one with no words, ``unavailable`` while the index
        is not ready or when search is off.
        """
        ...

    @property
    def search_status(self) -> str:
        """``"off"``, ``"building N%"`` or ``"ready"`` (for ``stats``)."""
        ...

    async def build_search_index(self) -> None:
        """Index what was stored before the index existed, without blocking writes or
        reads (returns at once when there is nothing to do); progress goes to the log."""
        ...

    def size_bytes(self) -> int:
        """About how many bytes the stored data takes: a backup's size estimate, and
        ``stats``' ``db_bytes`` (the SQLite backend: the database and its WAL)."""
        ...

    @property
    def snapshot_dir(self) -> Path:
        """Where the daemon writes :meth:`backup` copies and holds them while clients
        read them: a directory of its own, private (a copy holds everyone's messages),
        known before :meth:`open` (the SQLite backend: the resolved database's
        directory, which :meth:`open` checks is private)."""
        ...

    def live_files(self) -> list[Path]:
        """Files the backend has open, which must never be replaced while it runs."""
        ...
