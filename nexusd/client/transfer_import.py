"""Import: an import file's checked batches sent as pipelined ``append_many`` requests.

:func:`import_messages` (re-exported by :mod:`nexusd.client.transfer`, which
describes both directions) reads the lines through
:class:`~nexusd.client.transfer_rows.BatchMaker` and sends its batches on a
connection of its own, up to :data:`WINDOW` in flight: the daemon commits a
connection's writes in the order sent, and its group commit fills while the
next batch is on its way.  A reader thread takes the replies, so the sending
thread never waits on a daemon that waits for its replies to be read.
Lines are read at most :attr:`~nexusd.client.transfer_rows.Limits.max_line`
bytes at a time, so a file without newlines is a bad line, not all of memory.
"""

from __future__ import annotations

import dataclasses
import io
import os
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final

import msgspec

from ..wire import protocol as p
from ..wire.errors import ConnectionLost, NexusError, Timeout
from ..wire.framing import encode_frame
from .client_sync import Client
from .replies import expect
from .requests import encode
from .stream_sync import FrameStream
from .transfer_rows import BadLine, Batch, BatchMaker, Limits

__all__ = [
    "WINDOW",
    "ImportFailed",
    "ImportSummary",
    "TransferProgress",
    "import_messages",
    "open_source",
]

#: ``progress(bytes_done, bytes_total_or_None, messages_done)``.
TransferProgress = Callable[[int, int | None, int], None]

#: Requests of an import in flight at once: enough for the daemon to batch
#: one while the next is sent and the client parses a third.
WINDOW: Final = 4


@dataclass
class ImportSummary:
    """What an import read and stored.

    ``per_session``: target tag -> messages read for it.  ``stored``: rows
    the daemon stored now; ``present``: rows it already held (same key), so a
    second import of one file has ``stored == 0``.  ``stored_through``: the
    last line of the last batch stored before a failure (0: none).
    """

    lines: int = 0
    messages: int = 0
    batches: int = 0
    stored: int = 0
    present: int = 0
    stored_through: int = 0
    per_session: dict[str, int] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)


class ImportFailed(NexusError):
    """An import stopped: ``summary`` says what was stored before it did."""

    def __init__(self, err: NexusError, summary: ImportSummary, line: int | None) -> None:
        super().__init__(err.message, field=err.field)
        self.code = err.code
        self.cause = err
        self.summary = summary
        self.line = line


def check_arguments(what: str, client: object, stream: object) -> None:
    """TypeError, saying what to pass, for an async client or a text-mode file."""
    if not isinstance(client, Client):
        raise TypeError(
            f"{what} takes a blocking nexusd.Client, not {type(client).__name__}: from async"
            " code, run it in a worker thread (anyio.to_thread.run_sync) with a Client of its own"
        )
    if isinstance(stream, io.TextIOBase):
        raise TypeError(f"{what} takes a binary file: open it with 'rb' or 'wb', not text mode")


def import_messages(
    client: Client,
    source: BinaryIO,
    *,
    session_map: Mapping[str, str] | None = None,
    default_session: str = p.DEFAULT_SESSION,
    dry_run: bool = False,
    total: int | None = None,
    progress: TransferProgress | None = None,
    window: int = WINDOW,
    batch_rows: int | None = None,
) -> ImportSummary:
    """Store the lines of ``source`` (JSON Lines, see the module doc); return a summary.

    A line that cannot be stored raises :class:`ImportFailed` (its ``line``
    set, ``cause`` a :class:`BadLine`) once the batches sent before it are
    answered: every batch is atomic, the one holding the bad line is never
    sent, so what is stored is exactly the batches up to
    ``summary.stored_through``.  ``dry_run`` checks every line and counts
    messages per session without writing.  ``window``: requests in flight;
    ``batch_rows``: at most this many messages per request (the protocol's
    10000 by default).  ``total`` (bytes of ``source``,
    if known) is passed on to ``progress``.  A line's own ``session_tag`` goes
    through ``session_map``; a line without one goes to ``default_session`` as is.
    """
    check_arguments("import_messages", client, source)
    limits = Limits.of(client.hello())
    if batch_rows is not None:  # fewer rows per request than the protocol allows
        limits = dataclasses.replace(limits, max_batch=max(1, min(batch_rows, limits.max_batch)))
    maker = BatchMaker(limits, session_map=session_map, default_session=default_session)
    done = ImportSummary(limits=limits)
    sender = None if dry_run else _Sender(client, window, done)
    read = 0
    longest = limits.max_line
    try:
        lineno = 0
        while True:
            lineno += 1
            try:
                # Bounded: a file without newlines (/dev/zero) is refused, not slurped.
                raw = source.readline(longest + 1)
                if not raw:
                    break
                read += len(raw)
                if len(raw) > longest and not raw.endswith(b"\n"):
                    raise BadLine(
                        f"line is longer than {longest} bytes, the most a message within "
                        "the daemon's limits takes as JSON (6 x (max_content + max_meta) "
                        "+ 64 KiB)",
                        lineno,
                    )
                if not raw.strip():
                    continue
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a byte order mark some editors write: not part of the JSON
                batches = maker.add(raw, lineno)
            except BadLine as exc:
                raise _failed(sender, exc, done) from None
            except MemoryError:
                raw = b""  # let go of the line before saying so
                bad = BadLine("not enough memory to read and check this line", lineno)
                raise _failed(sender, bad, done) from None
            for batch in batches:
                _ship(sender, batch, done)
                if progress is not None:
                    progress(read, total, done.messages)
        done.lines = lineno - 1  # the last pass found the end
        last = maker.flush()
        if last is not None:
            _ship(sender, last, done)
        if sender is not None:
            sender.finish()
        if progress is not None:
            progress(read, total, done.messages)
    except NexusError as exc:
        if isinstance(exc, ImportFailed):
            raise
        raise _failed(sender, exc, done) from None
    finally:
        if sender is not None:
            sender.close()
    return done


