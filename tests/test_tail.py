"""``nexusd tail``: the newest messages, one line each, then with ``-f`` the new ones.

Through the real command against real daemons.  ``tail -f`` runs as a
subprocess whose stdout is a pipe (so each line arriving before it exits
shows it flushes), is read line by line with a deadline, and is stopped with
SIGINT: exit 0, nothing on stderr.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nexusd import Client
from tests.conftest import Daemon

TS = r"\d{4}-\d\d-\d\dT[\d:.]+Z"


def lines_of(text: str) -> list[str]:
    return text.splitlines()


class Tail:
    """A ``nexusd tail -f`` subprocess and the lines it has printed so far."""

    def __init__(self, daemon: Daemon, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nexusd", "tail", "-f", *args, "--socket", str(daemon.socket)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)  # EOF

    def next(self, within: float = 15.0) -> str:
        try:
            line = self.lines.get(timeout=within)
        except queue.Empty:
            raise AssertionError(f"tail printed nothing within {within}s") from None
        assert line is not None, f"tail exited early: {self.stop_now()}"
        return line

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C; its exit code and stderr."""
        self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(15)
        assert self.proc.stderr is not None
        return rc, self.proc.stderr.read()

    def stop_now(self) -> str:
        self.proc.kill()
        self.proc.wait()
        assert self.proc.stderr is not None
        return self.proc.stderr.read()


@pytest.fixture
def tails() -> Iterator[list[Tail]]:
    made: list[Tail] = []
    yield made
    for t in made:
        if t.proc.poll() is None:
            t.stop_now()


def fill(daemon: Daemon, tag: str, n: int, prefix: str = "m") -> list[int]:
    with Client(daemon.socket) as c:
        return c.append_many([("user", f"{prefix}{i}") for i in range(n)], session_tag=tag)


# ── the newest N ─────────────────────────────────────────────────────────────
def test_tail_prints_the_newest_n_oldest_first(shared_daemon: Daemon, tag: str) -> None:
    ids = fill(shared_daemon, tag, 12)
    done = shared_daemon.cli("tail", "-n", "3", "--session", tag)
    assert done.returncode == 0, done.stderr
    got = lines_of(done.stdout)
    assert [line.split("  ") for line in got] == [
        [str(i), got[k].split("  ")[1], "user", f"m{9 + k}"] for k, i in enumerate(ids[9:])
    ]
    default = lines_of(shared_daemon.cli("tail", "--session", tag).stdout)
    assert [line.split("  ")[-1] for line in default] == [f"m{i}" for i in range(2, 12)]
    assert shared_daemon.cli("tail", "-n", "0", "--session", tag).stdout == ""
    assert shared_daemon.cli("tail", "--session", f"{tag}-empty").stdout == ""


def test_tail_json_is_one_message_per_line(shared_daemon: Daemon, tag: str) -> None:
    ids = fill(shared_daemon, tag, 4)
    done = shared_daemon.cli("tail", "-n", "2", "--json", "--session", tag)
    got = [json.loads(line) for line in lines_of(done.stdout)]
    assert [(m["id"], m["content"], m["session_tag"]) for m in got] == [
        (ids[2], "m2", tag),
        (ids[3], "m3", tag),
    ]


def test_tail_shows_control_characters_escaped_on_one_line(shared_daemon: Daemon, tag: str) -> None:
    with Client(shared_daemon.socket) as c:
        c.append("user", "a\x1b[31mb\nc\u202ed", session_tag=tag)
    (line,) = lines_of(shared_daemon.cli("tail", "--session", tag).stdout)
    assert line.endswith("user  a\\x1b[31mb\\nc\\u202ed")


def test_tail_all_merges_every_session_by_id(daemon: Daemon) -> None:
    with Client(daemon.socket) as c:
        c.append_many([("user", f"old{i}") for i in range(20)], session_tag="old")
        for i in range(6):
            c.append("user", f"a{i}", session_tag="a")
            if i % 2:
                c.append("user", f"b{i}", session_tag="b")
        every = sorted(
            (m for s in c.sessions() for m in c.get_history(s.session_tag, 100)),
            key=lambda m: m.id,
        )
    done = daemon.cli("tail", "--all", "-n", "5")
    assert done.returncode == 0, done.stderr
    got = [line.split("  ") for line in lines_of(done.stdout)]
    assert [(int(g[0]), g[2], g[4]) for g in got] == [
        (m.id, m.session_tag, m.content) for m in every[-5:]
    ]
    many = lines_of(daemon.cli("tail", "--all", "-n", "25").stdout)
    assert [int(line.split("  ")[0]) for line in many] == [m.id for m in every[-25:]]


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (("--all", "--session", "x"), 2, "not allowed with"),
        (("-n", "10001"), 2, "-n must be between 0 and 10000"),
        (("-n", "x"), 2, "is not a whole number"),
    ],
)
def test_tail_usage_mistakes_are_one_line(
    shared_daemon: Daemon, args: tuple[str, ...], code: int, says: str
) -> None:
    done = shared_daemon.cli("tail", *args)
    assert done.returncode == code
    assert says in done.stderr and len(lines_of(done.stderr)) == 1


