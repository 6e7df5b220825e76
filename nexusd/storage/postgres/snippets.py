"""Snippets of PostgreSQL search hits, made in Python from ``ts_headline``'s marks.

The SQLite backend's snippet is FTS5's (about 16 tokens around the best
matches, cut to :data:`~nexusd.storage.search.SNIPPET_CHARS` characters
with ``…`` where cut).  Here the server marks every match in the message
(``ts_headline`` with ``HighlightAll``: it re-parses the text with the same
configuration and query as the index, so what it marks is exactly what
matched, phrases included) and sends a window of that marked text starting
:data:`LEAD_CHARS` before the first mark; :func:`snippet` picks about
:data:`~nexusd.storage.search.SNIPPET_TOKENS` words from a few words before
the first match, and turns the marks into ``[start, end)`` spans in code
points.  The text shown is the message's own (the index may see punctuation
as spaces, see :mod:`.search`): the marked text has the same length, so
positions carry over.

``ts_headline`` is used rather than re-tokenising here because only the
server knows its parser and dictionaries (``unaccent``): a Python tokenizer
would disagree with the index on some text and mark the wrong words.
"""

from __future__ import annotations

import bisect
import logging
import re
from typing import Final

from ..search import MARK_CLOSE, MARK_OPEN, SNIPPET_CHARS, SNIPPET_TOKENS

__all__ = ["LEAD_CHARS", "LEAD_WORDS", "WINDOW_CHARS", "snippet", "split_marks"]

logger = logging.getLogger(__name__)

#: Characters of the message the server sends before the first match.
LEAD_CHARS: Final = 120
#: Words shown before the first match (fewer when the message starts sooner):
#: FTS5 centres its 16 tokens on a lone match the same way.
LEAD_WORDS: Final = (SNIPPET_TOKENS - 1) // 2
#: Characters of marked text the server sends: enough for :data:`LEAD_CHARS`
#: plus a whole snippet even if every other character is a one-letter match
#: (two marks each).
WINDOW_CHARS: Final = 3 * (SNIPPET_CHARS + LEAD_CHARS)
#: A word, as the snippet counts them: a run of letters and digits (FTS5's
#: unicode61 counts tokens the same way; PostgreSQL's parser nearly so).
_WORD: Final = re.compile(r"[^\W_]+")


def split_marks(marked: str) -> tuple[str, list[tuple[int, int]]]:
    """Text without the marks, and the [start, end) of each marked run in it."""
    text: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    begun = -1
    for ch in marked:
        if ch == MARK_OPEN:
            begun = pos
        elif ch == MARK_CLOSE:
            if begun >= 0 and pos > begun:
                spans.append((begun, pos))
            begun = -1
        else:
            text.append(ch)
            pos += 1
    return "".join(text), spans


def snippet(content: str, window: str | None, start: int) -> tuple[str, list[tuple[int, int]]]:
    """The snippet of ``content`` and its highlight spans.

    ``window``: the marked text the server sent (None: it sent none), which
    began at ``start`` (1-based) in the marked message, at or before its
    first mark.  A window that does not line up with the content (a message
    holding the mark characters themselves) gives the content's start, unmarked.
    """
    base = max(0, start - 1)
    text, spans = split_marks(window or "")
    if window is not None and not _lines_up(text, content[base : base + len(text)]):
        # The marks are private-use characters: a message that holds them cannot
        # be lined up with its marked text, and gets no highlights.
        logger.debug("snippet window does not line up with its message; unmarked")
        base, spans = 0, []
    # The stretch of the message the snippet may use: from the window's start on.
    body = content[base : base + len(text) if window is not None else base + WINDOW_CHARS]
    words = [(m.start(), m.end()) for m in _WORD.finditer(body)]
    first = spans[0][0] if spans else 0
    i = bisect.bisect_right([end for _, end in words], first)  # the word holding the match
    lo = max(0, i - LEAD_WORDS)
    if base + len(body) >= len(content):  # the message's end is in view: use its words
        lo = max(0, min(lo, len(words) - SNIPPET_TOKENS))
    a = min(words[lo][0] if lo > 0 and lo < len(words) else 0, first)
    hi = lo + SNIPPET_TOKENS - 1
    b = words[hi][1] if hi < len(words) - 1 else len(body)
    if b <= first:  # never cut the first match away
        b = len(body)
    lead = base + a > 0
    trail = base + b < len(content)
    out = ("…" if lead else "") + body[a:b]
    shift = (1 if lead else 0) - a
    spans = [(s + shift, e + shift) for s, e in spans if s >= a and s < b]
    limit = SNIPPET_CHARS - (1 if trail else 0)
    if len(out) > limit:
        out, trail = out[: SNIPPET_CHARS - 1], True
        limit = SNIPPET_CHARS - 1
    if trail:
        out += "…"
    spans = [(s, min(e, limit, b + shift)) for s, e in spans if s < limit]
    return out, spans


def _lines_up(marked: str, original: str) -> bool:
    """Whether ``marked`` (the indexed form: some characters turned into spaces)
    is ``original``'s text, character for character."""
    return len(marked) == len(original) and all(
        a == b or a == " " for a, b in zip(marked, original, strict=True)
    )
