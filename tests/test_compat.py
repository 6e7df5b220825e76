"""nexusd.client.compat.NexusStore against the v1 store's own behaviour."""

from __future__ import annotations

import importlib.util
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
