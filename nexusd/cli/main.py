"""The ``nexusd`` command: its parser, its dispatch, and what each exit code means.

``serve`` runs the daemon (:mod:`.serve`), ``check`` judges a database file
(:mod:`.check`), the rest are clients of a running daemon
(:mod:`.client_commands`); everything they print goes through :mod:`.output`.

Exit codes: 0 ok, 1 the server answered an error (or the daemon could not
start, or refused us, or is not one we trust; ``check``: the database is
damaged; ``restore``: not restored, see :mod:`.restore`), 2 usage
(including what the daemon rejected as
``bad_request``/``too_large``, a setting that does not fit its declaration, a
``check --db`` path that is not a nexusd database,
``check``/``restore`` given PostgreSQL storage (they work on the SQLite file), a
``--config``/``--db``/backup destination that exists but is not a regular
file, and a default database path needing a home directory there is none of),
3 cannot reach the daemon (nothing listens there, or the socket path names
something that is not a socket), 130 interrupted (Ctrl-C; but ``tail -f``,
which Ctrl-C ends normally, exits 0).  Every mistake is
one line on stderr, never a traceback.  ``--json`` gives machine output;
otherwise a readable table, in which control characters are shown escaped.
The errors of the client commands are mapped to these codes in :func:`_main`;
``serve`` and ``check``, which have no client, map their own.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from .._version import __version__
from ..client import Client
from ..client.connect import Unreachable
from ..client.requests import MAX_TIMEOUT
from ..wire import protocol as p
from ..wire.errors import (
    BadRequest,
    ConnectionLost,
    DaemonNotRunning,
    NexusError,
    Timeout,
    TooLarge,
)
from ..wire.paths import socket_path_problem
from . import client_commands as cc
from . import lifecycle, migrate, restore, transfer
from .check import cmd_check
from .output import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    fail,
    plain_error,
    shown,
    usage,
)
from .serve import add_flags, cmd_serve

__all__ = ["build_parser", "main", "run"]

#: Seconds a client command waits for each answer unless --timeout says otherwise.
TIMEOUT = 30.0


# ── parser ───────────────────────────────────────────────────────────────────
class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (with where to get help), exit 2."""

    def error(self, message: str) -> NoReturn:
        # "argument --before: must be ..." reads better as "--before must be ...".
        message = _ARGUMENT_MUST.sub(r"\1 must", message)
        usage(f"{message} (see `{self.prog} --help`)")


_ARGUMENT_MUST = re.compile(r"^argument (-[\w-]+)(?:/-[\w-]+)*: must")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)!r} is not a number of seconds") from None
    # The client's own bound (a day): 1e12 would overflow the socket's timer.
    if not 0 < value <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds > 0 and at most {MAX_TIMEOUT} (one day), "
            f"not {shown(text)}"
        )
    return value


