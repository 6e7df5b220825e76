"""The blocking client against a real daemon subprocess."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from nexusd import BadRequest, Client, DaemonNotRunning
from tests.conftest import Daemon

#: Every test on a daemon runs against SQLite and PostgreSQL storage (tests/conftest.py).
BOTH_BACKENDS = True


def test_sync_client_every_operation(shared_daemon: Daemon, tag: str, backend: str) -> None:
    with Client(shared_daemon.socket) as c:
        c.ping()
        a = c.append("user", "one", session_tag=tag, meta={"x": 1})
        ids = c.append_many(
            [
                ("assistant", "two"),
                {"role": "user", "content": "three", "timestamp": "2024-01-02T03:04:05Z"},
            ],
            session_tag=tag,
        )
        assert ids == [a + 1, a + 2]
        hist = c.get_history(tag)
        assert [(m.role, m.content) for m in hist] == [
            ("user", "one"),
            ("assistant", "two"),
            ("user", "three"),
        ]
        assert hist[0].meta == {"x": 1} and hist[2].timestamp.startswith("2024-01-02T03:04:05")
        assert [m.id for m in c.get_history(tag, 1, before_id=ids[1])] == [ids[0]]
        assert c.message_count(tag) == 3
        assert any(s.session_tag == tag and s.count == 3 for s in c.sessions())
        popped = c.pop(tag)
        assert popped is not None and popped.content == "three"
        assert c.clear(tag) == 2
        assert c.message_count(tag) == 0
        st = c.stats()
        assert "queue_depth" in st
        assert st["storage"].startswith("postgresql://") == (backend == "postgres")
        with pytest.raises(BadRequest):
            c.append("r" * 65, "x", session_tag=tag)
        assert c.append("ok", "after error", session_tag=tag) > 0


def test_sync_client_is_safe_to_share_between_threads(shared_daemon: Daemon, tag: str) -> None:
    errors: list[BaseException] = []
    with Client(shared_daemon.socket) as c:

        def work(t: int) -> None:
            try:
                for i in range(50):
                    c.append("user", f"{t}-{i}", session_tag=tag)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert c.message_count(tag) == 400


def test_sync_client_unreachable(short_dir: Path) -> None:
    with pytest.raises(DaemonNotRunning, match="nexusd serve"):
        Client(short_dir / "none.sock").ping()
