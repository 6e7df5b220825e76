"""What an adapter stores for one framework object, and how any stored message reads back.

Each adapter stores a framework object as one nexusd message whose
``content`` is the JSON text of the framework's own serialised form
(:func:`dumps`) and whose ``role`` is the object's role or type
(:func:`role_of`).  Reading back, :func:`loads_object` parses that text, and
:func:`kind_of` says which framework's record a message holds, by its shape
and role together:

* ``"langchain"``: ``{"type": T, "data": {...}}`` (``message_to_dict``), role ``T``;
* ``"llamaindex"``: ``{"role": R, "blocks": [...], "additional_kwargs": {...}, ...}``
  (``ChatMessage.model_dump``), role ``R``;
* ``"agents"``: any other object whose ``role`` (else ``type``) is the role
  (a Responses-API item).

A message that is not its own framework's record (written by ``nexusd
append``, an import, or another framework's adapter) is read by each adapter
as a plain text message: :func:`plain` gives its role and text, so a session
written through LangChain reads in the Agents SDK as user and assistant
messages, not as JSON it cannot use.
"""

from __future__ import annotations

import json
from typing import Any, Final, Literal

import msgspec

from ..wire.protocol import Message

__all__ = ["ALIASES", "Kind", "dumps", "kind_of", "loads_object", "plain", "role_of"]

Kind = Literal["agents", "langchain", "llamaindex"]
#: Roles other frameworks and tools use for the user's and the model's turns.
ALIASES: Final = {"human": "user", "ai": "assistant", "model": "assistant", "chatbot": "assistant"}
_MAX_ROLE: Final = 64

_decode = msgspec.json.Decoder().decode


def dumps(obj: Any) -> str:
    """The JSON text stored for ``obj``: compact, non-ASCII kept as it is.

    A string with a lone surrogate cannot be UTF-8; such an object is stored
    with ``\\u`` escapes instead, which decode to the same value.  NaN and
    infinities are not JSON: ``ValueError``.
    """
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
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
    except msgspec.MsgspecError:
        try:  # what msgspec refuses but json reads: \ud800 escapes, 1e400
            value = json.loads(content)
        except ValueError:
            return None
    return value if isinstance(value, dict) else None


def role_of(*candidates: object, default: str = "item") -> str:
    """The first candidate that is a valid nexusd role (1 to 64 characters), else ``default``."""
    for c in candidates:
        if isinstance(c, str) and 0 < len(c) <= _MAX_ROLE:
            return c
    return default


def kind_of(record: dict[str, Any] | None, role: str) -> Kind | None:
    """Which framework's record ``record`` (a message's parsed content) is, given its role."""
    if record is None:
        return None
    if record.keys() == {"type", "data"} and isinstance(record["data"], dict):
        return "langchain" if record["type"] == role else None
    if isinstance(record.get("blocks"), list) and isinstance(record.get("additional_kwargs"), dict):
        return "llamaindex" if record.get("role") == role else None
    if role_of(record.get("role"), record.get("type")) == role:
        return "agents"
    return None


def plain(message: Message, record: dict[str, Any] | None) -> tuple[str, str]:
    """``message`` as a plain ``(role, text)``: a framework record's own role and text.

    ``record`` is ``loads_object(message.content)``.  The role is the record's
    (``human``, ``assistant``, ``tool``, ...; :data:`ALIASES` maps the usual
    synonyms for an adapter that needs to); the text is what the record says
    in words, or the stored content itself when it says none (a tool call).
    """
    kind = kind_of(record, message.role)
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
