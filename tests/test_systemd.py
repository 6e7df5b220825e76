"""Playing systemd: notify socket, socket activation, watchdog, peers, journal, units."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nexusd.daemon.systemd import (
    JournalFormatter,
    Notifier,
    forget_notify_environment,
    listen_fds,
)
from tests.conftest import Daemon, RawSync, _new_daemon, as_uid, wait_for_socket, write_config

ROOT = Path(__file__).resolve().parents[1]


class NotifySocket:
    """What systemd listens on: a datagram socket collecting sd_notify messages."""

    def __init__(self, path: Path | None = None, abstract: str | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            self.sock.bind(b"\0" + abstract.encode())
            self.env = f"@{abstract}"
        else:
            assert path is not None
            self.sock.bind(str(path))
            self.env = str(path)
        self.messages: list[str] = []

    def until(self, predicate: Any, deadline: float = 15.0) -> list[str]:
        end = time.monotonic() + deadline
        while not predicate(self.messages):
            left = end - time.monotonic()
            assert left > 0, f"timed out; got {self.messages}"
            self.sock.settimeout(left)
            self.messages += self.sock.recv(4096).decode().split("\n")
        return self.messages


def _start(d: Daemon, env: dict[str, str]) -> subprocess.Popen[bytes]:
    # No wait for the socket: READY on the notify socket is what these tests wait for.
    d.start(env=env, wait=False)
    assert d.proc is not None
    return d.proc


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_sequence_ready_status_watchdog_stopping(short_dir: Path, abstract: bool) -> None:
    ns = NotifySocket(short_dir / "notify", f"nexusd-test-{os.getpid()}" if abstract else None)
    d = _new_daemon(short_dir)
    proc = _start(d, {"NOTIFY_SOCKET": ns.env, "WATCHDOG_USEC": "400000"})
    try:
        ns.until(lambda m: "READY=1" in m)
        # READY means the socket already accepts.
        assert RawSync(d.socket).call({"op": "ping", "id": 1})["op"] == "ping"
        ns.until(lambda m: m.count("WATCHDOG=1") >= 3)
        assert any(line.startswith("STATUS=") and "rows committed" in line for line in ns.messages)
        proc.send_signal(signal.SIGTERM)
        ns.until(lambda m: "STOPPING=1" in m)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    kinds = [line.split("=")[0] for line in ns.messages if line]
    assert kinds.index("READY") < kinds.index("WATCHDOG") < kinds.index("STOPPING")
    assert "READY" not in kinds[kinds.index("STOPPING") :]
    assert kinds.index("STATUS") < kinds.index("STOPPING")


def test_a_notify_socket_nobody_reads_never_blocks_the_loop(short_dir: Path) -> None:
    ns = NotifySocket(short_dir / "notify")  # bound, and never read
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.setblocking(False)
    queued = 0
    try:
        while True:
            filler.sendto(b"STATUS=filler", str(short_dir / "notify"))
            queued += 1
    except BlockingIOError:
        pass  # its queue is full: every further send would block
    d = _new_daemon(short_dir)
    d.start(env={"NOTIFY_SOCKET": ns.env, "WATCHDOG_USEC": "200000"})
    assert d.proc is not None
    try:
        c = RawSync(d.socket, timeout=5)
        for i in range(20):  # across several watchdog periods
            assert c.call({"op": "ping", "id": i})["op"] == "ping"
        c.close()
        started = time.monotonic()
        assert d.stop(timeout=15) == 0
        assert time.monotonic() - started < 10  # SIGTERM was handled promptly
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
        filler.close()
    assert queued > 0
    assert "sd_notify dropped" in d.log
    assert d.log.count("sd_notify dropped") <= 2  # quiet: not one line per message


def test_a_stalled_loop_stops_pinging_the_watchdog(short_dir: Path) -> None:
    ns = NotifySocket(short_dir / "notify")
    d = _new_daemon(short_dir)
    proc = _start(d, {"NOTIFY_SOCKET": ns.env, "WATCHDOG_USEC": "200000"})
    try:
        ns.until(lambda m: m.count("WATCHDOG=1") >= 2)
        proc.send_signal(signal.SIGSTOP)  # the loop cannot run: no more pings
        time.sleep(0.3)
        ns.sock.setblocking(False)
        try:
            while True:
                ns.sock.recv(4096)  # discard anything sent before the stop landed
        except BlockingIOError:
            pass
        time.sleep(0.6)  # three ping intervals of silence expected
        with pytest.raises(BlockingIOError):
            ns.sock.recv(4096)
        ns.sock.setblocking(True)
        proc.send_signal(signal.SIGCONT)
        before = ns.messages.count("WATCHDOG=1")
        ns.until(lambda m: m.count("WATCHDOG=1") > before)  # and they resume
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_silent_without_notify_socket() -> None:
    n = Notifier(env={})
    assert not n.enabled and n.watchdog_interval is None
    assert n.ready("x") is False and n.watchdog() is False


def test_watchdog_for_another_pid_is_ignored() -> None:
    n = Notifier(env={"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert n.watchdog_interval is None
    n2 = Notifier(env={"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000"})
    assert n2.watchdog_interval == 0.5


def test_reading_the_notify_variables_leaves_the_environment_alone() -> None:
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "OTHER": "y"}
    n = Notifier(env=env)
    assert n.enabled and n.watchdog_interval == 0.5
    assert env == {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "OTHER": "y"}
    forget_notify_environment(env)  # what the daemon's start-up does, explicitly
    assert env == {"OTHER": "y"}


def test_listen_fds_unsets_its_variables_unless_told_not_to() -> None:
    # LISTEN_PID names another process: no fd is touched, only the variables.
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "OTHER": "y"}
    assert listen_fds(env, unset_environment=False) == [] and len(env) == 4
    assert listen_fds(env) == [] and env == {"OTHER": "y"}


def _activated(short_dir: Path, sock: socket.socket, *extra: str) -> subprocess.Popen[bytes]:
    """Start the daemon the way systemd does: the socket as fd 3, LISTEN_PID = its pid."""
    fd = sock.fileno()

    def as_systemd_would() -> None:  # runs in the child, between fork and exec
        os.dup2(fd, 3)
        os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="nexusd")

    d = Daemon(dir=short_dir, db=short_dir / "nexus.db", socket=short_dir / "unused.sock")
    cmd = d.command(*extra)
    # env=None: the child execs with the environment preexec_fn just set.
    return subprocess.Popen(cmd, pass_fds=(3,), preexec_fn=as_systemd_would, stderr=subprocess.PIPE)


def test_socket_activation_serves_the_passed_socket_and_leaves_it(short_dir: Path) -> None:
    path = short_dir / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)
    proc = _activated(short_dir, listener)
    listener.close()  # the daemon holds its own copy now
    try:
        wait_for_socket(path, proc)
        c = RawSync(path)
        assert (
            c.call({"op": "append", "id": 1, "role": "u", "content": "via fd 3"})["op"] == "append"
        )
        assert not (short_dir / "unused.sock").exists()  # it did not create its own
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert path.exists()  # not ours to unlink
    assert proc.stderr is not None and b"(from systemd)" in proc.stderr.read()


def test_socket_activation_refuses_a_socket_that_is_not_listening(short_dir: Path) -> None:
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dgram.bind(str(short_dir / "dgram"))
    proc = _activated(short_dir, dgram)
    dgram.close()
    assert proc.wait(20) == 1
    err = proc.stderr.read() if proc.stderr else b""
    assert b"not a Unix stream socket" in err and b"Traceback" not in err


def test_journal_lines_carry_priority_and_no_timestamp(short_dir: Path) -> None:
    r, w = os.pipe()
    st = os.fstat(w)
    d = _new_daemon(short_dir)
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    proc = subprocess.Popen(
        d.command(),
        stderr=w,
        env=env,
    )
    os.close(w)
    try:
        wait_for_socket(d.socket, proc)
        RawSync(d.socket).call({"op": "bogus", "id": 1})
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    with os.fdopen(r) as fh:
        lines = fh.read().splitlines()
    assert lines and all(line[:3] in ("<6>", "<4>", "<3>", "<7>") for line in lines), lines
    assert any(line.startswith("<6>nexusd.daemon.server: nexusd ") for line in lines)
    assert not any(line[3:7].isdigit() for line in lines)  # no timestamps of our own


def test_journal_formatter_priorities() -> None:
    f = JournalFormatter()
    rec = logging.LogRecord("nexusd.x", logging.ERROR, __file__, 1, "broke\nbadly", None, None)
    assert f.format(rec) == "<3>nexusd.x: broke\n<3>badly"
    rec = logging.LogRecord("n", logging.WARNING, __file__, 1, "w", None, None)
    assert f.format(rec) == "<4>n: w"


# ── peers (needs root to become other uids) ──────────────────────────────────
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other uids")


@needs_root
def test_other_uid_is_forbidden_by_default(short_dir: Path) -> None:
    short_dir.chmod(0o755)
    cfg = write_config(short_dir / "c.toml", socket_mode="0666")
    d = _new_daemon(short_dir, "--config", str(cfg)).start()
    try:
        [reply, *rest] = as_uid(65534, d.socket, [{"op": "ping", "id": 1}, {"op": "ping", "id": 2}])
        assert reply["op"] == "error" and reply["code"] == "forbidden" and reply["id"] is None
        assert rest in ([], [{"op": "closed"}])  # and disconnected
        assert RawSync(d.socket).call({"op": "ping", "id": 3})["op"] == "ping"  # root is fine
    finally:
        d.stop()


@needs_root
def test_isolated_peers_cannot_see_each_others_sessions(short_dir: Path) -> None:
    short_dir.chmod(0o755)
    cfg = write_config(short_dir / "c.toml", socket_mode="0666", isolate_peers=True)
    cfg.write_text(cfg.read_text() + "allow_uids = [0, 65534, 65533]\n")
    d = _new_daemon(short_dir, "--config", str(cfg)).start()
    try:
        root = RawSync(d.socket)
        root.call(
            {"op": "append", "id": 1, "role": "u", "content": "root's own", "session_tag": "chat"}
        )

        def act(uid: int, secret: str) -> list[dict[str, Any]]:
            return as_uid(
                uid,
                d.socket,
                [
                    {
                        "op": "append",
                        "id": 1,
                        "role": "u",
                        "content": secret,
                        "session_tag": "chat",
                    },
                    {"op": "history", "id": 2, "session_tag": "chat"},
                    {"op": "count", "id": 3, "session_tag": "chat"},
                    {"op": "sessions", "id": 4},
                    {
                        "op": "append",
                        "id": 5,
                        "role": "u",
                        "content": "x",
                        "session_tag": "\x1fu0\x1fchat",
                    },
                    {"op": "backup_begin", "id": 6},
                ],
            )

        a = act(65534, "secret of a")
        b = act(65533, "secret of b")
        assert [m["content"] for m in a[1]["messages"]] == ["secret of a"]
        assert [m["content"] for m in b[1]["messages"]] == ["secret of b"]
        assert a[1]["messages"][0]["session_tag"] == "chat"  # the prefix never shows
        assert a[2]["count"] == 1 and b[2]["count"] == 1
        assert [s["session_tag"] for s in a[3]["sessions"]] == ["chat"]
        assert a[4]["code"] == "bad_request"  # no forging another namespace
        assert a[5]["code"] == "forbidden"  # a backup would hold everyone's data
        cleared = as_uid(
            65534,
            d.socket,
            [{"op": "clear_all", "id": 1}, {"op": "pop", "id": 2, "session_tag": "chat"}],
        )
        assert cleared[0]["deleted"] == 1 and cleared[1]["message"] is None
        # b's data and the daemon uid's plain tags are untouched.
        assert [
            m["content"]
            for m in as_uid(65533, d.socket, [{"op": "history", "id": 1, "session_tag": "chat"}])[
                0
            ]["messages"]
        ] == ["secret of b"]
        # root (admin) sees every namespace as stored.
        tags = [s["session_tag"] for s in root.call({"op": "sessions", "id": 9})["sessions"]]
        assert tags == ["\x1fu65533\x1fchat", "chat"]
    finally:
        d.stop()


# ── units ────────────────────────────────────────────────────────────────────
analyze = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    analyze is None and not os.environ.get("CI"), reason="systemd-analyze not installed"
)


def _units_with_real_binary(tmp: Path, names: list[str], sub: str = "") -> list[Path]:
    out = []
    for name in names:
        text = (ROOT / "systemd" / sub / name).read_text()
        # verify checks that ExecStart= exists: point it at this checkout's nexusd.
        nexusd = Path(sys.executable).with_name("nexusd")
        text = text.replace("/opt/nexusd/bin/nexusd", str(nexusd))
        text = text.replace("%h/.local/share/nexusd/venv/bin/nexusd", str(nexusd))
        (tmp / name).write_text(text)
        out.append(tmp / name)
    return out


@needs_analyze
def test_system_units_verify(tmp_path: Path) -> None:
    units = _units_with_real_binary(tmp_path, ["nexusd.service", "nexusd.socket"])
    r = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr


@needs_analyze
def test_user_units_verify(tmp_path: Path) -> None:
    units = _units_with_real_binary(tmp_path, ["nexusd.service", "nexusd.socket"], sub="user")
    r = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)],
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr


@needs_analyze
def test_service_exposure_is_at_most_2(tmp_path: Path) -> None:
    [unit] = _units_with_real_binary(tmp_path, ["nexusd.service"])
    r = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True, text=True
    )
    line = next(x for x in r.stdout.splitlines() if "Overall exposure level" in x)
    score = float(line.split(":")[1].split()[0])
    print(f"systemd-analyze security: {score}")
    assert score <= 2.0, line
