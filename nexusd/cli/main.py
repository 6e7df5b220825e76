"""The ``nexusd`` command: ``serve`` runs the daemon, the rest are clients.

Exit codes: 0 ok, 1 the server answered an error (or the daemon could not
start, or refused us, or is not one we trust; ``check``: the database is
damaged), 2 usage (including what the daemon rejected as
``bad_request``/``too_large``, a ``check --db`` path that is not a nexusd
database, a ``--config``/``--db``/backup destination that exists but is not a
regular file, and a default database path needing a home directory there is
none of), 3 cannot reach the daemon (nothing listens there, or the socket
path names something that is not a socket), 130 interrupted (Ctrl-C).
Every mistake is one line on stderr, never a traceback.  ``--json`` gives
machine output; otherwise a readable table, in which control characters are
shown escaped.  This is the only module that writes to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sqlite3
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import msgspec

from .._version import __version__
from ..client.clients import Client
from ..client.requests import MAX_TIMEOUT, Unreachable, encode, file_kind, socket_path_problem
from ..wire import protocol as p
from ..wire.errors import (
    BadRequest,
    ConnectionLost,
    DaemonNotRunning,
    NexusError,
    Timeout,
    TooLarge,
)
from ..wire.paths import NoHomeDirectory

logger = logging.getLogger("nexusd")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
#: What a shell reports for a command ended by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130


# ── serve ────────────────────────────────────────────────────────────────────
def _setup_logging(level: str) -> None:
    from ..daemon.systemd import JournalFormatter, journal_stream_is_stderr

    handler = logging.StreamHandler(sys.stderr)
    if journal_stream_is_stderr():
        # journald adds the timestamp; the <N> prefix carries the priority.
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # aiosqlite logs every statement at debug: that is its noise, not ours.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..daemon.config import ConfigError, load_config
    from ..daemon.server import Server, StartupError
    from ..storage.schema import StorageError

    flags = {
        "db": args.db,
        "socket": args.socket,
        "max_messages": args.max_messages,
        "synchronous": args.synchronous,
        "queue_size": args.queue_size,
        "batch_max": args.batch_max,
        "readers": args.readers,
        "max_frame": args.max_frame,
        "max_content": args.max_content,
        "shutdown_timeout": args.shutdown_timeout,
        "log_level": args.log_level,
    }
    if args.config is not None:
        problem = _not_a_regular_file(args.config)
        if problem is not None:  # open() would wait on a fifo for a writer
            return _fail(f"config file {problem}", EXIT_USAGE)
    try:
        cfg = load_config(file=args.config, flags=flags)
    except (ConfigError, NoHomeDirectory) as exc:
        return _fail(exc.message, EXIT_USAGE)
    except (OSError, ValueError) as exc:  # config.py maps these; never a traceback regardless
        return _fail(f"cannot load the configuration: {exc}", EXIT_USAGE)
    _setup_logging(cfg.log_level)
    # The database, its WAL and the lock hold people's conversations: owner only.
    os.umask(0o077)

    import anyio

    async def main() -> None:
        server = Server(cfg)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_on_signals, server)
            await server.serve()
            tg.cancel_scope.cancel()

    options: dict[str, Any] = {}
    if cfg.uvloop:
        try:
            import uvloop  # noqa: F401
        except ImportError:
            pass
        else:
            options["use_uvloop"] = True
    try:
        anyio.run(main, backend="asyncio", backend_options=options)
    except BaseException as exc:
        # Task groups wrap what failed in exception groups: find the reason.
        reason = _find(exc, (StartupError, StorageError, ConfigError, OSError, sqlite3.Error))
        if reason is None:
            raise
        logger.error("cannot serve: %s", _reason(reason))
        return EXIT_ERROR
    return EXIT_OK


def _not_a_regular_file(path: str | os.PathLike[str]) -> str | None:
    """ "PATH is a fifo, not a regular file" when it exists as anything else, else None.

    A missing path is left to the caller, which words it for what it wanted;
    a directory too.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return f"{path} is {file_kind(mode)}, not a regular file"


