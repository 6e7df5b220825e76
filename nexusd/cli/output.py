"""How the ``nexusd`` command speaks: its exit codes, stdout, and one line on stderr.

Every command's answer goes through :func:`out` (``--json``: exact JSON;
otherwise readable text), every mistake through :func:`fail` or
:func:`usage` (one line on stderr, never a traceback).  Text that came from
outside (stored messages, paths, error messages) is shown with its control
characters escaped (:func:`safe`).  The CLI modules are the only ones of the
package that write to stdout, and they write only through here.
"""

from __future__ import annotations

import argparse
import os
import re
import stat
import sys
from collections.abc import Sequence
from typing import Any, Final, NoReturn

import msgspec

from ..client.backup import file_kind
from ..wire.errors import NexusError

# What each exit code means is told once, in the docstring of nexusd.cli.main.
EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3
#: What a shell reports for a command ended by SIGINT (128 + 2).
EXIT_INTERRUPTED: Final = 130

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


def safe(text: str) -> str:
    """``text`` with every control character escaped (``\\n``, ``\\x1b``, ``\\u202e``)."""
    return _UNSAFE.sub(_escape_char, text)


def fail(message: str, code: int) -> int:
    """Print one line to stderr; return ``code``."""
    print(f"nexusd: {safe(message)}", file=sys.stderr)
    return code


def not_for_postgres(command: str, source: str, url: str, instead: str) -> int:
    """``command`` works on an SQLite file, but ``source`` names PostgreSQL: one line, exit 2.

    The URL is shown without its password (it may have come from a file only
    nexusd reads).
    """
    from ..storage.postgres.dsn import redact

    return fail(
        f"{command} works on an SQLite database file, but {source} names PostgreSQL"
        f" ({redact(url)}): {instead}, or give --db FILE for a file",
        EXIT_USAGE,
    )


def is_url(text: str) -> bool:
    """Whether ``text`` looks like a URL (``scheme://``), not a path."""
    return re.match(r"\w[\w+.-]*://", text) is not None


def usage(message: str) -> NoReturn:
    """A usage mistake: one line on stderr, exit 2."""
    raise SystemExit(fail(message, EXIT_USAGE))


def out(args: argparse.Namespace, value: Any, human: str) -> None:
    """The command's answer: ``value`` as JSON with ``--json``, else ``human``."""
    if args.json:  # exact: JSON escapes control characters itself
        sys.stdout.write(msgspec.json.encode(value).decode() + "\n")
    else:
        sys.stdout.write(human + ("\n" if human and not human.endswith("\n") else ""))


def line(text: str) -> None:
    """One line of a command that streams (``tail``); :func:`flush` shows what was written."""
    sys.stdout.write(text + "\n")


def flush() -> None:
    sys.stdout.flush()


def as_json(value: Any) -> str:
    """``value`` as one line of JSON (exact: JSON escapes control characters itself)."""
    return msgspec.json.encode(value).decode()


def highlighting(stream: Any) -> tuple[str, str]:
    """How matched terms are marked on ``stream``: bold and underlined on a terminal
    (unless ``NO_COLOR`` is set), not at all elsewhere."""
    if os.environ.get("NO_COLOR") or not stream.isatty():
        return "", ""
    return "\x1b[1;4m", "\x1b[0m"


def marked(text: str, spans: Sequence[tuple[int, int]], marks: tuple[str, str]) -> str:
    """``text`` on one line, escaped, with each [start, end) span between ``marks``."""
    parts = []
    pos = 0
    for start, end in spans:
        if start < pos or end > len(text) or start > end:
            continue  # not a span of this text: show it unmarked
        parts += [safe(text[pos:start]), marks[0], safe(text[start:end]), marks[1]]
        pos = end
    parts.append(safe(text[pos:]))
    return "".join(parts)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[safe(str(c)) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    lines = [line.rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def one_line(text: str, width: int) -> str:
    """``text`` escaped, cut to ``width`` characters (0: whole)."""
    flat = safe(text)
    return flat if width <= 0 or len(flat) <= width else flat[: width - 1] + "…"


class ProgressBar:
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


def reason(exc: BaseException) -> str:
    """One line saying what went wrong, without Python's wording where it can."""
    if isinstance(exc, NexusError):
        return exc.message
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror.lower()}{where}"
    return str(exc) or type(exc).__name__


def not_a_regular_file(path: str | os.PathLike[str]) -> str | None:
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


_MSGSPEC_WORDING = re.compile(r"^Expected `(\w+)`(?: of length)? (<=|>=|<|>) (\d+)")


def plain_error(err: NexusError) -> str:
    """A validation error in plain words, naming the field."""
    message = err.message.split(" - at `$", 1)[0]
    m = _MSGSPEC_WORDING.match(message)
    if m is not None:
        kind, op, n = m.groups()
        bound = {"<=": "at most", ">=": "at least", "<": "under", ">": "over"}[op]
        unit = " characters" if kind == "str" else ""
        message = f"must be {bound} {n}{unit}"
    field = err.field
    if not field:
        return message
    # Say it the way the command line does: the option, not the wire's field.
    option = _OPTIONS.get(re.sub(r"\[\d+\]$", "", field), field)
    if message.startswith(field):
        return option + message[len(field) :]
    if field not in message:
        return f"{option}: {message}"
    return message


#: The wire's field names as the command line spells them.
_OPTIONS = {
    "session_tag": "--session",
    "session_tags": "--session",
    "since": "--since",
    "until": "--until",
    "role": "--role",
    "source_tag": "SOURCE",
    "new_tag": "NEW",
    "up_to_id": "--up-to",
    "max_messages": "--max-messages",
    "max_age": "--max-age",
    "ids": "ID",
    "timestamp": "--timestamp",
    "meta": "--meta",
}


def shown(text: str) -> str:
    """A value the user typed, cut short if it is long (it is echoed in a one-line error)."""
    return text if len(text) <= 40 else f"{text[:37]}..."
