"""LangChain's chat message history, kept by nexusd: :class:`NexusChatMessageHistory`.

``NexusChatMessageHistory("chat-42")`` keeps a LangChain conversation in the
nexusd session ``chat-42``, where every process on the machine (another
chain, ``nexusd history``, ``nexusd search``, ``nexusd tail -f``) sees it,
instead of in one process's SQLite file.

How ``BaseChatMessageHistory`` maps to nexusd:

* ``add_messages(messages)``: one ``append_many``, so a turn's messages are
  stored all or none, in order.  Each message is one nexusd message: ``role``
  is the message's ``type`` (``human``, ``ai``, ``tool``, ``system``,
  ``chat``, ``function``, or a chunk's type), ``content`` is the JSON text of
  LangChain's own ``message_to_dict(message)``, read back with
  ``messages_from_dict``, so every field (tool calls, usage metadata,
  response metadata, ids, ``additional_kwargs``) comes back equal.
* ``messages`` / ``aget_messages()``: the whole session, oldest first, read
  back in pages of at most :data:`PAGE`.
* ``clear()`` / ``aclear()``: ``clear``.

A message of the session that is not LangChain's dict (written by another
tool, ``nexusd append``, an import, or the Agents SDK or LlamaIndex adapter)
reads back as a plain message of its text
(:func:`~nexusd.integrations.records.plain`) and role: ``user``/``human`` a
``HumanMessage``, ``assistant``/``ai``/``model`` an ``AIMessage``, ``system``
a ``SystemMessage``, anything else (``tool`` included: a ``ToolMessage``
needs a ``tool_call_id`` such a message has not) a ``ChatMessage`` of that
role.

LangChain marks ``BaseChatMessageHistory`` deprecated since langchain-core
1.6.4 (removal planned for 2.0), pointing to LangGraph's checkpointers; the
README's LangChain section says what that means for this adapter.  LangChain
warns only when its own concrete classes are made, not subclasses, so this
class adds no warning of its own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, Final

from ..client import AsyncClient, Client
from ..wire.protocol import Message
from .extras import missing_extra
from .link import PAGE, Link, check_tag, history
from .records import ALIASES, kind_of, loads_object, plain, record, role_of

_ADAPTER: Final = "nexusd.integrations.langchain"

try:
    from langchain_core.chat_history import BaseChatMessageHistory
    from langchain_core.messages import (
        AIMessage,
        BaseMessage,
        ChatMessage,
        HumanMessage,
        SystemMessage,
        message_to_dict,
        messages_from_dict,
    )
except ImportError as exc:
    raise missing_extra(exc, "langchain_core", extra="langchain", adapter=_ADAPTER) from None

__all__ = ["PAGE", "NexusChatMessageHistory"]

logger = logging.getLogger(__name__)


#: The plain message a foreign message of each role reads back as.
_PLAIN: Final[dict[str, type[BaseMessage]]] = {
    "user": HumanMessage,
    "assistant": AIMessage,
    "system": SystemMessage,
}


class NexusChatMessageHistory(BaseChatMessageHistory):
    """A LangChain chat history stored in the nexusd session ``session_id``.

    ``session_id`` is the nexusd session tag (1 to 256 characters; anything else
    is ``ValueError``/``TypeError`` here).  ``socket`` is the
    daemon's socket (default: ``$NEXUSD_SOCKET``, else the usual path); or
    pass ``client``: a blocking :class:`~nexusd.Client` (async methods then
    call it in a worker thread) or an :class:`~nexusd.AsyncClient` you opened
    with ``async with`` (async methods run on your event loop, which must be
    that client's; the sync ones use a blocking client of the same socket).
    A client passed in stays yours; :meth:`close` closes only the one this
    history made.  For ``RunnableWithMessageHistory``, which makes a history
    per call, share one client: ``lambda sid: NexusChatMessageHistory(sid,
    client=client)``.

    nexusd's own errors (:class:`~nexusd.NexusError`: daemon not running,
    bad session tag, too large) reach you as they are.
    """

    def __init__(
        self,
        session_id: str,
        *,
        socket: str | os.PathLike[str] | None = None,
        client: Client | AsyncClient | None = None,
    ) -> None:
        super().__init__()
        self.session_id = check_tag(session_id, what="session_id", adapter=_ADAPTER)
        self._link = Link(socket, client, adapter=_ADAPTER)

    # ── reads ─────────────────────────────────────────────────────────────
    # The base class declares ``messages`` a plain attribute; LangChain's own
    # stores (SQLChatMessageHistory among them) make it a read-only property.
    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """Every message of the session, oldest first (paged back, :data:`PAGE` at a time)."""
        return [_message(m) for m in self._link.run(history(self.session_id))]

    async def aget_messages(self) -> list[BaseMessage]:
        """:attr:`messages`, awaited (on your ``AsyncClient`` if you passed one)."""
        return [_message(m) for m in await self._link.drive(history(self.session_id))]

    # ── writes ────────────────────────────────────────────────────────────
    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Store ``messages`` in one ``append_many``: all or none, in order.

        At most 10,000 messages, and a request within the daemon's
        ``max_frame`` (4 MiB by default), per call: more is the client's
        :class:`~nexusd.BadRequest` or :class:`~nexusd.TooLarge`, and nothing
        is stored.  A message whose dict is not JSON (an ``artifact`` or
        metadata holding an arbitrary object, a NaN) is a ``TypeError`` or
        ``ValueError`` naming it, before anything is sent.  An empty list sends
        nothing.
        """
        records = _records(messages)
        if records:
            self._link.blocking.append_many(records, session_tag=self.session_id)

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        """:meth:`add_messages`, awaited; once sent it is finished even if you are cancelled."""
        records = _records(messages)
        if records:
            await self._link.write(Client.append_many, records, session_tag=self.session_id)

    def clear(self) -> None:
        """Delete every message of the session (other tools' messages in it too)."""
        self._link.blocking.clear(self.session_id)

    async def aclear(self) -> None:
        """:meth:`clear`, awaited; once sent it is finished even if you are cancelled."""
        await self._link.write(Client.clear, self.session_id)

    # ── lifetime ──────────────────────────────────────────────────────────
    def close(self) -> None:
        """Close the client this history made (a client you passed in stays open)."""
        self._link.close()

    def __enter__(self) -> NexusChatMessageHistory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.session_id!r})"


