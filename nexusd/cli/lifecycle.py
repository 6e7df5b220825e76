"""The ``nexusd`` commands of a conversation's life: ``delete``, ``fork``, ``retention``.

Each is a client of a running daemon (declared with ``main.py``'s
``client_cmd``, so it takes ``--socket``, ``--json`` and ``--timeout``), checks
what it can before any I/O (one line, exit 2) and prints through
:mod:`.output`.  The daemon's and the connection's errors are left to
``nexusd.cli.main``, except a fork's ``conflict``, reworded here to name the
option that resolves it.  :func:`describe_retention` is also how ``nexusd
sessions`` shows a session's own retention.
"""

from __future__ import annotations

import argparse
from typing import Any, Final

from ..client import Client
from ..wire import protocol as p
from ..wire.durations import format_duration, parse_duration
from ..wire.errors import Conflict
from .output import out, safe, shown, table, usage

__all__ = ["add_commands", "describe_retention"]

#: What ``--max-messages`` / ``--max-age`` take to go back to the daemon's default.
DEFAULT: Final = "default"


class _Default:
    """The value of an option given as ``default`` (None means: not given)."""

    def __repr__(self) -> str:
        return DEFAULT


_BACK_TO_DEFAULT: Final = _Default()


def _message_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)!r} is not a message id") from None
    if not 0 <= value <= p.MAX_REQUEST_ID:
        raise argparse.ArgumentTypeError(
            f"message ids are 0 to {p.MAX_REQUEST_ID}, not {shown(text)}"
        )
    return value


def _max_messages(text: str) -> int | _Default:
    if text.strip().lower() == DEFAULT:
        return _BACK_TO_DEFAULT
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number of messages (0: unbounded) or {DEFAULT}, not {shown(text)!r}"
        ) from None
    if not 0 <= value <= p.MAX_RETAINED:
        raise argparse.ArgumentTypeError(
            f"must be 0 (unbounded) to {p.MAX_RETAINED}, not {shown(text.strip())}"
        )
    return value


def _max_age(text: str) -> float | _Default:
    if text.strip().lower() == DEFAULT:
        return _BACK_TO_DEFAULT
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a duration or {DEFAULT}: {exc}") from None


def add_commands(sub: Any, client_cmd: Any) -> None:
    """Declare this module's commands on ``sub`` (``client_cmd`` adds the client options)."""
    d = client_cmd("delete", cmd_delete, "delete messages of a session by id")
    d.add_argument("ids", nargs="+", type=_message_id, metavar="ID", help="message ids")
    f = client_cmd(
        "fork",
        cmd_fork,
        "copy a session (up to an id) into a new one, to branch the conversation",
        session=False,
    )
    f.add_argument("source", metavar="SOURCE", help="the session to copy")
    f.add_argument("new", metavar="NEW", help="the session to copy it into")
    f.add_argument(
        "--up-to", type=_message_id, metavar="ID", help="copy up to and including this id"
    )
    f.add_argument(
        "--append", action="store_true", help="NEW may hold messages: add the copies after them"
    )
    r = client_cmd(
        "retention",
        cmd_retention,
        "show or set a session's own retention (how many messages it keeps, for how long)",
    )
    r.add_argument(
        "--max-messages",
        type=_max_messages,
        metavar="N",
        help=f"keep the newest N messages (0: all; {DEFAULT}: the daemon's default)",
    )
    r.add_argument(
        "--max-age",
        type=_max_age,
        metavar="AGE",
        help=f"delete messages AGE after they were stored: 30d, 12h, seconds (0: never;"
        f" {DEFAULT}: the daemon's default)",
    )
    r.add_argument("--reset", action="store_true", help="back to the daemon's defaults for both")


def _check_tag(name: str, tag: str) -> None:
    if not 1 <= len(tag) <= p.MAX_SESSION_CHARS:
        usage(f"{name} must be 1 to {p.MAX_SESSION_CHARS} characters, not {len(tag)}")
    try:
        tag.encode("utf-8")
    except UnicodeEncodeError as exc:
        usage(f"{name} is not UTF-8 text (at position {exc.start}); convert it first")


