"""An import file's lines as checked ``append_many`` batches, without any I/O.

:func:`nexusd.client.transfer.import_messages` reads a file through a
:class:`BatchMaker`: each line is decoded (an export line, or the minimal form
``{"role", "content", "session_tag"?, "timestamp"?, "meta"?}``), checked
against the daemon's limits exactly as the daemon would check it, given an
idempotency key derived from its content, and added to the batch of its
(mapped) session.  A line that would be refused raises :class:`BadLine`; the
batch it belonged to is never handed out, so a caller that sends only the
batches it was given stores whole batches before the bad line and nothing
after them.

Keys are 22 characters.  For an export line: its source id, written so that
keys sort as the ids do, then 60 bits of a BLAKE2b hash of its source
session, source id, role, content, timestamp and meta.  Sorted keys matter:
the daemon's key index then grows where the last insert was instead of at a
random page of a big index (random keys halved a 1M-line import).  For a
minimal line: 128 bits of a hash of its digest (a BLAKE2b hash of its source
session, role, content, timestamp and meta) and ``n``, how many earlier
minimal lines of the file have a digest whose first 20 bits are the same as
its own (the digest alone when ``n`` is 0).  Identical lines always share
those bits, so each gets a key of its own; the count needs 2^20 counters
(8 MiB) whatever the file's size, where counting identical lines exactly
would keep every distinct line's digest.  So the same file gives the same
keys every time, and importing it again stores nothing (the daemon answers a
known key with the stored row's id).

Before decoding, a line is bounded (:attr:`Limits.max_line`: the longest a
message within the daemon's limits can be as JSON), and ``meta`` may nest 32
levels, as the daemon allows; deeper nesting is refused while decoding.
"""

from __future__ import annotations

import binascii
import hashlib
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from ..wire import protocol as p
from ..wire.errors import BadRequest
from ..wire.timestamps import parse_timestamp

__all__ = ["Batch", "BadLine", "BatchMaker", "Limits", "Row"]

#: Bytes of a batch's frame besides its messages' own (op, id, session tag, headers).
_FRAME_BASE: Final = 400
#: Bytes an item adds besides its line's own length: the key and the map's headers.
_ITEM_EXTRA: Final = 64
#: Levels of maps and arrays ``meta`` may nest (itself level 1): the daemon's
#: own limit (nexusd/daemon/validate.py), checked here so the line is named.
_MAX_META_DEPTH: Final = 32
_MAX_ID: Final = 2**63 - 1
#: Bytes a JSON string may take per byte of its UTF-8 text: a control
#: character (one byte) is written ``\u001b`` (six).
_JSON_GROWTH: Final = 6
#: Bytes of a line besides its content and meta: role (64 characters, each at
#: most 12 bytes escaped), session tag (256), timestamp, id, keys, spaces.
_LINE_SLACK: Final = 64 * 1024
#: Minimal lines are counted by the first this many bits of their digest.
_BUCKET_BITS: Final = 20


