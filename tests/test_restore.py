"""``nexusd restore``: real files, a real daemon; what is refused leaves the database as it was.

The command runs in this process (``main([...])``: the same code, no
interpreter start per case) except where another process matters: the daemon
that holds the database, and the programs that crash or hold a read open.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from nexusd.cli.main import main
from nexusd.client import Client
from nexusd.storage.index import build_step, ensure
from nexusd.storage.schema import SCHEMA_VERSION, open_writer
from tests.conftest import _new_daemon, make_v1_db, session_rows, write_config

TS = "2026-01-01T00:00:00Z"


def make_db(path: Path, contents: list[str], tag: str = "nexus") -> Path:
    """A current-schema database holding ``contents`` in session ``tag`` (closed, no -wal)."""
    conn = open_writer(path)
    with conn:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO nexus_messages (role, content, timestamp, session_tag) VALUES (?, ?, ?, ?)",
            [("user", c, TS, tag) for c in contents],
        )
        conn.execute("COMMIT")
    conn.close()
    return path


def crash_after_writing(db: Path, contents: list[str]) -> None:
    """Commit ``contents`` into ``db``'s WAL from another process that then dies uncleanly,
    as a killed daemon does: the rows live only in ``db-wal``."""
    code = (
        "import os, sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('PRAGMA journal_mode=WAL'); c.execute('PRAGMA wal_autocheckpoint=0')\n"
        "c.execute('BEGIN')\n"
        "for x in sys.argv[2:]:\n"
        "    c.execute('INSERT INTO nexus_messages (role, content, timestamp, session_tag)"
        " VALUES (?, ?, ?, ?)', ('user', x, '" + TS + "', 'nexus'))\n"
        "c.execute('COMMIT')\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(db), *contents], check=True, timeout=30)
    assert Path(f"{db}-wal").stat().st_size > 0


def make_indexed_db(path: Path, contents: list[str], *, built: bool = True) -> Path:
    """:func:`make_db` with the search index a daemon makes (``built`` False: as it is
    while being built, the triggers in their other form)."""
    make_db(path, contents)
    conn = open_writer(path)
    ensure(conn)
    if built:
        build_step(conn)
    conn.close()
    return path


def names(db: Path) -> set[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_schema")}
    finally:
        conn.close()


def contents(db: Path, tag: str = "nexus") -> list[str]:
    return [c for _, c in session_rows(db, tag)]


def restore(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main(["restore", *(str(a) for a in args)])
    out, err = capsys.readouterr()
    return code, out, err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_a_backup_of_a_running_daemon_restores_into_it_once_stopped(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = _new_daemon(short_dir)
    backup, v1 = short_dir / "backup.db", short_dir / "v1.db"
    d.start()
    try:
        with Client(d.socket) as c:
            c.append("user", "before the backup")
            c.backup(backup)
            c.append("user", "after the backup")
        # The daemon keeps a search index (search is on by default): the backup holds it too.
        assert {"nexus_fts", "nexus_fts_data", "nexus_fts_state", "nexus_fts_insert"} <= names(
            backup
        )
        # While the daemon holds the database: refused, naming it; nothing changed.
        assert d.proc is not None
        inode, files = d.db.stat().st_ino, listing(short_dir)
        code, out, err = restore(capsys, backup, "--db", d.db)
        assert (code, out) == (1, ""), err
        assert f"another nexusd (pid {d.proc.pid}) already serves" in err and err.count("\n") == 1
        assert d.db.stat().st_ino == inode and listing(short_dir) == files
        with Client(d.socket) as c:
            assert [m.content for m in c.get_history()] == ["before the backup", "after the backup"]
    finally:
        pid = d.proc.pid if d.proc is not None else 0
        d.stop(signal.SIGKILL)  # its last commits stay in nexus.db-wal alone
    assert Path(f"{d.db}-wal").stat().st_size > 0
    done = subprocess.run(  # once as a user runs it
        [sys.executable, "-m", "nexusd", "restore", str(backup), "--db", str(d.db)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"restored {d.db} from {backup} (schema {SCHEMA_VERSION}, 1 messages in 1 sessions);"
        f" kept the previous database as {d.db}.bak; the daemon before (pid {pid}) had not"
        f" stopped cleanly: its last commits are in {d.db}.bak\n"
    )
    assert listing(short_dir) == [
        "backup.db",
        "nexus.db",
        "nexus.db.bak",
        "nexus.db.lock",
        "s.sock",
    ]
    assert d.db.stat().st_mode & 0o777 == 0o600
    assert contents(Path(f"{d.db}.bak")) == ["before the backup", "after the backup"]
    d.start()
    try:
        with Client(d.socket) as c:
            assert [m.content for m in c.get_history()] == ["before the backup"]
            c.append("user", "after the restore")
            assert [h.message.content for h in c.search("restore")] == ["after the restore"]
    finally:
        assert d.stop() == 0
    # A v1 store's file (schema 0, WAL mode) is restored as it is, and the daemon migrates it.
    make_v1_db(v1, [("user", "from v1", TS, "nexus")])
    before = digest(v1)
    code, out, err = restore(capsys, v1, "--db", d.db, "--no-keep")
    assert code == 0, err
    assert (
        f"(schema 0, 1 messages in 1 sessions; nexusd serve upgrades it to {SCHEMA_VERSION})" in out
    )
    assert "discarded the previous database (--no-keep)" in out
    assert digest(v1) == before and not Path(f"{v1}-wal").exists()  # the backup untouched
    d.start()
    try:
        with Client(d.socket) as c:
            assert [m.content for m in c.get_history()] == ["from v1"]
    finally:
        assert d.stop() == 0


def _refusals(tmp: Path, db: Path) -> dict[str, tuple[Path, int, str]]:
    """Each bad backup: (path, exit code, what the message says)."""
    (tmp / "dir.db").mkdir()
    (tmp / "empty.db").write_bytes(b"")
    (tmp / "text.db").write_text("not a database\n" * 100)
    other = sqlite3.connect(tmp / "other.db")
    other.execute("CREATE TABLE invoices (id INTEGER)")
    other.commit()
    other.close()
    bare = sqlite3.connect(tmp / "bare.db")
    bare.execute("PRAGMA user_version = 1")
    bare.close()
    newer = make_db(tmp / "newer.db", ["x"])
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    corrupt = make_db(tmp / "corrupt.db", [f"{i} " + "x" * 2000 for i in range(40)])
    with corrupt.open("r+b") as fh:  # garble the middle of the table's pages (not page 1)
        size = corrupt.stat().st_size
        for at in range(size // 3, size - 512, 4096):
            fh.seek(at)
            fh.write(b"\xff" * 300)
    pending = make_db(tmp / "pending.db", ["x"])
    Path(f"{pending}-wal").write_bytes(b"\x37\x7f\x06\x82" + b"\0" * 28)
    os.link(db, tmp / "hardlink.db")
    (tmp / "symlink.db").symlink_to(db)
    os.mkfifo(tmp / "fifo.db")
    return {
        "missing": (tmp / "missing.db", 2, "missing.db does not exist"),
        "directory": (tmp / "dir.db", 2, "dir.db is a directory, not a database file"),
        "fifo": (tmp / "fifo.db", 2, "fifo.db is a fifo, not a regular file"),
        "empty": (tmp / "empty.db", 2, "empty.db is an empty file, not a nexusd database"),
        "not sqlite": (tmp / "text.db", 2, "text.db is not an SQLite database"),
        "another program's": (tmp / "other.db", 2, "of another program (tables invoices"),
        "no table": (tmp / "bare.db", 2, "bare.db is an SQLite database without nexusd's table"),
        "newer schema": (newer, 2, f"schema version {SCHEMA_VERSION + 1}, newer than this"),
        "corrupt": (corrupt, 1, "corrupt.db is damaged ("),
        "changes in its -wal": (pending, 2, "pending.db-wal holds changes that are not in"),
        "the database": (db, 2, "is the database itself"),
        "a hard link to it": (tmp / "hardlink.db", 2, "is the database itself"),
        "a symlink to it": (tmp / "symlink.db", 2, "is the database itself"),
    }


def test_every_bad_backup_is_one_line_and_leaves_the_database_as_it_was(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dbdir = short_dir / "state"
    dbdir.mkdir(mode=0o700)
    db = make_db(dbdir / "nexus.db", ["kept"])
    crash_after_writing(db, ["in the wal"])
    cases = _refusals(short_dir, db)
    (dbdir / "nexus.db.lock").touch()  # the lock's file stays (empty), as a daemon's does
    state = {p.name: digest(p) for p in dbdir.iterdir()}
    for name, (backup, code, message) in cases.items():
        got, out, err = restore(capsys, backup, "--db", db)
        assert (got, out) == (code, ""), (name, err)
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (name, err)
        assert {p.name: digest(p) for p in dbdir.iterdir()} == state, name
    assert contents(db) == ["kept", "in the wal"]


def test_the_previous_database_is_kept_whole_with_what_only_its_wal_held(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = make_db(short_dir / "nexus.db", ["old"])
    crash_after_writing(db, ["old, only in the wal"])
    db.chmod(0o640)
    bak = Path(f"{db}.bak")
    # An older .bak's own WAL must not be replayed into the new .bak.
    Path(f"{bak}-wal").write_bytes(b"stale")
    Path(f"{bak}-shm").write_bytes(b"stale")
    backup = make_db(short_dir / "b" / "backup.db", ["restored"])
    before = digest(backup)
    code, out, err = restore(capsys, backup, "--db", db)
    assert code == 0, err
    assert out.endswith(f"kept the previous database as {bak}\n")
    assert listing(short_dir) == ["b", "nexus.db", "nexus.db.bak", "nexus.db.lock"]
    assert contents(db) == ["restored"] and digest(backup) == before
    assert db.stat().st_mode & 0o777 == 0o640
    # The .bak is one complete file: opened read-only and alone, it has every row.
    assert bak.read_bytes()[18:20] == b"\x01\x01"  # the rollback journal: no -wal needed
    conn = sqlite3.connect(f"file:{bak}?immutable=1", uri=True)
    assert [r[0] for r in conn.execute("SELECT content FROM nexus_messages ORDER BY id")] == [
        "old",
        "old, only in the wal",
    ]
    conn.close()
    # Restoring the .bak undoes the restore: the two swap.
    code, out, err = restore(capsys, bak, "--db", db)
    assert code == 0, err
    assert contents(db) == ["old", "old, only in the wal"] and contents(bak) == ["restored"]


def test_no_keep_discards_the_previous_database_and_its_wal(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = make_db(short_dir / "nexus.db", ["old"])
    crash_after_writing(db, ["old, only in the wal"])
    backup = make_db(short_dir / "b" / "backup.db", ["restored"])
    code, out, err = restore(capsys, backup, "--db", db, "--no-keep")
    assert code == 0, err
    assert out.endswith("discarded the previous database (--no-keep)\n")
    assert listing(short_dir) == ["b", "nexus.db", "nexus.db.lock"]
    assert contents(db) == ["restored"]


def test_a_previous_database_sqlite_cannot_open_is_kept_as_it_is_with_its_wal(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, wal = short_dir / "nexus.db", short_dir / "nexus.db-wal"
    db.write_bytes(b"SQLite format 3\x00" + b"\xee" * 4080)  # a damaged header
    wal.write_bytes(b"frames of the damaged database")
    backup = make_db(short_dir / "b" / "backup.db", ["restored"])
    code, out, err = restore(capsys, backup, "--db", db, "--json")
    assert code == 0, err
    assert '"kept_beside":["' + f"{db}.bak-wal" + '"]' in out
    assert Path(f"{db}.bak").read_bytes()[16:] == b"\xee" * 4080
    assert Path(f"{db}.bak-wal").read_bytes() == b"frames of the damaged database"
    assert not wal.exists() and contents(db) == ["restored"]


def test_refused_while_another_program_reads_the_database(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = make_db(short_dir / "nexus.db", ["old"])
    backup = make_db(short_dir / "b" / "backup.db", ["restored"])
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('PRAGMA journal_mode=WAL'); c.execute('BEGIN')\n"
            "c.execute('SELECT count(*) FROM nexus_messages').fetchall()\n"
            "print('reading', flush=True); sys.stdin.read()\n",
            str(db),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline() == "reading\n"
        before = digest(db)
        code, _out, err = restore(capsys, backup, "--db", db)
        assert code == 1 and "is open in another program" in err, err
        assert digest(db) == before
        assert listing(short_dir) == [
            "b",
            "nexus.db",
            "nexus.db-shm",
            "nexus.db-wal",
            "nexus.db.lock",
        ]
    finally:
        reader.communicate("", timeout=30)
    assert contents(db) == ["old"]


def test_the_database_is_found_as_the_daemon_finds_it(
    short_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    backup = make_db(short_dir / "backup.db", ["restored"])
    config = write_config(short_dir / "nexusd.toml", db=str(short_dir / "from-config" / "x.db"))
    monkeypatch.delenv("NEXUSD_DB", raising=False)
    code, out, err = restore(capsys, backup, "--config", config)
    assert code == 0, err
    assert "there was no database there before" in out
    assert contents(short_dir / "from-config" / "x.db") == ["restored"]
    assert (short_dir / "from-config").stat().st_mode & 0o777 == 0o700
    monkeypatch.setenv("NEXUSD_DB", str(short_dir / "from-env.db"))  # the environment wins
    code, out, err = restore(capsys, backup, "--config", config)
    assert code == 0 and contents(short_dir / "from-env.db") == ["restored"], err
    monkeypatch.setenv("XDG_STATE_HOME", str(short_dir / "state"))
    monkeypatch.delenv("NEXUSD_DB")
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    code, out, err = restore(capsys, backup)
    assert code == 0 and contents(short_dir / "state" / "nexusd" / "nexus.db") == ["restored"]
    code, out, err = restore(capsys, backup, "--db", short_dir)
    assert code == 2 and err == f"nexusd: {short_dir} is a directory, not a database file\n"


#: Each backup's schema change (on a current database; ``fts``: one with the search
#: index), and what the refusal says.
HOSTILE = {
    "a trigger deleting each appended row": (
        "CREATE TRIGGER evil AFTER INSERT ON nexus_messages"
        " BEGIN DELETE FROM nexus_messages WHERE id = new.id; END",
        "holds a trigger evil on nexus_messages, which nexusd does not make; not restored",
    ),
    "a trigger copying rows into another peer's sessions": (
        "CREATE TRIGGER spy AFTER INSERT ON nexus_messages BEGIN INSERT INTO nexus_messages"
        " (role, content, timestamp, session_tag) VALUES"
        " (new.role, new.content, new.timestamp, char(31) || 'u65534' || char(31) || 'spy'); END",
        "holds a trigger spy on nexus_messages, which nexusd does not make",
    ),
    "the index's trigger with another body (fts)": (
        "DROP TRIGGER nexus_fts_insert; CREATE TRIGGER nexus_fts_insert AFTER INSERT ON"
        " nexus_messages BEGIN DELETE FROM nexus_messages WHERE id = new.id; END",
        "holds a trigger nexus_fts_insert on nexus_messages that is not the one nexusd makes",
    ),
    "a view": (
        "CREATE VIEW recent AS SELECT * FROM nexus_messages",
        "holds a view recent, which nexusd does not make",
    ),
    "an index on an expression": (
        "CREATE INDEX by_length ON nexus_messages(length(content))",
        "holds an index by_length on nexus_messages, which nexusd does not make",
    ),
    "a table nexusd does not make": (
        'CREATE TABLE "x\ny" (a)',
        "holds a table 'x\\ny', which nexusd does not make",
    ),
    "a table with other columns": (
        "DROP TABLE nexus_retention; CREATE TABLE nexus_retention"
        " (session_tag TEXT PRIMARY KEY, max_messages INTEGER) WITHOUT ROWID",
        "has a table nexus_retention with columns session_tag, max_messages; nexusd's schema"
        " 4 has session_tag, max_messages, max_age; not restored: nexusd could not use it",
    ),
    "no nexus_retention at schema 4": (
        "DROP TABLE nexus_retention",
        "has schema version 4 but no table nexus_retention; not restored",
    ),
    "nexus_floors as a view": (
        "DROP TABLE nexus_floors; CREATE VIEW nexus_floors AS"
        " SELECT 'nexus' AS session_tag, 999999999 AS below_id",
        "has nexus_floors as a view; nexusd's schema 4 has a table of that name",
    ),
    "the idempotency index not unique": (
        "DROP INDEX idx_nexus_idem; CREATE INDEX idx_nexus_idem ON nexus_messages"
        "(idem_key, session_tag) WHERE idem_key IS NOT NULL",
        "defines index idx_nexus_idem otherwise than nexusd's schema 4 does",
    ),
    "part of a search index (fts)": (
        "DROP TABLE nexus_fts_state",
        "holds part of a search index (nexus_fts) but no nexus_fts_state",
    ),
    "a negative schema version": (
        "PRAGMA user_version = -1",
        "has schema version -1, which no nexusd makes",
    ),
}


def test_a_schema_nexusd_does_not_make_is_refused_and_the_database_left_as_it_was(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert SCHEMA_VERSION == 4  # the messages above name it; a new migration revisits them
    dbdir = short_dir / "state"
    dbdir.mkdir(mode=0o700)
    db = make_db(dbdir / "nexus.db", ["kept"])
    (dbdir / "nexus.db.lock").touch()
    state = {p.name: digest(p) for p in dbdir.iterdir()}
    for i, (name, (sql, message)) in enumerate(HOSTILE.items()):
        backup = short_dir / f"b{i}.db"
        (make_indexed_db if "(fts)" in name else make_db)(backup, ["x"])
        conn = sqlite3.connect(backup, isolation_level=None)
        conn.executescript(sql)
        conn.close()
        got, out, err = restore(capsys, backup, "--db", db)
        assert (got, out) == (2, ""), (name, err)
        assert err.startswith(f"nexusd: {backup} "), (name, err)
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (name, err)
        assert {p.name: digest(p) for p in dbdir.iterdir()} == state, name
    assert contents(db) == ["kept"]


def test_backups_of_every_schema_nexusd_makes_restore(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = short_dir / "nexus.db"
    fits = {
        "no search index": make_db(short_dir / "plain.db", ["plain"]),
        "a search index": make_indexed_db(short_dir / "fts.db", ["indexed"]),
        "an index being built": make_indexed_db(short_dir / "build.db", ["half"], built=False),
        "the v1 store's": short_dir / "v1.db",
    }
    make_v1_db(fits["the v1 store's"], [("user", "from v1", TS, "nexus")])
    analyzed = sqlite3.connect(fits["no search index"])
    analyzed.execute("ANALYZE")  # SQLite's statistics tables are SQLite's
    analyzed.close()
    for name, backup in fits.items():
        code, out, err = restore(capsys, backup, "--db", db, "--no-keep")
        assert code == 0 and out.startswith(f"restored {db} from {backup}"), (name, err)
        assert names(db) == names(backup), name
    assert "sqlite_stat1" in names(fits["no search index"])
