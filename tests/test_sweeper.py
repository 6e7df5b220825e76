"""The daemon's sweeper (nexusd/daemon/sweeper.py), end to end: a real ``nexusd serve``.

Rows past ``max_age`` disappear on their own, and so do the rows a big
``clear`` hid, while the daemon goes on serving; on restart, rows that aged
while it was down go at once.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from nexusd import Client
from nexusd.storage.floors import HIDE_FROM
from tests.conftest import Daemon, _new_daemon


def until(check: Callable[[], bool], deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while not check():
        if time.monotonic() > end:
            raise AssertionError("not within the deadline")
        time.sleep(0.05)


def stored(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM nexus_messages").fetchone()[0])


def test_max_age_deletes_rows_by_themselves_while_serving(short_dir: Path) -> None:
    d = _new_daemon(short_dir, "--max-age", "1s").start()
    try:
        with Client(d.socket) as c:
            c.append("user", "short-lived", session_tag="s")
            assert c.message_count("s") == 1
            until(lambda: c.message_count("s") == 0)
            stats = c.stats()
            assert stats["rows_expired"] == 1 and stats["max_age_s"] == 1.0
        assert stored(d.db) == 0
    finally:
        d.stop()


def test_rows_that_aged_while_the_daemon_was_down_go_at_start(short_dir: Path) -> None:
    d = _new_daemon(short_dir).start()
    with Client(d.socket) as c:
        c.append("user", "old", session_tag="s")
    assert d.stop() == 0
    with sqlite3.connect(d.db) as conn:  # committed two days ago
        conn.execute("UPDATE nexus_marks SET second = second - 172800, at = at - 172800")
    d = Daemon(d.dir, d.db, d.socket, args=["--max-age", "1d"]).start()
    try:
        until(lambda: stored(d.db) == 0)
    finally:
        d.stop()


def test_a_big_clear_answers_at_once_and_its_rows_go_in_the_background(
    short_dir: Path,
) -> None:
    d = _new_daemon(short_dir, "--max-messages", "0").start()
    try:
        with Client(d.socket) as c:
            n = HIDE_FROM + 100
            for start in range(0, n, 500):
                c.append_many(
                    [("user", f"m{i}") for i in range(start, min(n, start + 500))],
                    session_tag="big",
                )
            c.append("user", "other", session_tag="other")
            assert c.clear("big") == n
            assert c.message_count("big") == 0 and c.get_history("big") == []
            until(lambda: stored(d.db) == 1)
            assert c.stats()["rows_swept"] == n
            assert [m.content for m in c.get_history("other")] == ["other"]
    finally:
        d.stop()
