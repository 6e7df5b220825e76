"""Commit marks (nexusd/storage/marks.py): what the age of a row is known by, and its thinning."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from nexusd.storage import marks
from nexusd.storage.schema import open_writer

NOW = 2_000_000_000.0
DAY = 86_400


def db_with_marks(path: Path, seconds: list[int]) -> sqlite3.Connection:
    conn = open_writer(path)
    conn.execute("DELETE FROM nexus_marks")
    conn.executemany(
        "INSERT INTO nexus_marks (second, last_id, at) VALUES (?, ?, ?)",
        [(s, i + 1, s + 0.5) for i, s in enumerate(seconds)],
    )
    conn.execute("INSERT INTO nexus_messages (role, content, timestamp) VALUES ('user', 'x', 't')")
    return conn


def test_the_boundary_is_the_newest_row_surely_committed_by_then(tmp_path: Path) -> None:
    conn = db_with_marks(tmp_path / "n.db", [100, 101, 105])
    assert marks.boundary(conn, 99.0) == 0
    assert marks.boundary(conn, 100.4) == 0  # the rows of second 100 may be later
    assert marks.boundary(conn, 100.5) == 1
    assert marks.boundary(conn, 104.0) == 2
    assert marks.boundary(conn, 1e10) == 3


def test_thinning_keeps_a_mark_a_minute_past_a_day_and_an_hour_past_a_month(
    tmp_path: Path,
) -> None:
    now = int(NOW)
    recent = list(range(now - 600, now))  # every second of the last 10 minutes
    yesterday = list(range(now - 2 * DAY, now - 2 * DAY + 600))  # 10 minutes, 2 days ago
    old = list(range(now - 40 * DAY, now - 40 * DAY + 7200, 10))  # 2 hours, 40 days ago
    conn = db_with_marks(tmp_path / "n.db", old + yesterday + recent)
    conn.execute("UPDATE nexus_marks SET last_id = last_id + 1000000")  # rows still stored
    before = marks.boundary(conn, now - 2 * DAY + 300.0)
    marks.thin(conn, NOW)

    def count(lo: int, hi: int) -> int:
        return int(
            conn.execute(
                "SELECT COUNT(*) FROM nexus_marks WHERE second >= ? AND second < ?", (lo, hi)
            ).fetchone()[0]
        )

    assert count(now - 600, now) == 600
    assert count(now - 2 * DAY, now - 2 * DAY + 600) in (10, 11)  # one per minute
    assert count(now - 40 * DAY, now - 40 * DAY + 7200) in (2, 3)  # one per hour
    # Thinning only ever makes a row's known commit time later, never earlier.
    assert marks.boundary(conn, now - 2 * DAY + 300.0) <= before


def test_thinning_drops_the_marks_of_rows_already_gone(tmp_path: Path) -> None:
    conn = db_with_marks(tmp_path / "n.db", [int(NOW) - 5, int(NOW) - 4, int(NOW) - 3])
    conn.execute("UPDATE nexus_messages SET id = 3")  # ids 1 and 2 are gone
    marks.thin(conn, NOW)
    assert conn.execute("SELECT last_id FROM nexus_marks").fetchall() == [(3,)]
