"""The commands that talk to a running daemon: append, history, tail, count, sessions, ...

Each ``cmd_*`` takes the parsed arguments and a connected-on-demand
:class:`~nexusd.client.Client`, checks what it can before any I/O
(one line, exit 2 through :func:`~nexusd.cli.output.usage`), makes its calls
and prints the answer through :func:`~nexusd.cli.output.out`.  The errors the
daemon or the connection raise are left to ``nexusd.cli.main``, which maps
them to exit codes in one place.
"""

from __future__ import annotations

import argparse
import json
import sys

import msgspec

from ..client import Client
from ..client.requests import MAX_TIMEOUT, encode
from ..wire import protocol as p
from .lifecycle import describe_retention
from .output import (
    ProgressBar,
    as_json,
    flush,
    highlighting,
    line,
    marked,
    one_line,
    out,
    safe,
    table,
    usage,
)


def read_stdin(raw: bool) -> str:
    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        usage(
            f"stdin is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "convert it first, e.g. with iconv"
        )
    # `echo text |` and here-documents end with a newline that is not part of
    # the message; --raw keeps everything.
    return text if raw or not text.endswith("\n") else text[:-1]


def check_length(name: str, value: str, most: int) -> None:
    if not 1 <= len(value) <= most:
        usage(f"{name} must be 1 to {most} characters, not {len(value)}")


def cmd_append(args: argparse.Namespace, c: Client) -> None:
    check_length("role", args.role, p.MAX_ROLE_CHARS)
    meta = None
    if args.meta is not None:
        try:
            meta = json.loads(args.meta)
        except json.JSONDecodeError as exc:
            usage(f"--meta is not valid JSON: {exc}")
        if not isinstance(meta, dict):
            usage('--meta must be a JSON object, like \'{"model": "m1"}\'')
        # What cannot be sent (an int over 64 bits, a lone surrogate from a
        # "\\ud800" escape) is BadRequest naming meta, before any I/O.
        encode(p.Append(id=0, role=args.role, content="", meta=meta))
    content = read_stdin(args.raw) if args.content == "-" else args.content
    if not content and not args.allow_empty:
        usage("the content is empty; pass --allow-empty to store an empty message")
    limits = c.hello().limits
    size = len(content.encode("utf-8"))
    max_content = limits.get("max_content")
    if max_content is not None and size > max_content:
        usage(
            f"the content is {size} bytes of UTF-8; this daemon accepts at most "
            f"{max_content} (max_content)"
        )
    max_meta = limits.get("max_meta")
    if meta is not None and max_meta is not None:
        meta_size = len(msgspec.json.encode(meta))
        if meta_size > max_meta:
            usage(f"--meta is {meta_size} bytes of JSON; this daemon accepts at most {max_meta}")
    mid = c.append(
        args.role, content, session_tag=args.session, timestamp=args.timestamp, meta=meta
    )
    out(args, {"id": mid}, str(mid))


def cmd_history(args: argparse.Namespace, c: Client) -> None:
    msgs = c.get_history(args.session, args.limit, before_id=args.before, after_id=args.after)
    width = 0 if args.full else 80
    rows = [(m.id, m.timestamp, m.role, one_line(m.content, width)) for m in msgs]
    human = table(["ID", "TIMESTAMP", "ROLE", "CONTENT"], rows) if msgs else "(no messages)"
    if msgs and len(msgs) >= args.limit and not args.json and sys.stdout.isatty():
        human += "\n" + _more_hint(args, c, msgs)
    out(args, msgs, human)


def _more_hint(args: argparse.Namespace, c: Client, msgs: list[p.Message]) -> str:
    """The footer saying a full page on a terminal may not be everything."""
    if args.after is not None:
        return f"(showing {len(msgs)}; newer ones may follow: --after {msgs[-1].id})"
    if args.before is not None:
        return f"(showing {len(msgs)}; older ones may exist: --before {msgs[0].id})"
    total = c.message_count(args.session)
    if total <= len(msgs):
        return f"(showing all {total})"
    return (
        f"(showing the newest {len(msgs)} of {total}; --limit N or --before {msgs[0].id} "
        "to see more)"
    )


def cmd_search(args: argparse.Namespace, c: Client) -> None:
    found = c.search(
        " ".join(args.query),
        session_tag=args.session,
        role=args.role,
        since=args.since,
        until=args.until,
        limit=args.limit,
        syntax=args.fts,
        order="newest" if args.newest else "rank",
        cursor=args.cursor,
    )
    marks = highlighting(sys.stdout)
    lines = []
    for hit in found:
        m = hit.message
        lines.append(f"#{m.id}  {safe(m.session_tag)}  {safe(m.role)}  {m.timestamp}")
        lines.append("    " + marked(hit.snippet, hit.highlights, marks))
    if found.cursor is not None:
        lines.append(f"(more: --cursor {found.cursor})")
    human = "\n".join(lines) if found else "(no matches)"
    out(args, {"hits": list(found), "cursor": found.cursor}, human)


def cmd_tail(args: argparse.Namespace, c: Client) -> None:
    """The newest ``-n`` messages, then with ``-f`` each new one until Ctrl-C (exit 0)."""
    try:
        _tail(args, c)
    except KeyboardInterrupt:
        if not args.follow:
            raise
        # Ctrl-C is how `tail -f` normally ends: exit 0, no "interrupted".


