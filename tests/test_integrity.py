"""The database file stays the daemon's own, and what it acknowledges is really stored.

Real ``nexusd serve`` processes, real files: other writers change the file
under the daemon (the ``sqlite3`` shell, the v1 store), a second daemon
reaches the same file by another name, and the database, its WAL or its
shared-memory file is deleted while the daemon runs.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from types import ModuleType

import pytest

from nexusd import Client, NexusError
from nexusd.storage.files import FileWatch
from nexusd.storage.schema import integrity_check
from nexusd.wire.errors import Unavailable
from tests.conftest import SEED, Daemon, _new_daemon, run_cli, session_rows


def _sql_outside(db: Path, sql: str) -> None:
    """Run ``sql`` as another program would: the sqlite3 shell when installed."""
    shell = shutil.which("sqlite3")
    if shell is not None:
        subprocess.run([shell, str(db), sql], check=True, capture_output=True, timeout=30)
        return
    conn = sqlite3.connect(db)
    try:
        conn.execute(sql)
        conn.commit()
    finally:
        conn.close()


def _v1_store(db: Path) -> object:
    spec = importlib.util.spec_from_file_location("nexus_store_v1_for_test", SEED)
    assert spec is not None and spec.loader is not None
    module: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.NexusStore(db)


# ── pruning never trusts a stale count ────────────────────────────────────────
def test_out_of_band_delete_cannot_prune_the_row_being_acknowledged(short_dir: Path) -> None:
    d = _new_daemon(short_dir, "--max-messages", "3").start()
    try:
        with Client(d.socket, retry_for=0) as c:
            for i in range(3):
                c.append("user", f"old{i}", session_tag="s")
            # The daemon's cached count says 3; the file now holds 0.
            _sql_outside(d.db, "DELETE FROM nexus_messages WHERE session_tag = 's'")
            mid = c.append("user", "new", session_tag="s")
            history = c.get_history(session_tag="s")
            assert [(m.id, m.content) for m in history] == [(mid, "new")]
            # Two more: still exact (nothing pruned until the 4th row).
            more = [c.append("user", f"n{i}", session_tag="s") for i in range(3)]
            assert [m.id for m in c.get_history(session_tag="s")] == more
            stats = c.stats()
            assert stats["external_writes_seen"] >= 1
            # The shell's connection closing is not the WAL going away.
            assert stats["storage_ok"] is True
    finally:
        d.stop()
    assert [i for i, _ in session_rows(d.db, "s")] == more


@pytest.mark.skipif(not SEED.exists(), reason="v1 seed store not beside the checkout")
def test_v1_store_writing_the_same_file_keeps_pruning_exact(short_dir: Path) -> None:
    d = _new_daemon(short_dir, "--max-messages", "3").start()
    store: object = None
    try:
        store = _v1_store(d.db)
        with Client(d.socket, retry_for=0) as c:
            ids = [c.append("user", f"d{i}", session_tag="s") for i in range(3)]
            store.clear("s")  # type: ignore[attr-defined]
            mid = c.append("user", "after v1 clear", session_tag="s")
            assert [m.id for m in c.get_history(session_tag="s")] == [mid]
            # v1 adds rows the daemon did not count: the cap still holds exactly.
            v1 = [store.append("user", f"v{i}", session_tag="s") for i in range(3)]  # type: ignore[attr-defined]
            last = c.append("user", "last", session_tag="s")
            assert [m.id for m in c.get_history(session_tag="s")] == [v1[1], v1[2], last]
            assert ids[0] < mid < v1[0] < last
    finally:
        if store is not None:
            store.close()  # type: ignore[attr-defined]
        d.stop()


# ── one daemon per database file ──────────────────────────────────────────────
@pytest.mark.parametrize("how", ["symlink", "hardlink"])
def test_second_daemon_through_another_name_is_refused(daemon: Daemon, how: str) -> None:
    assert daemon.proc is not None
    other = daemon.dir / "other-name.db"
    if how == "symlink":
        other.symlink_to(daemon.db)
    else:
        os.link(daemon.db, other)
    r = run_cli("serve", "--db", str(other), "--socket", str(daemon.dir / "twin.sock"))
    assert r.returncode == 1, r.stderr
    assert f"pid {daemon.proc.pid}" in r.stderr and str(other) in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (daemon.dir / "twin.sock").exists()
    assert daemon.cli("ping").returncode == 0


def test_a_restart_after_a_kill_says_the_last_stop_was_not_clean(short_dir: Path) -> None:
    d = _new_daemon(short_dir).start()
    with Client(d.socket, retry_for=0) as c:
        acked = c.append("user", "before the kill")
    d.stop(signal.SIGKILL)
    d.start()
    assert d.stop() == 0
    warned = [line for line in d.log.splitlines() if "did not stop cleanly" in line]
    assert len(warned) == 1 and " WARNING " in warned[0], d.log
    d.start()  # after a clean stop: no warning
    with Client(d.socket, retry_for=0) as c:
        assert [m.id for m in c.get_history()] == [acked]
    assert d.stop() == 0
    assert "did not stop cleanly" not in d.log


@pytest.mark.parametrize("case", ["directory", "parent is a file"])
def test_unusable_database_path_is_one_clear_line(short_dir: Path, case: str) -> None:
    if case == "directory":
        db = short_dir / "db-dir"
        db.mkdir()
        expected = "is a directory"
    else:
        (short_dir / "file").write_text("x")
        db = short_dir / "file" / "nexus.db"
        expected = str(db)
    r = run_cli("serve", "--db", str(db), "--socket", str(short_dir / "s.sock"))
    assert r.returncode == 1, r.stderr
    assert expected in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ── files deleted while the daemon runs ───────────────────────────────────────
def _settled(directory: Path, settle: float) -> None:
    """Poll (deadline 5 s) until the directory's last change is ``settle`` s old."""
    end = time.monotonic() + 5
    while time.time_ns() - directory.stat().st_ctime_ns <= settle * 1e9:
        assert time.monotonic() < end, "the directory's ctime never settled"
        time.sleep(0.01)  # poll interval of a deadline loop


