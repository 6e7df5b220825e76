#!/usr/bin/env python3
"""Write the blocking client from the async one, the httpcore way.

    python scripts/unasync.py           # (re)write client_sync.py and watch_sync.py
    python scripts/unasync.py --check   # exit 1, writing nothing, if it is out of date

The async client (``nexusd/client/client_async.py``), its watch iterator
(``watch_async.py``) and its conversation edits (``lifecycle_async.py``) are
the only ones written by hand.  Each of their lines
goes through :data:`SUBSTITUTIONS`, whole words only, in order; the result,
under a "generated, do not edit" header, is the blocking module.  Every
substitution must be used, so the table says exactly what differs.  No
dependency beyond the standard library.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nexusd" / "client"
#: Each async source and the blocking module generated from it.
FILES = {
    "client_async.py": "client_sync.py",
    "watch_async.py": "watch_sync.py",
    "lifecycle_async.py": "lifecycle_sync.py",
}
HEADER = (
    "# Generated from nexusd/client/{name} by scripts/unasync.py: do not edit.\n"
    "# Change the async original, then run `python scripts/unasync.py`.\n"
)

#: (async, blocking): the generated classes' names; the async transports' names
#: and the blocking ones' (nexusd/client/transport_async.py, transport_sync.py;
#: a watch's connection: stream_async.py, stream_sync.py); then the syntax.
SUBSTITUTIONS = (
    ("AsyncClient", "Client"),
    ("AsyncWatcher", "Watcher"),
    ("AsyncWatching", "Watching"),
    ("watch_async", "watch_sync"),
    ("AsyncLifecycle", "Lifecycle"),
    ("lifecycle_async", "lifecycle_sync"),
    ("AsyncCallGate", "CallGate"),
    ("AsyncConnector", "Connector"),
    ("AsyncLink", "Link"),
    ("AsyncLock", "Lock"),
    ("transport_async", "transport_sync"),
    ("AsyncFrameStream", "FrameStream"),
    ("stream_async", "stream_sync"),
    ("__aenter__", "__enter__"),
    ("__aexit__", "__exit__"),
    ("__aiter__", "__iter__"),
    ("__anext__", "__next__"),
    ("StopAsyncIteration", "StopIteration"),
    ("aclose", "close"),
    ("async def", "def"),
    ("async with", "with"),
    ("async for", "for"),
    ("await ", ""),
)


def _pattern(old: str) -> re.Pattern[str]:
    end = r"\b" if re.match(r"\w", old[-1]) else ""
    return re.compile(r"\b" + re.escape(old) + end)


_COMPILED = [(_pattern(old), new) for old, new in SUBSTITUTIONS]


def unasync(text: str, name: str, used: set[int] | None = None) -> str:
    """The blocking twin of the async source ``text`` (of file ``name``)."""
    out = [HEADER.format(name=name)]
    for line in text.splitlines(keepends=True):
        for i, (pattern, new) in enumerate(_COMPILED):
            line, n = pattern.subn(new, line)
            if n and used is not None:
                used.add(i)
        out.append(line)
    return "".join(out)


def generate() -> dict[Path, str]:
    """Every generated file's path and the text it must hold."""
    used: set[int] = set()
    out = {
        PACKAGE / target: unasync((PACKAGE / source).read_text(encoding="utf-8"), source, used)
        for source, target in FILES.items()
    }
    unused = [SUBSTITUTIONS[i] for i in range(len(SUBSTITUTIONS)) if i not in used]
    if unused:
        raise SystemExit(f"unasync: substitutions never used (remove them): {unused}")
    return out


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for path, text in generate().items():
        on_disk = path.read_text(encoding="utf-8") if path.exists() else None
        if on_disk == text:
            continue
        if check:
            stale.append(path.relative_to(ROOT))
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        names = ", ".join(map(str, stale))
        print(f"{names} out of date: run `python scripts/unasync.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
