"""History in and out as plain files: :func:`export_messages` and :func:`import_messages`.

Both work with the blocking :class:`~nexusd.client.Client` (the ``nexusd
export``/``import`` commands use them).  Export pages through ``sessions`` and
``history`` (``after_id``), so it holds one page at a time whatever the size;
its pages adapt to the messages' size (about 2 MiB each).  It writes JSON
Lines (one :class:`~nexusd.wire.protocol.Message` per line, every field) or a
Markdown transcript.

Import (:mod:`nexusd.client.transfer_import`, re-exported here) reads JSON
Lines (export's, or the minimal form) through
:class:`~nexusd.client.transfer_rows.BatchMaker`, which checks every line and
keys it from its content, and sends the batches as ``append_many`` requests on
a connection of its own, several in flight at once (the daemon commits a
connection's writes in the order sent, and its group commit fills up while the
next batch is on its way).  Only the blocking client has it: pipelining here
needs a reader thread beside the sending one, which an event loop would
replace with tasks, and an async caller can run it in a worker thread
(``anyio.to_thread.run_sync``) as it stands.  Importing the same file again
stores nothing: the daemon answers each known key with the stored row's id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Final, Literal

import msgspec

from ..wire import protocol as p
from ..wire.errors import BadRequest
from ..wire.timestamps import parse_timestamp
from .client_sync import Client
from .transfer_import import (
    ImportFailed,
    ImportSummary,
    TransferProgress,
    check_arguments,
    import_messages,
    open_source,
)
from .transfer_rows import BadLine

__all__ = [
    "BadLine",
    "ImportFailed",
    "open_source",
    "ExportSummary",
    "ImportSummary",
    "export_messages",
    "import_messages",
    "markdown_message",
]

#: Bytes of messages an export page aims at (its limit adapts to it).
_PAGE_BYTES: Final = 2 * 1024 * 1024
_encode_json = msgspec.json.encode


# ── export ───────────────────────────────────────────────────────────────────
@dataclass
class ExportSummary:
    """What an export wrote: messages, bytes, and sessions that had some."""

    messages: int = 0
    bytes: int = 0
    sessions: int = 0


def _bound(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    try:
        return parse_timestamp(value, name)
    except BadRequest as exc:
        raise BadRequest(exc.message, field=name) from None


def export_messages(
    client: Client,
    out: BinaryIO,
    *,
    sessions: Sequence[str] | None = None,
    since: str | None = None,
    until: str | None = None,
    format: Literal["jsonl", "markdown"] = "jsonl",
    progress: TransferProgress | None = None,
) -> ExportSummary:
    """Write the messages of ``sessions`` (None: every session) to ``out``.

    Sessions in tag order (UTF-8 bytes), messages in id order.  ``since`` /
    ``until`` (RFC 3339) keep the messages whose stored timestamp is at or
    after ``since`` and before ``until``, compared in the stored UTC form
    (as ``search`` does).  With ``isolate_peers`` a peer sees only its own
    sessions, so it exports only those.
    """
    check_arguments("export_messages", client, out)
    if format not in ("jsonl", "markdown"):
        raise BadRequest(f"format must be jsonl or markdown, not {format!r}", field="format")
    low, high = _bound(since, "since"), _bound(until, "until")
    if sessions is None:
        tags = [s.session_tag for s in client.sessions()]
    else:
        tags = sorted(set(sessions), key=lambda t: t.encode("utf-8", "surrogatepass"))
    done = ExportSummary()
    for tag in tags:
        first = True
        for page in _pages(client, tag):
            chunk: list[bytes] = []
            for m in page:
                if (low is not None and m.timestamp < low) or (
                    high is not None and m.timestamp >= high
                ):
                    continue
                if first:
                    first = False
                    done.sessions += 1
                    if format == "markdown":
                        chunk.append(markdown_heading(tag))
                if format == "jsonl":
                    chunk.append(_encode_json(m) + b"\n")
                else:
                    chunk.append(markdown_message(m))
                done.messages += 1
            data = b"".join(chunk)
            out.write(data)
            done.bytes += len(data)
            if progress is not None:
                progress(done.bytes, None, done.messages)
    return done


def _pages(client: Client, tag: str) -> Iterable[list[p.Message]]:
    """The messages of ``tag`` in id order, a page at a time of about :data:`_PAGE_BYTES`."""
    after = 0
    limit = 64
    while True:
        page = client.get_history(tag, limit, after_id=after)
        if page:
            yield page
            after = page[-1].id
        if len(page) < limit:
            return
        size = sum(len(m.content) + len(m.role) + 100 for m in page)
        limit = max(1, min(p.MAX_HISTORY_LIMIT, limit * _PAGE_BYTES // size))


def _code_span(text: str) -> str:
    """``text`` as an inline code span on one line (any backticks inside kept)."""
    text = _one_line(text)
    run = _longest_run(text)
    ticks = "`" * (run + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _one_line(text: str) -> str:
    """Control characters escaped (``\\n``, ``\\x1b``): a heading is one line."""
    return "".join(
        ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )


def _longest_run(text: str) -> int:
    best = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        best = max(best, run)
    return best


def markdown_heading(tag: str) -> bytes:
    return f"# Session {_code_span(tag)}\n\n".encode("utf-8", "surrogatepass")


def markdown_message(m: p.Message) -> bytes:
    """One message of a Markdown transcript: a heading (role, time, id), then its content.

    The content is kept verbatim inside a code fence longer than any run of
    backticks in it, so ````` ``` ````` and ``#`` lines in a message stay text.
    """
    parts = [f"## {_code_span(m.role)} · {_one_line(m.timestamp)} · id {m.id}\n\n"]
    if m.meta is not None:
        parts.append(f"meta: {_code_span(_encode_json(m.meta).decode())}\n\n")
    fence = "`" * max(3, _longest_run(m.content) + 1)
    body = m.content if m.content.endswith("\n") or not m.content else m.content + "\n"
    parts.append(f"{fence}text\n{body}{fence}\n\n")
    return "".join(parts).encode("utf-8", "surrogatepass")