def test_tail_of_no_daemon_says_so(short_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "nexusd", "tail", "-f", "--socket", str(short_dir / "no.sock")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3 and "nexusd serve" in done.stderr
    assert "Traceback" not in done.stderr


# ── -f ───────────────────────────────────────────────────────────────────────
def test_tail_f_follows_new_messages_until_ctrl_c_then_exits_0(
    shared_daemon: Daemon, tag: str, tails: list[Tail]
) -> None:
    fill(shared_daemon, tag, 3)
    tail = Tail(shared_daemon, "-n", "2", "--session", tag)
    tails.append(tail)
    assert [tail.next().split("  ")[-1] for _ in range(2)] == ["m1", "m2"]
    with Client(shared_daemon.socket) as c:
        c.append("user", "elsewhere", session_tag=f"{tag}-other")
        new = c.append("bot", "live one", session_tag=tag)
        c.append("bot", "live two", session_tag=tag)
    first = tail.next()
    assert first.startswith(f"{new}  ") and first.endswith("  bot  live one")
    assert tail.next().endswith("  bot  live two")
    rc, err = tail.interrupt()
    assert (rc, err) == (0, "")


def test_tail_f_json_mirrors_removals(daemon: Daemon, tails: list[Tail]) -> None:
    fill(daemon, "t", 1)
    tail = Tail(daemon, "-n", "1", "--json", "--session", "t")
    tails.append(tail)
    assert json.loads(tail.next())["content"] == "m0"  # it has started: what follows is new
    with Client(daemon.socket) as c:
        ids = c.append_many([("user", "x"), ("user", "y")], session_tag="t")
        c.pop("t")
        c.clear("t")
    events = [json.loads(tail.next()) for _ in range(4)]
    assert [e.get("id") for e in events[:2]] == ids
    assert events[2] == {"removed": {"session_tag": "t", "ids": [ids[1]], "before_id": None}}
    gone = events[3]["removed"]
    assert gone["session_tag"] == "t"
    assert ids[0] in gone["ids"] or (gone["before_id"] or 0) > ids[0]  # m0 too
    assert ids[0] - 1 in gone["ids"] or (gone["before_id"] or 0) > ids[0] - 1
    assert tail.interrupt() == (0, "")


def test_tail_f_all_goes_on_after_a_daemon_restart(daemon: Daemon, tails: list[Tail]) -> None:
    fill(daemon, "z", 1)
    tail = Tail(daemon, "--all", "-n", "1")
    tails.append(tail)
    assert tail.next().endswith("  z  user  m0")
    with Client(daemon.socket) as c:
        c.append("user", "before", session_tag="a")
    assert tail.next().endswith("  a  user  before")
    assert daemon.stop() == 0
    daemon.start()
    with Client(daemon.socket) as c:
        c.append("user", "after", session_tag="b")
    assert tail.next().endswith("  b  user  after")
    assert tail.interrupt() == (0, "")


def test_tail_f_json_says_when_it_resumed(daemon: Daemon, tails: list[Tail]) -> None:
    fill(daemon, "r", 1)
    tail = Tail(daemon, "--session", "r", "-n", "1", "--json")
    tails.append(tail)
    assert json.loads(tail.next())["content"] == "m0"
    # m0 is printed before the watch opens: one message through it first, so what
    # the restart interrupts is a watch (a first watch that opens late is no resume).
    with Client(daemon.socket) as c:
        c.append("user", "before", session_tag="r")
    before = json.loads(tail.next())
    assert before["content"] == "before"
    assert daemon.stop() == 0
    daemon.start()
    with Client(daemon.socket) as c:
        c.append("user", "after", session_tag="r")
    marker = json.loads(tail.next())
    assert set(marker) == {"resumed"} and isinstance(marker["resumed"]["after_id"], int)
    # It resumes from the last message printed (not from the one that follows).
    assert marker["resumed"]["after_id"] == before["id"]
    assert json.loads(tail.next())["content"] == "after"
    assert tail.interrupt() == (0, "")
