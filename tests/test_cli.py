"""The ``nexusd`` command through real subprocesses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, _new_daemon, run_cli, write_config


def test_append_history_count_sessions_pop_clear(shared_daemon: Daemon, tag: str) -> None:
    d = shared_daemon
    r = d.cli("append", "user", "hello from the shell", "--session", tag)
    assert r.returncode == 0, r.stderr
    first = int(r.stdout)
    r = d.cli(
        "append",
        "assistant",
        "-",
        "--session",
        tag,
        "--meta",
        '{"model": "m"}',
        input="multi\nline\n",  # the final newline is the shell's, not the message's
    )
    assert r.returncode == 0 and int(r.stdout) == first + 1

    r = d.cli("history", "--session", tag)
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["ID", "TIMESTAMP", "ROLE", "CONTENT"]
    assert "hello from the shell" in lines[2] and lines[3].endswith("multi\\nline")

    r = d.cli("history", "--session", tag, "--json")
    msgs = json.loads(r.stdout)
    assert [m["content"] for m in msgs] == ["hello from the shell", "multi\nline"]
    assert msgs[1]["meta"] == {"model": "m"} and msgs[1]["id"] == first + 1

    assert d.cli("count", "--session", tag).stdout.strip() == "2"
    assert json.loads(d.cli("count", "--session", tag, "--json").stdout)["count"] == 2
    sessions = json.loads(d.cli("sessions", "--json").stdout)
    assert any(s["session_tag"] == tag and s["count"] == 2 for s in sessions)
    assert tag in d.cli("sessions").stdout

    popped = json.loads(d.cli("pop", "--session", tag, "--json").stdout)
    assert popped["content"] == "multi\nline"
    assert json.loads(d.cli("clear", "--session", tag, "--json").stdout) == {"deleted": 1}
    assert d.cli("pop", "--session", tag).stdout.strip() == "(empty)"
    assert json.loads(d.cli("pop", "--session", tag, "--json").stdout) is None


def test_ping_and_stats(shared_daemon: Daemon) -> None:
    r = shared_daemon.cli("ping")
    assert r.returncode == 0 and r.stdout.startswith("ok (nexusd/")
    st = json.loads(shared_daemon.cli("stats", "--json").stdout)
    assert {
        "queue_depth",
        "batches_committed",
        "rows_committed",
        "mean_batch_size",
        "commit_latency_p50_ms",
        "commit_latency_p99_ms",
        "connections",
        "uptime_s",
        "db_bytes",
    } <= set(st)
    assert "batches_committed" in shared_daemon.cli("stats").stdout


def test_clear_all_needs_yes(daemon: Daemon) -> None:
    daemon.cli("append", "u", "x")
    r = daemon.cli("clear-all")
    assert r.returncode == 2 and "--yes" in r.stderr
    assert daemon.cli("count").stdout.strip() == "1"
    r = daemon.cli("clear-all", "--yes", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"deleted": 1}


def test_rejected_requests_exit_2_in_plain_words_naming_the_field(shared_daemon: Daemon) -> None:
    d = shared_daemon
    checks = [
        (("append", "r" * 65, "x"), "role must be 1 to 64 characters"),  # checked by the CLI
        (("history", "--limit", "0"), "--limit"),
        (("count", "--session", "s" * 257), "--session must be 1 to 256 characters"),
        (("append", "u", "x", "--timestamp", "yesterday"), "timestamp"),  # by the daemon
        (("history", "--before", "-1"), "--before must be between 0 and"),
    ]
    for args, words in checks:
        r = d.cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert words in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_server_error_exits_1(short_dir: Path) -> None:
    cfg = write_config(short_dir / "c.toml", allow_uids=[12345])  # not us
    d = _new_daemon(short_dir, "--config", str(cfg)).start()
    try:
        r = d.cli("count")
        assert r.returncode == 1 and "forbidden" in r.stderr, r.stderr
    finally:
        d.stop()


def test_usage_error_exits_2() -> None:
    assert run_cli("frobnicate").returncode == 2
    assert run_cli("append", "only-role").returncode == 2
    r = run_cli("append", "u", "x", "--meta", "[1]", "--socket", "/nonexistent.sock")
    assert r.returncode == 2


def test_unreachable_daemon_exits_3_with_a_hint(short_dir: Path) -> None:
    r = run_cli("ping", "--socket", str(short_dir / "none.sock"))
    assert r.returncode == 3
    assert "nexusd serve" in r.stderr


def test_socket_from_environment(shared_daemon: Daemon) -> None:
    env = dict(os.environ, NEXUSD_SOCKET=str(shared_daemon.socket))
    assert run_cli("ping", env=env).returncode == 0


def test_console_script_and_module_agree() -> None:
    script = Path(sys.executable).with_name("nexusd")
    if not script.exists():
        pytest.skip("console script not installed in this environment")
    import subprocess

    a = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    b = run_cli("--version")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout and "nexusd" in a.stdout


def test_negative_max_messages_is_a_startup_error(short_dir: Path) -> None:
    r = run_cli(
        "serve",
        "--db",
        str(short_dir / "n.db"),
        "--socket",
        str(short_dir / "s"),
        "--max-messages",
        "-1",
    )
    assert r.returncode == 2 and "max_messages" in r.stderr
    assert not (short_dir / "n.db").exists()


def test_live_daemon_is_not_stolen(daemon: Daemon) -> None:
    r = run_cli("serve", "--db", str(daemon.dir / "other.db"), "--socket", str(daemon.socket))
    assert r.returncode == 1 and "already listening" in r.stderr
    assert "Traceback" not in r.stderr  # a clear message, not a crash
    assert daemon.cli("ping").returncode == 0


def test_not_a_database_is_refused_untouched(short_dir: Path) -> None:
    db = short_dir / "n.db"
    db.write_text("definitely not sqlite")
    r = run_cli("serve", "--db", str(db), "--socket", str(short_dir / "s"))
    assert r.returncode == 1 and "not an SQLite database" in r.stderr
    assert "Traceback" not in r.stderr
    assert db.read_text() == "definitely not sqlite"


def test_sigterm_exits_zero_and_removes_the_socket(daemon: Daemon) -> None:
    daemon.cli("append", "u", "x")
    assert daemon.stop() == 0
    assert not daemon.socket.exists()


# ── everyday mistakes: one line, the documented exit code (issue 9, item 13) ──
def _one_clear_line(r: subprocess.CompletedProcess[Any], code: int, *words: str) -> None:
    err = r.stderr.decode() if isinstance(r.stderr, bytes) else r.stderr
    assert r.returncode == code, (r.returncode, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)


def _raw_cli(*args: str | bytes, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "nexusd", *args], input=input, capture_output=True, timeout=60
    )


def test_bytes_that_are_not_utf8_are_a_usage_error(shared_daemon: Daemon, tag: str) -> None:
    sock = str(shared_daemon.socket)
    r = _raw_cli("append", "user", "-", "--session", tag, "--socket", sock, input=b"caf\xe9")
    _one_clear_line(r, 2, "stdin is not UTF-8", "0xe9")
    r = _raw_cli("append", "user", b"caf\xe9", "--session", tag, "--socket", sock)
    _one_clear_line(r, 2, "content argument is not UTF-8", "0xe9")
    r = _raw_cli("append", "user", "x", "--session", b"t\xff", "--socket", sock)
    _one_clear_line(r, 2, "session argument is not UTF-8")
    assert shared_daemon.cli("count", "--session", tag).stdout.strip() == "0"


@pytest.mark.parametrize("value", ["-1", "0", "nan", "soon"])
def test_timeout_must_be_a_positive_number(value: str) -> None:
    _one_clear_line(run_cli("ping", "--timeout", value), 2, "--timeout")


def test_global_options_work_before_the_command(shared_daemon: Daemon, tag: str) -> None:
    sock = str(shared_daemon.socket)
    r = run_cli("--json", "--socket", sock, "--timeout", "5", "count", "--session", tag)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"session_tag": tag, "count": 0}
    r = run_cli("--socket", "/nonexistent.sock", "count", "--socket", sock)  # the later one wins
    assert r.returncode == 0, r.stderr


def test_empty_content_needs_allow_empty(shared_daemon: Daemon, tag: str) -> None:
    d = shared_daemon
    _one_clear_line(d.cli("append", "u", "", "--session", tag), 2, "--allow-empty")
    _one_clear_line(d.cli("append", "u", "-", "--session", tag, input="\n"), 2, "empty")
    assert d.cli("count", "--session", tag).stdout.strip() == "0"
    assert d.cli("append", "u", "", "--session", tag, "--allow-empty").returncode == 0
    assert json.loads(d.cli("history", "--session", tag, "--json").stdout)[0]["content"] == ""


def test_stdin_loses_exactly_one_final_newline_unless_raw(shared_daemon: Daemon, tag: str) -> None:
    d = shared_daemon
    for text in ["a\n", "b\n\n", "c"]:
        assert d.cli("append", "u", "-", "--session", tag, input=text).returncode == 0
    assert d.cli("append", "u", "-", "--raw", "--session", tag, input="d\n\n").returncode == 0
    got = [m["content"] for m in json.loads(d.cli("history", "--session", tag, "--json").stdout)]
    assert got == ["a", "b\n", "c", "d\n\n"]


def test_content_over_the_limit_says_so(shared_daemon: Daemon, tag: str) -> None:
    big = "x" * (1024 * 1024 + 1)
    r = shared_daemon.cli("append", "u", "-", "--raw", "--session", tag, input=big)
    _one_clear_line(r, 2, "max_content", "1048577 bytes")  # not "Broken pipe"
    r = shared_daemon.cli("append", "u", "x", "--session", tag, "--meta", "[1]")
    _one_clear_line(r, 2, "--meta must be a JSON object")


def test_control_characters_are_escaped_in_tables_but_exact_in_json(
    shared_daemon: Daemon, tag: str
) -> None:
    d = shared_daemon
    text = "red \x1b[31mALERT\x07 \u202eevil\ttab\r\n"
    assert d.cli("append", "ro\x1ble", text, "--session", tag).returncode == 0
    for args in (("history",), ("history", "--full")):
        out = d.cli(*args, "--session", tag).stdout
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out and "\r" not in out
        assert "\\x1b[31mALERT\\x07 \\u202eevil\\ttab\\r\\n" in out and "ro\\x1ble" in out
    msgs = json.loads(d.cli("history", "--session", tag, "--json").stdout)
    assert msgs[0]["content"] == text and msgs[0]["role"] == "ro\x1ble"
    popped = d.cli("pop", "--session", tag).stdout
    assert "\x1b" not in popped and "\\x1b[31mALERT" in popped


def test_history_on_a_terminal_says_when_it_shows_only_the_newest(
    shared_daemon: Daemon, tag: str
) -> None:
    import pty

    d = shared_daemon
    for i in range(5):
        d.cli("append", "u", f"m{i}", "--session", tag)

    def on_tty(*args: str) -> str:
        master, slave = pty.openpty()
        try:
            r = subprocess.run(
                [sys.executable, "-m", "nexusd", *args, "--socket", str(d.socket)],
                stdout=slave,
                stderr=subprocess.PIPE,
                timeout=60,
            )
            assert r.returncode == 0, r.stderr
            os.close(slave)
            slave = -1
            chunks = []
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the other side is closed and drained
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks).decode()
        finally:
            os.close(master)
            if slave != -1:
                os.close(slave)

    out = on_tty("history", "--session", tag, "--limit", "3")
    assert "showing the newest 3 of 5" in out and "--before" in out
    assert "showing" not in on_tty("history", "--session", tag, "--limit", "10")
    piped = d.cli("history", "--session", tag, "--limit", "3").stdout
    assert "showing" not in piped and len(piped.splitlines()) == 5  # header, rule, 3 rows


def test_check_on_a_directory_or_a_non_database(short_dir: Path) -> None:
    """Every "this is not a nexusd database" exits 2 (missing was 1, directory 2)."""
    _one_clear_line(run_cli("check", "--db", str(short_dir)), 2, "is a directory")
    junk = short_dir / "junk.db"
    junk.write_bytes(b"\x7fELF" + bytes(200))
    _one_clear_line(run_cli("check", "--db", str(junk)), 2, "not an SQLite database")
    _one_clear_line(run_cli("check", "--db", str(short_dir / "none.db")), 2, "does not exist")
    _one_clear_line(run_cli("check", "--db", "/etc/passwd"), 2, "not an SQLite database")
    empty = short_dir / "empty.db"
    empty.touch()
    _one_clear_line(run_cli("check", "--db", str(empty)), 2, "empty file")


def test_serve_mistakes_are_one_line(short_dir: Path) -> None:
    sock = str(short_dir / "s.sock")
    (short_dir / "adir").mkdir()
    env = dict(os.environ, NEXUSD_DB=str(short_dir / "adir"))
    r = run_cli("serve", "--socket", sock, env=env)
    assert r.returncode == 1 and "directory" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (short_dir / "afile").write_text("x")
    r = run_cli("serve", "--db", str(short_dir / "afile" / "n.db"), "--socket", sock)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    _one_clear_line(run_cli("serve", "--config", "/bin/ls", "--socket", sock), 2, "/bin/ls")


# ── Ctrl-C ────────────────────────────────────────────────────────────────────
_SYSCALLS = {"x86_64": {"read": 0, "poll": 7, "recvfrom": 45, "ppoll": 271}}


def _wait_blocked_in(pid: int, calls: set[str], fd: int | None = None) -> None:
    """Wait (bounded) until ``pid`` sleeps in one of ``calls`` (on ``fd`` if given)."""
    table = _SYSCALLS.get(os.uname().machine)
    if table is None:
        pytest.skip("syscall numbers known for x86_64 only")
    wanted = {table[c] for c in calls}
    end = time.monotonic() + 20
    while time.monotonic() < end:
        try:
            fields = Path(f"/proc/{pid}/syscall").read_text().split()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            fields, state = [], ""
        if (
            state == "S"
            and fields
            and fields[0].isdigit()
            and int(fields[0]) in wanted
            and (fd is None or int(fields[1], 16) == fd)
        ):
            return
        time.sleep(0.01)  # poll interval of a deadline loop
    raise AssertionError(f"process {pid} never blocked in {calls}")


def test_ctrl_c_while_append_reads_stdin_exits_130(shared_daemon: Daemon, tag: str) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nexusd",
            "append",
            "u",
            "-",
            "--session",
            tag,
            "--socket",
            str(shared_daemon.socket),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_blocked_in(proc.pid, {"read"}, fd=0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert b"Traceback" not in err and err.strip() == b"nexusd: interrupted"
    assert shared_daemon.cli("count", "--session", tag).stdout.strip() == "0"


def test_ctrl_c_during_backup_exits_130_and_leaves_no_partial_file(
    daemon: Daemon, short_dir: Path
) -> None:
    out = short_dir / "out"
    out.mkdir()
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGSTOP)  # the backup waits on its answers
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nexusd",
                "backup",
                str(out / "b.db"),
                "--socket",
                str(daemon.socket),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            _wait_blocked_in(proc.pid, {"poll", "ppoll", "recvfrom"})
            assert next(p.name for p in out.iterdir()).endswith(".partial")  # under way
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err and err.strip() == b"nexusd: interrupted"
    assert list(out.iterdir()) == []  # no .partial left behind
    assert daemon.cli("ping").returncode == 0


# ── what a new user ran into (issue 9, CLI findings) ──────────────────────────
INT64_MAX = 2**63 - 1


@pytest.mark.parametrize("flag", ["--before", "--after"])
@pytest.mark.parametrize("value", ["99999999999999999999999", str(INT64_MAX + 1), "-1"])
def test_history_cursors_out_of_range_are_a_usage_error(
    shared_daemon: Daemon, flag: str, value: str
) -> None:
    """A traceback (OverflowError from the encoder) before, for values past 2**64."""
    r = shared_daemon.cli("history", flag, value)
    _one_clear_line(r, 2, f"{flag} must be between 0 and {INT64_MAX}")


def test_history_cursors_at_the_bounds_are_accepted(shared_daemon: Daemon, tag: str) -> None:
    d = shared_daemon
    assert d.cli("append", "u", "x", "--session", tag).returncode == 0
    r = d.cli("history", "--session", tag, "--before", str(INT64_MAX), "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 1, r.stderr
    r = d.cli("history", "--session", tag, "--after", "0", "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 1, r.stderr
    _one_clear_line(d.cli("history", "--limit", "10" * 30), 2, "--limit must be between 1")


def test_socket_path_that_is_not_a_socket_says_so(short_dir: Path) -> None:
    """The hint to start the daemon was wrong for a path naming a directory or a file."""
    a_file = short_dir / "f"
    a_file.write_text("x")
    for path, kind in [(short_dir, "a directory"), (a_file, "a regular file")]:
        r = run_cli("ping", "--socket", str(path))
        _one_clear_line(r, 3, f"{path} is not a socket (it is {kind})", "--socket")
        assert "nexusd serve" not in r.stderr
    r = run_cli("ping", "--socket", str(a_file / "s.sock"))
    _one_clear_line(r, 3, f"{a_file} is not a directory")
    env = dict(os.environ, NEXUSD_SOCKET=str(short_dir))
    _one_clear_line(run_cli("count", env=env), 3, "is not a socket", "NEXUSD_SOCKET")


def test_unreachable_hint_names_the_socket_option(short_dir: Path) -> None:
    r = run_cli("ping", "--socket", str(short_dir / "none.sock"))
    _one_clear_line(r, 3, "nexusd serve", "point --socket at it")
    assert "socket_path" not in r.stderr


def test_empty_or_too_long_socket_path_is_a_usage_error(short_dir: Path) -> None:
    _one_clear_line(run_cli("ping", "--socket", ""), 2, "--socket must not be empty")
    long = "/tmp/" + "x" * 120
    _one_clear_line(run_cli("ping", "--socket", long), 2, "--socket is 125 bytes", "107")
    env = dict(os.environ, NEXUSD_SOCKET=long)
    _one_clear_line(run_cli("ping", env=env), 2, "NEXUSD_SOCKET", "at most 107 bytes")


def test_serve_refuses_a_socket_path_too_long_before_making_any_file(short_dir: Path) -> None:
    long = str(short_dir / ("s" * 120))
    r = run_cli("serve", "--db", str(short_dir / "db" / "nexus.db"), "--socket", long)
    _one_clear_line(r, 2, "socket is", "at most 107 bytes")
    assert not (short_dir / "db").exists()


def test_check_exit_codes_split_not_ours_from_damaged(short_dir: Path) -> None:
    import sqlite3

    other = short_dir / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, path TEXT)")
    conn.commit()
    conn.close()
    _one_clear_line(run_cli("check", "--db", str(other)), 2, "SQLite database")
    _one_clear_line(run_cli("check", "--json", "--db", str(other)), 2, "SQLite database")


def _damaged_db(path: Path) -> None:
    """A database with garbage over a few b-tree pages: SQLite reports ~100 problems."""
    import sqlite3

    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE nexus_messages (id INTEGER PRIMARY KEY AUTOINCREMENT, role TEXT NOT NULL,"
        " content TEXT NOT NULL, timestamp TEXT NOT NULL, session_tag TEXT NOT NULL)"
    )
    conn.execute("CREATE INDEX idx_nexus_session ON nexus_messages(session_tag)")
    conn.executemany(
        "INSERT INTO nexus_messages (role, content, timestamp, session_tag) VALUES (?,?,?,?)",
        [("u", "x" * 50, "t", f"s{i}") for i in range(3000)],
    )
    conn.commit()
    page = int(conn.execute("PRAGMA page_size").fetchone()[0])
    conn.close()
    data = bytearray(path.read_bytes())
    pages = len(data) // page
    for n in range(pages - 10, pages - 2):
        data[n * page + 100 : n * page + 400] = b"\xff" * 300
    path.write_bytes(bytes(data))


def test_check_of_a_damaged_database_prints_one_problem_per_line(short_dir: Path) -> None:
    """SQLite's problems came out as one huge line with literal \\n."""
    db = short_dir / "damaged.db"
    _damaged_db(db)
    r = run_cli("check", "--json", "--db", str(db))
    assert r.returncode == 1, r.stderr
    verdict = json.loads(r.stdout)
    problems = verdict["problems"]
    assert verdict["ok"] is False and len(problems) > 20, problems
    assert all("\n" not in line and line.strip() for line in problems)
    r = run_cli("check", "--db", str(db))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].endswith("DAMAGED") and "\\n" not in r.stdout
    assert lines[1:21] == [f"  {p}" for p in problems[:20]]
    assert lines[21:] == [f"  … and {len(problems) - 20} more"]


