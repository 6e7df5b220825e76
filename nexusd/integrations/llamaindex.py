"""LlamaIndex's chat store, kept by nexusd: :class:`NexusChatStore`.

``ChatMemoryBuffer.from_defaults(chat_store=NexusChatStore(), chat_store_key="chat-42")``
keeps a chat engine's or agent's memory in the nexusd session ``chat-42``,
where every process on the machine (another engine, ``nexusd history``,
``nexusd search``, ``nexusd tail -f``) sees it, instead of in one process's
``SimpleChatStore`` file or SQLite database.

How the ``BaseChatStore`` calls map to nexusd (the chat store key IS the session tag):

* ``add_message``: one ``append``; ``get_messages``: the whole session, oldest
  first, read back in pages of 10,000 (``before_id``).
* ``set_messages``: one ``append_many`` of the new messages, then ``delete``
  of the old ones (see its doc: not atomic, but never loses both).
* ``delete_messages``: ``delete`` of every message read; ``delete_message``:
  ``delete`` of the idx-th one's id; ``delete_last_message``: ``pop``.
* ``get_keys``: the tags of ``sessions``.

Each ``ChatMessage`` is one nexusd message: ``role`` is ``message.role.value``,
``content`` the JSON text of ``message.model_dump(mode="json")`` (what
LlamaIndex's own ``SQLAlchemyChatStore`` stores), read back with
``ChatMessage.model_validate``: text, blocks and ``additional_kwargs`` (tool
calls) come back equal.  A message that is not such a record (written by
``nexusd append``, an import, or the Agents SDK or LangChain adapter) reads
back as ``ChatMessage(role=..., content=<its text>)``
(:func:`~nexusd.integrations.records.plain`): its role when LlamaIndex has
it, ``human`` as ``user`` and ``ai`` as ``assistant``, any other as ``user``.

Every operation is written once, as a *plan* (:mod:`nexusd.integrations.link`):
a generator that yields the client calls it needs and gets their results
back.  The sync methods run it on the blocking client; the async ones await
each call on the link (natively on an ``AsyncClient``), and those that write
are settled: they finish even when the caller is cancelled, then re-raise the
cancellation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Final

from ..client import AsyncClient, Client
from ..wire.protocol import MAX_DELETE_IDS, Message
from .extras import missing_extra
from .link import Link, Plan, call, history
from .records import ALIASES, kind_of, loads_object, plain, record, role_of

try:
    from llama_index.core.bridge.pydantic import PrivateAttr
    from llama_index.core.llms import ChatMessage, MessageRole
    from llama_index.core.storage.chat_store.base import BaseChatStore
except ImportError as exc:
    raise missing_extra(
        exc, "llama_index.core", extra="llamaindex", adapter="nexusd.integrations.llamaindex"
    ) from None

__all__ = ["NexusChatStore"]

logger = logging.getLogger(__name__)

#: Ids per ``delete`` request: the protocol's most.
PAGE: Final = MAX_DELETE_IDS
#: LlamaIndex's roles; a foreign message of another role reads back as a user's.
ROLES: Final = frozenset(r.value for r in MessageRole)


# ── records ───────────────────────────────────────────────────────────────
def _record(message: ChatMessage) -> dict[str, Any]:
    """The nexusd message that stores ``message``; ValueError if it is not JSON-able."""
    if not isinstance(message, ChatMessage):
        raise TypeError(f"NexusChatStore: a message is a ChatMessage, not {type(message).__name__}")
    try:
        dumped = message.model_dump(mode="json")
    except (ValueError, TypeError) as exc:  # pydantic's serialisation error is a ValueError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"NexusChatStore: a ChatMessage that is not JSON: {reason}") from None
    role = role_of(message.role.value, default=MessageRole.USER.value)
    return record("llamaindex", role, dumped)


def _chat_message(m: Message) -> ChatMessage:
    """``m`` as the ``ChatMessage`` it was, or a plain text one if another tool wrote it."""
    data = loads_object(m.content)
    # Ours: LlamaIndex's dump of a message, whose role is the record's role.
    if kind_of(m, data) == "llamaindex":
        try:
            return ChatMessage.model_validate(data)  # kind_of: data is not None
        except (ValueError, TypeError, AttributeError):
            logger.debug("message %d of %r is not a ChatMessage: read as text", m.id, m.session_tag)
    role, text = plain(m, data)
    if role not in ROLES:
        role = ALIASES.get(role, MessageRole.USER.value)
    return ChatMessage(role=role, content=text)


def _copy(m: Message) -> Mapping[str, Any]:
    """``m`` as an ``append_many`` item: the same role, content, timestamp and meta."""
    return {"role": m.role, "content": m.content, "timestamp": m.timestamp, "meta": m.meta}


# ── plans: each operation once, for both drivers ──────────────────────────
def _delete(key: str, ids: Sequence[int]) -> Plan[set[int]]:
    """Delete ``ids`` from ``key`` (at most :data:`PAGE` a call); the ids really deleted."""
    gone: set[int] = set()
    for i in range(0, len(ids), PAGE):
        done = yield call(Client.delete, ids[i : i + PAGE], session_tag=key)
        gone.update(done.deleted)
    return gone


def _set(key: str, records: Sequence[Mapping[str, Any]]) -> Plan[None]:
    """Append ``records``, then delete every message older than them.

    A crash between leaves both, never neither.  Of two ``set_messages`` at
    once, the one appended last wins whole, as in a dict: each deletes what is
    older than its own first message, the other's set included.
    """
    if records:
        ids = yield call(Client.append_many, records, session_tag=key)
        old = yield from history(key, before=ids[0])
    else:
        old = yield from history(key)
    yield from _delete(key, [m.id for m in old])


def _index(idx: object, *, optional: bool = False) -> None:
    """``idx`` is a list index (an int, not a bool), or None where ``optional``."""
    if (idx is None and not optional) or (idx is not None and type(idx) is not int):
        raise TypeError(f"NexusChatStore: idx is an int, not {type(idx).__name__}")


def _add(key: str, item: Mapping[str, Any], idx: int | None) -> Plan[None]:
    _index(idx, optional=True)
    if idx is not None:
        old = yield from history(key)
        tail = old[idx:] if idx >= 0 else old[max(len(old) + idx, 0) :]  # as list.insert
        if tail:
            # Deleted first, so that the session never holds more than it will:
            # appending first could push its oldest messages out by retention.
            yield from _delete(key, [m.id for m in tail])
            yield call(Client.append_many, [item, *map(_copy, tail)], session_tag=key)
            return
    yield call(Client.append_many, [item], session_tag=key)


def _delete_all(key: str) -> Plan[list[Message] | None]:
    old = yield from history(key)
    gone = yield from _delete(key, [m.id for m in old])
    return [m for m in old if m.id in gone] or None


def _nth(key: str, idx: int) -> Plan[Message | None]:
    """The idx-th message of ``key`` as ``list[idx]`` indexes; None past the end.

    A negative ``idx`` beyond the start is ``IndexError``, as ``list.pop``'s
    (unless the session is empty: None, as ``SimpleChatStore`` for a new key).
    """
    if idx >= 0:
        after, left = 0, idx
        while True:
            page = yield call(Client.get_history, key, min(left + 1, PAGE), after_id=after)
            if left < len(page):
                return page[left]  # type: ignore[no-any-return]
            if len(page) < min(left + 1, PAGE):
                return None
            after, left = page[-1].id, left - len(page)
    before: int | None = None
    left, seen = -idx, 0
    while True:
        want = min(left, PAGE)
        page = yield call(Client.get_history, key, want, before_id=before)
        seen += len(page)
        if len(page) == want and left == want:
            return page[0]  # type: ignore[no-any-return]
        if len(page) < want:
            if seen == 0:
                return None
            raise IndexError("pop index out of range")
        before, left = page[0].id, left - want


def _delete_at(key: str, idx: int) -> Plan[Message | None]:
    _index(idx)
    while True:
        target = yield from _nth(key, idx)
        if target is None:
            return None
        gone = yield from _delete(key, [target.id])
        if gone:
            return target
        # Someone else deleted it meanwhile: the idx-th is another message now.


def _pop(key: str) -> Plan[Message | None]:
    return (yield call(Client.pop, key))  # type: ignore[no-any-return]


def _keys() -> Plan[list[str]]:
    sessions = yield call(Client.sessions)
    return [s.session_tag for s in sessions]


class NexusChatStore(BaseChatStore):
    """LlamaIndex's ``BaseChatStore`` over nexusd: each key is the nexusd session of that tag.

    ``socket`` is the daemon's socket (default: ``$NEXUSD_SOCKET``, else the
    usual path); or pass ``client``: a blocking :class:`~nexusd.Client` (the
    async methods then call it in a worker thread) or an
    :class:`~nexusd.AsyncClient` you opened with ``async with`` (the async
    methods call it on your event loop; the sync ones use a blocking client of
    the same socket).  ``close()`` closes only a client the store made.

    A key is 1 to 256 characters (else the client's ``BadRequest``).  A message
    is at most the daemon's ``max_content`` (1 MiB by default) as JSON text;
    one ``set_messages`` at most 10,000 messages within one frame (4 MiB by
    default): more is the client's ``BadRequest``/``TooLarge``, with nothing
    changed.  nexusd has no empty sessions: a key whose messages are all
    deleted is gone (``get_messages`` is ``[]``, ``delete_messages`` and the
    other deletes None), where ``SimpleChatStore`` keeps it as ``[]``.
    """

    _link: Link = PrivateAttr()

    def __init__(
        self,
        *,
        socket: str | os.PathLike[str] | None = None,
        client: Client | AsyncClient | None = None,
    ) -> None:
        super().__init__()
        self._link = Link(socket, client, adapter="NexusChatStore")

    @classmethod
    def class_name(cls) -> str:
        return "NexusChatStore"

    def close(self) -> None:
        """Close the client the store made (a client passed in stays open)."""
        self._link.close()

    # ── BaseChatStore ─────────────────────────────────────────────────────
    def set_messages(self, key: str, messages: list[ChatMessage]) -> None:
        """Make ``messages`` the messages of ``key``.

        nexusd has no replace: this appends ``messages`` (one atomic
        ``append_many``), then deletes every message of ``key`` older than
        them (in ``delete`` calls of at most 10,000 ids).  A crash or lost
        connection between the two leaves the old messages followed by the new
        ones, never neither.  As with a dict, the last writer wins: a message
        another process added before this append is deleted with the old ones,
        and of two ``set_messages`` at once, the one appended last is what
        stays, whole.
        """
        self._link.run(_set(key, [_record(m) for m in messages]))

    async def aset_messages(self, key: str, messages: list[ChatMessage]) -> None:
        """As :meth:`set_messages`; finishes even if the caller is cancelled meanwhile."""
        await self._link.drive(_set(key, [_record(m) for m in messages]), writes=True)

    def get_messages(self, key: str) -> list[ChatMessage]:
        """Every message of ``key``, oldest first (``[]`` for a key with none)."""
        return [_chat_message(m) for m in self._link.run(history(key))]

    async def aget_messages(self, key: str) -> list[ChatMessage]:
        """As :meth:`get_messages`."""
        return [_chat_message(m) for m in await self._link.drive(history(key))]

    def add_message(self, key: str, message: ChatMessage, idx: int | None = None) -> None:
        """Append ``message`` to ``key`` (one atomic ``append``).

        ``idx`` (as ``SimpleChatStore``'s, ``list.insert``'s): insert before
        the idx-th message instead.  nexusd orders by id and cannot insert, so
        this deletes the messages from ``idx`` on, then appends ``message``
        and copies of them (role, content, timestamp and meta kept; new ids)
        in one ``append_many``.  Deleting first keeps retention from pushing
        older messages out; a crash between the two loses the moved messages,
        which only this process then holds.
        """
        self._link.run(_add(key, _record(message), idx))

    async def async_add_message(
        self, key: str, message: ChatMessage, idx: int | None = None
    ) -> None:
        """As :meth:`add_message`; finishes even if the caller is cancelled meanwhile."""
        await self._link.drive(_add(key, _record(message), idx), writes=True)

    def delete_messages(self, key: str) -> list[ChatMessage] | None:
        """Delete every message of ``key``; return them (None if there were none)."""
        return _chat_messages(self._link.run(_delete_all(key)))

    async def adelete_messages(self, key: str) -> list[ChatMessage] | None:
        """As :meth:`delete_messages`; finishes even if the caller is cancelled meanwhile."""
        return _chat_messages(await self._link.drive(_delete_all(key), writes=True))

    def delete_message(self, key: str, idx: int) -> ChatMessage | None:
        """Delete and return the idx-th message of ``key`` (oldest first, as a list indexes).

        As ``SimpleChatStore``: None when ``idx`` is past the end (or ``key``
        has no messages); a negative ``idx`` counts from the newest, and one
        beyond the oldest is ``IndexError``.  Deleted by id, so a message
        another process adds meanwhile cannot be hit instead.
        """
        return _chat_message_or_none(self._link.run(_delete_at(key, idx)))

    async def adelete_message(self, key: str, idx: int) -> ChatMessage | None:
        """As :meth:`delete_message`; finishes even if the caller is cancelled meanwhile."""
        return _chat_message_or_none(await self._link.drive(_delete_at(key, idx), writes=True))

    def delete_last_message(self, key: str) -> ChatMessage | None:
        """Delete and return the newest message of ``key`` (one atomic ``pop``); None if none."""
        return _chat_message_or_none(self._link.run(_pop(key)))

    async def adelete_last_message(self, key: str) -> ChatMessage | None:
        """As :meth:`delete_last_message`; finishes even if the caller is cancelled meanwhile."""
        return _chat_message_or_none(await self._link.drive(_pop(key), writes=True))

    def get_keys(self) -> list[str]:
        """The tag of every session the daemon shows this user, not only LlamaIndex's keys.

        nexusd's sessions are shared by every tool and framework on the
        machine, so this lists theirs too (a ``NexusSession`` of the Agents
        SDK, ``nexusd append``, ...).
        """
        return self._link.run(_keys())

    async def aget_keys(self) -> list[str]:
        """As :meth:`get_keys`."""
        return await self._link.drive(_keys())


def _chat_messages(messages: list[Message] | None) -> list[ChatMessage] | None:
    return None if messages is None else [_chat_message(m) for m in messages]


def _chat_message_or_none(m: Message | None) -> ChatMessage | None:
    return None if m is None else _chat_message(m)
