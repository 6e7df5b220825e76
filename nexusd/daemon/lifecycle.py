"""What ``delete``, ``fork`` and ``set_retention`` mean: the writer jobs of a conversation's life.

Plain functions of the connection's dispatcher and the request, bound to
their rows of the table by :class:`~nexusd.daemon.handlers.Dispatcher` (which
imports this module; nothing here imports it back).  Each maps the tags the
client names to the stored ones (``isolate_peers``), checks what the wire
types cannot, and pairs the storage op with the builder of its reply.
"""

from __future__ import annotations

import functools
from typing import Protocol

from ..storage.base import Deleted, DeleteIds, Fork, Forked, Retention, SetRetention
from ..wire import protocol as p
from ..wire.errors import BadRequest
from .binding import Job, job
from .peers import Namespace

__all__ = ["delete", "fork", "set_retention"]


class Peer(Protocol):
    """What these handlers use of the connection's dispatcher: its tag namespace and
    the meta limit."""

    @property
    def ns(self) -> Namespace | None: ...

    @property
    def max_meta(self) -> int: ...


def _inner(peer: Peer, tag: str, field: str) -> str:
    """The stored form of the tag the client sent in ``field``."""
    return tag if peer.ns is None else peer.ns.inner(tag, field)


def delete(peer: Peer, req: p.Delete) -> Job[Deleted]:
    # Repeated ids are fine (each is deleted once, reported once); ids the
    # session does not hold, another session's included, come back as missing.
    op = DeleteIds(_inner(peer, req.session_tag, "session_tag"), tuple(req.ids))
    return job(op, _delete_reply)


def fork(peer: Peer, req: p.Fork) -> Job[Forked]:
    if req.source_tag == req.new_tag:
        raise BadRequest("a session cannot be forked into itself", field="new_tag")
    op = Fork(
        source_tag=_inner(peer, req.source_tag, "source_tag"),
        new_tag=_inner(peer, req.new_tag, "new_tag"),
        # ``forked_from`` names the source as this client knows it.
        link_tag=req.source_tag,
        up_to_id=req.up_to_id,
        append=req.append,
        max_meta=peer.max_meta,  # a copy must be a message this daemon accepts
    )
    return job(op, _fork_reply)


def set_retention(peer: Peer, req: p.SetRetention) -> Job[Retention]:
    tag = _inner(peer, req.session_tag, "session_tag")
    age = None if req.max_age is None else req.max_age + 0.0  # (-0.0 is 0)
    op = SetRetention(tag, Retention(req.max_messages, age))
    return job(op, functools.partial(_retention_reply, req.session_tag))


def _delete_reply(rid: int, done: Deleted) -> p.DeleteReply:
    return p.DeleteReply(id=rid, deleted=done.deleted, missing=done.missing)


def _fork_reply(rid: int, done: Forked) -> p.ForkReply:
    return p.ForkReply(id=rid, count=done.count, first_id=done.first_id, last_id=done.last_id)


def _retention_reply(tag: str, rid: int, done: Retention) -> p.SetRetentionReply:
    return p.SetRetentionReply(
        id=rid, session_tag=tag, max_messages=done.max_messages, max_age=done.max_age
    )