def test_help_shows_proper_placeholders() -> None:
    for args in (("--help",), ("ping", "--help")):
        r = run_cli(*args)
        assert r.returncode == 0
        assert "GLOBAL_" not in r.stdout and "--socket PATH" in r.stdout, r.stdout
        assert "--timeout SECONDS" in r.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (("--json", "serve"), "--json before the command applies to client commands, not serve"),
        (("--timeout", "5", "serve"), "--timeout before the command"),
        (("--socket", "/tmp/x.sock", "serve"), "`nexusd serve --socket ...`"),
        (("--socket", "/tmp/x.sock", "check"), "not check"),
    ],
)
def test_client_options_before_serve_or_check_are_refused(
    short_dir: Path, args: tuple[str, ...], words: str
) -> None:
    """They were silently ignored: the daemon started elsewhere than asked."""
    db = short_dir / "n.db"
    r = run_cli(*args, "--db", str(db))
    _one_clear_line(r, 2, words)
    assert not db.exists()


def test_json_before_check_still_works(short_dir: Path) -> None:
    _one_clear_line(run_cli("--json", "check", "--db", str(short_dir / "none.db")), 2, "does not")


# ── adversarial findings: one line and the documented exit code, never a traceback ──
@pytest.mark.parametrize("args", [("ping", "--timeout", "1e12"), ("--timeout", "86401", "ping")])
def test_timeout_over_a_day_is_a_usage_error(short_dir: Path, args: tuple[str, ...]) -> None:
    """1e12 s overflowed the socket's time_t: a traceback after connecting."""
    r = run_cli(*args, "--socket", str(short_dir / "none.sock"))
    _one_clear_line(r, 2, "--timeout", "86400")
    r = run_cli("ping", "--timeout", "86400", "--socket", str(short_dir / "none.sock"))
    _one_clear_line(r, 3, "cannot reach nexusd")  # the bound itself is accepted