def _bounded(low: int, high: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{shown(text)!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be between {low} and {high}, not {shown(text.strip())}"
            )
        return value

    return parse


def _add_client_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """``--socket``, ``--json``, ``--timeout``: accepted before and after the command."""
    d = argparse.SUPPRESS if prefix else None  # the command's own value wins when given
    parser.add_argument(
        "--socket",
        dest=f"{prefix}socket",
        default=d,
        metavar="PATH",
        help="daemon socket (default: as the daemon resolves it)",
    )
    parser.add_argument(
        "--json",
        dest=f"{prefix}json",
        action="store_true",
        default=d if prefix else False,
        help="machine-readable output",
    )
    parser.add_argument(
        "--timeout",
        dest=f"{prefix}timeout",
        type=_seconds,
        default=d,
        metavar="SECONDS",
        help=f"seconds to wait for each answer (default {TIMEOUT:g}, at most {MAX_TIMEOUT})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nexusd", description="Durable local conversation history over a Unix socket."
    )
    parser.add_argument("--version", action="version", version=f"nexusd {__version__}")
    _add_client_options(parser, prefix="global_")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the daemon in the foreground")
    add_flags(s)  # one per setting that has a flag, described by its declaration

    def client_cmd(
        name: str, func: Any, help: str, session: bool = True
    ) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        _add_client_options(c)
        if session:
            c.add_argument(
                "--session",
                default="nexus",
                metavar="TAG",
                help="session tag (default %(default)s)",
            )
        c.set_defaults(func=func)
        return c

    a = client_cmd("append", cc.cmd_append, "store one message and print its id")
    a.add_argument("role")
    a.add_argument("content", help="message text, or - to read it from stdin")
    a.add_argument("--timestamp", help="keep this RFC 3339 timestamp instead of the commit time")
    a.add_argument("--meta", help="JSON object stored with the message")
    a.add_argument("--raw", action="store_true", help="with -: keep the final newline")
    a.add_argument("--allow-empty", action="store_true", help="store an empty message")
    h = client_cmd("history", cc.cmd_history, "print a session's messages, oldest first")
    h.add_argument(
        "--limit",
        type=_bounded(1, p.MAX_HISTORY_LIMIT),
        default=200,
        metavar="N",
        help=f"most messages to print, 1 to {p.MAX_HISTORY_LIMIT} (default %(default)s)",
    )
    row_id = _bounded(0, p.MAX_REQUEST_ID)
    h.add_argument("--before", type=row_id, metavar="ID", help="page back: messages older than ID")
    h.add_argument(
        "--after", type=row_id, metavar="ID", help="page forward: messages newer than ID"
    )
    h.add_argument("--full", action="store_true", help="do not shorten long contents")
    f = client_cmd(
        "search", cc.cmd_search, "find messages by their words, best match first", session=False
    )
    f.add_argument(
        "query",
        nargs="+",
        help="words to find (all of them, any order; quotes optional), or FTS5 with --fts",
    )
    f.add_argument(
        "--session", action="append", metavar="TAG", help="only this session (repeatable)"
    )
    f.add_argument("--role", help="only messages of this role")
    f.add_argument("--since", metavar="TIME", help="only messages at or after this RFC 3339 time")
    f.add_argument("--until", metavar="TIME", help="only messages before this RFC 3339 time")
    f.add_argument(
        "--limit",
        type=_bounded(1, p.MAX_SEARCH_LIMIT),
        default=20,
        metavar="N",
        help=f"most hits to print, 1 to {p.MAX_SEARCH_LIMIT} (default %(default)s)",
    )
    f.add_argument("--newest", action="store_true", help="newest first instead of best first")
    f.add_argument(
        "--fts", action="store_true", help='QUERY is FTS5 syntax: "a phrase", pre*, NEAR, OR, NOT'
    )
    f.add_argument("--cursor", help="go on from where a previous search stopped")
    t = client_cmd(
        "tail", cc.cmd_tail, "print the newest messages; -f: follow new ones", session=False
    )
    which = t.add_mutually_exclusive_group()
    which.add_argument(
        "--session", default="nexus", metavar="TAG", help="session tag (default %(default)s)"
    )
    which.add_argument("--all", action="store_true", help="every session, merged by id")
    t.add_argument(
        "-n",
        "--lines",
        type=_bounded(0, p.MAX_HISTORY_LIMIT),
        default=10,
        metavar="N",
        help=f"print the newest N first, 0 to {p.MAX_HISTORY_LIMIT} (default %(default)s)",
    )
    t.add_argument(
        "-f", "--follow", action="store_true", help="then print each new one until Ctrl-C"
    )
    client_cmd("count", cc.cmd_count, "print how many messages a session holds")
    client_cmd("sessions", cc.cmd_sessions, "list session tags", session=False)
    client_cmd("pop", cc.cmd_pop, "remove and print the newest message of a session")
    client_cmd("clear", cc.cmd_clear, "delete every message of a session")
    ca = client_cmd(
        "clear-all", cc.cmd_clear_all, "delete every message of every session", session=False
    )
    ca.add_argument("--yes", action="store_true", help="confirm")
    client_cmd("stats", cc.cmd_stats, "print the daemon's counters", session=False)
    client_cmd("ping", cc.cmd_ping, "check that the daemon answers", session=False)
    b = client_cmd(
        "backup", cc.cmd_backup, "write a consistent copy of the database", session=False
    )
    b.add_argument("dest", help="file to write (replaced atomically when complete)")
    # Each of these modules declares its own commands (and owns their code).
    lifecycle.add_commands(sub, client_cmd)
    transfer.add_commands(sub, client_cmd)
    restore.add_command(sub)
    migrate.add_command(sub)
    ck = sub.add_parser("check", help="run integrity checks on a database file and print a verdict")
    ck.add_argument("--db", help="database file (default: as the daemon resolves it)")
    ck.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


#: Arguments that are text sent to the daemon (paths may be any bytes).
_TEXT_ARGS = ("role", "content", "session", "meta", "timestamp", "query", "since", "until")


def _merge_globals(args: argparse.Namespace) -> None:
    """Options given before the command apply unless the command repeats them.

    ``serve`` takes none of them (its own ``--socket`` goes after it) and
    ``check`` only ``--json``: given there they would be ignored, so they are refused.
    """
    if args.command in ("serve", "check"):
        command = args.command
        accepted = ("json",) if command == "check" else ()
        for name in ("socket", "json", "timeout"):
            if name not in accepted and hasattr(args, f"global_{name}"):
                after = f"; put it after: `nexusd {command} --{name} ...`"
                usage(
                    f"--{name} before the command applies to client commands, not {command}"
                    + (after if hasattr(args, name) else "")
                )
    for name in ("socket", "json", "timeout"):
        given = getattr(args, f"global_{name}", None)
        if given is not None and getattr(args, name, None) in (None, False):
            setattr(args, name, given)
    if getattr(args, "timeout", None) is None:
        args.timeout = TIMEOUT


def _check_socket_path(name: str, path: str | os.PathLike[str]) -> None:
    problem = socket_path_problem(path)
    if problem is not None:
        usage(f"{name} {problem}")


def _check_text(args: argparse.Namespace) -> None:
    """Arguments with bytes that are not UTF-8 arrive as lone surrogates: refuse them."""
    for name in _TEXT_ARGS:
        given = getattr(args, name, None)
        for value in given if isinstance(given, list) else [given]:
            if not isinstance(value, str):
                continue
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                byte = ord(value[exc.start]) - 0xDC00
                what = f"byte 0x{byte:02x}" if 0x80 <= byte <= 0xFF else "a surrogate"
                usage(
                    f"the {name} argument is not UTF-8 text ({what} at position {exc.start}); "
                    "convert it first, e.g. with iconv"
                )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C: what was interrupted has cleaned up on its way out (a
        # backup's temporary file is gone); a message, not a traceback.
        print("nexusd: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _merge_globals(args)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "check":
        return cmd_check(args)
    local = getattr(args, "local", None)
    if local is not None:  # a command that works on files, not through the daemon
        code: int = local(args)
        return code
    _check_text(args)
    sessions = getattr(args, "session", None)
    for tag in sessions if isinstance(sessions, list) else [sessions]:
        if tag is not None:
            cc.check_length("--session", tag, p.MAX_SESSION_CHARS)
    if args.socket is not None:
        _check_socket_path("--socket", args.socket)
    # Connects lazily, on the first call: usage errors come out before any I/O.
    try:
        client = Client(args.socket, timeout=args.timeout)
    except NexusError as exc:  # e.g. a malformed NEXUSD_TRUSTED_UIDS
        return fail(exc.message, EXIT_USAGE)
    if args.socket is None:  # from NEXUSD_SOCKET or the default
        source = "NEXUSD_SOCKET" if os.environ.get("NEXUSD_SOCKET") else "the default socket path"
        _check_socket_path(f"{source} {client.socket_path}", client.socket_path)
    try:
        args.func(args, client)
    except Unreachable as exc:
        how = "--socket" if args.socket is not None else "--socket (or NEXUSD_SOCKET)"
        return fail(exc.explain(how), EXIT_UNREACHABLE)
    except (DaemonNotRunning, ConnectionLost, Timeout) as exc:
        return fail(exc.message, EXIT_UNREACHABLE)
    except (BadRequest, TooLarge) as exc:
        # The daemon (or the client, before sending) rejected what was asked.
        return fail(plain_error(exc), EXIT_USAGE)
    except NexusError as exc:
        return fail(f"error ({exc.code}): {exc.message}", EXIT_ERROR)
    except BrokenPipeError:
        # stdout closed early (e.g. piped into head): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        client.close()
    return EXIT_OK


def run() -> NoReturn:
    """Console-script entry point."""
    sys.exit(main())
