"""The ``search`` operation (daemon/searching.py and its handler) through real daemons.

Storage-level behaviour (index upkeep, tokenizer, building) is tests/test_search.py;
here: what a client sees on the wire — filters, both orders and their cursors,
pages cut by the frame limit, namespaces, the setting that switches it off, an
old database indexed while the daemon serves — with both clients and the CLI.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import anyio
import msgspec
import pytest

from nexusd import BadRequest, Client, TooLarge, Unavailable
from nexusd.daemon.searching import Cursors, search_query
from nexusd.storage.base import Page, SearchQuery
from nexusd.storage.sqlite import SQLiteStorage
from nexusd.wire import protocol as p
from tests.conftest import Daemon, RawSync, _new_daemon, make_v1_db
from tests.test_both_clients import FLAVORS, make, run
from tests.test_handlers import Daemonless, isolated


def hit(mid: int, rank: float) -> p.SearchHit:
    msg = p.Message(id=mid, role="r", content="c", timestamp="t", session_tag="s")
    return p.SearchHit(message=msg, snippet="c", rank=rank)


# ── the cursor ──────────────────────────────────────────────────────────────
def ask(req: p.Search, cursors: Cursors | None = None) -> SearchQuery:
    return search_query(req, cursors or Cursors(req), sessions=None, scope=None, budget=1)


@pytest.mark.parametrize("rank", [-1.2345678901234567e-06, -3.0, 0.0, -1e-300])
def test_a_ranked_cursor_carries_the_rank_exactly(rank: float) -> None:
    first = p.Search(id=1, query="x")
    cursor = Cursors(first).after(Page([hit(7, rank)], truncated=True))
    assert cursor is not None
    assert ask(p.Search(id=2, query="x", cursor=cursor)).after == (rank, 7)
    assert Cursors(first).after(Page([hit(7, rank)], truncated=False)) is None


@pytest.mark.parametrize(
    "other",
    [
        {"order": "newest"},  # the other order's
        {"query": "y"},
        {"syntax": True},
        {"session_tags": ["s"]},
        {"role": "user"},
        {"since": "2026-01-01T00:00:00Z"},
        {"until": "2026-01-01T00:00:00Z"},
    ],
)
def test_a_cursor_of_another_search_is_bad_request(other: dict[str, object]) -> None:
    cursor = Cursors(p.Search(id=1, query="x")).after(Page([hit(7, -1.0)], truncated=True))
    req = p.Search(id=2, **{"query": "x", **other, "cursor": cursor})  # type: ignore[arg-type]
    with pytest.raises(BadRequest) as err:
        ask(req)
    assert err.value.field == "cursor"


@pytest.mark.parametrize(
    ("order", "made"),
    [
        ("rank", "r:nan:5"),
        ("rank", "r:inf:5"),
        ("rank", "r:-0x1p+0:-5"),
        ("newest", "n:"),
        ("newest", "n:99999999999999999999"),
        ("newest", "n:9999999999999999999"),  # 19 digits, over 2^63 - 1
        ("newest", "n:٣"),  # a digit, but not ASCII
        ("rank", "garbage"),
        ("rank", ""),
    ],
)
def test_a_cursor_that_does_not_parse_is_bad_request(order: str, made: str) -> None:
    req = p.Search(id=1, query="x", order=order)  # type: ignore[arg-type]
    fp = Cursors(req).past(hit(1, 0.0)).rsplit(":", 1)[1]  # even with the right hash
    with pytest.raises(BadRequest) as err:
        ask(msgspec.structs.replace(req, cursor=f"{made}:{fp}"))
    assert err.value.field == "cursor"


def test_since_and_until_are_checked_and_stored_in_the_daemons_form() -> None:
    req = p.Search(id=1, query="x", since="2026-11-26T08:00:00+01:00", until="2026-11-27T00:00:00Z")
    q = ask(req)
    assert (q.since, q.until) == ("2026-11-26T07:00:00.000000Z", "2026-11-27T00:00:00.000000Z")
    with pytest.raises(BadRequest) as err:
        ask(p.Search(id=1, query="x", until="tomorrow"))
    assert err.value.field == "until"


# ── namespaces, without sockets ───────────────────────────────────────────
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_namespaced_peer_finds_only_its_own_messages(tmp_path: Path) -> None:
    storage = SQLiteStorage(
        tmp_path / "n.db",
        max_messages=0,
        synchronous="full",
        wal_autocheckpoint=1000,
        readers=2,
        search=True,
    )
    from nexusd.daemon.backups import Snapshots
    from nexusd.daemon.writer import Writer

    await storage.open()
    writer = Writer(storage, queue_size=16, batch_max=4)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            dl = Daemonless(storage, writer, Snapshots(storage, tmp_path, max_snapshots=1))
            alice, bob = dl.dispatcher(isolated(5001)), dl.dispatcher(isolated(5002))
            plain = dl.dispatcher()
            for who, d in (("alice", alice), ("bob", bob), ("daemon", plain)):
                await dl.ask(d, p.Append(id=1, role="user", content=f"secret of {who}"))
            for who, d in (("alice", alice), ("bob", bob)):
                found = await dl.ask(d, p.Search(id=2, query="secret"))
                assert [h.message.content for h in found.hits] == [f"secret of {who}"]
                assert found.hits[0].message.session_tag == p.DEFAULT_SESSION  # its own tag
                # Naming the others' stored tags finds nothing either.
                assert (await dl.ask(d, p.Search(id=3, query="daemon"))).hits == []
            everyone = await dl.ask(plain, p.Search(id=4, query="secret"))
            assert len(everyone.hits) == 3
            writer.close()
    finally:
        await storage.close()


# ── through a real daemon, both clients ─────────────────────────────────────
@pytest.mark.parametrize("flavor", FLAVORS)
def test_filters_orders_and_paging_with_the_cursor(
    shared_daemon: Daemon, tag: str, flavor: str
) -> None:
    other = tag + "-other"

    async def scenario() -> None:
        async with make(flavor, shared_daemon.socket) as c:
            ids = await c.append_many(
                [("user" if i % 2 else "assistant", f"needle number {i} {tag}") for i in range(45)],
                session_tag=tag,
            )
            await c.append("user", f"needle elsewhere {tag}", session_tag=other)
            word = tag.replace("[", " ").replace("]", " ").split()[-1]  # a token of the tag
            first = await c.search(f"needle {word}", session_tag=tag, limit=20)
            assert len(first) == 20 and first.cursor is not None
            seen = [h.message.id for h in first]
            cursor = first.cursor
            while cursor is not None:
                page = await c.search(f"needle {word}", session_tag=tag, limit=20, cursor=cursor)
                seen += [h.message.id for h in page]
                cursor = page.cursor
            assert sorted(seen) == ids  # every hit once, none twice
            newest = await c.search(f"needle {word}", session_tag=tag, order="newest", limit=45)
            assert [h.message.id for h in newest] == ids[::-1] and newest.cursor is None
            both = await c.search(f"needle {word}", session_tag=[tag, other], limit=100)
            assert len(both) == 46
            roles = {h.message.role for h in await c.search(f"needle {word}", role="user")}
            assert roles == {"user"}
            assert await c.search(f"needle {word}", until="2000-01-01T00:00:00Z") == []
            hit = (await c.search(f"number 7 {word}", session_tag=tag))[0]
            assert [hit.snippet[a:b] for a, b in hit.highlights] == ["number", "7", word]
            assert hit.message.id == ids[7] and isinstance(hit.rank, float)
            with pytest.raises(BadRequest) as err:
                await c.search('"unterminated', syntax=True)
            assert err.value.field == "query"
            assert len(await c.search(f'"number 7" {word}*', syntax=True, session_tag=tag)) == 1

    run(flavor, scenario)


def test_a_page_is_cut_to_the_frame_limit_and_the_client_goes_on(short_dir: Path) -> None:
    d = _new_daemon(short_dir, "--max-frame", "131072", "--max-content", "100000").start()
    try:
        with Client(d.socket) as c:
            big = "w" * 40_000
            ids = [c.append("user", f"findme {i} {big}") for i in range(5)]
            raw = RawSync(d.socket)
            reply = raw.call({"op": "search", "id": 9, "query": "findme", "limit": 5})
            assert 1 <= len(reply["hits"]) < 5 and reply["cursor"] is not None
            found = c.search("findme", limit=5)  # pages on by itself
            assert sorted(h.message.id for h in found) == ids and found.cursor is None
    finally:
        d.stop()


def test_search_switched_off_answers_unavailable_and_says_so(short_dir: Path) -> None:
    d = _new_daemon(short_dir, "--search", "false").start()
    try:
        with Client(d.socket) as c:
            c.append("user", "not indexed")
            with pytest.raises(Unavailable, match="search is off"):
                c.search("indexed")
            assert c.stats()["search"] == "off"
    finally:
        d.stop()
    conn = sqlite3.connect(d.db)
    try:  # not maintained: not even there
        fts = conn.execute("SELECT name FROM sqlite_master WHERE name LIKE 'nexus_fts%'").fetchall()
    finally:
        conn.close()
    assert fts == []


def test_a_v1_database_is_indexed_while_the_daemon_serves(short_dir: Path) -> None:
    rows = [("user", f"old words {i}", "12:00:00", "v1") for i in range(20_000)]
    make_v1_db(short_dir / "nexus.db", rows)
    d = _new_daemon(short_dir).start()
    try:
        with Client(d.socket) as c:
            c.append("user", "old and new", session_tag="live")  # served while building
            end = time.monotonic() + 60
            while c.stats()["search"] != "ready":
                assert time.monotonic() < end, "the index was not built within 60 s"
                try:
                    c.search("old")
                except Unavailable as exc:
                    assert "being built" in exc.message
                time.sleep(0.05)  # poll interval of a deadline loop
            assert len(c.search("old", limit=1000)) == 1000
            assert c.search("old", limit=1000).cursor is not None
            assert len(c.search("new")) == 1
    finally:
        d.stop()
    assert "search index complete" in d.log


def test_too_large_a_hit_is_named(short_dir: Path) -> None:
    # Stored while the frame limit was larger: a hit no reply can carry.
    d = _new_daemon(short_dir).start()
    try:
        with Client(d.socket) as c:
            first = c.append("user", "huge but small")
            mid = c.append("user", "huge " + "x" * 1_000_000)
    finally:
        d.stop()
    d = _new_daemon(short_dir, "--max-frame", "1000000", "--max-content", "900000").start()
    try:
        with Client(d.socket) as c:
            with pytest.raises(TooLarge, match=f"message {mid}") as err:
                c.search("huge", order="newest")
            c.ping()  # the connection stays usable
            assert err.value.cursor is not None  # pages on past it
            assert [
                h.message.id for h in c.search("huge", cursor=err.value.cursor, order="newest")
            ] == [first]
    finally:
        d.stop()


# ── the command line ───────────────────────────────────────────────────────
def test_the_cli_prints_hits_with_their_snippets_and_json(shared_daemon: Daemon, tag: str) -> None:
    d = shared_daemon
    assert d.cli("append", "user", "Über das Café\x1b[31m", "--session", tag).returncode == 0
    r = d.cli("search", "uber cafe", "--session", tag)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("#") and f"  {tag}  user  " in lines[0]
    assert lines[1] == "    Über das Café\\x1b[31m"  # escaped, no highlighting on a pipe
    unquoted = d.cli("search", "uber", "cafe", "--session", tag)  # words need no quotes
    assert unquoted.returncode == 0 and unquoted.stdout == r.stdout
    r = d.cli("search", "uber cafe", "--session", tag, "--json")
    out = json.loads(r.stdout)
    assert out["cursor"] is None and out["hits"][0]["highlights"] == [[0, 4], [9, 13]]
    r = d.cli("search", "nothing-like-this-anywhere-xyz", "--session", tag)
    assert (r.returncode, r.stdout) == (0, "(no matches)\n")
    r = d.cli("search", "AND AND", "--fts")
    assert r.returncode == 2 and r.stderr.startswith("nexusd: ") and "Traceback" not in r.stderr
    r = d.cli("search", "x", "--since", "yesterday")
    assert r.returncode == 2 and "since" in r.stderr