@pytest.mark.parametrize(
    "meta",
    [
        '{"a": 123456789012345678901234567890}',
        '{"\\ud800": 1}',  # JSON escapes that json.loads turns into lone surrogates
        '{"a": "\\udc80"}',
        '{"a": ["ok", {"b": "\\udfff"}]}',
    ],
)
def test_meta_that_cannot_be_sent_is_one_line_naming_meta(
    shared_daemon: Daemon, tag: str, meta: str
) -> None:
    r = shared_daemon.cli("append", "user", "x", "--session", tag, "--meta", meta)
    _one_clear_line(r, 2, "meta")
    assert "codec" not in r.stderr  # plain words, not Python's
    assert shared_daemon.cli("count", "--session", tag).stdout.strip() == "0"


def test_not_a_regular_file_is_refused_by_check_and_serve_config(short_dir: Path) -> None:
    """A fifo made both wait forever for a writer (open blocks); a device is no database."""
    fifo = short_dir / "fifo"
    os.mkfifo(fifo)
    sock = str(short_dir / "s.sock")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "nexusd", *args], capture_output=True, text=True, timeout=20
        )

    _one_clear_line(cli("check", "--db", str(fifo)), 2, str(fifo), "not a regular file", "fifo")
    _one_clear_line(cli("check", "--db", "/dev/null"), 2, "not a regular file", "device")
    r = cli("serve", "--config", str(fifo), "--socket", sock)
    _one_clear_line(r, 2, f"config file {fifo}", "not a regular file", "fifo")
    r = cli("serve", "--config", "/dev/zero", "--socket", sock)
    _one_clear_line(r, 2, "not a regular file", "device")
    assert not (short_dir / "s.sock").exists()


