"""Oversized fields (issue 9, item 6): ``meta`` is bounded at append, and rows
stored before that (or by v1, or by hand) never make ``history`` answer an
empty page with ``truncated: true`` nor make ``sessions`` fail.

The odd rows are written straight into the SQLite file while the daemon is
stopped, as an older version could have left them.  Frames are 64 KiB here so
"too big for a frame" costs kilobytes, not megabytes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nexusd import BadRequest, Client
from tests.conftest import Daemon, RawSync, _new_daemon, write_config

FRAME = 64 * 1024


def _small_daemon(base: Path) -> Daemon:
    cfg = write_config(
        base / "small.toml", max_frame=FRAME, max_meta=16 * 1024, max_content=16 * 1024
    )
    return _new_daemon(base, "--config", str(cfg), "--max-messages", "0")


def _restart_with(d: Daemon, sql: list[tuple[str, tuple[Any, ...]]]) -> None:
    """Stop ``d``, run ``sql`` on its file directly (no validation), start it again."""
    assert d.stop() == 0
    conn = sqlite3.connect(d.db)
    with conn:
        for stmt, params in sql:
            conn.execute(stmt, params)
    conn.close()
    d.start()


@pytest.fixture
def small(short_dir: Path) -> Iterator[Daemon]:
    d = _small_daemon(short_dir).start()
    try:
        yield d
    finally:
        d.stop()


def _page(raw: RawSync, rid: int, **keys: Any) -> tuple[list[int], bool]:
    reply = raw.call({"op": "history", "id": rid, **keys})
    assert reply["op"] == "history", reply
    return [m["id"] for m in reply["messages"]], reply["truncated"]


def test_meta_over_max_meta_is_refused_at_append_with_the_field_named(daemon: Daemon) -> None:
    big = {"blob": "m" * 1_500_000}  # 1.5 MB of meta, well inside the 4 MiB frame
    with Client(daemon.socket, retry_for=0) as c:
        limit = c.hello().limits["max_meta"]
        with pytest.raises(BadRequest) as info:
            c.append("user", "hi", session_tag="m", meta=big)
        assert info.value.field == "meta" and str(limit) in info.value.message
        with pytest.raises(BadRequest) as info:
            c.append_many(
                [("user", "ok"), {"role": "user", "content": "x", "meta": big}], session_tag="m"
            )
        assert info.value.field == "messages[1].meta"
        # Exactly at the limit is fine: {"k":"…"} is 8 bytes of JSON around the string.
        c.append("user", "edge", session_tag="m", meta={"k": "v" * (limit - 8)})
        with pytest.raises(BadRequest):
            c.append("user", "over", session_tag="m", meta={"k": "v" * (limit - 7)})
        assert [m.content for m in c.get_history("m")] == ["edge"]


def test_history_returns_a_row_over_the_estimate_alone_and_pages_past_it(small: Daemon) -> None:
    with Client(small.socket, retry_for=0) as c:
        ids = c.append_many([("user", f"m{i}") for i in range(1, 7)], session_tag="t")
    # Row 4 gets 30 KB of meta: its estimate (meta at 3x) is over the 64 KiB
    # budget, its real size is not.  Stored by hand, as an old version could.
    meta = '{"k":"' + "x" * 30_000 + '"}'
    _restart_with(small, [("UPDATE nexus_messages SET meta = ? WHERE id = ?", (meta, ids[3]))])
    raw = RawSync(small.socket)
    try:
        # Newest first: 6, 5 fit; 4 does not fit along with them.
        assert _page(raw, 1, session_tag="t") == (ids[4:], True)
        # Before the fix this page was empty with truncated: true.
        assert _page(raw, 2, session_tag="t", before_id=ids[4]) == ([ids[3]], True)
        assert _page(raw, 3, session_tag="t", before_id=ids[3]) == (ids[:3], False)
        # Forward, the same row comes alone too, and the last page is complete.
        assert _page(raw, 4, session_tag="t", after_id=0) == (ids[:3], True)
        assert _page(raw, 5, session_tag="t", after_id=ids[2]) == ([ids[3]], True)
        assert _page(raw, 6, session_tag="t", after_id=ids[3]) == (ids[4:], False)
        # A one-row page is not "truncated" when nothing else is in range.
        assert _page(raw, 7, session_tag="t", after_id=ids[2], before_id=ids[4]) == (
            [ids[3]],
            False,
        )
    finally:
        raw.close()
    with Client(small.socket, retry_for=0) as c:  # the client pages through all of it
        got = c.get_history("t")
        assert [m.id for m in got] == ids
        assert got[3].meta is not None and len(got[3].meta["k"]) == 30_000


def test_a_row_that_cannot_fit_a_frame_is_an_explicit_error_naming_it(small: Daemon) -> None:
    with Client(small.socket, retry_for=0) as c:
        ids = c.append_many([("user", "a"), ("user", "b"), ("user", "c")], session_tag="t")
    meta = '{"k":"' + "x" * 70_000 + '"}'  # over the 64 KiB frame by itself
    _restart_with(small, [("UPDATE nexus_messages SET meta = ? WHERE id = ?", (meta, ids[1]))])
    raw = RawSync(small.socket)
    try:
        assert _page(raw, 1, session_tag="t") == ([ids[2]], True)
        err = raw.call({"op": "history", "id": 2, "session_tag": "t", "before_id": ids[2]})
        assert (err["op"], err["id"], err["code"]) == ("error", 2, "too_large")
        assert f"message {ids[1]} " in err["message"] and "max_frame" in err["message"]
        # The connection stays usable, and the rows around it can still be read.
        assert _page(raw, 3, session_tag="t", before_id=ids[1]) == ([ids[0]], False)
        assert raw.call({"op": "ping", "id": 4}) == {"op": "ping", "id": 4}
    finally:
        raw.close()


def test_sessions_pages_by_real_size_past_long_stored_timestamps(small: Daemon) -> None:
    with Client(small.socket, retry_for=0) as c:
        for tag in ("a", "b", "c", "d"):
            c.append("user", "x", session_tag=tag)
    # Two 40 KB timestamps (the two 2 MB ones, at a 64 KiB frame):
    # before the fix every sessions call failed with too_large.
    long_ts = "2026-01-01T00:00:00Z" + "9" * 40_000
    _restart_with(
        small,
        [
            ("UPDATE nexus_messages SET timestamp = ? WHERE session_tag IN ('b', 'c')", (long_ts,)),
        ],
    )
    raw = RawSync(small.socket)
    try:
        first = raw.call({"op": "sessions", "id": 1})
        assert [s["session_tag"] for s in first["sessions"]] == ["a", "b"]
        assert first["truncated"] is True
        assert first["sessions"][1]["last_timestamp"] == long_ts
        rest = raw.call({"op": "sessions", "id": 2, "after": "b"})
        assert [s["session_tag"] for s in rest["sessions"]] == ["c", "d"]
        assert rest["truncated"] is False
    finally:
        raw.close()
    with Client(small.socket, retry_for=0) as c:
        assert [s.session_tag for s in c.sessions()] == ["a", "b", "c", "d"]


def test_a_session_entry_that_cannot_fit_is_an_explicit_error_naming_it(small: Daemon) -> None:
    with Client(small.socket, retry_for=0) as c:
        for tag in ("a", "b"):
            c.append("user", "x", session_tag=tag)
    _restart_with(
        small,
        [("UPDATE nexus_messages SET timestamp = ? WHERE session_tag = 'b'", ("9" * 70_000,))],
    )
    raw = RawSync(small.socket)
    try:
        first = raw.call({"op": "sessions", "id": 1})
        assert ([s["session_tag"] for s in first["sessions"]], first["truncated"]) == (["a"], True)
        err = raw.call({"op": "sessions", "id": 2, "after": "a"})
        assert (err["code"], err["id"]) == ("too_large", 2) and "'b'" in err["message"]
    finally:
        raw.close()


def test_pop_of_a_row_too_big_for_any_reply_removes_nothing(small: Daemon) -> None:
    with Client(small.socket, retry_for=0) as c:
        ids = c.append_many([("user", "a"), ("user", "b")], session_tag="t")
    # Stored when the frame limit was larger: 70 KB of content, over the 64 KiB frame.
    _restart_with(
        small, [("UPDATE nexus_messages SET content = ? WHERE id = ?", ("x" * 70_000, ids[1]))]
    )
    raw = RawSync(small.socket)
    try:
        err = raw.call({"op": "pop", "id": 1, "session_tag": "t"})
        assert (err["op"], err["id"], err["code"]) == ("error", 1, "too_large")
        assert f"message {ids[1]} " in err["message"] and "not removed" in err["message"]
        assert raw.call({"op": "count", "id": 2, "session_tag": "t"})["count"] == 2
    finally:
        raw.close()


def test_meta_may_nest_32_levels_and_no_more(daemon: Daemon) -> None:
    def nested(levels: int) -> dict[str, Any]:
        meta: dict[str, Any] = {"leaf": 1}  # a scalar adds no level
        for _ in range(levels - 1):
            meta = {"a": meta}
        return meta

    with Client(daemon.socket, retry_for=0) as c:
        c.append("user", "deep enough", meta=nested(32), session_tag="n")
        with pytest.raises(BadRequest, match="deeper than 32") as too_deep:
            c.append("user", "too deep", meta=nested(33), session_tag="n")
        assert too_deep.value.field is not None and too_deep.value.field.startswith("meta.a")
        assert [m.content for m in c.get_history("n")] == ["deep enough"]
