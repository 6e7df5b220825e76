"""Who may connect, and where the socket may live (issue 9, items 9 and 11).

Real daemons, real uids and groups (these need root to become other users),
real directories with real owners and modes.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RawSync, _new_daemon, as_uid, run_cli, write_config

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")
NOBODY = 65534


def _unused_gid() -> int:
    import grp

    taken = {g.gr_gid for g in grp.getgrall()}
    return next(g for g in range(40000, 50000) if g not in taken)


def _ping_as(path: Path, uid: int, gid: int, groups: list[int]) -> dict[str, Any]:
    """Take these credentials in a child, ping over a fresh connection, return the reply."""
    return as_uid(uid, path, [{"op": "ping", "id": 1}], gid=gid, groups=groups)[0]


# ── item 11: supplementary groups ────────────────────────────────────────────
@needs_root
def test_a_supplementary_group_in_allow_gids_lets_its_member_in(short_dir: Path) -> None:
    short_dir.chmod(0o755)
    g = _unused_gid()
    cfg = write_config(short_dir / "c.toml", socket_mode="0666")
    cfg.write_text(cfg.read_text() + f"allow_gids = [{g}]\n")
    d = _new_daemon(short_dir, "--config", str(cfg)).start()
    try:
        member = _ping_as(d.socket, NOBODY, NOBODY, [g])
        assert member == {"op": "ping", "id": 1}
        outsider = _ping_as(d.socket, NOBODY, NOBODY, [])
        assert outsider["op"] == "error" and outsider["code"] == "forbidden"
        # A primary group in allow_gids keeps working too.
        assert _ping_as(d.socket, NOBODY, g, []) == {"op": "ping", "id": 1}
    finally:
        d.stop()
    assert "buflen" not in d.log


# ── item 9: the socket's directory ───────────────────────────────────────────
@pytest.fixture
def sticky_dir() -> Iterator[Path]:
    """A fresh root-owned, world-writable, sticky directory: a /tmp of our own."""
    d = Path(tempfile.mkdtemp(prefix="nxt", dir="/tmp"))
    d.chmod(0o1777)
    try:
        yield d
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def _serve(short_dir: Path, sock: Path) -> Any:
    return run_cli("serve", "--db", str(short_dir / "nexus.db"), "--socket", str(sock))


@needs_root
def test_a_socket_directory_owned_by_another_uid_is_refused(short_dir: Path) -> None:
    planted = short_dir / "run"
    planted.mkdir(mode=0o700)
    os.chown(planted, NOBODY, NOBODY)  # someone else made it first
    r = _serve(short_dir, planted / "s.sock")
    assert r.returncode == 1
    assert "owned by uid 65534" in r.stderr and str(planted) in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (planted / "s.sock").exists()


def test_a_socket_directory_writable_by_others_is_refused(short_dir: Path) -> None:
    open_dir = short_dir / "run"
    open_dir.mkdir()
    open_dir.chmod(0o777)  # not sticky: anyone could replace the socket
    r = _serve(short_dir, open_dir / "s.sock")
    assert r.returncode == 1
    assert "writable by group or others" in r.stderr and "Traceback" not in r.stderr
    assert not (open_dir / "s.sock").exists()


@needs_root
def test_another_users_socket_file_is_neither_removed_nor_used(short_dir: Path) -> None:
    path = short_dir / "s.sock"
    planted = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    planted.bind(str(path))  # a stale socket, not listening ...
    planted.close()
    os.chown(path, NOBODY, NOBODY)  # ... and not ours
    r = _serve(short_dir, path)
    assert r.returncode == 1 and "belongs to uid 65534" in r.stderr
    assert path.exists() and path.lstat().st_uid == NOBODY


def test_an_explicit_socket_in_a_sticky_root_directory_is_allowed(
    short_dir: Path, sticky_dir: Path
) -> None:
    st = sticky_dir.stat()
    assert st.st_uid == 0 or os.geteuid() != 0
    if st.st_uid != 0:
        pytest.skip("needs a root-owned sticky directory")
    assert st.st_mode & stat.S_ISVTX and st.st_mode & 0o002
    d = _new_daemon(short_dir)
    d.socket = sticky_dir / "s.sock"
    d.start()
    try:
        assert RawSync(d.socket).call({"op": "ping", "id": 1})["op"] == "ping"
    finally:
        d.stop()


def test_the_default_directory_is_created_private(short_dir: Path) -> None:
    # The default is /tmp/nexusd-<uid> when neither RUNTIME_DIRECTORY nor XDG_RUNTIME_DIR is set.
    env = {k: v for k, v in os.environ.items() if k not in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR")}
    env.pop("NEXUSD_SOCKET", None)
    default = Path(f"/tmp/nexusd-{os.getuid()}")
    if default.is_dir() and not default.is_symlink() and not any(default.iterdir()):
        default.rmdir()  # left empty by an earlier daemon: nobody's socket is in it
    if default.exists():
        pytest.skip(f"{default} holds files already (another daemon may use it)")
    import subprocess
    import sys

    from tests.conftest import wait_for_socket

    proc = subprocess.Popen(
        [sys.executable, "-m", "nexusd", "serve", "--db", str(short_dir / "nexus.db")],
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_socket(default / "nexusd.sock", proc)
        st = default.lstat()
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == os.geteuid()
    finally:
        proc.terminate()
        proc.wait(20)
        if proc.stderr:
            proc.stderr.close()
        if default.exists():
            for p in default.iterdir():
                p.unlink()
            default.rmdir()
