"""``nexusd migrate --to postgresql://…``: an SQLite database copied into PostgreSQL.

Every test runs the real command in a subprocess against a real database of
the run's PostgreSQL cluster (``pg_url``) and compares what PostgreSQL holds
with the SQLite file row by row, the file itself byte for byte before and after.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pty
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nexusd.storage.schema import open_writer
from tests.conftest import Daemon, make_v1_db, pg_database, run_cli

COLUMNS = "id, role, content, timestamp, session_tag, meta, idem_key"


# ── helpers ──────────────────────────────────────────────────────────────────
def migrate(url: str, db: Path, *more: str) -> subprocess.CompletedProcess[str]:
    return run_cli("migrate", "--to", url, "--db", str(db), *more)


def pg(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()


def sqlite_rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def file_state(db: Path) -> tuple[str, int, int]:
    """The file's bytes (hashed), its mtime, and its WAL's size.

    A read in WAL mode makes SQLite create ``-wal`` and ``-shm`` beside the
    file when they are missing (any reader does, ``nexusd check`` too); the
    WAL stays empty: nothing is written.
    """
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    wal = Path(f"{db}-wal")
    return digest, db.stat().st_mtime_ns, wal.stat().st_size if wal.exists() else 0


def expected_counts(db: Path) -> list[tuple[str, int]]:
    """Visible messages per session, as the SQLite backend counts them (floors applied)."""
    has_floors = bool(sqlite_rows(db, "SELECT 1 FROM sqlite_master WHERE name = 'nexus_floors'"))
    floor = (
        "coalesce((SELECT below_id FROM nexus_floors f WHERE f.session_tag = m.session_tag), 0)"
        if has_floors
        else "0"
    )
    return sqlite_rows(
        db,
        f"SELECT session_tag, count(*) FROM nexus_messages m WHERE id >= {floor}"
        " GROUP BY session_tag ORDER BY session_tag",
    )


def assert_same(url: str, db: Path) -> None:
    """PostgreSQL holds exactly the file's messages (every column), counts and small tables."""
    have = {c[1] for c in sqlite_rows(db, "PRAGMA table_info(nexus_messages)")}
    select = ", ".join(c if c in have else "NULL" for c in COLUMNS.split(", "))
    theirs = sqlite_rows(db, f"SELECT {select} FROM nexus_messages ORDER BY id")
    mine = pg(url, f"SELECT {COLUMNS} FROM nexus_messages ORDER BY id")
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs, strict=True):
        assert a == b
    counts = pg(url, "SELECT session_tag, messages FROM nexus_sessions ORDER BY session_tag")
    assert [(t, int(n)) for t, n in counts] == expected_counts(db)
    tables = {r[0] for r in sqlite_rows(db, "SELECT name FROM sqlite_master WHERE type='table'")}
    for table, cols in (
        ("nexus_floors", "session_tag, below_id"),
        ("nexus_retention", "session_tag, max_messages, max_age"),
        ("nexus_marks", "second, last_id, at"),
    ):
        if table in tables:
            assert pg(url, f"SELECT {cols} FROM {table} ORDER BY 1") == sqlite_rows(
                db, f"SELECT {cols} FROM {table} ORDER BY 1"
            )
    # Ids are never reused: the sequence stands at the highest id the file ever gave.
    seq = sqlite_rows(db, "SELECT seq FROM sqlite_sequence WHERE name = 'nexus_messages'")
    last = max([r[0] for r in seq] + [theirs[-1][0] if theirs else 0])
    assert pg(url, "SELECT last_value, is_called FROM nexus_messages_id_seq") == [(last, True)]


def target_state(url: str) -> list[Any]:
    """Everything a rerun could change, for an exact before/after comparison."""
    out: list[Any] = []
    for table in ("nexus_messages", "nexus_sessions", "nexus_floors", "nexus_retention"):
        out.append(pg(url, f"SELECT * FROM {table} ORDER BY 1"))
    out.append(pg(url, "SELECT * FROM nexus_marks ORDER BY 1"))
    out.append(pg(url, "SELECT last_value, is_called FROM nexus_messages_id_seq"))
    return out


