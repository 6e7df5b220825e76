from __future__ import annotations

import importlib.util
import sqlite3
from pathlib import Path

import pytest

from nexusd.storage.schema import SCHEMA_VERSION, StorageError, integrity_check, open_writer
from tests.conftest import SEED, make_v1_db

V1_ROWS = [
    ("user", "hello", "09:15:02", "nexus"),
    ("assistant", "hi there\nsecond line", "09:15:03", "nexus"),
    ("user", "other", "10:00:00", "ops"),
    ("tool", "ünïcödé ✓ \x00 nul", "10:00:01", "ops"),
]


def _rows(path: Path) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            "SELECT id, role, content, timestamp, session_tag FROM nexus_messages ORDER BY id"
        ).fetchall()
    finally:
        conn.close()


def test_fresh_database_gets_the_v1_table_and_the_migrations(tmp_path: Path) -> None:
    conn = open_writer(tmp_path / "n.db")
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        cols = [r[1] for r in conn.execute("PRAGMA table_info(nexus_messages)")]
        assert cols == ["id", "role", "content", "timestamp", "session_tag", "meta", "idem_key"]
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(nexus_messages)")}
        assert "idx_nexus_session" in indexes and "idx_nexus_ts" not in indexes
        # v1's session index serves id-ordered ranges: no sort, no second index.
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM nexus_messages "
            "WHERE session_tag = ? AND id < ? ORDER BY id DESC LIMIT 5",
            ("s", 9),
        ).fetchall()
        assert [r[-1] for r in plan] == [
            "SEARCH nexus_messages USING COVERING INDEX idx_nexus_session (session_tag=? AND rowid<?)"
        ]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name='nexus_messages'").fetchone()[
            0
        ]
        assert "AUTOINCREMENT" in sql
    finally:
        conn.close()


def test_v1_database_opens_in_place_with_every_row_intact(tmp_path: Path) -> None:
    db = tmp_path / "nexus.db"
    make_v1_db(db, V1_ROWS)
    before = _rows(db)
    assert [r[0] for r in before] == [1, 2, 3, 4]
    conn = open_writer(db)
    conn.close()
    assert _rows(db) == before
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("SELECT COUNT(*) FROM nexus_messages WHERE meta IS NULL").fetchone()[0] == 4
    conn.close()
    # Re-opening is a no-op: migrations are numbered and never re-run.
    open_writer(db).close()
    assert _rows(db) == before


@pytest.mark.skipif(not SEED.exists(), reason="v1 seed store not beside the checkout")
def test_database_written_by_the_real_v1_store_opens_in_place(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("nexus_store_v1", SEED)
    assert spec and spec.loader
    v1 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(v1)
    db = tmp_path / "nexus.db"
    store = v1.NexusStore(db)
    ids = [store.append("user", f"m{i}", session_tag="t") for i in range(5)]
    store.close()
    open_writer(db).close()
    assert [r[0] for r in _rows(db)] == ids
    assert [r[2] for r in _rows(db)] == [f"m{i}" for i in range(5)]


def test_ids_are_never_reused_after_delete(tmp_path: Path) -> None:
    db = tmp_path / "nexus.db"
    make_v1_db(db, V1_ROWS)
    conn = open_writer(db)
    conn.execute("DELETE FROM nexus_messages")
    cur = conn.execute(
        "INSERT INTO nexus_messages (role, content, timestamp, session_tag) VALUES ('a','b','c','d')"
    )
    assert cur.lastrowid == 5
    conn.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "n.db"
    open_writer(db).close()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StorageError, match="newer"):
        open_writer(db)


def test_non_sqlite_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    db = tmp_path / "n.db"
    db.write_bytes(b"this is not a database, it is a grocery list\n" * 10)
    before = db.read_bytes()
    with pytest.raises(StorageError, match="not an SQLite database"):
        open_writer(db)
    assert db.read_bytes() == before
    assert not Path(f"{db}-wal").exists()


def test_integrity_check_reports_ok(tmp_path: Path) -> None:
    db = tmp_path / "n.db"
    open_writer(db).close()
    assert integrity_check(db) == ["ok"]


def test_another_programs_sqlite_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    with pytest.raises(StorageError, match="SQLite database of another program"):
        open_writer(db)
    with pytest.raises(StorageError, match="SQLite database of another program"):
        integrity_check(db)
    assert db.read_bytes() == before  # no table added, no WAL switch, no user_version
    # An empty SQLite file (no tables) is simply a new database.
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    open_writer(empty).close()