# ── delete ───────────────────────────────────────────────────────────────────
def cmd_delete(args: argparse.Namespace, c: Client) -> None:
    if len(args.ids) > p.MAX_DELETE_IDS:
        usage(f"at most {p.MAX_DELETE_IDS} ids at once, not {len(args.ids)}")
    done = c.delete(args.ids, args.session)
    lines = [f"deleted {len(done.deleted)} message(s) from {safe(repr(args.session))}"]
    if done.deleted:
        lines[0] += ": " + ", ".join(map(str, done.deleted))
    if done.missing:
        lines.append("not in that session: " + ", ".join(map(str, done.missing)))
    out(args, {"deleted": done.deleted, "missing": done.missing}, "\n".join(lines))


# ── fork ─────────────────────────────────────────────────────────────────────
def cmd_fork(args: argparse.Namespace, c: Client) -> None:
    _check_tag("SOURCE", args.source)
    _check_tag("NEW", args.new)
    if args.source == args.new:
        usage("SOURCE and NEW are the same session; a session cannot be forked into itself")
    try:
        done = c.fork(args.source, args.new, up_to_id=args.up_to, append=args.append)
    except Conflict:
        raise Conflict(
            f"session {args.new!r} already holds messages; fork into a new tag,"
            " or add --append to copy after them"
        ) from None
    human = (
        f"forked {done.count} message(s) from {safe(repr(args.source))} into"
        f" {safe(repr(args.new))} (ids {done.first_id} to {done.last_id})"
    )
    out(args, {"count": done.count, "first_id": done.first_id, "last_id": done.last_id}, human)


# ── retention ────────────────────────────────────────────────────────────────
def describe_retention(max_messages: int | None, max_age: float | None) -> str:
    """A session's own retention in a few words ("" when it has none)."""
    parts = []
    if max_messages is not None:
        parts.append("all messages" if max_messages == 0 else f"newest {max_messages}")
    if max_age is not None:
        parts.append("no age limit" if max_age == 0 else f"for {format_duration(max_age)}")
    return ", ".join(parts)


def _current(c: Client, tag: str) -> tuple[int | None, float | None]:
    """The session's own retention as ``sessions`` shows it (none for an empty session)."""
    for info in c.sessions():
        if info.session_tag == tag:
            return info.max_messages, info.max_age
    return None, None


def cmd_retention(args: argparse.Namespace, c: Client) -> None:
    given = args.max_messages is not None or args.max_age is not None
    if args.reset and given:
        usage("--reset restores both defaults; give it alone, without --max-messages/--max-age")
    own_messages, own_age = _current(c, args.session)
    if args.reset or given:
        # An option left out keeps the value the session has now.
        if args.reset:
            own_messages, own_age = None, None
        if args.max_messages is not None:
            own_messages = None if args.max_messages is _BACK_TO_DEFAULT else args.max_messages
        if args.max_age is not None:
            own_age = None if args.max_age is _BACK_TO_DEFAULT else args.max_age
        now = c.set_retention(args.session, max_messages=own_messages, max_age=own_age)
        own_messages, own_age = now.max_messages, now.max_age
    stats = c.stats()
    defaults = {"max_messages": stats.get("max_messages"), "max_age": stats.get("max_age_s")}
    value = {
        "session_tag": args.session,
        "max_messages": own_messages,
        "max_age": own_age,
        "defaults": defaults,
    }
    rows = [
        ("--max-messages", *_setting(own_messages, defaults["max_messages"], _count)),
        ("--max-age", *_setting(own_age, defaults["max_age"], _age)),
    ]
    human = f"session {safe(repr(args.session))}\n" + table(["OPTION", "VALUE", "FROM"], rows)
    out(args, value, human)


def _setting(own: Any, default: Any, show: Any) -> tuple[str, str]:
    if own is not None:
        return show(own), "this session"
    return ("?" if default is None else show(default)), "the daemon's default"


def _count(n: int) -> str:
    return "all messages" if n == 0 else f"newest {n}"


def _age(seconds: float) -> str:
    return "never expire" if seconds == 0 else format_duration(seconds)
