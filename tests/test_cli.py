"""The ``nexusd`` command through real subprocesses."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import Daemon, run_cli


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
        input="multi\nline\n",
    )
    assert r.returncode == 0 and int(r.stdout) == first + 1

    r = d.cli("history", "--session", tag)
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["ID", "TIMESTAMP", "ROLE", "CONTENT"]
    assert "hello from the shell" in lines[2] and "multi\\nline\\n" in lines[3]

    r = d.cli("history", "--session", tag, "--json")
    msgs = json.loads(r.stdout)
    assert [m["content"] for m in msgs] == ["hello from the shell", "multi\nline\n"]
    assert msgs[1]["meta"] == {"model": "m"} and msgs[1]["id"] == first + 1

    assert d.cli("count", "--session", tag).stdout.strip() == "2"
    assert json.loads(d.cli("count", "--session", tag, "--json").stdout)["count"] == 2
    sessions = json.loads(d.cli("sessions", "--json").stdout)
    assert any(s["session_tag"] == tag and s["count"] == 2 for s in sessions)
    assert tag in d.cli("sessions").stdout

    popped = json.loads(d.cli("pop", "--session", tag, "--json").stdout)
    assert popped["content"] == "multi\nline\n"
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


def test_server_error_exits_1(shared_daemon: Daemon) -> None:
    r = shared_daemon.cli("append", "r" * 65, "x")
    assert r.returncode == 1
    assert "bad_request" in r.stderr and "role" in r.stderr
    r = shared_daemon.cli("history", "--limit", "0")
    assert r.returncode == 1 and "limit" in r.stderr


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