def _homeless(argv: list[str], **env: str) -> int:
    """``nexusd argv`` in a process whose uid has no passwd entry and no $HOME."""
    from nexusd import cli

    for name in ("HOME", "XDG_STATE_HOME", "STATE_DIRECTORY", "NEXUSD_DB"):
        os.environ.pop(name, None)
    os.environ.update(env)
    return cli.main(argv)


def _uid_without_passwd_entry() -> int:
    import pwd

    for uid in range(54321, 54400):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    pytest.skip("no free uid")


def test_defaults_that_need_a_home_directory_are_computed_only_when_needed(
    short_dir: Path,
) -> None:
    """``serve --db X`` failed with "Could not determine home directory" it did not need."""
    from tests.test_backups import run_as

    uid = _uid_without_passwd_entry()
    os.chmod(short_dir, 0o777)
    sock = str(short_dir / "s.sock")
    (short_dir / "adir").mkdir()
    # --db given: the default is never computed; this --db fails later, for its own reason.
    rc, err = run_as(
        uid, lambda: _homeless(["serve", "--db", str(short_dir / "adir"), "--socket", sock])
    )
    assert rc == 1 and "directory" in err and "home" not in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    rc, err = run_as(uid, lambda: _homeless(["check", "--db", str(short_dir / "none.db")]))
    assert rc == 2 and "does not exist" in err, err
    # Needed and impossible: one line saying what to give instead.
    for argv in (["serve", "--socket", sock], ["check"]):
        rc, err = run_as(uid, lambda argv=argv: _homeless(argv))
        assert rc == 2, err
        assert "cannot find a home directory for the default database" in err, err
        assert "--db" in err and "XDG_STATE_HOME" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    # XDG_STATE_HOME alone is enough.
    state = short_dir / "state"
    rc, err = run_as(uid, lambda: _homeless(["check"], XDG_STATE_HOME=str(state)))
    assert rc == 2 and f"{state}/nexusd/nexus.db does not exist" in err, err