def current_db(path: Path, n: int = 300) -> Path:
    """A current-schema file (as nexusd writes it) with meta, keys, floors, retention, marks,
    a hidden row below a floor and deleted rows (so sqlite_sequence is past max(id))."""
    conn = open_writer(path)
    rows = [
        (
            "user" if i % 2 else "assistant",
            f"message {i} héllo — 日本語 ‮ \x1b[1m" + "x" * (i % 7),
            f"2024-05-01T00:00:{i % 60:02d}.000000Z",
            f"s{i % 4}",
            json.dumps({"i": i, "f": 0.5}) if i % 3 == 0 else None,
            f"key-{i}" if i % 5 == 0 else None,
        )
        for i in range(n)
    ]
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO nexus_messages (role, content, timestamp, session_tag, meta, idem_key)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        rows,
    )
    conn.execute("INSERT INTO nexus_floors VALUES ('s1', 50)")  # s1's rows below 50: hidden
    conn.execute("INSERT INTO nexus_retention VALUES ('s2', 1000, NULL), ('s3', NULL, 86400.0)")
    conn.execute("INSERT INTO nexus_marks VALUES (1714521600, 100, 1714521600.25)")
    conn.execute("INSERT INTO nexus_marks VALUES (1714521700, ?, 1714521700.5)", (n,))
    conn.execute("DELETE FROM nexus_messages WHERE id > ?", (n - 3,))  # ids n-2.. never reused
    conn.execute("COMMIT")
    conn.close()
    return path


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    return d


# ── copying ──────────────────────────────────────────────────────────────────
def test_v1_file_is_copied_read_only(pg_url: str, workdir: Path) -> None:
    db = workdir / "nexus.db"
    make_v1_db(
        db,
        [
            ("user", f"v1 message {i}", f"2023-01-01T00:00:{i:02d}Z", f"tag{i % 3}")
            for i in range(40)
        ],
    )
    before = file_state(db)
    r = migrate(pg_url, db)
    assert r.returncode == 0, r.stderr
    assert "40 messages in 3 sessions" in r.stdout
    assert file_state(db) == before  # not migrated, not written
    assert sqlite_rows(db, "PRAGMA user_version") == [(0,)]
    assert_same(pg_url, db)
    assert pg(pg_url, "SELECT count(*) FROM nexus_messages WHERE meta IS NULL AND idem_key IS NULL")
    # As SQLite's migration 4: the rows already there count as committed by the copy.
    marks = pg(pg_url, "SELECT last_id FROM nexus_marks")
    assert marks == [(40,)]
    # Full-text: PostgreSQL fills the tsv column itself.
    hits = pg(pg_url, "SELECT id FROM nexus_messages WHERE tsv @@ 'v1 & 7'::tsquery")
    assert hits == [(8,)]


