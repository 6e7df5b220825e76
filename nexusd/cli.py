"""The ``nexusd`` command: ``serve`` runs the daemon, the rest are clients.

Exit codes: 0 ok, 1 the server answered an error (or the daemon could not
start), 2 usage, 3 cannot reach the daemon.  ``--json`` gives machine output;
otherwise a readable table.  This is the only module that writes to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import msgspec

from . import __version__
from .client import Client
from .errors import ConnectionLost, DaemonNotRunning, NexusError, Timeout

logger = logging.getLogger("nexusd")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


# ── serve ────────────────────────────────────────────────────────────────────
def _setup_logging(level: str) -> None:
    from .systemd import JournalFormatter, journal_stream_is_stderr

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
    from .config import ConfigError, load_config
    from .schema import StorageError
    from .server import Server, StartupError

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
    try:
        cfg = load_config(file=args.config, flags=flags)
    except ConfigError as exc:
        print(f"nexusd: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
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
        reason = _find(exc, (StartupError, StorageError, ConfigError))
        if reason is None:
            raise
        logger.error("%s", reason.message)
        return EXIT_ERROR
    return EXIT_OK


def _find(exc: BaseException, kinds: tuple[type[NexusError], ...]) -> NexusError | None:
    """The first exception of ``kinds`` in ``exc`` or the groups nested in it."""
    if isinstance(exc, kinds):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kinds)
            if found is not None:
                return found
    return None


async def _on_signals(server: Any) -> None:
    import anyio

    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            logger.info("received %s", signal.Signals(signum).name)
            server.request_shutdown()


# ── client commands ──────────────────────────────────────────────────────────
def _out(args: argparse.Namespace, value: Any, human: str) -> None:
    if args.json:
        sys.stdout.write(msgspec.json.encode(value).decode() + "\n")
    else:
        sys.stdout.write(human + ("\n" if human and not human.endswith("\n") else ""))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line.rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(out)


def _one_line(text: str, width: int) -> str:
    flat = text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", " ")
    return flat if width <= 0 or len(flat) <= width else flat[: width - 1] + "…"


def cmd_append(args: argparse.Namespace, c: Client) -> None:
    content = sys.stdin.read() if args.content == "-" else args.content
    meta = None
    if args.meta is not None:
        try:
            meta = json.loads(args.meta)
        except json.JSONDecodeError as exc:
            _usage(f"--meta is not valid JSON: {exc}")
        if not isinstance(meta, dict):
            _usage("--meta must be a JSON object")
    mid = c.append(
        args.role, content, session_tag=args.session, timestamp=args.timestamp, meta=meta
    )
    _out(args, {"id": mid}, str(mid))


def cmd_history(args: argparse.Namespace, c: Client) -> None:
    msgs = c.get_history(args.session, args.limit, before_id=args.before, after_id=args.after)
    width = 0 if args.full else 80
    rows = [(m.id, m.timestamp, m.role, _one_line(m.content, width)) for m in msgs]
    _out(
        args,
        msgs,
        _table(["ID", "TIMESTAMP", "ROLE", "CONTENT"], rows) if msgs else "(no messages)",
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
    _out(args, {"deleted": n}, f"deleted {n} message(s) from {args.session!r}")


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
        f"ok ({hello.server}, protocol {hello.version})",
    )


def cmd_backup(args: argparse.Namespace, c: Client) -> None:
    bar = _ProgressBar(sys.stderr) if sys.stderr.isatty() and not args.json else None
    size = c.backup(args.dest, progress=bar)
    if bar is not None:
        bar.done()
    _out(args, {"dest": args.dest, "bytes": size}, f"wrote {size} bytes to {args.dest}")


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


def cmd_check(args: argparse.Namespace) -> int:
    from .paths import default_db_path
    from .schema import StorageError, describe, integrity_check

    db = Path(args.db or os.environ.get("NEXUSD_DB") or default_db_path())
    if not db.exists():
        print(f"nexusd: {db} does not exist", file=sys.stderr)
        return EXIT_ERROR
    try:
        problems = integrity_check(db)
        info = describe(db) if problems == ["ok"] else {}
    except (StorageError, sqlite3.Error) as exc:
        problems, info = [str(exc)], {}
    ok = problems == ["ok"]
    verdict = {"db": str(db), "ok": ok, "problems": [] if ok else problems, **info}
    if ok:
        human = (
            f"{db}: ok (schema {info['schema_version']}, {info['messages']} messages "
            f"in {info['sessions']} sessions)"
        )
    else:
        human = f"{db}: DAMAGED\n" + "\n".join(f"  {line}" for line in problems[:20])
    _out(args, verdict, human)
    return EXIT_OK if ok else EXIT_ERROR


def _usage(message: str) -> NoReturn:
    print(f"nexusd: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


# ── parser ───────────────────────────────────────────────────────────────────
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nexusd", description="Durable local conversation history over a Unix socket."
    )
    parser.add_argument("--version", action="version", version=f"nexusd {__version__}")
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
        c.add_argument("--socket", help="daemon socket (default: as the daemon resolves it)")
        c.add_argument("--json", action="store_true", help="machine-readable output")
        c.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
        if session:
            c.add_argument(
                "--session", default="nexus", metavar="TAG", help="session tag (default nexus)"
            )
        c.set_defaults(func=func)
        return c

    a = client_cmd("append", cmd_append, "store one message and print its id")
    a.add_argument("role")
    a.add_argument("content", help="message text, or - to read it from stdin")
    a.add_argument("--timestamp", help="keep this timestamp instead of the commit time")
    a.add_argument("--meta", help="JSON object stored with the message")
    h = client_cmd("history", cmd_history, "print a session's messages, oldest first")
    h.add_argument("--limit", type=int, default=200)
    h.add_argument("--before", type=int, metavar="ID", help="page back: messages older than ID")
    h.add_argument("--after", type=int, metavar="ID", help="page forward: messages newer than ID")
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.func is None:
        return cmd_serve(args)
    if args.func == "check":
        return cmd_check(args)
    # Connects lazily, on the first call: usage errors come out before any I/O.
    client = Client(args.socket, timeout=args.timeout)
    try:
        args.func(args, client)
    except (DaemonNotRunning, ConnectionLost, Timeout) as exc:
        print(f"nexusd: {exc.message}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except NexusError as exc:
        print(f"nexusd: error ({exc.code}): {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # stdout closed early (e.g. piped into head): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        client.close()
    return EXIT_OK


def run() -> NoReturn:
    """Console-script entry point."""
    sys.exit(main())
