"""The ``nexusd export`` and ``nexusd import`` commands (history in and out as files).

The work is :mod:`nexusd.client.transfer`'s; this module parses the options,
writes ``-o FILE`` atomically (a private temporary file in the same
directory, fsynced and renamed: no half file on failure or Ctrl-C), draws a
progress bar on stderr when stderr is a terminal (and stdout is not the same
screen), and words the errors: a bad import line is ``FILE:LINE: what is
wrong`` with exit 2, and says what was stored before it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

from ..client import Client
from ..client.transfer import (
    ImportFailed,
    ImportSummary,
    export_messages,
    import_messages,
    open_source,
)
from ..wire import protocol as p
from ..wire.errors import NexusError
from .output import (
    EXIT_ERROR,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    fail,
    not_a_regular_file,
    out,
    reason,
    table,
    usage,
)

#: Exit codes as nexusd.cli.main gives them for these errors.
_EXIT_BY_CODE = {
    "unreachable": EXIT_UNREACHABLE,
    "disconnected": EXIT_UNREACHABLE,
    "timeout": EXIT_UNREACHABLE,
    "bad_request": EXIT_USAGE,
    "too_large": EXIT_USAGE,
}


def add_commands(sub: Any, client_cmd: Any) -> None:
    """Declare this module's commands on sub (client_cmd adds the client options)."""
    e = client_cmd(
        "export",
        cmd_export,
        "write sessions as JSON Lines (or Markdown), oldest first",
        session=False,
    )
    which = e.add_mutually_exclusive_group()
    which.add_argument(
        "--session", action="append", metavar="TAG", help="this session (repeatable)"
    )
    which.add_argument("--all", action="store_true", help="every session")
    e.add_argument(
        "--since",
        metavar="TIME",
        help="only messages whose stored timestamp is at or after this RFC 3339 time",
    )
    e.add_argument(
        "--until", metavar="TIME", help="only messages whose stored timestamp is before this"
    )
    e.add_argument(
        "--format",
        choices=("jsonl", "markdown"),
        default="jsonl",
        help="jsonl: one JSON object per message, every field (default); "
        "markdown: a readable transcript",
    )
    e.add_argument(
        "-o", "--output", metavar="FILE", help="write FILE (atomically) instead of stdout"
    )
    i = client_cmd(
        "import",
        cmd_import,
        "store the messages of a JSON Lines file (export's, or the minimal form)",
    )
    i.add_argument("file", metavar="FILE", help="JSON Lines file, or - for stdin")
    i.add_argument(
        "--session-map",
        action="append",
        metavar="OLD=NEW",
        default=[],
        help="store session OLD's messages in NEW (repeatable)",
    )
    i.add_argument(
        "--dry-run",
        action="store_true",
        help="check every line and count messages per session; write nothing",
    )


# ── progress ─────────────────────────────────────────────────────────────────
class _Bar:
    """``12.3 MiB  45%  120,000 messages`` on stderr, redrawn at most 10 times a second."""

    def __init__(self) -> None:
        self.shown = 0.0
        self.drawn = False

    def __call__(self, done: int, total: int | None, messages: int) -> None:
        now = time.monotonic()
        if now - self.shown < 0.1 and (total is None or done < total):
            return
        self.shown = now
        mib = 1024 * 1024
        size = f"{done / mib:.1f}" + (f"/{total / mib:.1f}" if total else "") + " MiB"
        share = f"  {done / total:4.0%}" if total else ""
        sys.stderr.write(f"\r{size}{share}  {messages:,} messages ")
        sys.stderr.flush()
        self.drawn = True

    def end(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _bar() -> _Bar | None:
    """A bar when stderr is a terminal that stdout is not writing to."""
    try:
        if not sys.stderr.isatty():
            return None
        if sys.stdout.isatty():  # the bar would be drawn over the output
            return None
    except (AttributeError, ValueError):
        return None
    return _Bar()


# ── export ───────────────────────────────────────────────────────────────────
class _AtomicFile:
    """``dest`` written whole or not at all: a private temporary file, then a rename."""

    def __init__(self, dest: str) -> None:
        self.dest = Path(dest)
        problem = not_a_regular_file(self.dest)
        if problem is not None:
            usage(f"{problem}; give a new file name")
        if self.dest.is_dir():
            usage(f"{self.dest} is a directory; give a file name")
        try:
            fd, name = tempfile.mkstemp(
                dir=self.dest.parent, prefix=f".{self.dest.name}.", suffix=".partial"
            )
        except OSError as exc:
            usage(f"cannot write {self.dest}: {reason(exc)}")
        self.partial = Path(name)
        self.file: BinaryIO = os.fdopen(fd, "wb", buffering=1024 * 1024)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.partial, self.dest)

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.partial.unlink(missing_ok=True)