class Row(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One line of an import file: an export line (with ``id``) or the minimal form."""

    role: str
    content: str
    session_tag: str | None = None
    timestamp: str | None = None
    meta: dict[str, Any] | None = None
    id: int | None = None


_decode_row = msgspec.json.Decoder(Row).decode
_canonical = msgspec.msgpack.Encoder(order="sorted").encode


class BadLine(BadRequest):
    """A line of an import file that cannot be stored: ``line`` is its number (from 1)."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(message, field=f"line {line}")
        self.line = line


@dataclass(frozen=True)
class Limits:
    """What the daemon accepts (from ``hello``), as the batches must respect it."""

    max_frame: int = 4 * 1024 * 1024
    max_content: int = 1024 * 1024
    max_meta: int = 65536
    max_role_chars: int = p.MAX_ROLE_CHARS
    max_session_chars: int = p.MAX_SESSION_CHARS
    max_messages: int = 0
    max_batch: int = p.MAX_HISTORY_LIMIT

    @classmethod
    def of(cls, hello: p.HelloReply) -> Limits:
        got = hello.limits
        d = cls()
        return cls(
            max_frame=got.get("max_frame", d.max_frame),
            max_content=got.get("max_content", d.max_content),
            max_meta=got.get("max_meta", d.max_meta),
            max_role_chars=got.get("max_role_chars", d.max_role_chars),
            max_session_chars=got.get("max_session_chars", d.max_session_chars),
            max_messages=got.get("max_messages", 0),
        )

    @property
    def max_line(self) -> int:
        """The longest line (bytes, without its newline) a message within these limits
        can take as JSON: content and meta escaped at worst, plus the rest.

        Content and meta count at most ``max_frame`` each: no request carries more.
        """
        content = min(self.max_content, self.max_frame)
        meta = min(self.max_meta, self.max_frame)
        return _JSON_GROWTH * (content + meta) + _LINE_SLACK

    @property
    def batch_rows(self) -> int:
        """Most messages per ``append_many``: the protocol's cap, and retention's."""
        n = self.max_batch
        return min(n, self.max_messages) if self.max_messages > 0 else n


@dataclass
class Batch:
    """Consecutive lines of one session, checked, ready to send as one ``append_many``."""

    session_tag: str
    first_line: int
    last_line: int = 0
    messages: list[p.NewMessage] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    size: int = _FRAME_BASE
    keys: set[str] = field(default_factory=set)

    def request(self) -> p.AppendMany:
        return p.AppendMany(id=0, messages=self.messages, session_tag=self.session_tag)


_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")


def _key(digest: bytes) -> str:
    """22 characters of base64url (what ``base64.urlsafe_b64encode`` gives, without its
    two calls and the padding): short keys are cheaper for the daemon to index."""
    return binascii.b2a_base64(digest, newline=False)[:22].translate(_URLSAFE).decode("ascii")


#: Base 64 with its digits in ASCII order (value 0 is "-", 63 is "z"), from
#: the standard alphabet: fixed-width numbers written in it sort as text.
_SORTED: Final = bytes.maketrans(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
    b"-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz",
)


def _sortable(n: int) -> str:
    """``n`` (0 to 2^63-1) as 12 characters that sort as the numbers do."""
    return binascii.b2a_base64(n.to_bytes(9, "big"), newline=False).translate(_SORTED).decode()


def _blake(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class BatchMaker:
    """Lines in, batches out (see the module doc).

    ``session_map`` renames source sessions; lines without a session go to
    ``default_session``.  :meth:`add` returns the batches a line completed
    (usually none); :meth:`flush` the last one.
    """

    def __init__(
        self,
        limits: Limits,
        *,
        session_map: Mapping[str, str] | None = None,
        default_session: str = p.DEFAULT_SESSION,
    ) -> None:
        self.limits = limits
        self.session_map = dict(session_map or {})
        self.default_session = default_session
        self._batch: Batch | None = None
        self._rows = limits.batch_rows
        # Frames are kept well under the limit: the size of a batch is an estimate.
        self._budget = max(limits.max_frame - limits.max_frame // 16, 32 * 1024)
        # Minimal lines so far by their digest's first bits (made at the first one).
        self._counts: array[int] | None = None
        self._checked_tags: dict[str, str] = {}  # source tag (or "") -> target tag

    def add(self, raw: bytes, line: int) -> list[Batch]:
        """Check line number ``line`` (its bytes ``raw``); the batches it completed."""
        row = self._decode(raw, line)
        target = self._target(row.session_tag, line)
        # Meta can only nest past the limit when that many maps and arrays open.
        deep = raw.count(b"{") + raw.count(b"[") > _MAX_META_DEPTH + 1  # +1: the line's own
        msg = self._message(row, line, deep)
        size = len(raw) + _ITEM_EXTRA + (len(msg.timestamp) if msg.timestamp else 0)
        out: list[Batch] = []
        batch = self._batch
        if batch is not None and (
            batch.session_tag != target
            or len(batch.messages) >= self._rows
            or batch.size + size > self._budget
            or msg.idem_key in batch.keys  # one request may not carry a key twice
        ):
            out.append(batch)
            batch = None
        if batch is None:
            batch = self._batch = Batch(target, line)
        batch.messages.append(msg)
        batch.lines.append(line)
        batch.keys.add(msg.idem_key)  # type: ignore[arg-type]  # always set here
        batch.last_line = line
        batch.size += size
        return out

    def flush(self) -> Batch | None:
        batch, self._batch = self._batch, None
        return batch

    # ── one line ────────────────────────────────────────────────────────────
    def _decode(self, raw: bytes, line: int) -> Row:
        try:
            return _decode_row(raw)
        except RecursionError:  # only meta can nest (other fields are typed)
            deep = f"meta nests more than {_MAX_META_DEPTH} levels of maps and arrays"
            raise BadLine(deep, line) from None
        except UnicodeDecodeError as exc:
            byte = exc.object[exc.start] if exc.start < len(exc.object) else 0
            raise BadLine(f"not UTF-8 text (byte 0x{byte:02x}); convert it first", line) from None
        except msgspec.ValidationError as exc:
            raise BadLine(_plain(str(exc)), line) from None
        except msgspec.DecodeError as exc:
            raise BadLine(f"not a JSON object: {_plain(str(exc))}", line) from None

    def _target(self, source: str | None, line: int) -> str:
        got = self._checked_tags.get(source or "")
        if got is not None:
            return got
        if source is not None:
            _check_text(source, "session_tag", line)
            if not source:
                raise BadLine("session_tag is empty (leave it out for the default session)", line)
        target = self.default_session if source is None else self.session_map.get(source, source)
        most = self.limits.max_session_chars
        if not 1 <= len(target) <= most:
            raise BadLine(f"session tag is {len(target)} characters; the limit is {most}", line)
        _check_text(target, "session_tag", line)
        self._checked_tags[source or ""] = target
        return target

    def _message(self, row: Row, line: int, deep: bool) -> p.NewMessage:
        lim = self.limits
        role, content = row.role, row.content
        if not 1 <= len(role) <= lim.max_role_chars:
            raise BadLine(
                f"role is {len(role)} characters; it must be 1 to {lim.max_role_chars}", line
            )
        if len(content) * 4 > lim.max_content:  # a code point is at most 4 bytes
            _check_text(content, "content", line)
            size = len(content.encode("utf-8"))
            if size > lim.max_content:
                raise BadLine(
                    f"content is {size} bytes of UTF-8; the daemon's limit is {lim.max_content}"
                    " (max_content)",
                    line,
                )
        stamp = row.timestamp
        if stamp is not None:
            try:
                stamp = parse_timestamp(stamp)
            except BadRequest as exc:
                raise BadLine(exc.message, line) from None
        meta = row.meta
        if meta is not None:
            _check_meta(meta, lim.max_meta, line, deep)
        if row.id is not None and not 0 <= row.id <= _MAX_ID:
            raise BadLine(f"id must be 0 to {_MAX_ID}, not {row.id}", line)
        try:
            canon = _canonical((row.session_tag, row.id, role, content, stamp, meta))
        except (OverflowError, TypeError, ValueError) as exc:
            raise BadLine(_unsendable(exc), line) from None
        digest = _blake(canon)
        if row.id is not None:
            key = _sortable(row.id) + _key(digest)[:10]
        else:  # minimal: n lines before it share its digest's first bits (see above)
            counts = self._counts
            if counts is None:
                counts = self._counts = array("Q", [0]) * (1 << _BUCKET_BITS)
            bucket = int.from_bytes(digest[:4], "big") >> (32 - _BUCKET_BITS)
            n = counts[bucket]
            counts[bucket] = n + 1
            if n:
                digest = _blake(digest + n.to_bytes(8, "big"))
            key = _key(digest)
        return p.NewMessage(role=role, content=content, timestamp=stamp, meta=meta, idem_key=key)


def _check_text(text: str, name: str, line: int) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadLine(f"{name} holds {_surrogate(text, exc.start)}", line) from None


def _surrogate(text: str, at: int) -> str:
    return f"a lone surrogate (U+{ord(text[at]):04X}), which is not Unicode text"


def _check_meta(meta: dict[str, Any], max_meta: int, line: int, deep: bool) -> None:
    # Depth first: encoding a meta hundreds of levels deep overflows the stack.
    if deep and _too_deep(meta, 1):
        raise BadLine(f"meta nests more than {_MAX_META_DEPTH} levels of maps and arrays", line)
    try:
        text = msgspec.json.encode(meta)
    except (OverflowError, TypeError, ValueError) as exc:
        raise BadLine(f"meta: {_unsendable(exc)}", line) from None
    if len(text) > max_meta:
        raise BadLine(f"meta is {len(text)} bytes as JSON; the daemon's limit is {max_meta}", line)


def _too_deep(value: dict[str, Any] | list[Any], level: int) -> bool:
    """Whether a map or array below ``value`` (at ``level``) is deeper than the limit.

    The recursion stops at the limit, so it stays shallow whatever the input.
    """
    items = value.values() if isinstance(value, dict) else value
    for v in items:
        if isinstance(v, (dict, list)) and (level >= _MAX_META_DEPTH or _too_deep(v, level + 1)):
            return True
    return False


def _unsendable(exc: Exception) -> str:
    if isinstance(exc, UnicodeEncodeError) and isinstance(exc.object, str):
        return f"it holds {_surrogate(exc.object, exc.start)}"
    if isinstance(exc, OverflowError):
        return "an integer is out of range (at most 64 bits)"
    return str(exc)


def _plain(message: str) -> str:
    """msgspec's wording, with the JSON path as a field name (``$.meta.x`` -> ``meta.x``)."""
    text, _, where = message.partition(" - at `$")
    if where:
        path = where.rstrip("`").lstrip(".")
        return f"{path}: {text[0].lower()}{text[1:]}"
    if text.startswith("Object missing required field"):
        return "missing field " + text.split("`")[1] + ' (a line needs "role" and "content")'
    if text.startswith("Object contains unknown field"):
        return "unknown field " + text.split("`")[1]
    if text == "Input data was truncated":
        return "truncated or holds a lone surrogate escape"
    return text[0].lower() + text[1:] if text else "invalid"