def _ship(sender: _Sender | None, batch: Batch, done: ImportSummary) -> None:
    done.messages += len(batch.messages)
    done.batches += 1
    done.per_session[batch.session_tag] = done.per_session.get(batch.session_tag, 0) + len(
        batch.messages
    )
    if sender is not None:
        sender.send(batch)


def _failed(sender: _Sender | None, err: NexusError, done: ImportSummary) -> ImportFailed:
    """``err`` with what was stored, once the batches in flight are answered."""
    line = err.line if isinstance(err, BadLine) else None
    if sender is not None:
        try:
            sender.finish()
        except ImportFailed as earlier:  # a batch in flight failed first: that is the story
            return earlier
        except NexusError:
            pass
    return ImportFailed(err, done, line)


class _Sender:
    """Batches out on a connection of their own, up to ``window`` in flight, in order."""

    def __init__(self, client: Client, window: int, done: ImportSummary) -> None:
        self.client = client
        self.window = max(1, window)
        self.done = done
        self.timeout = client.timeout
        self.max_frame = done.limits.max_frame
        self.stream = FrameStream.open(client.socket_path, client._trusted)
        self.replies: queue.Queue[Any] = queue.Queue()
        self.inflight: dict[int, Batch] = {}
        self.last_ids: dict[str, int] = {}  # target session -> its newest id before us
        self.rid = 0
        self.contiguous = True
        self.reader = threading.Thread(target=self._read, name="nexusd-import", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            while True:
                self.replies.put(self.stream.receive(None))
        except NexusError as exc:
            self.replies.put(exc)

    def send(self, batch: Batch) -> None:
        tag = batch.session_tag
        if tag not in self.last_ids:  # before any batch of ours reaches it
            newest = self.client.get_history(tag, 1)
            self.last_ids[tag] = newest[-1].id if newest else 0
        while len(self.inflight) >= self.window:
            self._settle()
        self.rid += 1
        body = encode(msgspec.structs.replace(batch.request(), id=self.rid))
        if len(body) > self.max_frame:
            if len(batch.messages) == 1:
                raise BadLine(
                    f"this message makes a request of {len(body)} bytes, over the daemon's "
                    f"frame limit of {self.max_frame} (max_frame)",
                    batch.first_line,
                )
            half = len(batch.messages) // 2  # the size estimate was short: split it
            for part in _split(batch, half):
                self.send(part)
            return
        self.inflight[self.rid] = batch
        self.stream.send(encode_frame(body), None)

    def finish(self) -> None:
        while self.inflight:
            self._settle()

    def _next(self) -> tuple[Batch, Any]:
        try:
            reply = self.replies.get(timeout=self.timeout)
        except queue.Empty:
            raise Timeout(f"no reply from nexusd within {self.timeout}s") from None
        if isinstance(reply, NexusError):
            self.inflight.clear()
            raise reply
        batch = self.inflight.pop(reply.id, None)
        if batch is None:
            raise ConnectionLost(f"nexusd answered request {reply.id}, which was never sent")
        return batch, reply

    def _settle(self) -> None:
        batch, reply = self._next()
        if isinstance(reply, p.ErrorReply):
            self.contiguous = False
            err = p.error_for_reply(reply)
            line = _line_of(batch, err.field)
            if line is not None:
                err = BadLine(err.message, line)
            failure = ImportFailed(err, self.done, line)
            # The batches sent after it are answered too: the summary counts them.
            while self.inflight:
                try:
                    later, reply = self._next()
                except NexusError:
                    break
                if not isinstance(reply, p.ErrorReply):
                    self._account(later, reply)
            raise failure
        self._account(batch, reply)
        if self.contiguous:
            self.done.stored_through = batch.last_line

    def _account(self, batch: Batch, reply: Any) -> None:
        ids = expect(reply, p.AppendManyReply).message_ids
        newest = self.last_ids[batch.session_tag]
        fresh = sum(1 for i in ids if i > newest)
        self.done.stored += fresh
        self.done.present += len(ids) - fresh
        if ids:
            self.last_ids[batch.session_tag] = max(newest, max(ids))

    def close(self) -> None:
        self.stream.close()
        self.reader.join(timeout=5)


def _split(batch: Batch, at: int) -> list[Batch]:
    parts = []
    for lo, hi in ((0, at), (at, len(batch.messages))):
        part = Batch(batch.session_tag, batch.lines[lo])
        part.messages = batch.messages[lo:hi]
        part.lines = batch.lines[lo:hi]
        part.last_line = part.lines[-1]
        parts.append(part)
    return parts


def _line_of(batch: Batch, field: str | None) -> int | None:
    """The file line a daemon's ``messages[i].x`` field names, else None."""
    if field is None or not field.startswith("messages["):
        return None
    try:
        return batch.lines[int(field[9 : field.index("]")])]
    except (ValueError, IndexError):
        return None


def open_source(path: str | os.PathLike[str]) -> tuple[BinaryIO, int | None]:
    """``path`` opened for :func:`import_messages`, with its size when it is a regular file."""
    f = open(path, "rb")  # noqa: SIM115  # the caller closes it
    try:
        size = os.fstat(f.fileno()).st_size
    except OSError:
        size = None
    return f, size
