"""Backups: never over the live database, private files, bounded snapshots (issue 9: 1, 7, 10)."""

from __future__ import annotations

import os
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nexusd import Client
from tests.conftest import Daemon, RawSync, _new_daemon, run_cli

_SNAP = ".nexusd-backup-*.db"


def _snapshots(d: Daemon) -> list[Path]:
    return sorted(d.db.parent.glob(_SNAP))


def _wait_until(cond: object, what: str, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.01)  # poll interval of a deadline loop
    raise AssertionError(f"timed out waiting for {what}")


# ── item 1: never over the live database ─────────────────────────────────────
def test_backup_onto_any_name_of_the_live_database_is_refused(short_dir: Path) -> None:
    d = _new_daemon(short_dir).start()
    try:
        with Client(d.socket) as c:
            ids = [c.append("user", f"m{i}") for i in range(5)]
        (short_dir / "link.db").symlink_to(d.db)
        os.link(d.db, short_dir / "hard.db")
        targets = [
            d.db,  # the database itself
            short_dir / "link.db",  # through a symlink
            short_dir / "hard.db",  # through a hard link
            Path(f"{d.db}-wal"),
            Path(f"{d.db}-shm"),
        ]
        lock = Path(f"{d.db}.lock")
        if lock.exists():
            targets.append(lock)
        for dest in targets:
            before = dest.stat()
            r = run_cli("backup", str(dest), "--socket", str(d.socket))
            assert r.returncode == 2, (dest, r.stdout, r.stderr)
            assert "live database" in r.stderr and "Traceback" not in r.stderr
            assert len(r.stderr.strip().splitlines()) == 1
            after = dest.stat()
            assert (after.st_ino, after.st_dev) == (before.st_ino, before.st_dev)
        assert not list(short_dir.glob("*.partial"))
        assert _snapshots(d) == []  # each refused backup released its snapshot
        with Client(d.socket) as c:  # the daemon keeps working
            ids.append(c.append("user", "after"))
        assert d.stop() == 0
        d.start()
        with Client(d.socket) as c:
            assert [m.id for m in c.get_history()] == ids  # no acknowledged row lost
            assert c.append("user", "new") > ids[-1]  # and no id reused
    finally:
        d.stop()


def test_backup_refused_for_the_live_database_through_the_library(daemon: Daemon) -> None:
    from nexusd import BadRequest

    with Client(daemon.socket) as c:
        c.append("user", "x")
        with pytest.raises(BadRequest) as info:
            c.backup(daemon.db)
        assert info.value.field == "dest"
        assert c.message_count() == 1  # same connection, still usable


