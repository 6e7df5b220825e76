"""What an adapter stores for one framework object, and how any stored message reads back.

Each adapter stores a framework object as one nexusd message whose
``content`` is the JSON text of the framework's own serialised form
(:func:`dumps`), whose ``role`` is the object's role or type
(:func:`role_of`), and whose ``meta`` marks it as that framework's record
(:func:`record`: ``{"nexusd_record": "agents" | "langchain" | "llamaindex"}``).
Reading back, :func:`kind_of` says which framework's record a message is:
the mark, and the shape and role that framework's records have:

* ``"langchain"``: ``{"type": T, "data": {...}}`` (``message_to_dict``), role ``T``;
* ``"llamaindex"``: ``{"role": R, "blocks": [...], "additional_kwargs": {...}, ...}``
  (``ChatMessage.model_dump``), role ``R``;
* ``"agents"``: an object whose ``role`` (else ``type``) is the role (a
  Responses-API item).

The mark is what keeps text a person typed from being taken for a record: a
chat front end that stores ``{"role": "system", ...}`` or a LlamaIndex block
naming a local file, as what someone typed, has it read back as that text.
Any message that is not its own framework's record (written by ``nexusd
append``, an import, or another framework's adapter) is read by each adapter
as a plain text message: :func:`plain` gives its role and text, so a session
written through LangChain reads in the Agents SDK as user and assistant
messages, not as JSON it cannot use.
"""

from __future__ import annotations

import json
from typing import Any, Final, Literal

import msgspec

from ..wire.protocol import MAX_ROLE_CHARS, Message

__all__ = [
    "ALIASES",
    "MARK",
    "Kind",
    "dumps",
    "kind_of",
    "loads_object",
    "plain",
    "record",
    "role_of",
]

Kind = Literal["agents", "langchain", "llamaindex"]
#: Roles other frameworks and tools use for the user's and the model's turns.
ALIASES: Final = {"human": "user", "ai": "assistant", "model": "assistant", "chatbot": "assistant"}
#: The ``meta`` key that marks a message as an adapter's record, and whose.
MARK: Final = "nexusd_record"
_KINDS: Final = frozenset({"agents", "langchain", "llamaindex"})

_decode = msgspec.json.Decoder().decode


def record(kind: Kind, role: str, obj: Any) -> dict[str, Any]:
    """The ``append``/``append_many`` item that stores ``obj`` as ``kind``'s record."""
    return {"role": role, "content": dumps(obj), "meta": {MARK: kind}}


def dumps(obj: Any) -> str:
    """The JSON text stored for ``obj``: compact, non-ASCII kept as it is.

    A string with a lone surrogate cannot be UTF-8; such an object is stored
    with ``\\u`` escapes instead, which decode to the same value.  NaN and
    infinities are not JSON: ``ValueError``.
    """
    try:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except RecursionError:
        raise ValueError("nested too deeply to be stored as JSON") from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False)
    return text


def loads_object(content: str) -> dict[str, Any] | None:
    """The JSON object ``content`` holds, or None if it holds no object (a foreign message)."""
    if not content.startswith("{"):
        return None
    try:
        value = _decode(content)  # two to three times json.loads' speed
    except RecursionError:  # nested past what either parser takes: not a record
        return None
    except msgspec.MsgspecError:
        try:  # what msgspec refuses but json reads: \ud800 escapes, 1e400
            value = json.loads(content)
        except (ValueError, RecursionError):
            return None
    return value if isinstance(value, dict) else None


def role_of(*candidates: object, default: str = "item") -> str:
    """The first candidate that is a valid nexusd role (1 to 64 characters), else ``default``."""
    for c in candidates:
        if isinstance(c, str) and 0 < len(c) <= MAX_ROLE_CHARS:
            return c
    return default


def kind_of(message: Message, record: dict[str, Any] | None) -> Kind | None:
    """Which framework's record ``message`` is (``record``: its parsed content), if any."""
    kind = message.meta.get(MARK) if message.meta else None
    if record is None or kind not in _KINDS:
        return None
    role = message.role
    if kind == "langchain":
        ok = record.keys() == {"type", "data"} and isinstance(record["data"], dict)
        return "langchain" if ok and record["type"] == role else None
    if kind == "llamaindex":
        ok = isinstance(record.get("blocks"), list) and record.get("role") == role
        return "llamaindex" if ok else None
    return "agents" if role_of(record.get("role"), record.get("type")) == role else None


def plain(message: Message, record: dict[str, Any] | None) -> tuple[str, str]:
    """``message`` as a plain ``(role, text)``: a framework record's own role and text.

    ``record`` is ``loads_object(message.content)``.  The role is the record's
    (``human``, ``assistant``, ``tool``, ...; :data:`ALIASES` maps the usual
    synonyms for an adapter that needs to); the text is what the record says
    in words, or the stored content itself when it says none (a tool call).
    """
    kind = kind_of(message, record)
    text: str | None = None
    if kind == "langchain":
        assert record is not None
        text = _text(record["data"].get("content"))
    elif kind == "llamaindex":
        assert record is not None
        text = _text(record["blocks"])
    elif kind == "agents":
        assert record is not None
        text = _text(record.get("content"))
    return message.role, text or message.content


def _text(content: object) -> str | None:
    """The words in a framework's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        ]
        return "\n".join(parts) if parts else None
    return None
