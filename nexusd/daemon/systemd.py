"""systemd integration without libsystemd: notify, socket activation, journal logs.

* ``sd_notify``: datagrams to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the
  abstract namespace): ``READY=1``, ``STATUS=…``, ``STOPPING=1`` and
  ``WATCHDOG=1``.  Without ``NOTIFY_SOCKET`` every call is a silent no-op.
  Sends never block (they run on the event loop): when nobody reads the
  socket and its queue is full, the message is dropped and logged.
* Socket activation: the fds from 3 on that ``$LISTEN_FDS`` names (when
  ``$LISTEN_PID`` is us), checked to be listening Unix stream sockets.
* Journal logging: under systemd (``$JOURNAL_STREAM`` names our stderr) each
  line carries the sd-daemon ``<N>`` priority prefix and no timestamp, which
  journald adds itself.

The environment: :class:`Notifier` and :func:`journal_stream_is_stderr` only
read it.  Two calls change it, at start-up, on purpose:
:func:`listen_fds` removes ``LISTEN_*`` (as ``sd_listen_fds`` does) and
:func:`forget_notify_environment` removes ``NOTIFY_SOCKET`` and the watchdog
variables, so that no child process talks to systemd in the daemon's name.

In the manner of gunicorn's ``systemd.py``: small, synchronous, no event loop.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import sys
from collections.abc import Mapping, MutableMapping
from typing import Final

from .limits import QuietLog

__all__ = [
    "LISTEN_VARIABLES",
    "NOTIFY_VARIABLES",
    "SD_LISTEN_FDS_START",
    "ActivationError",
    "JournalFormatter",
    "Notifier",
    "forget_notify_environment",
    "journal_stream_is_stderr",
    "listen_fds",
]

logger = logging.getLogger(__name__)
_quiet = QuietLog(logger)

SD_LISTEN_FDS_START: Final = 3
#: What systemd sets for sd_notify and its watchdog.
NOTIFY_VARIABLES: Final = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
#: What systemd sets for socket activation.
LISTEN_VARIABLES: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(Exception):
    """A socket passed by systemd cannot be used."""


class Notifier:
    """Sends sd_notify messages; does nothing when not run by systemd."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        """Read ``NOTIFY_SOCKET`` and the watchdog variables from ``env`` (``os.environ``).

        Only reads: the process environment is left as it is.  The daemon's
        entry point calls :func:`forget_notify_environment` once the notifier
        exists, so that children do not inherit the variables.
        """
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self._addr: str | bytes | None = None
        if addr.startswith("@"):
            self._addr = b"\0" + addr[1:].encode()  # abstract namespace
        elif addr.startswith("/"):
            self._addr = addr
        self._sock: socket.socket | None = None
        usec = env.get("WATCHDOG_USEC", "")
        wd_pid = env.get("WATCHDOG_PID", "")
        self.watchdog_usec = int(usec) if usec.isdigit() and int(usec) > 0 else 0
        if wd_pid and wd_pid != str(os.getpid()):
            self.watchdog_usec = 0  # meant for another process

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half the watchdog timeout), or None."""
        if not self.enabled or not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2_000_000

    def send(self, *lines: str) -> bool:
        if self._addr is None:
            return False
        if self._sock is None:
            self._sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
        try:
            self._sock.sendto("\n".join(lines).encode(), self._addr)
        except BlockingIOError:
            # Nobody reads the notify socket: drop this one rather than stall the loop.
            _quiet.warning("full", "sd_notify dropped: the notify socket's queue is full")
            return False
        except OSError as exc:
            _quiet.warning("failed", "sd_notify failed: %s", exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str = "shutting down") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def forget_notify_environment(env: MutableMapping[str, str] | None = None) -> None:
    """Remove ``NOTIFY_SOCKET`` and the watchdog variables from ``env`` (``os.environ``).

    The daemon's entry point calls it once its :class:`Notifier` has read
    them: children we might spawn must not talk to systemd in our name (what
    ``sd_notify(unset_environment=1)`` does in C).
    """
    env = os.environ if env is None else env
    for var in NOTIFY_VARIABLES:
        env.pop(var, None)


def listen_fds(
    env: MutableMapping[str, str] | None = None, *, unset_environment: bool = True
) -> list[tuple[socket.socket, str]]:
    """The listening sockets systemd passed us, with their names; [] if none.

    Reads ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` from ``env``
    (``os.environ``).  Like ``sd_listen_fds(unset_environment)``, it then
    removes them from ``env`` unless ``unset_environment`` is false: the
    sockets are ours, and a child process that inherited the variables would
    take them for its own.  This is the one function here that changes the
    environment, and only when asked to (which is the default, as in
    libsystemd's daemons): call it once, at start-up.
    """
    env = os.environ if env is None else env
    pid, count = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    names = env.get("LISTEN_FDNAMES", "")
    if unset_environment:
        for var in LISTEN_VARIABLES:
            env.pop(var, None)
    if not count:
        return []
    if pid != str(os.getpid()):
        logger.info("LISTEN_FDS is meant for pid %s, not us; ignoring it", pid or "?")
        return []
    if not count.isdigit():
        raise ActivationError(f"LISTEN_FDS is not a number: {count!r}")
    labels = names.split(":") if names else []
    out = []
    for i in range(int(count)):
        fd = SD_LISTEN_FDS_START + i
        label = labels[i] if i < len(labels) else f"fd{fd}"
        out.append((_listening_unix_socket(fd, label), label))
    return out


def _listening_unix_socket(fd: int, label: str) -> socket.socket:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise ActivationError(f"passed fd {fd} ({label}) is not open: {exc}") from None
    if not stat.S_ISSOCK(mode):
        raise ActivationError(f"passed fd {fd} ({label}) is not a socket")
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ActivationError(
            f"passed fd {fd} ({label}) is not a Unix stream socket; use ListenStream=/path"
        )
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ActivationError(f"passed fd {fd} ({label}) is not listening")
    os.set_inheritable(fd, False)
    return sock


def journal_stream_is_stderr(env: Mapping[str, str] | None = None) -> bool:
    """Whether stderr is the journal stream systemd connected us to."""
    env = os.environ if env is None else env
    value = env.get("JOURNAL_STREAM", "")
    if ":" not in value:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return value == f"{st.st_dev}:{st.st_ino}"


class JournalFormatter(logging.Formatter):
    """``<3>nexusd.writer: message``: the sd-daemon priority prefix, no timestamp."""

    PRIORITIES: Final = {
        logging.CRITICAL: 2,
        logging.ERROR: 3,
        logging.WARNING: 4,
        logging.INFO: 6,
        logging.DEBUG: 7,
    }

    def format(self, record: logging.LogRecord) -> str:
        prio = self.PRIORITIES.get(record.levelno, 6 if record.levelno > logging.DEBUG else 7)
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        # journald splits on newlines: every continuation line keeps the priority.
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())
