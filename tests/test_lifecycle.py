"""A conversation's life through the daemon: delete, fork and set_retention, end to end.

One daemon for the module (``isolate_peers`` on, so other uids get namespaces
while this process, the daemon's own uid, keeps the plain tags); each test
uses its own session tags.  The scenarios that exercise the client code run
on the blocking client and on the async one under asyncio and trio.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from nexusd import (
    AsyncClient,
    BadRequest,
    Client,
    Conflict,
    Deleted,
    Forked,
    Message,
    NotFound,
    Removal,
    Retention,
)
from nexusd.wire import protocol as p
from nexusd.wire.ops import retryable
from tests.conftest import Daemon, RawSync, _new_daemon, as_uid, backend_storage, write_config
from tests.test_both_clients import FLAVORS, make, run

_PROTOCOL = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
#: The part of docs/protocol.md on delete, fork and set_retention.
DOC = _PROTOCOL[_PROTOCOL.index("The examples of `delete`") : _PROTOCOL.index("**`hello` limits**")]
#: Two uids the daemon admits besides root, for the namespace tests.
ONE, TWO = 61011, 61012


#: Delete, fork and retention through daemons on SQLite and on PostgreSQL.
BOTH_BACKENDS = True


@pytest.fixture(scope="module")
def d(backend: str) -> Iterator[Daemon]:
    base = Path(tempfile.mkdtemp(prefix="nxl", dir="/tmp"))
    base.chmod(0o755)  # other uids reach the socket (the namespace tests)
    cfg = write_config(base / "c.toml", socket_mode="0666", isolate_peers=True)
    cfg.write_text(cfg.read_text() + f"allow_uids = [0, {ONE}, {TWO}]\n")
    with backend_storage(backend) as storage:
        daemon = _new_daemon(base, "--config", str(cfg), storage=storage).start()
        try:
            yield daemon
        finally:
            assert daemon.stop() == 0
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def c(d: Daemon) -> Iterator[Client]:
    with Client(d.socket) as client:
        yield client


def _session(c: Client, tag: str) -> p.SessionInfo | None:
    return next((s for s in c.sessions() if s.session_tag == tag), None)


# ── delete ───────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("flavor", FLAVORS)
def test_delete_removes_exactly_those_ids_and_reports_the_missing(
    flavor: str, d: Daemon, tag: str
) -> None:
    async def scenario() -> None:
        async with make(flavor, d.socket) as cl:
            ids = await cl.append_many([("user", f"m{i}") for i in range(5)], session_tag=tag)
            (elsewhere,) = await cl.append_many([("user", "other")], session_tag=tag + "/x")
            gone = [ids[3], ids[1], ids[3]]  # any order, repeats allowed
            done = await cl.delete([*gone, 10**12, elsewhere], session_tag=tag)
            assert done == Deleted(deleted=[ids[1], ids[3]], missing=[elsewhere, 10**12])
            left = await cl.get_history(tag)
            assert [m.id for m in left] == [ids[0], ids[2], ids[4]]
            assert await cl.message_count(tag + "/x") == 1  # another session's id: untouched
            again = await cl.delete(gone, tag)  # harmless: ids are never reused
            assert again == Deleted(deleted=[], missing=[ids[1], ids[3]])
            assert await cl.message_count(tag) == 3

    run(flavor, scenario)


def test_delete_is_resent_after_a_lost_answer_but_fork_is_not() -> None:
    assert retryable(p.Delete(id=1, ids=[1]))
    assert retryable(p.SetRetention(id=1))
    assert not retryable(p.Fork(id=1, source_tag="a", new_tag="b"))


def test_a_watcher_sees_the_deletion_and_search_no_longer_finds_it(
    c: Client, d: Daemon, tag: str
) -> None:
    ids = c.append_many([("user", "keep this"), ("user", "secret number 4111")], session_tag=tag)

    async def watch() -> None:
        async with AsyncClient(d.socket) as ac:
            with anyio.fail_after(10):
                async with ac.watch(tag, removals=True) as w:
                    done = await ac.delete([ids[1], 10**12], tag)
                    assert done.deleted == [ids[1]]
                    item = await w.__anext__()
            assert item == Removal(session_tag=tag, ids=[ids[1]])

    anyio.run(watch)
    assert [h.message.id for h in c.search("secret 4111", session_tag=tag)] == []
    assert [h.message.id for h in c.search("keep", session_tag=tag)] == [ids[0]]


def test_a_watcher_sees_a_fork_arrive_and_a_lower_retention_remove(d: Daemon, tag: str) -> None:
    new = tag + "-b"

    async def watch() -> None:
        async with AsyncClient(d.socket) as ac:
            await ac.append_many([("user", "a"), ("user", "b")], session_tag=tag)
            with anyio.fail_after(10):
                async with ac.watch(new, removals=True) as w:
                    done = await ac.fork(tag, new)
                    got = [await w.__anext__(), await w.__anext__()]
                    assert [m.id for m in got if isinstance(m, Message)] == [
                        done.first_id,
                        done.last_id,
                    ]
                    await ac.set_retention(new, max_messages=1)
                    gone = await w.__anext__()
            assert gone == Removal(session_tag=new, before_id=done.last_id)

    anyio.run(watch)


def test_delete_refuses_bad_ids_naming_the_item(c: Client, tag: str) -> None:
    with pytest.raises(BadRequest) as err:
        c.delete([1, -5], tag)
    assert err.value.field == "ids[1]"
    with pytest.raises(BadRequest) as err:
        c.delete([], tag)
    assert err.value.field == "ids"
    with pytest.raises(BadRequest) as err:
        c.delete(list(range(p.MAX_DELETE_IDS + 1)), tag)
    assert err.value.field == "ids"
    with pytest.raises(BadRequest, match="list of message ids") as err:
        c.delete(5, tag)  # type: ignore[arg-type]
    assert err.value.field == "ids"


# ── fork ─────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("flavor", FLAVORS)
def test_fork_copies_every_field_with_new_ids_and_a_link(flavor: str, d: Daemon, tag: str) -> None:
    new = tag + " (fork)"

    async def scenario() -> None:
        async with make(flavor, d.socket) as cl:
            await cl.append_many(
                [
                    ("system", "be brief"),
                    {"role": "user", "content": "hi", "meta": {"lang": "en", "n": [1, 2]}},
                    {"role": "assistant", "content": "hello", "timestamp": "2020-01-02T03:04:05Z"},
                ],
                session_tag=tag,
            )
            src = await cl.get_history(tag)
            done = await cl.fork(tag, new)
            assert isinstance(done, Forked) and done.count == 3
            copy = await cl.get_history(new)
            assert [m.id for m in copy] == list(range(done.first_id, done.last_id + 1))
            assert done.first_id > src[-1].id
            for m, orig in zip(copy, src, strict=True):
                assert (m.role, m.content, m.timestamp, m.session_tag) == (
                    orig.role,
                    orig.content,
                    orig.timestamp,
                    new,
                )
                link = {"forked_from": {"session_tag": tag, "id": orig.id}}
                assert m.meta == {**(orig.meta or {}), **link}
            assert await cl.get_history(tag) == src  # the source is unchanged

    run(flavor, scenario)


def test_fork_up_to_an_id_then_conflict_then_append(c: Client, tag: str) -> None:
    ids = c.append_many([("user", f"m{i}") for i in range(4)], session_tag=tag)
    new = tag + "-b"
    first = c.fork(tag, new, up_to_id=ids[1])
    assert [m.content for m in c.get_history(new)] == ["m0", "m1"]
    assert first.count == 2
    with pytest.raises(Conflict) as err:
        c.fork(tag, new)
    assert err.value.field == "new_tag"
    assert c.message_count(new) == 2  # nothing stored
    more = c.fork(tag, new, append=True)
    assert (more.count, more.first_id) == (4, first.last_id + 1)
    assert [m.content for m in c.get_history(new)] == ["m0", "m1", "m0", "m1", "m2", "m3"]
    # A fork of a fork links to its direct source.
    (m,) = c.get_history(new, 1)
    c.fork(new, tag + "-c", up_to_id=m.id)
    last = c.get_history(tag + "-c", 1)[0]
    assert last.meta == {"forked_from": {"session_tag": new, "id": m.id}}


def test_fork_refuses_nothing_to_copy_and_itself(c: Client, tag: str) -> None:
    with pytest.raises(NotFound) as err:
        c.fork(tag + "-empty", tag + "-x")
    assert err.value.field == "source_tag"
    (mid,) = c.append_many([("user", "x")], session_tag=tag)
    with pytest.raises(NotFound) as err:
        c.fork(tag, tag + "-x", up_to_id=mid + 10**9)
    assert err.value.field == "up_to_id"
    with pytest.raises(BadRequest) as bad:
        c.fork(tag, tag)
    assert bad.value.field == "new_tag"
    assert c.message_count(tag + "-x") == 0


def test_a_fork_keeps_the_new_sessions_retention(c: Client, tag: str) -> None:
    c.set_retention(tag, max_messages=0)  # the source keeps everything
    for _ in range(2):
        c.append_many([("user", f"m{i}") for i in range(300)], session_tag=tag)
    done = c.fork(tag, tag + "-b")  # 600 copies into a session of the default 500
    assert done.count == 600
    kept = c.get_history(tag + "-b", 1000)
    assert len(kept) == 500 and kept[-1].id == done.last_id


# ── set_retention ────────────────────────────────────────────────────────────
@pytest.mark.parametrize("flavor", FLAVORS)
def test_set_retention_lowers_the_count_at_once_and_none_restores_the_default(
    flavor: str, d: Daemon, tag: str
) -> None:
    async def scenario() -> None:
        async with make(flavor, d.socket) as cl:
            ids = await cl.append_many([("user", f"m{i}") for i in range(10)], session_tag=tag)
            now = await cl.set_retention(tag, max_messages=3, max_age="30d")
            assert now == Retention(tag, 3, 30 * 86400.0)
            assert [m.id for m in await cl.get_history(tag)] == ids[-3:]
            assert await cl.message_count(tag) == 3
            back = await cl.set_retention(tag)
            assert back == Retention(tag, None, None)
            await cl.append_many([("user", "more")] * 5, session_tag=tag)
            assert await cl.message_count(tag) == 8  # the default, 500, applies again

    run(flavor, scenario)


def test_set_retention_checks_its_arguments(c: Client, tag: str) -> None:
    with pytest.raises(BadRequest, match="max_age") as err:
        c.set_retention(tag, max_age="soon")  # refused by the client, nothing sent
    assert err.value.field == "max_age"
    with pytest.raises(BadRequest) as err:
        c.set_retention(tag, max_age=-1)
    assert err.value.field == "max_age"
    with pytest.raises(BadRequest) as err:
        c.set_retention(tag, max_messages=-1)
    assert err.value.field == "max_messages"
    with pytest.raises(BadRequest) as err:
        c.set_retention(tag, max_messages=p.MAX_RETAINED + 1)
    assert err.value.field == "max_messages"
    assert c.set_retention(tag, max_messages=p.MAX_RETAINED).max_messages == p.MAX_RETAINED


def test_a_sessions_own_max_age_deletes_its_old_messages(c: Client, tag: str) -> None:
    c.append_many([("user", "old")], session_tag=tag)
    c.append_many([("user", "kept")], session_tag=tag + "/other")
    c.set_retention(tag, max_age=0.2)
    deadline = time.monotonic() + 10
    while c.message_count(tag):
        assert time.monotonic() < deadline, "the session's max_age never applied"
        time.sleep(0.05)  # poll interval of a deadline loop
    assert c.message_count(tag + "/other") == 1  # the default (no max_age) elsewhere


def test_retention_survives_a_restart(d: Daemon, tag: str) -> None:
    with Client(d.socket) as c:
        c.append_many([("user", f"m{i}") for i in range(5)], session_tag=tag)
        c.set_retention(tag, max_messages=4, max_age=3600)
    d.stop()
    d.start()
    with Client(d.socket) as c:
        c.append_many([("user", "after")] * 3, session_tag=tag)
        assert c.message_count(tag) == 4  # still its own, after the restart
        c.set_retention(tag)
        c.append_many([("user", "after")] * 3, session_tag=tag)
        assert c.message_count(tag) == 7


def test_sessions_show_a_sessions_own_retention(c: Client, tag: str) -> None:
    c.append_many([("user", "m")], session_tag=tag)
    c.set_retention(tag, max_messages=4, max_age="1h")
    info = _session(c, tag)
    assert info is not None and (info.max_messages, info.max_age) == (4, 3600.0)
    c.set_retention(tag, max_messages=0)
    info = _session(c, tag)
    assert info is not None and (info.max_messages, info.max_age) == (0, None)
    c.set_retention(tag)
    info = _session(c, tag)
    assert info is not None and (info.max_messages, info.max_age) == (None, None)


# ── isolate_peers ────────────────────────────────────────────────────────────
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other uids")
def test_each_peer_deletes_forks_and_sets_retention_in_its_own_namespace(
    c: Client, d: Daemon
) -> None:
    def req(op: str, **keys: Any) -> dict[str, Any]:
        return {"op": op, "id": 1, **keys}

    (added,) = as_uid(
        ONE,
        d.socket,
        [
            req(
                "append_many",
                session_tag="s",
                messages=[{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
            )
        ],
    )
    ids = added["message_ids"]
    c.append("user", "plain", session_tag="s")
    # Another uid, and this one under the plain tag, cannot touch them.
    (theirs,) = as_uid(TWO, d.socket, [req("delete", session_tag="s", ids=ids)])
    assert theirs["missing"] == ids
    assert c.delete(ids, "s").missing == ids
    forked, history, retention, more, count, deleted = as_uid(
        ONE,
        d.socket,
        [
            req("fork", source_tag="s", new_tag="t", up_to_id=ids[0]),
            req("history", session_tag="t"),
            req("set_retention", session_tag="t", max_messages=1),
            req("append", session_tag="t", role="user", content="three"),
            req("count", session_tag="t"),
            req("delete", session_tag="s", ids=[ids[1]]),
        ],
    )
    assert forked["count"] == 1
    (copy,) = history["messages"]
    assert copy["session_tag"] == "t"
    assert copy["meta"] == {"forked_from": {"session_tag": "s", "id": ids[0]}}
    assert (retention["session_tag"], retention["max_messages"]) == ("t", 1)
    assert (more["op"], count["count"]) == ("append", 1)  # its own retention applies
    assert deleted["deleted"] == [ids[1]]
    assert _session(c, "t") is None  # not in this uid's (the plain) namespace
    assert c.fork("s", "t2") is not None  # nor is this "s" the other uid's
    assert [m.content for m in c.get_history("t2")] == ["plain"]


# ── the protocol document's examples ─────────────────────────────────────────
_EXAMPLE = re.compile(r"^→ (.*)\n← (.*)$", re.M)


def _matches(documented: Any, got: Any) -> bool:
    """``got`` is what the document shows, ``"…"`` standing for any value."""
    if documented == "…":
        return True
    if isinstance(documented, dict):
        return (
            isinstance(got, dict)
            and documented.keys() == got.keys()
            and all(_matches(v, got[k]) for k, v in documented.items())
        )
    if isinstance(documented, list):
        return (
            isinstance(got, list)
            and len(documented) == len(got)
            and all(_matches(a, b) for a, b in zip(documented, got, strict=True))
        )
    return bool(documented == got)


def test_the_documented_examples_are_what_the_daemon_answers(short_dir: Path) -> None:
    pairs = _EXAMPLE.findall(DOC)
    assert {msgspec.json.decode(r)["op"] for r, _ in pairs} >= {
        "delete",
        "fork",
        "set_retention",
    }
    daemon = _new_daemon(short_dir).start()  # the examples start from a fresh database
    raw = RawSync(daemon.socket)
    try:
        for request, reply in pairs:
            got = raw.call(msgspec.json.decode(request))
            assert _matches(msgspec.json.decode(reply), got), (request, got)
    finally:
        raw.close()
        daemon.stop()