def _tail(args: argparse.Namespace, c: Client) -> None:
    if args.all:
        shown, upto = _newest_everywhere(c, args.lines)
    else:
        recent = c.get_history(args.session, max(args.lines, 1))
        upto = recent[-1].id if recent else 0
        shown = recent[-args.lines :] if args.lines else []
    for m in shown:
        line(_tail_line(args, m))
    flush()
    if not args.follow:
        return
    # From the last id seen, not from "now": what was written meanwhile follows.
    removals = args.json or sys.stdout.isatty()
    # A daemon down for an upgrade or a slow restart does not end a `tail -f`:
    # it waits (up to a day) like `tail -F` waits for its file.
    c.retry_for = float(MAX_TIMEOUT)
    resumes, printed = 0, upto
    with c.watch(args.session, all=args.all, after_id=upto, removals=removals) as w:
        for item in w:
            if w.resumes != resumes and removals:
                # Removals made while it was away cannot be asked for: say so, so a
                # script keeping a copy knows to compare it with `history` again.
                resumes = w.resumes
                line(
                    # The last id printed: the item in hand, taken after the
                    # reconnection, is already past it (w.last_id is that item's).
                    as_json({"resumed": {"after_id": printed}})
                    if args.json
                    else "(reconnected: removals made meanwhile are not shown)"
                )
            line(_tail_line(args, item))
            if isinstance(item, p.Message):
                printed = item.id
            if not w.buffered:  # the next one is not here yet: show what came
                flush()


def _newest_everywhere(c: Client, n: int) -> tuple[list[p.Message], int]:
    """The ``n`` newest messages of every session (oldest first), and the newest id then.

    One ``sessions`` call fixes the moment (its largest ``last_id``); then the
    sessions are read newest first, each up to that id, until no session left
    can hold one of the ``n`` newest (its ``last_id`` is below them all).
    """
    infos = c.sessions()
    upto = max((s.last_id for s in infos), default=0)
    newest: list[p.Message] = []
    for s in sorted(infos, key=lambda s: s.last_id, reverse=True):
        if n == 0 or (len(newest) >= n and s.last_id < newest[0].id):
            break
        page = c.get_history(s.session_tag, n, before_id=upto + 1)
        newest = sorted(newest + page, key=lambda m: m.id)[-n:]
    return newest, upto


def _tail_line(args: argparse.Namespace, item: p.Message | p.Removal) -> str:
    """One line of ``tail``: a message, or what went away (JSON Lines with ``--json``)."""
    if isinstance(item, p.Removal):
        if args.json:
            return as_json({"removed": item})
        gone = [", ".join(map(str, item.ids))] if item.ids else []
        if item.before_id is not None:
            gone.append(f"every message before {item.before_id}")
        where = "every session" if item.session_tag is None else safe(item.session_tag)
        return f"(removed {' and '.join(gone) or 'nothing'} from {where})"
    if args.json:
        return as_json(item)
    tag = f"{safe(item.session_tag)}  " if args.all else ""
    return f"{item.id}  {item.timestamp}  {tag}{safe(item.role)}  {safe(item.content)}"


def cmd_count(args: argparse.Namespace, c: Client) -> None:
    n = c.message_count(args.session)
    out(args, {"session_tag": args.session, "count": n}, str(n))


def cmd_sessions(args: argparse.Namespace, c: Client) -> None:
    infos = c.sessions()
    rows: list[tuple[object, ...]]
    rows = [(s.session_tag, s.count, s.first_id, s.last_id, s.last_timestamp) for s in infos]
    headers = ["SESSION", "COUNT", "FIRST", "LAST", "LAST TIMESTAMP"]
    # A session's own retention (nexusd retention), in a column only when one has it.
    own = [describe_retention(s.max_messages, s.max_age) for s in infos]
    if any(own):
        rows = [(*row, keeps) for row, keeps in zip(rows, own, strict=True)]
        headers.append("OWN RETENTION")
    human = table(headers, rows) if infos else "(no sessions)"
    out(args, infos, human)


def cmd_pop(args: argparse.Namespace, c: Client) -> None:
    m = c.pop(args.session)
    human = (
        "(empty)"
        if m is None
        else table(
            ["ID", "TIMESTAMP", "ROLE", "CONTENT"],
            [(m.id, m.timestamp, m.role, one_line(m.content, 0))],
        )
    )
    out(args, m, human)


def cmd_clear(args: argparse.Namespace, c: Client) -> None:
    n = c.clear(args.session)
    out(args, {"deleted": n}, f"deleted {n} message(s) from {safe(repr(args.session))}")


def cmd_clear_all(args: argparse.Namespace, c: Client) -> None:
    if not args.yes:
        usage("clear-all deletes every message of every session; confirm with --yes")
    n = c.clear_all()
    out(args, {"deleted": n}, f"deleted {n} message(s)")


def cmd_stats(args: argparse.Namespace, c: Client) -> None:
    st = c.stats()
    out(args, st, table(["STAT", "VALUE"], sorted(st.items())))


def cmd_ping(args: argparse.Namespace, c: Client) -> None:
    hello = c.hello()
    c.ping()
    out(
        args,
        {"ok": True, "server": hello.server, "version": hello.version},
        f"ok ({safe(hello.server)}, protocol {hello.version})",
    )


def cmd_backup(args: argparse.Namespace, c: Client) -> None:
    bar = ProgressBar(sys.stderr) if sys.stderr.isatty() and not args.json else None
    size = c.backup(args.dest, progress=bar)
    if bar is not None:
        bar.done()
    out(args, {"dest": args.dest, "bytes": size}, f"wrote {size} bytes to {safe(args.dest)}")
