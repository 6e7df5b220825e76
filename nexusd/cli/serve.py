"""``nexusd serve``: the daemon's process — configuration, logging, signals, exit code.

This is where the daemon starts, so what belongs to the whole process is done
here and nowhere else: the umask, the log handler, the signal handlers, and
taking systemd's notify variables out of the environment.  The daemon itself
(:class:`nexusd.daemon.server.Server`) is imported only when serving, so the
client commands do not load it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sqlite3
import sys
from typing import TYPE_CHECKING, Any

from ..daemon.config import SETTINGS, ConfigError, load_config
from ..storage.postgres import dsn
from ..wire.paths import NoHomeDirectory
from .output import EXIT_ERROR, EXIT_OK, EXIT_USAGE, fail, not_a_regular_file, reason

if TYPE_CHECKING:
    from ..daemon.server import Server

# Not __name__: "nexusd" is the name the daemon's start-up errors have always
# been logged under ("ERROR nexusd: cannot serve: ...").
logger = logging.getLogger("nexusd")

#: The settings that ``nexusd serve`` also takes as flags (``--max-messages``);
#: their help and default come from the declaration in nexusd.daemon.config.
FLAGS = (
    "db",
    "storage",
    "socket",
    "max_messages",
    "max_age",
    "synchronous",
    "search",
    "queue_size",
    "batch_max",
    "readers",
    "max_frame",
    "max_content",
    "shutdown_timeout",
    "log_level",
)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """``--config`` and one flag per setting of :data:`FLAGS`, described by the declaration.

    A flag's value stays a string (None when not given, so the file and the
    environment still apply): :func:`load_config` converts it like the others.
    """
    parser.add_argument("--config", help="TOML file with the same keys")
    for name in FLAGS:
        setting = SETTINGS[name]
        text = setting.description
        if setting.default is not None:  # None: computed, and described in words
            text += f" (default {shown_default(setting.default)})"
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            choices=setting.choices or None,
            help=text.replace("%", "%%"),  # argparse formats help with %
        )


def shown_default(value: Any) -> str:
    """A default as one writes it in TOML (``true``) or on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) or '""'  # storage's "" (SQLite) would read as nothing


def setup_logging(level: str) -> None:
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
    """Run the daemon until SIGTERM/SIGINT: 0 after a clean stop, 1 if it could not serve."""
    from ..daemon.server import Server, StartupError
    from ..daemon.systemd import forget_notify_environment
    from ..storage.schema import StorageError

    flags = {name: getattr(args, name) for name in FLAGS}
    if args.config is not None:
        problem = not_a_regular_file(args.config)
        if problem is not None:  # open() would wait on a fifo for a writer
            return fail(f"config file {problem}", EXIT_USAGE)
    try:
        cfg = load_config(file=args.config, flags=flags)
    except (ConfigError, NoHomeDirectory) as exc:
        return fail(exc.message, EXIT_USAGE)
    except (OSError, ValueError) as exc:  # config.py maps these; never a traceback regardless
        return fail(f"cannot load the configuration: {exc}", EXIT_USAGE)
    setup_logging(cfg.log_level)
    if args.storage and dsn.has_password(args.storage):
        # argv is readable by every user of the machine (ps, /proc/PID/cmdline).
        logger.warning(
            "the password in --storage is visible to every user of this machine in `ps`:"
            " keep it in ~/.pgpass, PGPASSFILE or PGPASSWORD, or set NEXUSD_STORAGE"
            " from a file only nexusd reads (see docs/scaling.md)"
        )
    # The database, its WAL and the lock hold people's conversations: owner only.
    os.umask(0o077)

    import anyio

    async def main() -> None:
        server = Server(cfg)  # its Notifier reads NOTIFY_SOCKET and the watchdog here
        # ... and then the process forgets them: children must not talk to
        # systemd in our name.
        forget_notify_environment()
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
        found = _find(exc, (StartupError, StorageError, ConfigError, OSError, sqlite3.Error))
        if found is None:
            raise
        logger.error("cannot serve: %s", reason(found))
        return EXIT_ERROR
    return EXIT_OK


def _find(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of ``kinds`` in ``exc`` or the groups nested in it."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kinds)
            if found is not None:
                return found
        return None
    return exc if isinstance(exc, kinds) else None


async def _on_signals(server: Server) -> None:
    import anyio

    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            logger.info("received %s", signal.Signals(signum).name)
            server.request_shutdown()