def _records(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """The ``append_many`` items for ``messages``; every one is checked before any is sent."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, BaseMessage):
            raise TypeError(
                f"{_ADAPTER}: messages[{i}] is a {type(message).__name__}, not a LangChain message"
            )
        role = role_of(message.type, default="message")
        try:
            out.append(record("langchain", role, message_to_dict(message)))
        except (TypeError, ValueError) as exc:
            # json's own words say what is wrong; which message it was is ours to say.
            raise type(exc)(
                f"{_ADAPTER}: messages[{i}] ({message.type}) cannot be stored as JSON: {exc}"
            ) from None
    return out


def _message(stored: Message) -> BaseMessage:
    """``stored`` as the LangChain message it holds, or a plain one of its role."""
    found = loads_object(stored.content)
    if found is not None and kind_of(stored, found) == "langchain":
        try:
            return messages_from_dict([found])[0]
        except Exception as exc:
            # Shaped like ours but not a message this langchain-core can make
            # (an unknown type, a missing field): read it as text rather than
            # fail the whole history.  Not only pydantic's ValidationError: a
            # ToolMessage without tool_call_id is a KeyError from its validator.
            logger.warning(
                "nexusd message %d of session %r is not a LangChain message (%s); "
                "read as plain text",
                stored.id,
                stored.session_tag,
                _first_line(exc),
            )
    return _plain(*plain(stored, found))


def _plain(role: str, content: str) -> BaseMessage:
    kind = _PLAIN.get(ALIASES.get(role, role))
    if kind is not None:
        made: BaseMessage = kind(content=content)
        return made
    return ChatMessage(role=role, content=content)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