def cmd_export(args: argparse.Namespace, c: Client) -> None:
    if not args.session and not args.all:
        usage("say which sessions: --session TAG (repeatable) or --all")
    bar = _bar()
    target = _AtomicFile(args.output) if args.output is not None else None
    sink = target.file if target is not None else sys.stdout.buffer
    try:
        done = export_messages(
            c,
            sink,
            sessions=None if args.all else args.session,
            since=args.since,
            until=args.until,
            format=args.format,
            progress=bar,
        )
        if target is not None:
            target.commit()
        else:
            sys.stdout.flush()
    except NexusError:
        raise  # (some are OSErrors too) nexusd.cli.main words them
    except OSError as exc:
        if target is None and isinstance(exc, BrokenPipeError):
            raise
        raise SystemExit(fail(f"cannot write the export: {reason(exc)}", EXIT_ERROR)) from None
    finally:
        if bar is not None:
            bar.end()
        if target is not None:
            target.discard()  # a no-op once renamed
    if target is not None:
        text = (
            f"wrote {done.messages} messages of {done.sessions} sessions "
            f"({done.bytes} bytes) to {args.output}"
        )
        summary = {"messages": done.messages, "sessions": done.sessions, "bytes": done.bytes}
        if args.json:
            out(args, summary, text)
        else:
            sys.stderr.write(text + "\n")


# ── import ───────────────────────────────────────────────────────────────────
def _session_map(pairs: list[str]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old or not new:
            usage(f"--session-map takes OLD=NEW, not {pair!r}")
        if len(new) > p.MAX_SESSION_CHARS:
            usage(f"--session-map: {new[:40]!r}... is over {p.MAX_SESSION_CHARS} characters")
        if old in mapping and mapping[old] != new:
            usage(f"--session-map maps {old!r} twice")
        mapping[old] = new
    return mapping


def cmd_import(args: argparse.Namespace, c: Client) -> None:
    mapping = _session_map(args.session_map)
    name = "stdin" if args.file == "-" else args.file
    if args.file == "-":
        source: BinaryIO = sys.stdin.buffer
        try:
            st = os.fstat(source.fileno())
            total: int | None = st.st_size if st.st_size > 0 and not sys.stdin.isatty() else None
        except (OSError, ValueError):
            total = None
    else:
        problem = not_a_regular_file(args.file)
        if Path(args.file).is_dir():
            usage(f"{args.file} is a directory, not a JSON Lines file")
        try:
            source, total = open_source(args.file)
        except OSError as exc:
            usage(f"cannot read {args.file}: {reason(exc)}")
        if problem is not None:  # a fifo or a device still reads: no size to show
            total = None
    bar = _bar()
    try:
        done = import_messages(
            c,
            source,
            session_map=mapping,
            default_session=args.session,
            dry_run=args.dry_run,
            total=total,
            progress=bar,
        )
    except ImportFailed as exc:
        if bar is not None:
            bar.end()
        _report_failure(args, name, exc)
    except NexusError:
        raise
    except OSError as exc:
        usage(f"cannot read {name}: {reason(exc)}")
    finally:
        if bar is not None:
            bar.end()
        if source is not sys.stdin.buffer:
            source.close()
    _report(args, done, c)


def _stored_note(s: ImportSummary) -> str:
    if s.stored_through:
        return f"lines 1-{s.stored_through} are stored; nothing after them was written by this run"
    return "nothing was written"


def _report_failure(args: argparse.Namespace, name: str, exc: ImportFailed) -> None:
    s = exc.summary
    if exc.line is not None:
        where = f"{name}:{exc.line}: "
        note = "checked only, nothing written" if args.dry_run else _stored_note(s)
        raise SystemExit(fail(f"{where}{exc.message} ({note})", EXIT_USAGE))
    if args.dry_run:
        raise exc.cause
    # The daemon or the connection failed mid-way: the rerun is safe (the keys).
    raise SystemExit(
        fail(
            f"import stopped: {exc.cause.code}: {exc.message} ({_stored_note(s)}; "
            "run the same import again to go on: stored lines are skipped)",
            _EXIT_BY_CODE.get(exc.cause.code, EXIT_ERROR),
        )
    )


def _report(args: argparse.Namespace, s: ImportSummary, c: Client) -> None:
    per = sorted(s.per_session.items(), key=lambda kv: kv[0].encode("utf-8", "surrogatepass"))
    value = {
        "dry_run": args.dry_run,
        "lines": s.lines,
        "messages": s.messages,
        "stored": s.stored,
        "already_present": s.present,
        "sessions": dict(per),
    }
    rows = [(tag, n) for tag, n in per]
    if args.dry_run:
        head = f"dry run: {s.messages} messages in {len(per)} sessions would be sent"
    else:
        head = (
            f"imported {s.messages} messages into {len(per)} sessions: {s.stored} stored, "
            f"{s.present} already there"
        )
    human = head + ("\n" + table(["SESSION", "MESSAGES"], rows) if rows else "")
    keep = s.limits.max_messages
    if args.dry_run:
        over = [tag for tag, n in per if keep and n > keep]
    else:  # what retention (the daemon's, or a session's own) really took
        over = [tag for tag, n in per if keep and n > keep and c.message_count(tag) < n]
    value["over_retention"] = over
    if over and not args.json:
        verb = "would lose" if args.dry_run else "lost"
        human += (
            f"\nnote: {len(over)} session(s) got more messages than their retention keeps"
            f" (the daemon's max_messages is {keep}, unless a session has its own) and"
            f" {verb} their oldest; importing again would store those again"
        )
    out(args, value, human)
