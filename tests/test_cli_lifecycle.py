"""``nexusd delete``, ``fork`` and ``retention`` (and ``sessions``' retention column).

Against one real daemon for the module; the commands run in this process
(``nexusd.cli.main.main``, the console script's body) for speed, with one
run of the real ``nexusd`` executable to check what a user's terminal sees.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nexusd import Client
from nexusd.cli.main import main
from tests.conftest import Daemon, _new_daemon

CODE = tuple[int, str, str]


@pytest.fixture(scope="module")
def d() -> Iterator[Daemon]:
    base = Path(tempfile.mkdtemp(prefix="nxk", dir="/tmp"))
    daemon = _new_daemon(base).start()
    try:
        yield daemon
    finally:
        assert daemon.stop() == 0
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def c(d: Daemon) -> Iterator[Client]:
    with Client(d.socket) as client:
        yield client


@pytest.fixture
def nexusd(d: Daemon, capsys: pytest.CaptureFixture[str]) -> Iterator[object]:
    """``nexusd(*args)`` → (exit code, stdout, stderr), against the module's daemon."""

    def call(*args: str) -> CODE:
        code = _exit_code(lambda: main([*args, "--socket", str(d.socket)]))
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    yield call


def _exit_code(fn: object) -> int:
    try:
        return int(fn())  # type: ignore[operator]
    except SystemExit as exc:  # usage errors leave through SystemExit, as in the script
        return int(exc.code or 0)


def _one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nexusd: "), err
    return lines[0]


# ── delete ───────────────────────────────────────────────────────────────────
def test_delete_prints_what_it_deleted_and_what_was_missing(
    nexusd: Any, c: Client, tag: str
) -> None:
    ids = c.append_many([("user", "a"), ("user", "b"), ("user", "c")], session_tag=tag)
    code, out, _ = nexusd("delete", str(ids[0]), str(ids[2]), "999999999", "--session", tag)
    assert code == 0
    assert out.splitlines() == [
        f"deleted 2 message(s) from {tag!r}: {ids[0]}, {ids[2]}",
        "not in that session: 999999999",
    ]
    code, out, _ = nexusd("delete", str(ids[0]), str(ids[1]), "--session", tag, "--json")
    assert (code, json.loads(out)) == (0, {"deleted": [ids[1]], "missing": [ids[0]]})
    assert c.message_count(tag) == 0


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["x"], "'x' is not a message id"),
        (["--", "-1"], "message ids are 0 to"),
        ([str(2**63)], "message ids are 0 to"),
        (["1"] * 10001, "at most 10000 ids at once"),
    ],
    ids=["word", "negative", "huge", "too-many"],
)
def test_delete_refuses_bad_ids_in_one_line(nexusd: Any, args: list[str], says: str) -> None:
    code, out, err = nexusd("delete", *args)
    assert (code, out) == (2, "")
    assert says in _one_line(err)


# ── fork ─────────────────────────────────────────────────────────────────────
def test_fork_copies_then_refuses_an_existing_tag_unless_append(
    nexusd: Any, c: Client, tag: str
) -> None:
    ids = c.append_many([("user", "a"), ("user", "b")], session_tag=tag)
    new = tag + "-b"
    code, out, _ = nexusd("fork", tag, new, "--up-to", str(ids[0]))
    assert code == 0 and out.startswith(f"forked 1 message(s) from {tag!r} into {new!r}")
    code, out, err = nexusd("fork", tag, new)
    assert (code, out) == (1, "")
    line = _one_line(err)
    assert "conflict" in line and "--append" in line and "new_tag" not in line
    code, out, _ = nexusd("fork", tag, new, "--append", "--json")
    assert code == 0 and json.loads(out)["count"] == 2
    assert [m.content for m in c.get_history(new)] == ["a", "a", "b"]


def test_fork_mistakes_are_one_line(nexusd: Any, tag: str) -> None:
    code, _, err = nexusd("fork", tag, tag)
    assert code == 2 and "SOURCE and NEW are the same session" in _one_line(err)
    code, _, err = nexusd("fork", tag + "-nothing", tag + "-x")
    assert code == 1 and "not_found" in _one_line(err)
    code, _, err = nexusd("fork", "x" * 257, tag)
    assert code == 2 and "SOURCE must be 1 to 256 characters" in _one_line(err)


# ── retention ────────────────────────────────────────────────────────────────
def test_retention_sets_shows_and_resets(nexusd: Any, c: Client, tag: str) -> None:
    c.append_many([("user", f"m{i}") for i in range(5)], session_tag=tag)
    code, out, _ = nexusd("retention", "--session", tag, "--max-messages", "3", "--max-age", "30d")
    assert code == 0 and c.message_count(tag) == 3
    assert out.splitlines()[-2:] == [
        "--max-messages  newest 3  this session",
        "--max-age       30d       this session",
    ]
    code, out, _ = nexusd("retention", "--session", tag, "--reset", "--json")
    shown = json.loads(out)
    assert (code, shown["max_messages"], shown["max_age"]) == (0, None, None)
    assert shown["defaults"] == {"max_messages": 500, "max_age": 0}
    code, out, _ = nexusd("retention", "--session", tag)  # no option: shows it
    assert code == 0 and out.count("the daemon's default") == 2


def test_retention_keeps_the_option_left_out_and_sessions_shows_it(
    nexusd: Any, c: Client, tag: str
) -> None:
    c.append_many([("user", "m")], session_tag=tag)
    nexusd("retention", "--session", tag, "--max-messages", "3", "--max-age", "30d")
    # An option left out keeps its value; `default` restores one.
    code, out, _ = nexusd("retention", "--session", tag, "--max-messages", "default", "--json")
    shown = json.loads(out)
    assert (code, shown["max_messages"], shown["max_age"]) == (0, None, 30 * 86400)
    code, out, _ = nexusd("sessions")
    row = next(line for line in out.splitlines() if line.startswith(tag + " "))
    assert "OWN RETENTION" in out.splitlines()[0] and row.endswith("for 30d")
    nexusd("retention", "--session", tag, "--reset")
    assert "OWN RETENTION" not in nexusd("sessions")[1]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--max-age", "soon"], "--max-age must be a duration or default"),
        (["--max-age", "200y"], "--max-age must be"),
        (["--max-messages", "-3"], "--max-messages must be 0 (unbounded) to"),
        (["--max-messages", "lots"], "--max-messages must be a number of messages"),
        (["--reset", "--max-age", "1d"], "--reset restores both defaults"),
    ],
    ids=["word", "too-long", "negative", "not-a-number", "reset-and-more"],
)
def test_retention_mistakes_are_one_line_naming_the_option(
    nexusd: Any, args: list[str], says: str
) -> None:
    code, out, err = nexusd("retention", *args)
    assert (code, out) == (2, "")
    assert says in _one_line(err)


def test_the_real_command_says_one_line_and_exits_1_on_a_conflict(
    d: Daemon, c: Client, tag: str
) -> None:
    c.append_many([("user", "a")], session_tag=tag)
    c.append_many([("user", "b")], session_tag=tag + "-b")
    done = d.cli("fork", tag, tag + "-b")
    assert done.returncode == 1 and done.stdout == ""
    assert _one_line(done.stderr).startswith("nexusd: error (conflict): ")