def test_current_schema_file_keeps_ids_meta_keys_floors_retention(
    pg_url: str, workdir: Path
) -> None:
    db = current_db(workdir / "nexus.db")
    before = file_state(db)
    r = migrate(pg_url, db, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["messages"] == summary["inserted"] == 297
    assert summary["schema_version"] == 4
    assert (summary["floors"], summary["retention"], summary["marks"]) == (1, 2, 2)
    assert file_state(db) == before
    assert_same(pg_url, db)
    # s1 holds 74 rows (ids 2, 6, ... 294), 12 of them below its floor (50): not counted.
    assert pg(pg_url, "SELECT messages FROM nexus_sessions WHERE session_tag = 's1'") == [(62,)]
    # The next id a daemon takes is past every id the file handed out (300 was deleted).
    assert pg(pg_url, "SELECT nextval('nexus_messages_id_seq')") == [(301,)]


def test_rerun_changes_nothing(pg_url: str, workdir: Path) -> None:
    db = current_db(workdir / "nexus.db", n=120)
    assert migrate(pg_url, db).returncode == 0
    first = target_state(pg_url)
    r = migrate(pg_url, db, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["inserted"] == 0
    assert target_state(pg_url) == first
    # A v1 file too (its synthetic mark is not added twice).
    with pg_database() as other:
        v1 = workdir / "v1.db"
        make_v1_db(v1, [("user", "hello", "2023-01-01T00:00:00Z", "nexus")] * 3)
        assert migrate(other, v1).returncode == 0
        once = target_state(other)
        assert migrate(other, v1).returncode == 0
        assert target_state(other) == once


def test_a_stopped_daemons_file(pg_url: str, short_dir: Path) -> None:
    d = Daemon(dir=short_dir, db=short_dir / "nexus.db", socket=short_dir / "s.sock").start()
    try:
        for i in range(5):
            assert (
                d.cli("append", "user", f"from the daemon {i}", "--session", "live").returncode == 0
            )
        assert d.cli("pop", "--session", "live").returncode == 0
        r = migrate(pg_url, d.db)
        assert r.returncode == 1
        err = r.stderr.strip()
        assert err.count("\n") == 0
        assert f"a nexusd daemon (pid {d.proc.pid if d.proc else ''}) serves" in err
        assert pg(pg_url, "SELECT count(*) FROM pg_tables WHERE tablename = 'nexus_messages'") == [
            (0,)
        ]
    finally:
        d.stop()
    r = migrate(pg_url, d.db)
    assert r.returncode == 0, r.stderr
    assert_same(pg_url, d.db)
    assert pg(pg_url, "SELECT count(*) FROM nexus_marks") != [(0,)]


# ── interrupted ──────────────────────────────────────────────────────────────
def big_db(path: Path, n: int) -> Path:
    conn = open_writer(path)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO nexus_messages (role, content, timestamp, session_tag, meta, idem_key)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (
            (
                "user",
                f"row {i} " + "lorem ipsum dolor " * (1 + i % 9),
                "2024-01-01T00:00:00.000000Z",
                f"s{i % 97}",
                '{"n": 1}' if i % 4 == 0 else None,
                f"k{i}" if i % 6 == 0 else None,
            )
            for i in range(n)
        ),
    )
    conn.execute("INSERT INTO nexus_floors VALUES ('s5', 1000)")
    conn.execute("COMMIT")
    conn.close()
    return path


def test_killed_mid_copy_then_rerun_is_identical(pg_url: str, workdir: Path) -> None:
    n = 80_000  # 16 chunks: killed after the third, long before the last
    db = big_db(workdir / "nexus.db", n)
    before = file_state(db)
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexusd", "migrate", "--to", pg_url, "--db", str(db)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        copied = 0
        while copied < 15_000 and time.monotonic() < deadline and proc.poll() is None:
            try:
                copied = pg(pg_url, "SELECT count(*) FROM nexus_messages")[0][0]
            except Exception:  # the schema may not be there yet
                copied = 0
            time.sleep(0.01)  # poll interval of a deadline loop
        assert proc.poll() is None, "the copy ended before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    partial = pg(pg_url, "SELECT count(*), max(id) FROM nexus_messages")[0]
    assert 0 < partial[0] < n
    # Whole chunks only, and their counts with them.
    assert partial[0] == partial[1]
    counted = pg(pg_url, "SELECT sum(messages) FROM nexus_sessions")[0][0]
    hidden = pg(
        pg_url, "SELECT count(*) FROM nexus_messages WHERE session_tag = 's5' AND id < 1000"
    )[0][0]
    assert counted == partial[0] - hidden
    r = migrate(pg_url, db)
    assert r.returncode == 0, r.stderr
    assert f"{n - partial[0]:,} inserted now ({partial[0]:,} already there)" in r.stdout
    assert file_state(db) == before
    assert_same(pg_url, db)


def test_the_copy_waits_for_the_write_lock(pg_url: str, workdir: Path) -> None:
    """A daemon's batch holds the write lock: the copy writes nothing until it is released."""
    import psycopg

    from nexusd.storage.postgres import schema

    async def make_schema() -> None:
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as c:
            await schema.migrate(c)

    asyncio.run(make_schema())
    db = current_db(workdir / "nexus.db", n=40)
    with psycopg.connect(pg_url, autocommit=True) as holder:
        holder.execute("BEGIN")
        holder.execute(schema.TAKE_WRITE_LOCK)
        proc = subprocess.Popen(
            [sys.executable, "-m", "nexusd", "migrate", "--to", pg_url, "--db", str(db)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            waiting: list[tuple[Any, ...]] = []
            while not waiting and time.monotonic() < deadline and proc.poll() is None:
                waiting = pg(
                    pg_url,
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                )
                time.sleep(0.01)  # poll interval of a deadline loop
            assert waiting, "the copy never queued for the write lock"
            assert pg(pg_url, "SELECT count(*) FROM nexus_messages") == [(0,)]
            holder.execute("COMMIT")
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err
    assert_same(pg_url, db)


# ── refusals ─────────────────────────────────────────────────────────────────
def one_line(r: subprocess.CompletedProcess[str], code: int) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    # Progress lines (stderr is not a terminal here) may come first.
    lines = [x for x in r.stderr.splitlines() if not x.startswith("nexusd: migrate: ")]
    assert len(lines) == 1 and lines[0].startswith("nexusd: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.mark.parametrize("case", ["foreign", "changed", "above"])
def test_a_target_holding_other_messages_is_refused(pg_url: str, workdir: Path, case: str) -> None:
    db = current_db(workdir / "nexus.db", n=50)
    if case == "foreign":  # another file's copy is there
        other = workdir / "other.db"
        make_v1_db(other, [("user", f"other {i}", "2023-01-01T00:00:00Z", "x") for i in range(5)])
        assert migrate(pg_url, other).returncode == 0
    else:
        assert migrate(pg_url, db).returncode == 0
        if case == "changed":
            pg(pg_url, "UPDATE nexus_messages SET content = 'edited' WHERE id = 7 RETURNING 1")
        else:
            pg(
                pg_url,
                "INSERT INTO nexus_messages (id, role, content, timestamp, session_tag)"
                " VALUES (900, 'user', 'new', 't', 's0') RETURNING 1",
            )
    state = target_state(pg_url)
    line = one_line(migrate(pg_url, db), 1)
    assert line.startswith("nexusd: not copied: the target already holds messages")
    assert "migrate into an empty database" in line
    assert target_state(pg_url) == state  # nothing written


def test_a_nul_character_stops_the_copy_at_its_message(pg_url: str, workdir: Path) -> None:
    db = big_db(workdir / "nexus.db", 12_000)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE nexus_messages SET content = ? WHERE id = 7003", ("a\x00b",))
    conn.commit()
    conn.close()
    line = one_line(migrate(pg_url, db, "--json"), 1)
    assert line == (
        "nexusd: stopped at message id 7003: it holds a NUL character, which PostgreSQL text"
        " cannot store (the chunks before its chunk are copied)"
    )
    assert pg(pg_url, "SELECT count(*), max(id) FROM nexus_messages") == [(5000, 5000)]


def test_bad_sources_are_usage_errors(pg_url: str, workdir: Path) -> None:
    missing = workdir / "missing.db"
    assert "does not exist" in one_line(migrate(pg_url, missing), 2)
    text = workdir / "notes.txt"
    text.write_text("hello, this is not a database at all\n")
    assert "is not an SQLite database" in one_line(migrate(pg_url, text), 2)
    foreign = workdir / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE orders (id INTEGER)")
    conn.commit()
    conn.close()
    assert "is not a nexusd database" in one_line(migrate(pg_url, foreign), 2)
    newer = current_db(workdir / "newer.db", n=3)
    conn = sqlite3.connect(newer)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    assert "newer than this nexusd" in one_line(migrate(pg_url, newer), 2)
    assert "is a directory" in one_line(migrate(pg_url, workdir), 2)


def test_bad_url_and_unreachable_server(workdir: Path) -> None:
    db = current_db(workdir / "nexus.db", n=3)
    line = one_line(migrate("mysql://u:hunter22@h/db", db), 2)
    assert "--to must be a postgresql://" in line and "hunter22" not in line
    assert "port" in one_line(migrate("postgresql://h:99999/db", db), 2)
    # Nothing listens there; the password given in the URL is never shown.
    url = f"postgresql://nexusd:hunter22@/db?host={workdir}&connect_timeout=5"
    line = one_line(migrate(url, db), 1)
    assert "hunter22" not in line and "***" in line
    assert "run it again" in line


def test_missing_psycopg_says_what_to_install(workdir: Path) -> None:
    db = current_db(workdir / "nexus.db", n=3)
    code = (
        "import sys; sys.modules['psycopg'] = None; from nexusd.cli.main import main;"
        f" sys.exit(main(['migrate', '--to', 'postgresql://u@h/db', '--db', {str(db)!r}]))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install 'nexusd[postgres]'" in one_line(r, 1)


# ── progress ─────────────────────────────────────────────────────────────────
def test_progress_lines_when_not_a_terminal(pg_url: str, workdir: Path) -> None:
    db = big_db(workdir / "nexus.db", 30_000)
    r = migrate(pg_url, db)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == "nexusd: migrate:   0%  0/30,000 messages"
    assert lines[-1] == "nexusd: migrate: 100%  30,000/30,000 messages"
    shares = [int(line.split("%")[0].rsplit(" ", 1)[1]) for line in lines]
    assert shares == sorted(shares) and len(set(s // 10 for s in shares)) == len(shares)
    assert 5 <= len(lines) <= 11


def test_progress_bar_on_a_terminal(pg_url: str, workdir: Path) -> None:
    db = big_db(workdir / "nexus.db", 12_000)
    leader, follower = pty.openpty()
    try:
        r = subprocess.run(
            [sys.executable, "-m", "nexusd", "migrate", "--to", pg_url, "--db", str(db)],
            stdout=subprocess.PIPE,
            stderr=follower,
            text=True,
            timeout=60,
        )
        os.close(follower)
        follower = -1
        drawn = _read_all(leader)
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    assert r.returncode == 0
    assert "\r[" in drawn and "] 100%  12,000/12,000 messages" in drawn
    assert drawn.endswith("\n") and "nexusd: migrate:" not in drawn


def _read_all(fd: int) -> str:
    chunks: list[bytes] = []
    for chunk in iter(lambda: _read(fd), b""):
        chunks.append(chunk)
    return b"".join(chunks).decode().replace("\r\n", "\n")


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the other end is closed and everything was read
        return b""
