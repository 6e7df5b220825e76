"""The OpenAI Agents SDK's ``Session``, kept by nexusd: :class:`NexusSession`.

``Runner.run(agent, "hi", session=NexusSession("chat-42"))`` keeps the run's
items in the nexusd session ``chat-42``, where every process on the machine
(another agent, ``nexusd history``, ``nexusd search``, ``nexusd tail -f``) sees
them, instead of in one process's SQLite file.

How the SDK's calls map to nexusd:

* ``add_items(items)``: one ``append_many``, so a turn's items (the user's
  input, tool calls and outputs, the answer) are stored all or none, in order.
  Each item is one message: ``role`` is the item's ``role`` (messages) or
  ``type`` (``function_call``, ``reasoning``, …), ``content`` is the item's
  JSON text, exactly as given; it reads back equal, key order included.
* ``get_items(limit)``: the newest ``limit`` (``session_settings.limit`` when
  not given; all of them when neither is), oldest first, paged.
* ``pop_item()``: ``pop``; ``clear_session()``: ``clear``.

A message of the session that is not such an item (written by ``nexusd
append``, an import, or the LangChain or LlamaIndex adapter) reads back as
the plain message ``{"role": role, "content": text}`` that the Responses API
takes: its text (:func:`~nexusd.integrations.records.plain`), the role
``human`` as ``user`` and ``ai`` as ``assistant``, and any role but user,
assistant, system and developer (``tool``, ``critic``) as ``user``.  An item
with neither ``role`` nor ``type`` is stored with the role ``item``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from ..client import AsyncClient, Client
from ..wire.protocol import Message
from .extras import missing_extra
from .link import Link, check_tag, history
from .records import ALIASES, kind_of, loads_object, plain, record, role_of

try:
    from agents.memory import SessionSettings
except ImportError as exc:
    raise missing_extra(
        exc, "agents", extra="agents", adapter="nexusd.integrations.openai_agents"
    ) from None

if TYPE_CHECKING:
    from agents.items import TResponseInputItem

__all__ = ["NexusSession"]

#: The roles of a plain message the Responses API takes; another's reads as the user's.
_ROLES: Final = frozenset({"user", "assistant", "system", "developer"})


class NexusSession:
    """A conversation of the Agents SDK, stored in the nexusd session ``session_id``.

    ``socket`` is the daemon's socket (default: ``$NEXUSD_SOCKET``, else the
    usual path); or pass ``client``: a blocking :class:`~nexusd.Client`
    (calls then run in a worker thread, as the SDK's ``SQLiteSession`` does)
    or an :class:`~nexusd.AsyncClient` you opened with ``async with`` (calls
    on your event loop; it must be that loop).  ``session_settings`` (or a
    dict of it): ``limit`` is how many items ``get_items()`` returns when not
    told.

    Items must be JSON (what the SDK hands a session is); each is at most the
    daemon's ``max_content`` (1 MiB by default) as JSON text, and one
    ``add_items`` at most 10,000 items within one frame (4 MiB by default):
    more is the client's ``BadRequest``/``TooLarge``, and nothing is stored.
    Writes finish even when the calling task is cancelled meanwhile; the
    cancellation is raised after (so a cancelled ``add_items`` stored all of
    its items or none).
    """

    session_settings: SessionSettings | None

    def __init__(
        self,
        session_id: str,
        *,
        socket: str | os.PathLike[str] | None = None,
        client: Client | AsyncClient | None = None,
        session_settings: SessionSettings | dict[str, Any] | None = None,
    ) -> None:
        self.session_id = check_tag(session_id, what="session_id", adapter="NexusSession")
        if isinstance(session_settings, dict):
            session_settings = SessionSettings(**session_settings)
        self.session_settings = session_settings or SessionSettings()
        self._link = Link(socket, client, adapter="NexusSession")

    def __repr__(self) -> str:
        return f"NexusSession({self.session_id!r})"

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """The newest ``limit`` items, oldest first (every item when no limit is set)."""
        if limit is None and self.session_settings is not None:
            limit = self.session_settings.limit
        if limit is not None and (type(limit) is not int):  # bool too: True is not a count
            raise TypeError(f"NexusSession: limit is an int or None, not {type(limit).__name__}")
        if limit == 0:
            return []
        # As SQLiteSession: a negative limit is no limit.
        want = None if limit is None or limit < 0 else limit
        return [_item(m) for m in await self._link.drive(history(self.session_id, want))]

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        """Store ``items`` in order, all or none, in one ``append_many``."""
        if not items:
            return
        batch = [_record(i, item) for i, item in enumerate(_checked(items))]
        await self._link.write(Client.append_many, batch, session_tag=self.session_id)

    async def pop_item(self) -> TResponseInputItem | None:
        """Remove and return the newest item (None when the session is empty)."""
        msg: Message | None = await self._link.write(Client.pop, self.session_id)
        return None if msg is None else _item(msg)

    async def clear_session(self) -> None:
        """Remove every item of the session."""
        await self._link.write(Client.clear, self.session_id)

    def close(self) -> None:
        """Close the connection this session opened (a ``client`` passed in stays open)."""
        self._link.close()

    def __enter__(self) -> NexusSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _checked(items: Sequence[Any]) -> Sequence[Any]:
    if isinstance(items, (str, bytes, dict)) or not isinstance(items, Sequence):
        raise TypeError(f"add_items takes a list of items, not {type(items).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise TypeError(f"item {i} is a {type(item).__name__}, not a dict (a JSON object)")
    return items


def _record(i: int, item: dict[str, Any]) -> dict[str, Any]:
    """``item`` as the message that stores it; its own error names which item it was."""
    role = role_of(item.get("role"), item.get("type"))
    try:
        return record("agents", role, item)
    except (TypeError, ValueError) as exc:
        raise type(exc)(
            f"NexusSession: items[{i}] ({role}) cannot be stored as JSON: {exc}"
        ) from None


def _item(msg: Message) -> Any:
    """The item a stored message holds; any other message as a plain message of its role."""
    stored = loads_object(msg.content)
    if kind_of(msg, stored) == "agents":
        return stored
    role, text = plain(msg, stored)
    role = ALIASES.get(role, role)
    return {"role": role if role in _ROLES else "user", "content": text}