def _reason(exc: BaseException) -> str:
    """One line saying what went wrong, without Python's wording where it can."""
    if isinstance(exc, NexusError):
        return exc.message
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror.lower()}{where}"
    return str(exc) or type(exc).__name__


def _find(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of ``kinds`` in ``exc`` or the groups nested in it."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kinds)
            if found is not None:
                return found
        return None
    return exc if isinstance(exc, kinds) else None


async def _on_signals(server: Any) -> None:
    import anyio

    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            logger.info("received %s", signal.Signals(signum).name)
            server.request_shutdown()


# ── output ───────────────────────────────────────────────────────────────────
#: Control characters (C0, DEL, C1) and the bidirectional overrides and
#: isolates: sent raw to a terminal they can rewrite the screen or reorder what
#: is shown, so stored text shows them escaped.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    named = _NAMED.get(c)
    if named is not None:
        return named
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def _safe(text: str) -> str:
    """``text`` with every control character escaped (``\\n``, ``\\x1b``, ``\\u202e``)."""
    return _UNSAFE.sub(_escape_char, text)


def _fail(message: str, code: int) -> int:
    """Print one line to stderr; return ``code``."""
    print(f"nexusd: {_safe(message)}", file=sys.stderr)
    return code


def _out(args: argparse.Namespace, value: Any, human: str) -> None:
    if args.json:  # exact: JSON escapes control characters itself
        sys.stdout.write(msgspec.json.encode(value).decode() + "\n")
    else:
        sys.stdout.write(human + ("\n" if human and not human.endswith("\n") else ""))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_safe(str(c)) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line.rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(out)


def _one_line(text: str, width: int) -> str:
    flat = _safe(text)
    return flat if width <= 0 or len(flat) <= width else flat[: width - 1] + "…"


# ── client commands ──────────────────────────────────────────────────────────
def _read_stdin(raw: bool) -> str:
    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        _usage(
            f"stdin is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "convert it first, e.g. with iconv"
        )
    # `echo text |` and here-documents end with a newline that is not part of
    # the message; --raw keeps everything.
    return text if raw or not text.endswith("\n") else text[:-1]


def _check_length(name: str, value: str, most: int) -> None:
    if not 1 <= len(value) <= most:
        _usage(f"{name} must be 1 to {most} characters, not {len(value)}")


def cmd_append(args: argparse.Namespace, c: Client) -> None:
    _check_length("role", args.role, p.MAX_ROLE_CHARS)
    meta = None
    if args.meta is not None:
        try:
            meta = json.loads(args.meta)
        except json.JSONDecodeError as exc:
            _usage(f"--meta is not valid JSON: {exc}")
        if not isinstance(meta, dict):
            _usage('--meta must be a JSON object, like \'{"model": "m1"}\'')
        # What cannot be sent (an int over 64 bits, a lone surrogate from a
        # "\\ud800" escape) is BadRequest naming meta, before any I/O.
        encode(p.Append(id=0, role=args.role, content="", meta=meta))
    content = _read_stdin(args.raw) if args.content == "-" else args.content
    if not content and not args.allow_empty:
        _usage("the content is empty; pass --allow-empty to store an empty message")
    limits = c.hello().limits
    size = len(content.encode("utf-8"))
    max_content = limits.get("max_content")
    if max_content is not None and size > max_content:
        _usage(
            f"the content is {size} bytes of UTF-8; this daemon accepts at most "
            f"{max_content} (max_content)"
        )
    max_meta = limits.get("max_meta")
    if meta is not None and max_meta is not None:
        meta_size = len(msgspec.json.encode(meta))
        if meta_size > max_meta:
            _usage(f"--meta is {meta_size} bytes of JSON; this daemon accepts at most {max_meta}")
    mid = c.append(
        args.role, content, session_tag=args.session, timestamp=args.timestamp, meta=meta
    )
    _out(args, {"id": mid}, str(mid))


def cmd_history(args: argparse.Namespace, c: Client) -> None:
    msgs = c.get_history(args.session, args.limit, before_id=args.before, after_id=args.after)
    width = 0 if args.full else 80
    rows = [(m.id, m.timestamp, m.role, _one_line(m.content, width)) for m in msgs]
    human = _table(["ID", "TIMESTAMP", "ROLE", "CONTENT"], rows) if msgs else "(no messages)"
    if msgs and len(msgs) >= args.limit and not args.json and sys.stdout.isatty():
        human += "\n" + _more_hint(args, c, msgs)
    _out(args, msgs, human)


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


def cmd_count(args: argparse.Namespace, c: Client) -> None:
    n = c.message_count(args.session)
    _out(args, {"session_tag": args.session, "count": n}, str(n))


def cmd_sessions(args: argparse.Namespace, c: Client) -> None:
    infos = c.sessions()
    rows = [(s.session_tag, s.count, s.first_id, s.last_id, s.last_timestamp) for s in infos]
    human = (
        _table(["SESSION", "COUNT", "FIRST", "LAST", "LAST TIMESTAMP"], rows)
        if infos
        else "(no sessions)"
    )
    _out(args, infos, human)


def cmd_pop(args: argparse.Namespace, c: Client) -> None:
    m = c.pop(args.session)
    human = (
        "(empty)"
        if m is None
        else _table(
            ["ID", "TIMESTAMP", "ROLE", "CONTENT"],
            [(m.id, m.timestamp, m.role, _one_line(m.content, 0))],
        )
    )
    _out(args, m, human)


def cmd_clear(args: argparse.Namespace, c: Client) -> None:
    n = c.clear(args.session)
    _out(args, {"deleted": n}, f"deleted {n} message(s) from {_safe(repr(args.session))}")


def cmd_clear_all(args: argparse.Namespace, c: Client) -> None:
    if not args.yes:
        _usage("clear-all deletes every message of every session; confirm with --yes")
    n = c.clear_all()
    _out(args, {"deleted": n}, f"deleted {n} message(s)")


def cmd_stats(args: argparse.Namespace, c: Client) -> None:
    st = c.stats()
    _out(args, st, _table(["STAT", "VALUE"], sorted(st.items())))


def cmd_ping(args: argparse.Namespace, c: Client) -> None:
    hello = c.hello()
    c.ping()
    _out(
        args,
        {"ok": True, "server": hello.server, "version": hello.version},
        f"ok ({_safe(hello.server)}, protocol {hello.version})",
    )


def cmd_backup(args: argparse.Namespace, c: Client) -> None:
    bar = _ProgressBar(sys.stderr) if sys.stderr.isatty() and not args.json else None
    size = c.backup(args.dest, progress=bar)
    if bar is not None:
        bar.done()
    _out(args, {"dest": args.dest, "bytes": size}, f"wrote {size} bytes to {_safe(args.dest)}")


class _ProgressBar:
    """``[#####.....]  45%  12.3/27.0 MiB`` on a terminal, redrawn in place."""

    def __init__(self, stream: Any, width: int = 30) -> None:
        self.stream = stream
        self.width = width

    def __call__(self, done: int, total: int) -> None:
        frac = done / total if total else 1.0
        filled = int(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        mib = 1024 * 1024
        self.stream.write(f"\r[{bar}] {frac:4.0%}  {done / mib:.1f}/{total / mib:.1f} MiB")
        self.stream.flush()

    def done(self) -> None:
        self.stream.write("\n")


#: Problems ``check`` prints before "… and N more" (``--json`` lists them all).
CHECK_SHOWN = 20


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0 sound, 1 damaged, 2 when the path is not a nexusd database at all."""
    from ..storage.schema import StorageError, describe, integrity_check
    from ..wire.paths import default_db_path

    try:  # the default only when needed: it may need a home directory
        db = Path(args.db or os.environ.get("NEXUSD_DB") or default_db_path())
    except NoHomeDirectory as exc:
        return _fail(exc.message, EXIT_USAGE)
    if db.is_dir():
        return _fail(f"{db} is a directory, not a database file", EXIT_USAGE)
    if not db.exists():
        return _fail(f"{db} does not exist", EXIT_USAGE)
    problem = _not_a_regular_file(db)
    if problem is not None:  # SQLite would block on a fifo, read a device
        return _fail(problem, EXIT_USAGE)
    try:
        if db.stat().st_size == 0:  # SQLite would read it as an empty database
            return _fail(f"{db} is an empty file, not a nexusd database", EXIT_USAGE)
        problems = integrity_check(db)
        info = _describe(db, describe) if problems == ["ok"] else {}
    except StorageError as exc:  # not SQLite, or another program's: one line, no verdict
        return _fail(exc.message, EXIT_USAGE)
    except OSError as exc:
        return _fail(f"cannot read {db}: {_reason(exc)}", EXIT_ERROR)
    except sqlite3.Error as exc:
        problems, info = [str(exc)], {}
    ok = problems == ["ok"]
    # SQLite puts several problems in one row, separated by newlines.
    lines = [] if ok else [ln for row in problems for ln in row.splitlines() if ln.strip()]
    verdict = {"db": str(db), "ok": ok, "problems": lines, **info}
    if ok:
        human = (
            f"{_safe(str(db))}: ok (schema {info['schema_version']}, {info['messages']} messages "
            f"in {info['sessions']} sessions)"
        )
    else:
        shown = [f"  {_safe(line)}" for line in lines[:CHECK_SHOWN]]
        if len(lines) > CHECK_SHOWN:
            shown.append(f"  … and {len(lines) - CHECK_SHOWN} more")
        human = f"{_safe(str(db))}: DAMAGED\n" + "\n".join(shown)
    _out(args, verdict, human)
    return EXIT_OK if ok else EXIT_ERROR


def _describe(db: Path, describe: Any) -> dict[str, int]:
    """What ``check`` reports of a sound file; one without nexusd's table is not ours."""
    from ..storage.schema import TABLE, StorageError

    try:
        return dict(describe(db))
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        raise StorageError(
            f"{db} is an SQLite database without nexusd's table ({TABLE}), not a nexusd database"
        ) from None


def _usage(message: str) -> NoReturn:
    raise SystemExit(_fail(message, EXIT_USAGE))


_MSGSPEC_WORDING = re.compile(r"^Expected `(\w+)`(?: of length)? (<=|>=|<|>) (\d+)")


def _plain(err: NexusError) -> str:
    """A validation error in plain words, naming the field."""
    message = err.message.split(" - at `$", 1)[0]
    m = _MSGSPEC_WORDING.match(message)
    if m is not None:
        kind, op, n = m.groups()
        bound = {"<=": "at most", ">=": "at least", "<": "under", ">": "over"}[op]
        unit = " characters" if kind == "str" else ""
        message = f"must be {bound} {n}{unit}"
    field = err.field
    if field and field not in message:
        return f"{field}: {message}"
    return message


# ── parser ───────────────────────────────────────────────────────────────────
class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (with where to get help), exit 2."""

    def error(self, message: str) -> NoReturn:
        # "argument --before: must be ..." reads better as "--before must be ...".
        message = _ARGUMENT_MUST.sub(r"\1 must", message)
        _usage(f"{message} (see `{self.prog} --help`)")


_ARGUMENT_MUST = re.compile(r"^argument (-[\w-]+)(?:/-[\w-]+)*: must")


def _shown(text: str) -> str:
    """A value the user typed, cut short if it is long (it is echoed in a one-line error)."""
    return text if len(text) <= 40 else f"{text[:37]}..."


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{_shown(text)!r} is not a number of seconds") from None
    # The client's own bound (a day): 1e12 would overflow the socket's timer.
    if not 0 < value <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds > 0 and at most {MAX_TIMEOUT} (one day), "
            f"not {_shown(text)}"
        )
    return value


def _bounded(low: int, high: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{_shown(text)!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be between {low} and {high}, not {_shown(text.strip())}"
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
        help=f"seconds to wait for each answer (default 30, at most {MAX_TIMEOUT})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nexusd", description="Durable local conversation history over a Unix socket."
    )
    parser.add_argument("--version", action="version", version=f"nexusd {__version__}")
    _add_client_options(parser, prefix="global_")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the daemon in the foreground")
    s.add_argument("--db", help="database file (default: $STATE_DIRECTORY or XDG state dir)")
    s.add_argument(
        "--socket", help="socket path (default: $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR or /tmp)"
    )
    s.add_argument("--config", help="TOML file with the same keys")
    s.add_argument(
        "--max-messages", type=int, help="rows kept per session (default 500, 0 = unbounded)"
    )
    s.add_argument(
        "--synchronous", choices=["full", "normal"], help="SQLite durability (default full)"
    )
    s.add_argument("--queue-size", type=int, help="write queue capacity (default 10000)")
    s.add_argument("--batch-max", type=int, help="most writes per transaction (default 1000)")
    s.add_argument("--readers", type=int, help="read-only connections (default 4)")
    s.add_argument("--max-frame", type=int, help="frame limit in bytes (default 4 MiB)")
    s.add_argument(
        "--max-content", type=int, help="content limit in bytes of UTF-8 (default 1 MiB)"
    )
    s.add_argument("--shutdown-timeout", type=float, help="drain deadline in seconds (default 20)")
    s.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="default info"
    )
    s.set_defaults(func=None)

    def client_cmd(
        name: str, func: Any, help: str, session: bool = True
    ) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        _add_client_options(c)
        if session:
            c.add_argument(
                "--session", default="nexus", metavar="TAG", help="session tag (default nexus)"
            )
        c.set_defaults(func=func)
        return c

    a = client_cmd("append", cmd_append, "store one message and print its id")
    a.add_argument("role")
    a.add_argument("content", help="message text, or - to read it from stdin")
    a.add_argument("--timestamp", help="keep this RFC 3339 timestamp instead of the commit time")
    a.add_argument("--meta", help="JSON object stored with the message")
    a.add_argument("--raw", action="store_true", help="with -: keep the final newline")
    a.add_argument("--allow-empty", action="store_true", help="store an empty message")
    h = client_cmd("history", cmd_history, "print a session's messages, oldest first")
    h.add_argument(
        "--limit",
        type=_bounded(1, p.MAX_HISTORY_LIMIT),
        default=200,
        metavar="N",
        help=f"most messages to print, 1 to {p.MAX_HISTORY_LIMIT} (default 200)",
    )
    row_id = _bounded(0, p.MAX_REQUEST_ID)
    h.add_argument("--before", type=row_id, metavar="ID", help="page back: messages older than ID")
    h.add_argument(
        "--after", type=row_id, metavar="ID", help="page forward: messages newer than ID"
    )
    h.add_argument("--full", action="store_true", help="do not shorten long contents")
    client_cmd("count", cmd_count, "print how many messages a session holds")
    client_cmd("sessions", cmd_sessions, "list session tags", session=False)
    client_cmd("pop", cmd_pop, "remove and print the newest message of a session")
    client_cmd("clear", cmd_clear, "delete every message of a session")
    ca = client_cmd(
        "clear-all", cmd_clear_all, "delete every message of every session", session=False
    )
    ca.add_argument("--yes", action="store_true", help="confirm")
    client_cmd("stats", cmd_stats, "print the daemon's counters", session=False)
    client_cmd("ping", cmd_ping, "check that the daemon answers", session=False)
    b = client_cmd("backup", cmd_backup, "write a consistent copy of the database", session=False)
    b.add_argument("dest", help="file to write (replaced atomically when complete)")
    ck = sub.add_parser("check", help="run integrity checks on a database file and print a verdict")
    ck.add_argument("--db", help="database file (default: as the daemon resolves it)")
    ck.add_argument("--json", action="store_true", help="machine-readable output")
    ck.set_defaults(func="check")
    return parser


#: Arguments that are text sent to the daemon (paths may be any bytes).
_TEXT_ARGS = ("role", "content", "session", "meta", "timestamp")


def _merge_globals(args: argparse.Namespace) -> None:
    """Options given before the command apply unless the command repeats them.

    ``serve`` takes none of them (its own ``--socket`` goes after it) and
    ``check`` only ``--json``: given there they would be ignored, so they are refused.
    """
    if args.func is None or args.func == "check":
        command, accepted = ("serve", ()) if args.func is None else ("check", ("json",))
        for name in ("socket", "json", "timeout"):
            if name not in accepted and hasattr(args, f"global_{name}"):
                after = f"; put it after: `nexusd {command} --{name} ...`"
                _usage(
                    f"--{name} before the command applies to client commands, not {command}"
                    + (after if hasattr(args, name) else "")
                )
    for name in ("socket", "json", "timeout"):
        given = getattr(args, f"global_{name}", None)
        if given is not None and getattr(args, name, None) in (None, False):
            setattr(args, name, given)
    if getattr(args, "timeout", None) is None:
        args.timeout = 30.0


def _check_socket_path(name: str, path: str | os.PathLike[str]) -> None:
    problem = socket_path_problem(path)
    if problem is not None:
        _usage(f"{name} {problem}")


def _check_text(args: argparse.Namespace) -> None:
    """Arguments with bytes that are not UTF-8 arrive as lone surrogates: refuse them."""
    for name in _TEXT_ARGS:
        value = getattr(args, name, None)
        if not isinstance(value, str):
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            byte = ord(value[exc.start]) - 0xDC00
            what = f"byte 0x{byte:02x}" if 0x80 <= byte <= 0xFF else "a surrogate"
            _usage(
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
    if args.func is None:
        return cmd_serve(args)
    if args.func == "check":
        return cmd_check(args)
    _check_text(args)
    if getattr(args, "session", None) is not None:
        _check_length("--session", args.session, p.MAX_SESSION_CHARS)
    if args.socket is not None:
        _check_socket_path("--socket", args.socket)
    # Connects lazily, on the first call: usage errors come out before any I/O.
    try:
        client = Client(args.socket, timeout=args.timeout)
    except NexusError as exc:  # e.g. a malformed NEXUSD_TRUSTED_UIDS
        return _fail(exc.message, EXIT_USAGE)
    if args.socket is None:  # from NEXUSD_SOCKET or the default
        source = "NEXUSD_SOCKET" if os.environ.get("NEXUSD_SOCKET") else "the default socket path"
        _check_socket_path(f"{source} {client.socket_path}", client.socket_path)
    try:
        args.func(args, client)
    except Unreachable as exc:
        how = "--socket" if args.socket is not None else "--socket (or NEXUSD_SOCKET)"
        return _fail(exc.explain(how), EXIT_UNREACHABLE)
    except (DaemonNotRunning, ConnectionLost, Timeout) as exc:
        return _fail(exc.message, EXIT_UNREACHABLE)
    except (BadRequest, TooLarge) as exc:
        # The daemon (or the client, before sending) rejected what was asked.
        return _fail(_plain(exc), EXIT_USAGE)
    except NexusError as exc:
        return _fail(f"error ({exc.code}): {exc.message}", EXIT_ERROR)
    except BrokenPipeError:
        # stdout closed early (e.g. piped into head): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        client.close()
    return EXIT_OK


def run() -> NoReturn:
    """Console-script entry point."""
    sys.exit(main())