def test_serve_help_states_each_declared_default() -> None:
    """Every setting flag's help shows the default that Config declares, not a copy of it."""
    from nexusd.daemon.config import Config

    r = run_cli("serve", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split()).split(" options: ", 1)[1]
    helps = dict(re.findall(r"(?:^| )--([\w-]+) (.*?)(?= --[\w-]+ |$)", text))
    cfg = Config()
    flagged = [name.replace("-", "_") for name in helps]
    flagged = [name for name in flagged if name in Config.__struct_fields__]
    assert {"max_messages", "readers", "shutdown_timeout", "log_level"} <= set(flagged)
    for name in flagged:
        if name in ("db", "socket"):  # computed at start-up: described in words
            assert "(default: $" in helps[name.replace("_", "-")]
            continue
        value = getattr(cfg, name)
        shown = str(value).lower() if isinstance(value, bool) else (str(value) or '""')
        assert f"(default {shown})" in helps[name.replace("_", "-")], (name, shown)


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--max-messages", "many", "command line: bad value for max_messages: expected `int`"),
        ("--readers", "0", "readers: expected `int` >= 1"),
        ("--shutdown-timeout", "-1", "shutdown_timeout: expected `float` > 0"),
    ],
)
def test_serve_flags_are_converted_by_the_declaration(
    short_dir: Path, flag: str, value: str, words: str
) -> None:
    db = short_dir / "n.db"
    r = run_cli("serve", "--db", str(db), "--socket", str(short_dir / "s.sock"), flag, value)
    _one_clear_line(r, 2, words)
    assert not db.exists()


def test_errors_name_the_option_the_user_typed_not_the_wire_field() -> None:
    from nexusd.cli.output import plain_error
    from nexusd.wire.errors import BadRequest, TooLarge

    assert plain_error(BadRequest("since must be RFC 3339", field="since")) == (
        "--since must be RFC 3339"
    )
    assert plain_error(BadRequest("is 300 characters", field="session_tags[2]")) == (
        "--session: is 300 characters"
    )
    assert plain_error(TooLarge("a fork copies at most 10", field="source_tag")) == (
        "SOURCE: a fork copies at most 10"
    )
