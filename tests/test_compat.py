"""nexusd.client.compat.NexusStore against the v1 store's own behaviour."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nexusd.client.compat import NexusStore
from tests.conftest import SEED, Daemon


def _load_v1() -> Any:
    spec = importlib.util.spec_from_file_location("nexus_store_v1", SEED)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _script(store: Any) -> list[Any]:
    """The same calls against either store; results minus volatile fields."""
    out: list[Any] = []
    a = store.append("user", "hello")
    # (v1's bare "12:00:00" is bad_request for the daemon: timestamps are RFC 3339 instants)
    b = store.append("assistant", "hi", timestamp="2026-11-26T07:41:50.406180Z")
    c = store.append("user", "elsewhere", session_tag="other")
    out.append([b - a, c - b])
    hist = store.get_history()
    out.append([(m["id"] - a, m["role"], m["content"], m["session_tag"]) for m in hist])
    out.append(sorted(hist[0].keys()))
    out.append(hist[1]["timestamp"])  # a caller's timestamp in the stored form is kept as given
    out.append(store.get_history(limit=1)[0]["content"])
    out.append(store.get_history("other", 10)[0]["content"])
    out.append(store.message_count())
    out.append(store.message_count("other"))
    out.append(store.message_count("nobody"))
    out.append(store.clear())
    out.append(store.get_history())
    out.append(store.clear_all())
    out.append(store.message_count("other"))
    store.close()
    store.close()  # idempotent
    return out


@pytest.mark.skipif(not SEED.exists(), reason="v1 seed store not beside the checkout")
def test_compat_matches_v1_semantics(daemon: Daemon, tmp_path: Path) -> None:
    v1 = _load_v1()
    expected = _script(v1.NexusStore(tmp_path / "v1.db"))
    got = _script(NexusStore(socket_path=daemon.socket))
    assert got == expected


def test_compat_retention_is_the_daemons(daemon: Daemon) -> None:
    store = NexusStore(socket_path=daemon.socket)
    for i in range(505):
        store.append("user", str(i))
    assert store.message_count() == 500
    assert store.get_history(limit=1000)[0]["content"] == "5"


def test_compat_reconnects_after_close(daemon: Daemon) -> None:
    store = NexusStore(socket_path=daemon.socket)
    store.append("u", "1")
    store.close()
    assert store.message_count() == 1


# ── importing connects nothing; the v1 singleton still works (issue 10) ──
def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


def test_importing_compat_makes_no_client(short_dir: Path) -> None:
    """Nothing happens at import: a bad environment surfaces at first use, not as an ImportError."""
    done = _python(
        "import nexusd.compat, nexusd.client.compat as cc\n"
        "from nexusd.compat import NexusStore\n"
        "assert 'nexus_store' not in vars(cc), 'made at import'\n"
        "try:\n"
        "    nexusd.compat.nexus_store\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc.field)\n",
        NEXUSD_TRUSTED_UIDS="not-a-uid",
        NEXUSD_SOCKET=str(short_dir / "none.sock"),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["BadRequest", "NEXUSD_TRUSTED_UIDS"]


def test_importing_compat_opens_no_connection(short_dir: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(short_dir / "s.sock"))
    listener.listen()
    listener.setblocking(False)
    with listener:
        done = _python(
            "import nexusd.compat\nfrom nexusd.compat import NexusStore, nexus_store\n",
            NEXUSD_SOCKET=str(short_dir / "s.sock"),
        )
        assert done.returncode == 0, done.stderr
        with pytest.raises(BlockingIOError):  # no connection is waiting to be accepted
            listener.accept()


def test_v1_code_using_the_module_singleton_keeps_working(daemon: Daemon) -> None:
    done = _python(
        "from nexusd.compat import nexus_store\n"
        "import nexusd.compat, nexusd.client.compat\n"
        "assert nexusd.compat.nexus_store is nexus_store is nexusd.client.compat.nexus_store\n"
        "a = nexus_store.append('user', 'via the singleton')\n"
        "print(a, nexus_store.message_count(), nexus_store.get_history()[-1]['content'])\n",
        NEXUSD_SOCKET=str(daemon.socket),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[1:] == ["1", "via", "the", "singleton"]


def test_the_singleton_is_one_store_even_when_threads_race_for_it() -> None:
    done = _python(
        "import threading\n"
        "import nexusd.client.compat as cc\n"
        "got, start = [], threading.Barrier(8)\n"
        "def take():\n"
        "    start.wait()\n"
        "    got.append(cc.nexus_store)\n"
        "ts = [threading.Thread(target=take) for _ in range(8)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "print(len({id(s) for s in got}))\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"