# ── item 10: a private file, never through a planted symlink ────────────────
def test_backup_ignores_a_planted_symlink_and_is_private_under_umask_022(
    daemon: Daemon, short_dir: Path
) -> None:
    with Client(daemon.socket) as c:
        c.append("user", "secret")
    victim = short_dir / "victim"
    victim.write_text("precious")
    out = short_dir / "out"
    out.mkdir()
    dest = out / "copy.db"
    planted = out / "copy.db.partial"  # the name the old code wrote through
    planted.symlink_to(victim)
    r = subprocess.run(
        [sys.executable, "-m", "nexusd", "backup", str(dest), "--socket", str(daemon.socket)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: os.umask(0o022),
    )
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "precious"
    assert planted.is_symlink() and os.readlink(planted) == str(victim)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert dest.read_bytes()[:16] == b"SQLite format 3\x00"
    assert sorted(p.name for p in out.iterdir()) == ["copy.db", "copy.db.partial"]


def test_backup_destination_mistakes_are_one_line_before_any_snapshot(
    daemon: Daemon, short_dir: Path
) -> None:
    with Client(daemon.socket) as c:
        accepted = c.stats()["connections_accepted"]
    cases = {
        str(short_dir): "is a directory",
        str(short_dir / "missing" / "b.db"): "does not exist",
        str(daemon.db.parent / "nexus.db" / "b.db"): "not a directory",
    }
    for dest, words in cases.items():
        r = run_cli("backup", dest, "--socket", str(daemon.socket))
        assert r.returncode == 2 and words in r.stderr, (dest, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    with Client(daemon.socket) as c:  # refused before even connecting to the daemon
        assert c.stats()["connections_accepted"] == accepted + 1


def test_backup_into_a_directory_the_user_may_not_write(short_dir: Path) -> None:
    """As an unprivileged uid (root writes anywhere): exit 2, one line, nothing written."""
    from nexusd import cli

    locked = short_dir / "locked"
    locked.mkdir(mode=0o755)  # root's, not writable by uid 65534
    os.chmod(short_dir, 0o755)
    rc, err = run_as(65534, lambda: cli.main(["backup", str(locked / "b.db"), "--socket", "/x"]))
    assert rc == 2, err
    assert "permission denied" in err and len(err.strip().splitlines()) == 1
    assert list(locked.iterdir()) == []


def run_as(uid: int, fn: object) -> tuple[int, str]:
    """Run ``fn()`` in a forked child as ``uid``; return its exit code and stderr.

    A fork, not a new interpreter: Python's own files live under /root here,
    which another uid may not read.
    """
    import pwd  # noqa: F401  (loaded before the fork: the child may not read it)

    if os.getuid() != 0:
        pytest.skip("needs root to switch uid")
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 99
        try:
            os.close(rfd)
            os.dup2(wfd, 2)
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115  (pytest replaced it)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            code = int(fn())  # type: ignore[operator]
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:
            os.write(2, f"child failed: {exc!r}\n".encode())
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(wfd)
    chunks = []
    while chunk := os.read(rfd, 65536):
        chunks.append(chunk)
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


# ── item 7: snapshots are bounded and released ───────────────────────────────
def _begin(conn: RawSync, rid: int) -> dict[str, object]:
    return conn.call({"op": "backup_begin", "id": rid})


def test_snapshots_are_capped_per_connection_and_in_total(daemon: Daemon) -> None:
    with Client(daemon.socket) as c:
        c.append("user", "x")
    a, b, c2 = (RawSync(daemon.socket) for _ in range(3))
    try:
        first = _begin(a, 1)
        assert first["op"] == "backup_begin"
        again = _begin(a, 2)  # one per connection
        assert again["code"] == "overloaded" and again["retry_after"]
        assert "backup_end" in str(again["message"])
        assert _begin(b, 1)["op"] == "backup_begin"  # a second connection: 2 of 2
        full = _begin(c2, 1)
        assert full["code"] == "overloaded" and "max_snapshots" in str(full["message"])
        assert len(_snapshots(daemon)) == 2
        assert a.call({"op": "backup_end", "id": 3, "backup": first["backup"]})["op"] == (
            "backup_end"
        )
        assert _begin(c2, 2)["op"] == "backup_begin"  # room again
        assert len(_snapshots(daemon)) == 2
    finally:
        for conn in (a, b, c2):
            conn.close()
    _wait_until(lambda: _snapshots(daemon) == [], "the snapshots to be deleted")


def _abort(conn: RawSync) -> None:
    """Close with a reset (SO_LINGER 0), as a killed process would."""
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.sock.close()


def test_a_snapshot_is_deleted_as_soon_as_its_reader_goes_away(daemon: Daemon) -> None:
    with Client(daemon.socket) as c:
        c.append_many([("user", "y" * 1000)] * 200)
    # Closed cleanly after one chunk.
    conn = RawSync(daemon.socket)
    begin = _begin(conn, 1)
    part = conn.call(
        {"op": "backup_read", "id": 2, "backup": begin["backup"], "offset": 0, "length": 4096}
    )
    assert len(part["data"]) == 4096 and not part["eof"]
    assert len(_snapshots(daemon)) == 1
    conn.close()
    _wait_until(lambda: _snapshots(daemon) == [], "a closed reader's snapshot to go")
    # Aborted with a read in flight (the reply has nowhere to go).
    conn = RawSync(daemon.socket)
    begin = _begin(conn, 1)
    conn.send({"op": "backup_read", "id": 2, "backup": begin["backup"], "offset": 0})
    _abort(conn)
    _wait_until(lambda: _snapshots(daemon) == [], "an aborted reader's snapshot to go")
    # Aborted right after asking for a snapshot (it may still be being taken).
    conn = RawSync(daemon.socket)
    conn.send({"op": "backup_begin", "id": 1})
    _abort(conn)
    with Client(daemon.socket) as c:  # the daemon is fine, and a backup works after
        assert c.message_count() == 200
    _wait_until(lambda: _snapshots(daemon) == [], "a snapshot begun by a gone reader to go")


def test_backup_read_past_the_end_is_empty_with_eof(daemon: Daemon) -> None:
    conn = RawSync(daemon.socket)
    try:
        begin = _begin(conn, 1)
        size = int(begin["size"])  # type: ignore[call-overload]
        assert begin["files"]  # the live files' identities come with the handle
        for i, offset in enumerate([size, size + 1, 10**12, 2**64 - 1]):
            part = conn.call(
                {"op": "backup_read", "id": 10 + i, "backup": begin["backup"], "offset": offset}
            )
            assert part["op"] == "backup_read", part
            assert part["data"] == b"" and part["eof"] is True
        last = conn.call(
            {"op": "backup_read", "id": 20, "backup": begin["backup"], "offset": size - 10}
        )
        assert len(last["data"]) == 10 and last["eof"] is True
    finally:
        conn.close()


@pytest.fixture
def small_fs(short_dir: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs: room for a database, not for a snapshot plus the margin."""
    mnt = short_dir / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_no_snapshot_without_free_space_to_spare(short_dir: Path, small_fs: Path) -> None:
    d = Daemon(dir=small_fs, db=small_fs / "nexus.db", socket=short_dir / "s.sock").start()
    try:
        with Client(d.socket) as c:
            c.append("user", "x")
            r = run_cli("backup", str(short_dir / "b.db"), "--socket", str(d.socket))
            assert r.returncode == 1, r.stderr
            assert "unavailable" in r.stderr and "free space" in r.stderr
            assert _snapshots(d) == [] and not (short_dir / "b.db").exists()
            assert not list(short_dir.glob("*.partial"))
            assert c.append("user", "writes go on") > 0
    finally:
        d.stop()


def test_a_symlinked_database_keeps_its_snapshots_beside_the_real_file(short_dir: Path) -> None:
    real = short_dir / "real"
    real.mkdir()
    links = short_dir / "links"
    links.mkdir()
    (links / "nexus.db").symlink_to(real / "nexus.db")
    d = Daemon(dir=short_dir, db=links / "nexus.db", socket=short_dir / "s.sock").start()
    try:
        with Client(d.socket) as c:
            c.append("user", "x" * 10_000)
            begin = RawSync(d.socket)
            assert begin.call({"op": "backup_begin", "id": 1})["op"] == "backup_begin"
            # The snapshot sits in the state directory of the real file, not the link's.
            assert [p.name for p in links.iterdir()] == ["nexus.db"]
            assert any(p.name.startswith(".nexusd-backup-") for p in real.iterdir())
            begin.close()
            stats = c.stats()
            on_disk = sum(
                (real / n).stat().st_size
                for n in ("nexus.db", "nexus.db-wal")
                if (real / n).exists()
            )
            assert stats["db_bytes"] == on_disk > 10_000
    finally:
        d.stop()


def test_backup_chunks_shrink_to_fit_a_small_frame_limit(short_dir: Path) -> None:
    cfg = short_dir / "c.toml"
    cfg.write_text("max_frame = 65536\nmax_content = 16384\nmax_meta = 16384\n")
    d = _new_daemon(short_dir, "--config", str(cfg)).start()
    try:
        with Client(d.socket, retry_for=0) as c:
            for _ in range(6):
                c.append_many([("user", "y" * 10_000)] * 5, session_tag="fill")
        conn = RawSync(d.socket)
        try:
            begin = _begin(conn, 1)
            size = int(begin["size"])  # type: ignore[call-overload]
            assert size > 2 * 65536
            copied = b""
            while True:  # the default length (1 MiB) on a 64 KiB frame limit
                part = conn.call(
                    {"op": "backup_read", "id": 2, "backup": begin["backup"], "offset": len(copied)}
                )
                assert part["op"] == "backup_read", part
                assert 0 < len(part["data"]) < 65536 or part["eof"]
                copied += part["data"]
                if part["eof"]:
                    break
            assert len(copied) == size and copied.startswith(b"SQLite format 3\x00")
        finally:
            conn.close()
    finally:
        d.stop()


# ── adversarial findings: a destination that is not a file, a planted directory link ──
def test_backup_onto_the_daemons_socket_or_a_fifo_is_refused_before_any_snapshot(
    daemon: Daemon, short_dir: Path
) -> None:
    """DEST = the daemon's own socket replaced it with the backup: every client cut off."""
    from nexusd.wire.errors import BadRequest

    fifo = short_dir / "fifo"
    os.mkfifo(fifo)
    with Client(daemon.socket) as c:
        accepted = c.stats()["connections_accepted"]
    for dest, kind in ((daemon.socket, "socket"), (fifo, "fifo")):
        r = run_cli("backup", str(dest), "--socket", str(daemon.socket))
        assert r.returncode == 2 and f"{dest} is a {kind}" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        with pytest.raises(BadRequest, match="not a regular file") as info:
            Client(daemon.socket).backup(dest)
        assert info.value.field == "dest"
    assert stat.S_ISSOCK(daemon.socket.stat().st_mode) and stat.S_ISFIFO(fifo.stat().st_mode)
    assert not list(short_dir.glob(".*.partial"))
    with Client(daemon.socket) as c:  # the socket still serves; nothing connected meanwhile
        assert c.stats()["connections_accepted"] == accepted + 1


def test_backup_refuses_a_directory_link_another_user_planted(
    daemon: Daemon, short_dir: Path
) -> None:
    """Root's backup through nobody's link went into nobody's chosen directory.

    The kernel blocks that only in sticky directories with protected_symlinks=1;
    the client refuses any link owned by someone else than the caller or root.
    """
    victim = short_dir / "victim"
    victim.mkdir()
    planted = short_dir / "planted"
    planted.symlink_to(victim)
    os.lchown(planted, 65534, 65534)
    r = run_cli("backup", str(planted / "new.db"), "--socket", str(daemon.socket))
    assert r.returncode == 2, r.stderr
    assert f"{planted} is a symbolic link owned by uid 65534" in r.stderr, r.stderr
    assert str(victim) in r.stderr  # what to give if that really is the place
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert list(victim.iterdir()) == []
    # One's own link (here root's) is followed as before.
    os.lchown(planted, os.getuid(), os.getgid())
    r = run_cli("backup", str(planted / "new.db"), "--socket", str(daemon.socket))
    assert r.returncode == 0, r.stderr
    assert [p.name for p in victim.iterdir()] == ["new.db"]
