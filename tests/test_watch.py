"""Watches on the wire (daemon/watch.py): replay then live, removals, slow readers, the end.

Raw frames against real daemons, as a client in another language would see
them (docs/protocol.md, "watch").  The Python clients' iterators are tested in
tests/test_watch_client.py.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from nexusd import Client
from nexusd.wire.framing import encode_frame
from tests.conftest import Daemon, RawSync, _new_daemon, as_uid, write_config


def frames(raw: RawSync, rid: int, until: Any, deadline: float = 20.0) -> list[dict[str, Any]]:
    """Frames of watch ``rid`` until ``until(frames)`` holds (other ids are kept aside)."""
    got: list[dict[str, Any]] = []
    end = time.monotonic() + deadline
    while not until(got):
        assert time.monotonic() < end, f"watch {rid}: no end within {deadline}s: {got[-3:]}"
        f = raw.recv()
        assert f["id"] == rid, f
        got.append(f)
    return got


def ids_of(got: list[dict[str, Any]]) -> list[int]:
    return [m["id"] for f in got if f["op"] == "watch" for m in f["messages"]]


def live(got: list[dict[str, Any]]) -> bool:
    return any(f.get("live") for f in got)


@pytest.fixture
def plain(short_dir: Path) -> Iterator[Daemon]:
    """A daemon without retention (every row stays, so the file is the truth)."""
    d = _new_daemon(short_dir, "--max-messages", "0").start()
    try:
        yield d
    finally:
        d.stop()


def test_stored_messages_then_live_ones_with_the_switch_marked(plain: Daemon) -> None:
    with Client(plain.socket) as c:
        ids = [c.append("user", f"m{i}", session_tag="s") for i in range(5)]
        raw = RawSync(plain.socket)
        raw.send({"op": "watch", "id": 7, "session_tag": "s", "after_id": ids[1]})
        got = frames(raw, 7, live)
        assert ids_of(got) == ids[2:]
        assert [f["live"] for f in got] == [False] * (len(got) - 1) + [True]
        c.append("user", "other session", session_tag="t")
        new = c.append("user", "live one", session_tag="s", meta={"k": [1, 2]})
        (f,) = frames(raw, 7, lambda g: bool(g))
        assert f["live"] and f["removed"] == []
        assert f["messages"] == [
            {
                "id": new,
                "role": "user",
                "content": "live one",
                "timestamp": f["messages"][0]["timestamp"],
                "session_tag": "s",
                "meta": {"k": [1, 2]},
            }
        ]
        assert f["messages"][0]["timestamp"] == c.get_history("s", 1)[0].timestamp
        # Without after_id: the live marker at once, then only what is new.
        raw.send({"op": "watch", "id": 8, "session_tag": "s"})
        (marker,) = frames(raw, 8, live)
        assert marker["messages"] == [] and marker["live"]


def _append_in_background(path: Path, tags: list[str], n: int) -> threading.Thread:
    def run() -> None:
        with Client(path) as c:
            for i in range(n):
                c.append_many([("user", f"r{i}-{j}") for j in range(3)], session_tag=tags[i % 2])

    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.parametrize("all_sessions", [False, True], ids=["one", "all"])
def test_no_gap_and_no_duplicate_when_a_watch_starts_during_writes(
    plain: Daemon, all_sessions: bool
) -> None:
    tags = ["a", "b"]
    with Client(plain.socket) as c:
        c.append_many([("user", f"before {i}") for i in range(1500)], session_tag="a")
    writer = _append_in_background(plain.socket, tags, 400)
    raw = RawSync(plain.socket)
    # Starts while the writer is busy: part replay, part live, switched mid-stream.
    req: dict[str, Any] = {"op": "watch", "id": 1, "after_id": 0}
    req.update({"all": True} if all_sessions else {"session_tag": "a"})
    raw.send(req)
    writer.join()
    conn = sqlite3.connect(plain.db)
    where = "" if all_sessions else " WHERE session_tag = 'a'"
    stored = [r[0] for r in conn.execute(f"SELECT id FROM nexus_messages{where} ORDER BY id")]
    conn.close()
    got = ids_of(frames(raw, 1, lambda g: ids_of(g)[-1:] == stored[-1:]))
    assert got == stored  # every one, once, in id order


def test_removals_keep_a_mirror_exact(short_dir: Path) -> None:
    d = _new_daemon(short_dir, "--max-messages", "3").start()
    try:
        raw = RawSync(d.socket)
        raw.send({"op": "watch", "id": 1, "session_tag": "s"})
        raw.send({"op": "watch", "id": 2, "all": True})
        frames(raw, 1, live)
        frames(raw, 2, live)
        mirror: dict[int, dict[int, str]] = {1: {}, 2: {}}

        def apply(f: dict[str, Any]) -> None:
            m = mirror[f["id"]]
            for msg in f["messages"]:
                m[msg["id"]] = msg["content"]
            for r in f["removed"]:
                for i in r["ids"]:
                    m.pop(i, None)
                if r["before_id"] is not None:
                    for i in [i for i in m if i < r["before_id"]]:
                        m.pop(i)

        with Client(d.socket) as c:
            steps: list[Any] = [
                lambda: c.append_many([("user", f"x{i}") for i in range(3)], session_tag="s"),
                lambda: c.append("user", "y", session_tag="s"),  # prunes one
                lambda: c.pop("s"),
                lambda: c.append("user", "z", session_tag="s"),
                lambda: c.clear("s"),
                lambda: c.append_many([("user", "p"), ("user", "q")], session_tag="s"),
                lambda: c.append("user", "elsewhere", session_tag="t"),
                lambda: c.clear_all(),
                lambda: c.append("user", "last", session_tag="s"),
            ]
            for n, step in enumerate(steps):
                step()
                # The step's frames were queued when it was answered: before this pong.
                raw.send({"op": "ping", "id": 1000 + n})
                while (f := raw.recv())["op"] != "ping":
                    apply(f)
                expected = {m.id: m.content for m in c.get_history("s", 100)}
                assert mirror[1] == expected
        assert set(mirror[2].values()) == {"last"}
    finally:
        d.stop()


def test_a_watch_that_is_not_read_ends_lagged_and_writers_never_wait(short_dir: Path) -> None:
    cfg = write_config(short_dir / "n.toml", watch_buffer=16384)
    d = _new_daemon(short_dir, "--config", str(cfg), "--max-messages", "0").start()
    try:
        sleeper = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sleeper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sleeper.connect(str(d.socket))
        raw = RawSync.__new__(RawSync)
        RawSync.__init__(raw, d.socket)
        raw.sock.close()
        raw.sock = sleeper
        raw.send({"op": "watch", "id": 5, "session_tag": "s", "after_id": 0})
        # Live first: a watch still replaying holds every batch, so on a loaded
        # machine it could lag before sending one (correct, but not this test).
        got = frames(raw, 5, live)
        with Client(d.socket) as c:
            big = "x" * 4000
            first = c.append("user", big, session_tag="s")
            for _ in range(200):  # ~800 KB: far past the socket, 256 KiB unsent and 16 KiB
                c.append_many([("user", big)] * 5, session_tag="s")
            assert c.stats()["watches_lagged"] == 1
            assert c.stats()["watches"] == 0
        while True:
            f = raw.recv()
            got.append(f)
            if f["op"] == "error":
                break
        assert f["code"] == "lagged" and f["id"] == 5
        sent = ids_of(got)
        assert sent[0] == first and f["last_id"] == sent[-1]
        assert sent == list(range(first, first + len(sent)))
        raw.close()
    finally:
        d.stop()


def test_unwatch_limits_and_bad_requests(plain: Daemon) -> None:
    raw = RawSync(plain.socket)
    raw.send({"op": "watch", "id": 1, "session_tag": "s"})
    frames(raw, 1, live)
    raw.send({"op": "watch", "id": 2, "session_tag": "s"})
    frames(raw, 2, live)
    bye = raw.call({"op": "unwatch", "id": 3, "watch": 2})
    assert bye == {"op": "unwatch", "id": 3}
    again = raw.call({"op": "unwatch", "id": 4, "watch": 2})
    assert (again["code"], again["field"]) == ("not_found", "watch")
    # A second watch with an open one's id: its error frame carries that id, so
    # it ends both (a client would take it for the first one's end).
    dup = raw.call({"op": "watch", "id": 1, "session_tag": "t"})
    assert (dup["op"], dup["code"], dup["field"]) == ("error", "bad_request", "id")
    gone = raw.call({"op": "unwatch", "id": 5, "watch": 1})
    assert gone["code"] == "not_found"
    with Client(plain.socket) as c:
        c.append("user", "after the unwatch", session_tag="s")
        assert c.stats()["watches"] == 0
    for i in range(64):
        raw.send({"op": "watch", "id": 100 + i, "session_tag": f"s{i}"})
        frames(raw, 100 + i, live)
    over = raw.call({"op": "watch", "id": 999, "session_tag": "s"})
    assert over["code"] == "bad_request" and "64" in over["message"]
    bad = raw.call({"op": "watch", "id": 1000, "session_tag": ""})
    assert (bad["code"], bad["field"]) == ("bad_request", "session_tag")
    assert raw.call({"op": "ping", "id": 1001}) == {"op": "ping", "id": 1001}


def test_shutdown_ends_watches_with_unavailable(short_dir: Path) -> None:
    d = _new_daemon(short_dir).start()
    raw = RawSync(d.socket)
    raw.send({"op": "watch", "id": 3, "all": True})
    frames(raw, 3, live)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    f = raw.recv()
    assert (f["id"], f["op"], f["code"]) == (3, "error", "unavailable")
    assert d.stop() == 0


def test_a_watching_connection_is_never_idle(short_dir: Path) -> None:
    cfg = write_config(short_dir / "n.toml", idle_timeout=0.3)
    d = _new_daemon(short_dir, "--config", str(cfg)).start()
    try:
        watching, idle = RawSync(d.socket), RawSync(d.socket)
        watching.send({"op": "watch", "id": 1, "session_tag": "s"})
        frames(watching, 1, live)
        assert idle.closed_by_peer()  # blocks until the idle timeout closed it
        with Client(d.socket) as c:
            c.append("user", "still here", session_tag="s")
        (f,) = frames(watching, 1, lambda g: bool(g))
        assert f["messages"][0]["content"] == "still here"
    finally:
        d.stop()


def test_a_message_no_frame_can_carry_ends_the_watch_naming_it(short_dir: Path) -> None:
    d = _new_daemon(short_dir).start()  # stored while the frame limit was 4 MiB
    try:
        with Client(d.socket) as c:
            before = c.append("user", "small", session_tag="s")
            huge = c.append("user", "x" * 1_000_000, session_tag="s")
            after = c.append("user", "small again", session_tag="s")
    finally:
        d.stop()
    d = _new_daemon(short_dir, "--max-frame", "1000000", "--max-content", "900000").start()
    try:
        raw = RawSync(d.socket)
        raw.send({"op": "watch", "id": 1, "session_tag": "s", "after_id": 0})
        got = frames(raw, 1, lambda g: bool(g) and g[-1]["op"] == "error")
        end = got[-1]
        assert (end["code"], end["last_id"]) == ("too_large", huge)
        assert ids_of(got) == [before] and str(huge) in end["message"]
        raw.send({"op": "watch", "id": 2, "session_tag": "s", "after_id": end["last_id"]})
        assert ids_of(frames(raw, 2, live)) == [after]
    finally:
        d.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")
def test_a_namespaced_peer_watches_and_finds_only_its_own(short_dir: Path) -> None:
    short_dir.chmod(0o755)
    one, two = 61001, 61002
    cfg = write_config(short_dir / "c.toml", socket_mode="0666", isolate_peers=True)
    cfg.write_text(cfg.read_text() + f"allow_uids = [{one}, {two}]\n")
    d = _new_daemon(short_dir, "--config", str(cfg)).start()
    try:
        for uid in (one, two):
            req = {"op": "append", "id": 1, "role": "user", "content": f"alpha of {uid}"}
            (ok,) = as_uid(uid, d.socket, [{**req, "session_tag": "s"}])
            assert ok["op"] == "append", ok
        (replay,) = as_uid(one, d.socket, [{"op": "watch", "id": 2, "all": True, "after_id": 0}])
        (found,) = as_uid(one, d.socket, [{"op": "search", "id": 3, "query": "alpha"}])
        assert [(m["content"], m["session_tag"]) for m in replay["messages"]] == [
            (f"alpha of {one}", "s")
        ]
        assert [h["message"]["content"] for h in found["hits"]] == [f"alpha of {one}"]
    finally:
        d.stop()


def test_all_watches_together_are_bounded_by_max_buffered(short_dir: Path) -> None:
    cfg = write_config(short_dir / "n.toml", watch_buffer=1048576, max_buffered=1048576)
    d = _new_daemon(short_dir, "--config", str(cfg), "--max-messages", "0").start()
    try:
        sleepers = []
        for rid in (1, 2, 3):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(str(d.socket))
            req = {"op": "watch", "id": rid, "session_tag": "s"}
            s.sendall(encode_frame(msgspec.msgpack.encode(req)))
            sleepers.append(s)
        with Client(d.socket) as c:
            for _ in range(60):  # ~960 kB each: under watch_buffer, not all three together
                c.append_many([("user", "x" * 4000)] * 4, session_tag="s")
            assert c.stats()["watches_lagged"] >= 1
        for s in sleepers:
            s.close()
    finally:
        d.stop()


def test_long_roles_and_tags_never_push_a_frame_past_the_limit(short_dir: Path) -> None:
    d = _new_daemon(short_dir, "--max-frame", "131072", "--max-content", "100000").start()
    try:
        tag, role = "🦜" * 256, "🐍" * 64  # 4 bytes of UTF-8 each
        raw = RawSync(d.socket)
        raw.send({"op": "watch", "id": 1, "all": True})
        frames(raw, 1, live)
        with Client(d.socket) as c:
            ids = c.append_many([(role, f"message {i}" * 4) for i in range(120)], session_tag=tag)
        got = frames(
            raw, 1, lambda g: bool(g) and (ids_of(g)[-1:] == ids[-1:] or g[-1]["op"] == "error")
        )
        assert [f["op"] for f in got] == ["watch"] * len(got) and ids_of(got) == ids
    finally:
        d.stop()