@pytest.mark.parametrize("change", ["delete wal", "replace db", "move db", "move dir"])
def test_file_watch_sees_a_change_once_the_directory_settled(tmp_path: Path, change: str) -> None:
    # Between changes a check is one stat of the directory; any deletion,
    # rename or replacement changes the directory and is caught.
    base = tmp_path / "d"
    base.mkdir()
    db = base / "n.db"
    for name in ("n.db", "n.db-wal", "n.db-shm"):
        (base / name).write_bytes(b"x")
    watch = FileWatch(db, settle=0.05)
    watch.arm()
    assert watch.check() is None
    _settled(base, 0.05)
    full = watch.full_checks
    assert watch.check() is None and watch.check() is None
    assert watch.full_checks == full  # the directory alone answered
    if change == "delete wal":
        (base / "n.db-wal").unlink()
        expected = "WAL file"
    elif change == "replace db":
        (base / "other").write_bytes(b"y")
        (base / "other").rename(db)
        expected = "replaced"
    elif change == "move db":
        db.rename(base / "elsewhere.db")
        expected = "moved away"
    else:
        base.rename(tmp_path / "d2")
        base.mkdir()
        expected = "database file"
    found = watch.check()
    assert found is not None and expected in found


def _error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line]


def _open_copy_of_deleted(pid: int, db: Path) -> Path | None:
    """The daemon's descriptor of its deleted database, as ``/proc/PID/fd/N``."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target == f"{db} (deleted)":
            return Path(f"/proc/{pid}/fd/{fd}")
    return None


@pytest.mark.parametrize("victim", ["", "-wal", "-shm"])
def test_deleted_database_files_refuse_writes_and_lose_nothing_acknowledged(
    short_dir: Path, victim: str
) -> None:
    d = _new_daemon(short_dir, "--max-messages", "0").start()
    assert d.proc is not None
    pid = d.proc.pid
    acked: dict[int, str] = {}
    rescued = short_dir / "rescued.db"
    with Client(d.socket, retry_for=0) as c:
        for i in range(20):
            acked[c.append("user", f"before{i}", session_tag="s")] = f"before{i}"
        Path(f"{d.db}{victim}").unlink()
        refused = 0
        for i in range(5):  # one batch finds it; the later ones are refused at once
            try:
                acked[c.append("user", f"after{i}", session_tag="s")] = f"after{i}"
            except Unavailable as exc:
                assert "deleted" in exc.message and "restart" in exc.message
                refused += 1
        assert refused == 5 and len(acked) == 20
        with Client(d.socket) as patient:  # retries for 30 s by default, but not this
            started = time.monotonic()
            with pytest.raises(Unavailable) as lost:
                patient.append("user", "again", session_tag="s")
            assert lost.value.field == "storage"
            assert time.monotonic() - started < 10
        with pytest.raises(Unavailable):
            c.append_many([("user", "x"), ("user", "y")], session_tag="s")
        stats = c.stats()
        assert stats["storage_ok"] is False
        assert f"{d.db}{victim}" in stats["storage_error"]
        try:  # reads go on, or say unavailable: never internal
            c.get_history(session_tag="s")
        except NexusError as exc:
            assert exc.code == "unavailable"
        if victim == "":
            copy = _open_copy_of_deleted(pid, d.db)
            assert copy is not None
            shutil.copyfile(copy, rescued)
    assert d.stop() == 0
    errors = _error_lines(d.log)
    # The write path that noticed (the SQLite backend, behind the storage seam).
    writer_errors = [line for line in errors if "nexusd.storage.sqlite" in line]
    assert len(writer_errors) == 1, errors
    assert "restarted" in writer_errors[0]
    assert len(errors) <= 2, errors  # and at most one from the readers
    # Every acknowledged row is where an operator can find it after a restart.
    d.start()
    try:
        with Client(d.socket, retry_for=0) as c:
            c.ping()
            assert c.stats()["storage_ok"] is True
    finally:
        assert d.stop() == 0
    assert integrity_check(d.db) == ["ok"]
    source = rescued if victim == "" else d.db
    if victim == "":
        assert f"/proc/{pid}/fd/" in writer_errors[0]
        assert integrity_check(rescued) == ["ok"]
        assert session_rows(d.db, "s") == []  # the restarted daemon began a new, empty file
    stored = dict(session_rows(source, "s"))
    assert {i: stored.get(i) for i in acked} == acked


@pytest.mark.parametrize("mode", [0o1777, 0o0777, 0o0770])
def test_a_database_directory_others_may_write_is_refused(short_dir: Path, mode: int) -> None:
    shared = short_dir / "shared"
    shared.mkdir()
    shared.chmod(mode)
    r = run_cli("serve", "--db", str(shared / "nexus.db"), "--socket", str(short_dir / "s.sock"))
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "writable by other users" in lines[0], r.stderr
    assert list(shared.iterdir()) == []  # nothing created there


def test_a_symlink_planted_at_the_lock_name_is_never_written_through(short_dir: Path) -> None:
    victim = short_dir / "victim"
    victim.write_text("IMPORTANT")
    (short_dir / "nexus.db.lock").symlink_to(victim)
    r = run_cli("serve", "--db", str(short_dir / "nexus.db"), "--socket", str(short_dir / "s.sock"))
    assert r.returncode == 1, r.stderr
    assert "nexus.db.lock" in r.stderr and "Traceback" not in r.stderr
    assert victim.read_text() == "IMPORTANT"


def test_a_stored_value_messagepack_cannot_carry_costs_one_request_not_the_daemon(
    short_dir: Path,
) -> None:
    # Another program writes meta with an integer past 64 bits: JSON holds it,
    # MessagePack cannot.  Reading or popping that row must be one error reply,
    # never an exception that stops the daemon for everyone (every read runs
    # in the daemon's one task group) or fails a whole write batch.
    d = _new_daemon(short_dir).start()
    try:
        with Client(d.socket, retry_for=0) as c:
            c.append("user", "fine", session_tag="s")
            _sql_outside(
                d.db,
                "INSERT INTO nexus_messages (role, content, timestamp, session_tag, meta)"
                " VALUES ('user', 'huge', '2026-11-26T00:00:00.000000Z', 's',"
                " '{\"n\": 123456789012345678901234567890}')",
            )
            for call in (lambda: c.get_history(session_tag="s"), lambda: c.pop("s")):
                with pytest.raises(NexusError) as info:
                    call()
                assert info.value.code == "internal", info.value
                assert "MessagePack cannot carry" in info.value.message
            assert c.append("user", "still serving", session_tag="other") > 0
        with Client(d.socket, retry_for=0) as fresh:
            fresh.ping()
            assert fresh.message_count("s") == 2  # the pop removed nothing
    finally:
        rc = d.stop()
    assert rc == 0, d.log
    assert "Traceback" not in d.log, d.log
